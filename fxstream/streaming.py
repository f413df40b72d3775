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
from .errors import SplitError, UnsupportedError
from .rewrite import ENGINE, build_head_graph, build_segment_graph, split_stem
from .runtime import ChainEngine, StreamEngine
from .tracing import trace

_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)
PROBE_SIZE = 1024
class _DefaultTile(int):
    """2048, but distinguishable from an explicit ``tile_size=2048`` (a budget may override it)."""

    def __repr__(self) -> str:
        return "2048"


_DEFAULT_TILE = _DefaultTile(2048)


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


def compile(model: nn.Module, tile_size=_DEFAULT_TILE, split: str | None = None,
            leaf_modules=(), input_shape=None, cuts=None, memory_budget=None,
            offload: bool = False, cudnn_benchmark: bool = False) -> StreamingModule:
    """Compile ``model`` into a :class:`StreamingModule` that streams its local stem.

    Args:
        model: an ``nn.Module`` traceable by torch.fx. BatchNorm in the stem must be in eval mode
            (see :func:`freeze_batchnorm`).
        tile_size: the largest input tile edge in pixels (int, or one per spatial axis).
        split: a node name or module qualname: stream only up to its output.
        leaf_modules: module classes or qualnames to keep as single calls when tracing.
        input_shape: an example ``(N, C, *spatial)``; by default the channels are read from the
            first layer and a 1024-pixel probe is used. Plans are made per input shape anyway.
        cuts: node names or module qualnames (``["layer1", "layer2"]``) after which the stem is
            cut: each segment is streamed on the stored full output of the one before, so the
            tiles' overlap nearly vanishes at the price of storing those maps (a multi-cut plan).
        memory_budget: bytes or a string like ``"8GiB"``: choose the cuts and tile size that
            minimise the estimated work under this peak memory (``input_shape`` should then be
            the real one). An explicit ``tile_size`` or ``cuts`` is kept. On the CPU the budget
            is the process's peak resident memory; for a model on CUDA it is the device's peak
            allocated memory (``torch.cuda.max_memory_allocated``), from what is allocated now.
            The plan counts one input image on top of the memory in use at this call, so compile
            before loading images (an image already loaded is counted twice: safe, but the plan
            is then slower than it needs to be).
        offload: with the model on CUDA, keep the stored cut maps of a multi-cut plan in pinned
            host memory (their gradients in host memory too); each segment then fetches its
            tiles from there, the next tile's copy overlapping the current tile's compute.
        cudnn_benchmark: with the model on CUDA, turn on ``torch.backends.cudnn.benchmark``
            inside the tile loops (restored after), so each tile shape is autotuned once. Off
            by default: cuDNN may then pick algorithms whose workspace no memory budget counts
            (on an H200, ResNet-18 at 4096² under a 1.75 GiB budget peaked at 33 GiB with it).
            A ``torch.backends.cudnn.benchmark`` the caller set is left as it is.
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
    tile_given = tile_size is not _DEFAULT_TILE
    tile_size = int(tile_size) if tile_size is _DEFAULT_TILE else tile_size
    if input_shape is None:
        input_shape = _probe_shape(model, leaf_modules)
    analysis = analyze(model, input_shape, split=split, leaf_modules=leaf_modules)
    _check_streamable(analysis)
    gm = analysis.graph_module
    boundary = stem_boundary(analysis)
    if memory_budget is not None:
        from .budget import choose_plan

        baseline = _device_baseline(model)
        choice = choose_plan(analysis, input_shape, memory_budget,
                             tile_size=tile_size if tile_given else None, cuts=cuts,
                             baseline=baseline, host_pool=baseline is None,
                             keep_graphs=not offload)
        cuts, tiles, pools = choice.cuts, choice.segment_tiles, choice.segment_pool
        keeps = choice.segment_keep
    cut_names = resolve_cuts(analysis, cuts or ())
    segments = split_stem(gm.graph, boundary, cut_names)
    if memory_budget is None:
        tiles, pools = [tile_size] * len(segments), [True] * len(segments)
        keeps = [False] * len(segments)
    engines = []
    for (source, names, outputs), tile_size, pool in zip(segments, tiles, pools):
        graph = build_segment_graph(gm.graph, source, names, outputs)
        stem = fx.GraphModule(gm, graph, "Stem")
        if len(segments) == 1:
            seg_analysis, order = analysis, outputs
        else:  # each segment's geometry relative to the stored map it starts from
            shape = passes.concrete_shape({n.name: n for n in gm.graph.nodes}[source])
            seg_analysis = analyze(stem, shape, leaf_modules=leaf_modules)
            out = next(n for n in seg_analysis.graph_module.graph.nodes if n.op == "output")
            order = tuple(a.name for a in out.args[0])
        engines.append(_engine(stem, seg_analysis, order, tile_size, pool))
    for e in engines:
        e.cudnn_benchmark = bool(cudnn_benchmark)
    for e, keep in zip(engines[:-1], keeps):
        e.offload, e.keep = bool(offload), bool(keep)
    engine = engines[0] if len(engines) == 1 else ChainEngine(engines, cut_names)
    head = build_head_graph(gm.graph, boundary)
    return StreamingModule(model, head, engine, analysis)


def _device_baseline(model: nn.Module):
    """For a model on CUDA, the memory already allocated there (the budget's baseline); None on
    the CPU (the process's resident memory is used)."""
    for p in model.parameters():
        if p.device.type == "cuda":
            return torch.cuda.memory_allocated(p.device)
        break
    return None


def stem_boundary(analysis: Analysis) -> passes.Boundary:
    gm = analysis.graph_module
    stem = tuple(n.name for n in gm.graph.nodes
                 if n.meta.get(passes.ROLE) in ("stem", "boundary"))
    return passes.Boundary(stem=stem, tensors=analysis.boundary, split=analysis.split)


def resolve_cuts(analysis: Analysis, cuts) -> tuple[str, ...]:
    """Node names or module qualnames -> valid cut nodes in topological order."""
    gm = analysis.graph_module
    if isinstance(cuts, str):
        cuts = (cuts,)
    valid = passes.cut_candidates(gm.graph, stem_boundary(analysis))
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    names = []
    for cut in cuts:
        try:
            node = passes.resolve_split(gm.graph, cut)
        except passes.SplitError as e:
            raise SplitError(f"cuts: {e}") from e
        if node.name not in valid:
            raise SplitError(
                f"cannot cut the stem at {cut!r} (node '{node.name}'): a cut must be a single "
                "stem tensor that every later stem node reaches only through it. Valid cuts: "
                f"{', '.join(valid[:12])}{' ...' if len(valid) > 12 else ''}")
        names.append(node.name)
    return tuple(sorted(set(names), key=order.__getitem__))


def _engine(stem: fx.GraphModule, analysis: Analysis, outputs, tile_size,
            pool: bool = True) -> StreamEngine:
    """A :class:`StreamEngine` over one segment, planned from that segment's own geometry."""
    nodes = {n.name: n for n in analysis.graph_module.graph.nodes}
    dims = [nodes[b].meta[GEOMETRY].dims for b in outputs]
    ranks = [len(passes.concrete_shape(nodes[b]) or ()) for b in outputs]
    if any(r == 0 for r in ranks):
        raise UnsupportedError(f"a boundary value is not a single tensor: {tuple(outputs)}")
    batchnorms = [(name, m) for name, m in stem.named_modules() if isinstance(m, _BATCHNORM)]
    input_shape = analysis.input_shape

    def planner(shape):
        return make_plan(analysis, shape, tile_size, names=outputs)

    planner(tuple(input_shape))  # fail early on a bad tile_size
    engine = StreamEngine(stem, planner, dims, ranks, tuple(outputs), batchnorms,
                          input_shape[1], len(input_shape) - 2, tile_size, pool_backward=pool)
    engine.copy_input = not all(passes.only_read(n, stem) for n in stem.graph.nodes
                                if n.op == "placeholder")
    return engine


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
