"""``fxstream.compile``: a model in, a :class:`StreamingModule` out."""
from __future__ import annotations

import types
from collections import OrderedDict

import torch
import torch.fx as fx
import torch.nn as nn

import passes
from passes import GEOMETRY, Local, NonLocal

from .analysis import Analysis, analyze, make_plan
from .errors import UnsupportedError
from .rewrite import ENGINE, build_head_graph, build_stem_graph
from .runtime import StreamEngine
from .tracing import trace

_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)
PROBE_SIZE = 1024


class StreamingModule(fx.GraphModule):
    """The user's model with its local stem streamed tile by tile.

    A ``torch.fx.GraphModule``: ``print(sm.code)`` shows the generated forward. Its parameters,
    buffers and ``state_dict`` keys are the model's own (shared, not copied), so optimisers and
    checkpoints work unchanged. ``sm.analysis`` is the :class:`~fxstream.Analysis` it was built
    from.
    """

    def __init__(self, model: nn.Module, head: fx.Graph, engine: StreamEngine,
                 analysis: Analysis):
        root = {ENGINE: engine}
        for node in head.nodes:
            if node.op in ("call_module", "get_attr") and node.target != ENGINE:
                root[node.target] = _resolve(model, node.target)
        super().__init__(root, head, class_name=f"Streaming{type(model).__name__}")
        # exactly the model's own children, parameters and buffers: state_dict stays compatible
        self._modules = OrderedDict(list(model._modules.items()) + [(ENGINE, engine)])
        self._parameters = OrderedDict(model._parameters)
        self._buffers = OrderedDict(model._buffers)
        self._non_persistent_buffers_set = set(model._non_persistent_buffers_set)
        self.training = model.training
        object.__setattr__(self, "analysis", analysis)

    @property
    def engine(self) -> StreamEngine:
        return self._modules[ENGINE]

    def plan(self, input_shape):
        """The lowered tile plan used for an input of this shape."""
        return self.engine.exec_plan(torch.empty(tuple(input_shape), device="meta"))


def _resolve(model, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def compile(model: nn.Module, tile_size=2048, split: str | None = None, leaf_modules=(),
            input_shape=None) -> StreamingModule:
    """Compile ``model`` into a :class:`StreamingModule` that streams its local stem.

    Args:
        model: an ``nn.Module`` traceable by torch.fx. BatchNorm in the stem must be in eval mode
            (see :func:`freeze_batchnorm`).
        tile_size: the largest input tile edge in pixels (int, or one per spatial axis).
        split: a node name or module qualname: stream only up to its output.
        leaf_modules: module classes or qualnames to keep as single calls when tracing.
        input_shape: an example ``(N, C, *spatial)``; by default the channels are read from the
            first layer and a 1024-pixel probe is used. Plans are made per input shape anyway.
    Returns:
        a :class:`StreamingModule` computing what ``model`` computes.

    Example:
        >>> import torch, torch.nn as nn, fxstream
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        >>> sm = fxstream.compile(net, tile_size=32)
        >>> x = torch.randn(1, 3, 100, 100)
        >>> torch.allclose(sm(x), net(x), atol=1e-6)
        True
    """
    if input_shape is None:
        input_shape = _probe_shape(model, leaf_modules)
    analysis = analyze(model, input_shape, split=split, leaf_modules=leaf_modules)
    _check_streamable(analysis)
    gm = analysis.graph_module
    boundary = passes.Boundary(
        stem=tuple(n.name for n in gm.graph.nodes if n.meta.get(passes.ROLE) in ("stem",
                                                                                    "boundary")),
        tensors=analysis.boundary, split=split)
    stem = fx.GraphModule(gm, build_stem_graph(gm.graph, boundary), "Stem")
    head = build_head_graph(gm.graph, boundary)
    nodes = {n.name: n for n in gm.graph.nodes}
    dims = [nodes[b].meta[GEOMETRY].dims for b in analysis.boundary]
    ranks = [len(passes.concrete_shape(nodes[b]) or ()) for b in analysis.boundary]
    if any(r == 0 for r in ranks):
        raise UnsupportedError("a boundary value is not a single tensor: "
                               f"{analysis.boundary}")
    batchnorms = [(name, m) for name, m in stem.named_modules() if isinstance(m, _BATCHNORM)]
    n_spatial = len(input_shape) - 2

    def planner(shape):
        return make_plan(analysis, shape, tile_size)

    engine = StreamEngine(stem, planner, dims, ranks, analysis.boundary, batchnorms,
                          input_shape[1], n_spatial)
    planner(tuple(input_shape))  # fail early on a bad tile_size
    return StreamingModule(model, head, engine, analysis)


def _probe_shape(model, leaf_modules):
    """``(1, C, 1024, ...)`` with C and the spatial rank read from the first layer."""
    gm = trace(model, leaf_modules)
    image = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    for node in gm.graph.nodes:
        if node.op == "call_module" and image in node.all_input_nodes:
            m = gm.get_submodule(node.target)
            if isinstance(m, (nn.modules.conv._ConvNd,)):
                return (1, m.in_channels) + (PROBE_SIZE,) * len(m.kernel_size)
    raise UnsupportedError("cannot tell the input's channels from the model's first layer; "
                           "pass input_shape=(N, C, H, W) to fxstream.compile")


def _check_streamable(analysis: Analysis):
    gm = analysis.graph_module
    blocked = []
    for node in gm.graph.nodes:
        g = node.meta.get(GEOMETRY)
        if isinstance(g, NonLocal) and g.kind == "train_batchnorm" and g.origin == node.name:
            if any(isinstance(i.meta.get(GEOMETRY), Local) for i in node.all_input_nodes):
                blocked.append(passes.qualname(node) or node.name)
    if blocked:
        raise UnsupportedError(
            f"train-mode BatchNorm where the stem would continue ({', '.join(blocked[:4])}"
            f"{', ...' if len(blocked) > 4 else ''}): batch statistics span the whole image. "
            "Call fxstream.freeze_batchnorm(model) before compiling (eval-mode statistics, "
            "affine parameters still trained), or model.eval()")


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Put every BatchNorm of ``model`` in eval mode for good; their affine parameters still train.

    ``model.train()`` afterwards leaves them in eval mode. Returns ``model``.

    Example:
        >>> import torch.nn as nn, fxstream
        >>> net = fxstream.freeze_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
        >>> net.train()[1].training
        False
    """
    for m in model.modules():
        if isinstance(m, _BATCHNORM):
            m.eval()
            m.train = types.MethodType(_stay_eval, m)
    return model


def _stay_eval(self, mode: bool = True):
    return nn.Module.train(self, False)


__all__ = ["StreamingModule", "compile", "freeze_batchnorm"]
