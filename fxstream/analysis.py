"""``fxstream.analyze``: the analysis pipeline and the :class:`Analysis` it returns."""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import sympy
import torch
import torch.fx as fx
import torch.nn as nn

import passes
from passes import GEOMETRY, ROLE, Local, NonLocal, Symbolic

from .errors import GeometryError, PlanError, SplitError, UnsupportedError
from .plan import AxisGeometry, TilePlan, plan_tiles
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
class PlanSummary:
    """What a tile plan costs: tiles, margins, redundancy, estimated activation memory."""

    tile_size: tuple[int, ...]
    tiles_per_axis: tuple[int, ...]
    num_tiles: int
    max_tile: tuple[int, ...]
    margin: tuple[int, ...]
    overlap: tuple[int, ...]
    redundancy: float
    full_activation_bytes: int
    tile_activation_bytes: int


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
    plan: PlanSummary | None = None
    budget_plan: object | None = None  # a fxstream.budget.PlanChoice when a budget was given
    graph_module: fx.GraphModule | None = field(default=None, repr=False, compare=False)

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
        return _jsonable(d)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def analyze(model: nn.Module, input_shape, tile_size=None, split: str | None = None,
            leaf_modules=(), dtype: torch.dtype | None = None, memory_budget=None,
            cuts=None) -> Analysis:
    """Trace ``model``, derive every node's geometry, find the stem/head boundary.

    Args:
        model: any ``nn.Module`` that torch.fx can trace (its current train/eval mode counts).
        input_shape: ``(N, C, *spatial)`` of the image, e.g. ``(1, 3, 8192, 8192)``.
        tile_size: largest input tile edge (int or one per axis); adds a plan summary.
        split: a node name or module qualname whose output becomes the boundary.
        leaf_modules: module classes or qualnames to keep as single calls when tracing.
        dtype: dtype of the image (default: the model's parameter dtype).
        memory_budget: bytes or ``"8GiB"``: choose cuts and tile size as
            ``fxstream.compile(memory_budget=...)`` would, and report them (``budget_plan``);
            ``tile_size``/``cuts`` then fix that part of the choice.
        cuts: with ``memory_budget``, fixed cut points.
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
    dtype = dtype or _param_dtype(model)
    # 1. trace the model into an fx graph (stack traces and qualnames kept)
    gm = trace(model, leaf_modules)
    # 2. concrete shapes at this input size, on fake tensors
    _propagate_shapes(gm, input_shape, dtype)
    # 3. geometry of every node (sympy), or the reason it is not local
    symbols = passes.infer_geometry(gm, input_shape)
    # 4. the stem and the boundary tensors it hands to the head
    boundary = _find_boundary(gm, split)
    _check_invariants(gm, boundary)
    rows = tuple(_row(gm, node) for node in gm.graph.nodes if node.op != "output")
    alignment = _alignment(gm, boundary)
    analysis = Analysis(
        model=type(model).__name__, input_shape=tuple(input_shape), dtype=str(dtype),
        symbols=tuple(str(s) for s in symbols), rows=rows, boundary=boundary.tensors,
        alignment=alignment, split=split, graph_module=gm,
    )
    # 5. with a memory budget: the multi-cut plan and tile size the runtime would choose
    if memory_budget is not None:
        from dataclasses import replace

        from .budget import choose_plan

        choice = choose_plan(analysis, input_shape, memory_budget, tile_size=tile_size,
                             cuts=cuts)
        analysis = replace(analysis, budget_plan=choice)
        tile_size = None if choice.cuts else choice.tile_size
    # 6. the one-segment tile plan's summary, when a tile size is given
    if tile_size is not None:
        plan = make_plan(analysis, input_shape, tile_size)
        analysis = _with_plan(analysis, plan, tile_size)
    return analysis


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


def _param_dtype(model):
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _propagate_shapes(gm, input_shape, dtype):
    try:
        passes.propagate_shapes(gm, input_shape, dtype)
    except passes.ShapePropagationError as e:
        node = e.node
        raise GeometryError(
            f"the model fails on an input of shape {tuple(input_shape)} at node '{node.name}' "
            f"({passes.qualname(node) or 'top level'}; {passes.source_line(node)}): "
            f"{e.cause}") from e.cause


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
        if not isinstance(g, (Local, Symbolic)):
            raise GeometryError(f"internal: stem node '{name}' has no local geometry")
    stem = set(boundary.stem)
    for name in boundary.stem:
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
    if isinstance(g, NonLocal):
        return NodeRow(local=False, reason=g.reason, origin=g.origin, **common)
    return NodeRow(local=isinstance(g, Symbolic), **common)


# ---------------------------------------------------------------------------------------------
# plans


def boundary_geometry(analysis: Analysis, input_shape, names=None) -> list[list[AxisGeometry]]:
    """Per axis, the plain-number geometry of each boundary tensor at this input size."""
    gm = analysis.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    symbols = passes.input_symbols(len(input_shape) - 2)
    values = dict(zip(symbols, input_shape[2:]))
    per_axis = [[] for _ in symbols]
    for name in analysis.boundary if names is None else names:
        g = nodes[name].meta[GEOMETRY]
        for k, ax in enumerate(g.axes):
            size = int(ax.size.subs(values))
            # lo/hi may depend on the size's residue (a crop by a shape-derived amount)
            lo, hi = (_frac(sympy.sympify(v).subs(values)) for v in (ax.lo, ax.hi))
            per_axis[k].append(AxisGeometry(_frac(ax.stride), lo, hi, size))
    return per_axis


def _frac(x) -> Fraction:
    n, d = sympy.fraction(sympy.Rational(x))
    return Fraction(int(n), int(d))


def make_plan(analysis: Analysis, input_shape, tile_size, names=None) -> TilePlan:
    """The :class:`TilePlan` for one input shape (plain integers from the symbolic geometry).

    ``names`` orders the boundary tensors (default: ``analysis.boundary``)."""
    sizes = tuple(input_shape[2:])
    _check_stem_sizes(analysis, input_shape)
    geos = boundary_geometry(analysis, input_shape, names)
    return plan_tiles(sizes, analysis.alignment, geos, tile_size)


def _check_stem_sizes(analysis: Analysis, input_shape):
    """Every stem tensor must be non-empty on this image (else the image is too small)."""
    gm = analysis.graph_module
    symbols = passes.input_symbols(len(input_shape) - 2)
    values = dict(zip(symbols, input_shape[2:]))
    seen = {}
    for node in gm.graph.nodes:
        g = node.meta.get(GEOMETRY)
        if node.meta.get(ROLE) not in ("stem", "boundary") or not isinstance(g, Local):
            continue
        for k, ax in enumerate(g.axes):
            if ax.size not in seen:
                seen[ax.size] = int(ax.size.subs(values))
            if seen[ax.size] < 1:
                raise PlanError(
                    f"the image {tuple(input_shape)} is too small for the stem: "
                    f"'{node.name}' ({passes.qualname(node) or node.op}) would have size "
                    f"{seen[ax.size]} on axis {k} (size = {ax.size}); use a larger image")


def smallest_tile_size(analysis: Analysis, input_shape) -> tuple[int, ...]:
    """Per spatial axis, the smallest ``tile_size`` that has a legal plan for this input."""
    from .plan import smallest_tile

    return smallest_tile(tuple(input_shape[2:]), analysis.alignment,
                         boundary_geometry(analysis, input_shape))


def _with_plan(analysis: Analysis, plan: TilePlan, tile_size) -> Analysis:
    from dataclasses import replace

    n = len(plan.axes)
    tiles = (tile_size,) * n if isinstance(tile_size, int) else tuple(tile_size)
    margin, overlap = [], []
    for ax in plan.axes:
        spans = ax.spans
        overlap.append(max([spans[i].stop - spans[i + 1].start for i in range(len(spans) - 1)],
                           default=0))
    for geos in boundary_geometry(analysis, analysis.input_shape):
        margin.append(max(math.ceil(max(-g.lo, g.hi)) for g in geos))
    itemsize = torch.empty((), dtype=_dtype(analysis.dtype)).element_size()
    full, tile = activation_bytes(analysis, analysis.input_shape,
                                  [ax.max_length for ax in plan.axes], itemsize)
    summary = PlanSummary(
        tile_size=tiles, tiles_per_axis=tuple(len(a.spans) for a in plan.axes),
        num_tiles=plan.num_tiles, max_tile=tuple(a.max_length for a in plan.axes),
        margin=tuple(margin), overlap=tuple(overlap), redundancy=round(plan.redundancy, 4),
        full_activation_bytes=full, tile_activation_bytes=tile)
    return replace(analysis, plan=summary)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


def stem_tensors(analysis: Analysis):
    """``(node, Local geometry, concrete shape)`` of every stem tensor, in graph order."""
    for node in analysis.graph_module.graph.nodes:
        g = node.meta.get(GEOMETRY)
        if node.meta.get(ROLE) not in ("stem", "boundary") or not isinstance(g, Local):
            continue
        shape = passes.concrete_shape(node)
        if shape is not None:
            yield node, g, shape


def itemsize(analysis: Analysis) -> int:
    """Bytes per element of the analysed dtype."""
    return torch.empty((), dtype=_dtype(analysis.dtype)).element_size()


def activation_bytes(analysis: Analysis, input_shape, tile_lengths, itemsize):
    """Bytes of all stem activations on the whole image, and on one tile of the given size."""
    symbols = passes.input_symbols(len(input_shape) - 2)
    tile_values = dict(zip(symbols, tile_lengths))
    cache = {}

    def evaluate(expr, values, key):
        k = (expr, key)
        if k not in cache:
            cache[k] = max(0, int(expr.subs(values)))
        return cache[k]

    full = tile = 0
    for node, g, shape in stem_tensors(analysis):
        numel = math.prod(shape)
        tshape = list(shape)
        for ax, d in zip(g.axes, g.dims):
            tshape[d] = evaluate(ax.size, tile_values, "tile")
        full += numel * itemsize
        tile += math.prod(tshape) * itemsize
    return full, tile
