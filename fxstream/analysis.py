"""``fxstream.analyze``: trace, shapes, geometry, boundary, and the :class:`Analysis` they give.

The analysis is computed once per model mode and input shape and holds no plan: planning is
:mod:`fxstream.planner`'s job, and the report asks it for a plan when it shows one.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

import passes
from passes import GEOMETRY, ROLE, Local, NonLocal, Symbolic

from .errors import GeometryError, SplitError, UnsupportedError
from .tracing import trace


@dataclass(frozen=True)
class NodeRow:
    """One node of the analysed graph, as users see it."""

    name: str
    op: str
    qualname: str
    role: str  # input | stem | boundary | head | constant
    local: bool
    shape: tuple[int, ...] | None
    stride: tuple[str, ...] = ()
    receptive_field: tuple[str, ...] = ()
    interval: tuple[tuple[str, str], ...] = ()
    size: tuple[str, ...] = ()
    align: int | None = None
    reason: str = ""
    origin: str = ""
    source: str = ""

    @property
    def changes_geometry(self) -> bool:
        return bool(self.stride)


@dataclass(frozen=True)
class Analysis:
    """Result of :func:`analyze`. ``to_dict()`` is JSON-ready; ``graph_module`` is annotated."""

    model: str
    input_shape: tuple[int, ...]
    dtype: str
    symbols: tuple[str, ...]
    rows: tuple[NodeRow, ...]
    boundary: tuple[str, ...]
    alignment: tuple[int, ...]
    split: str | None = None
    # floating-point operations of one forward (torch.utils.flop_counter: convolutions and
    # matrix products), of the whole model and of its stem
    total_flops: int = 0
    stem_flops: int = 0
    graph_module: fx.GraphModule | None = field(default=None, repr=False, compare=False)

    @property
    def size_values(self) -> dict:
        """The input's spatial size symbols (``passes.input_symbols``) -> their values here."""
        symbols = passes.input_symbols(len(self.input_shape) - 2)
        return dict(zip(symbols, self.input_shape[2:]))

    @property
    def stem_share(self) -> float | None:
        """The stem's share of the model's forward work (None for a model without any)."""
        return self.stem_flops / self.total_flops if self.total_flops else None

    @property
    def image_in_boundary(self) -> bool:
        """Whether the head reads the image itself (it is then handed over without a copy)."""
        return bool(self.rows) and self.rows[0].name in self.boundary

    @property
    def boundary_rows(self) -> list[NodeRow]:
        by_name = {r.name: r for r in self.rows}
        return [by_name[n] for n in self.boundary]

    @property
    def global_rows(self) -> list[NodeRow]:
        """Nodes where non-locality starts (not those that merely depend on one)."""
        return [r for r in self.rows if r.role == "head" and r.origin == r.name]

    def row(self, name: str) -> NodeRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("graph_module")
        return jsonable(d)


def jsonable(x):
    """Dicts, lists and tuples made JSON-ready (tuples become lists), recursively."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def analyze(model: nn.Module, input_shape, split: str | None = None, leaf_modules=(),
            dtype: torch.dtype | None = None, extra_inputs=None) -> Analysis:
    """Trace ``model``, derive every node's geometry, find the stem/head boundary.

    Args:
        model: any ``nn.Module`` that torch.fx can trace (its current train/eval mode counts).
        input_shape: ``(N, C, *spatial)`` of the image, e.g. ``(1, 3, 8192, 8192)``.
        split: a node name or module qualname whose output becomes the boundary.
        leaf_modules: module classes or qualnames to keep as single calls when tracing.
        dtype: dtype of the image (default: the model's parameter dtype; a ``uint8`` image is
            analysed as ``uint8``, and the model's own conversion is part of the stem).
        extra_inputs: values of the model's other arguments, in order (default: their defaults
            in ``forward``, else None).
    Returns:
        an :class:`Analysis`.

    Example:
        >>> import torch.nn as nn, fxstream
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1))
        >>> a = fxstream.analyze(net, (1, 3, 64, 64))
        >>> a.boundary, a.row(a.boundary[0]).stride
        (('_1',), ('2', '2'))
    """
    input_shape = check_input_shape(input_shape)
    dtype = dtype or param_dtype(model)
    # 1. trace the model into an fx graph (stack traces and qualnames kept)
    gm = trace(model, leaf_modules)
    return analyze_traced(gm, type(model).__name__, input_shape, dtype, split, extra_inputs)


def analyze_traced(gm: fx.GraphModule, name: str, input_shape, dtype: torch.dtype,
                   split: str | None = None, extra_inputs=None) -> Analysis:
    """The analysis of a freshly traced graph (``gm``'s nodes get their meta written)."""
    input_shape = check_input_shape(input_shape)
    # 2. concrete shapes and work at this input size, on the meta device; norms over the
    # image's statistics are taken apart (a reduction, then a pointwise step)
    _propagate_shapes(gm, input_shape, dtype, extra_inputs)
    if passes.decompose_statistics(gm):
        _propagate_shapes(gm, input_shape, dtype, extra_inputs)
    # 3. geometry of every node (sympy), or the reason it is not local
    symbols = passes.infer_geometry(gm, input_shape)
    _check_failures(gm, input_shape, dtype)
    # 4. the stem and the boundary tensors it hands to the head
    boundary = _find_boundary(gm, split)
    _check_invariants(gm, boundary)
    rows = tuple(_row(gm, node) for node in gm.graph.nodes if node.op != "output")
    stem = set(boundary.stem)
    flops = {n.name: n.meta.get(passes.WORK, 0) for n in gm.graph.nodes}
    return Analysis(
        model=name, input_shape=tuple(input_shape), dtype=str(dtype),
        symbols=tuple(str(s) for s in symbols), rows=rows, boundary=boundary.tensors,
        alignment=_alignment(gm, boundary), split=split, total_flops=sum(flops.values()),
        stem_flops=sum(v for k, v in flops.items() if k in stem), graph_module=gm,
    )


def check_input_shape(input_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise UnsupportedError(f"input_shape must be a tuple of ints like (1, 3, 1024, 1024), "
                               f"got {input_shape!r}") from None
    if len(shape) < 3 or any(s <= 0 for s in shape):
        raise UnsupportedError(f"input_shape must be (N, C, *spatial) with positive sizes and at "
                               f"least one spatial axis, got {shape}")
    return shape


def param_dtype(model) -> torch.dtype:
    """The dtype of the model's first floating parameter (float32 without one)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _propagate_shapes(gm, input_shape, dtype, extra_inputs):
    try:
        passes.propagate_shapes(gm, input_shape, dtype, extra_inputs)
    except passes.ShapePropagationError as e:
        raise _failed(e.node, input_shape, dtype, str(e.cause)) from e.cause


def _failed(node, input_shape, dtype, error: str) -> GeometryError:
    """The error for a model that fails at ``node``, with what most often causes it."""
    image = next((n for n in node.graph.nodes if n.op == "placeholder"), None)
    missing = next((i.name for i in node.all_input_nodes if i.op == "placeholder"
                    and i is not image and i.meta.get("tensor_meta") is None), None)
    hint = (f"it reads the model's argument '{missing}', which was not given: a stem that "
            f"reads other arguments is planned when the model is called with them"
            if missing else _hint(dtype))
    err = GeometryError(
        f"the model fails on an input of shape {tuple(input_shape)} at node '{node.name}' "
        f"({passes.qualname(node) or 'top level'}; {passes.source_line(node)}): {error} "
        f"({hint})")
    err.missing_argument = missing
    return err


def _hint(dtype) -> str:
    """What most often makes a model fail on a valid image of this dtype."""
    if dtype is not None and not dtype.is_floating_point and not dtype.is_complex:
        return (f"the image is {dtype}, as stored: convert it in the model's forward, e.g. "
                f"x = x.float() / 255, or is the image too small for the model?")
    return "is the image too small for the model?"


def _check_failures(gm, input_shape, dtype=None):
    """A node that failed on the meta device is an error unless it lies past a non-local node
    or a whole-image reduction (in the head, which runs as the model does: a join of the
    pooled features with another input, a ``.item()``)."""
    for node in gm.graph.nodes:
        error = node.meta.get(passes.SHAPE_ERROR)
        if error is None:
            continue
        if not any(isinstance(i.meta.get(GEOMETRY), (NonLocal, passes.Reduced))
                   for i in node.all_input_nodes):
            raise _failed(node, input_shape, dtype,
                          f"{type(error).__name__}: {error}") from error


def _find_boundary(gm, split):
    try:
        boundary = passes.find_boundary(gm, split)
    except passes.SplitError as e:
        where = ""
        if e.node is not None:
            node = {n.name: n for n in gm.graph.nodes}[e.node]
            where = f" (module '{passes.qualname(node)}', {passes.source_line(node)})"
        raise SplitError(f"{e}{where}. Hint: choose an earlier module, e.g. one listed as stem "
                         "by `fxstream analyze --all-nodes`") from e
    if not boundary.tensors:
        raise UnsupportedError("nothing to stream: no node of the model is local in the image "
                               "(does the model take the image as its first argument?)")
    return boundary


def _check_invariants(gm, boundary):
    gm.graph.lint()
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in boundary.stem:
        g = nodes[name].meta.get(GEOMETRY)
        if not isinstance(g, (Local, Symbolic, passes.Reduced)):
            raise GeometryError(f"internal: stem node '{name}' has no local geometry")
    stem = set(boundary.stem)
    for name in boundary.stem:
        if isinstance(nodes[name].meta.get(GEOMETRY), passes.Reduced):
            continue  # statistics: small values the head may read as they are
        for user in nodes[name].users:
            dead_check = user.meta.get(ROLE) == "constant" and not user.users
            if user.name not in stem and name not in boundary.tensors and not dead_check:
                raise GeometryError(f"internal: '{name}' leaves the stem but is no boundary")


def _alignment(gm, boundary) -> tuple[int, ...]:
    nodes = {n.name: n for n in gm.graph.nodes}
    aligns = None
    for name in boundary.stem:
        g = nodes[name].meta[GEOMETRY]
        if isinstance(g, Local):
            a = [int(ax.align) for ax in g.axes]
            aligns = a if aligns is None else [math.lcm(x, y) for x, y in zip(aligns, a)]
    return tuple(aligns or ())


@functools.lru_cache(maxsize=4096)
def _fmt(x) -> str:
    """sympy's printer is slow and many nodes share a few expressions: print each once."""
    return str(x)


def _row(gm, node) -> NodeRow:
    g = node.meta.get(GEOMETRY)
    role = node.meta.get(ROLE, "head")
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    shape = passes.concrete_shape(node)
    common = dict(name=node.name, op=passes.target_name(node, module) if node.op != "placeholder"
                  else "input", qualname=passes.qualname(node),
                  role="input" if node.op == "placeholder" and isinstance(g, Local) else role,
                  shape=shape, source=passes.source_line(node))
    if isinstance(g, Local):
        return NodeRow(
            local=True, stride=tuple(_fmt(a.stride) for a in g.axes),
            receptive_field=tuple(_fmt(a.receptive_field) for a in g.axes),
            interval=tuple((_fmt(a.lo), _fmt(a.hi)) for a in g.axes),
            size=tuple(_fmt(a.size) for a in g.axes), align=g.align, **common)
    if isinstance(g, (NonLocal, passes.Reduced)):
        return NodeRow(local=False, reason=g.reason, origin=g.origin, **common)
    return NodeRow(local=isinstance(g, Symbolic), **common)
