"""What a plan costs, in the numbers the report shows: tiles, margins, overlap, redundancy, memory.

Compute, then render: :func:`summarize` reads a :class:`~fxstream.plans.Plan` and its analysis
and returns plain numbers; :mod:`fxstream.report` only formats them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import passes

from .analysis import Analysis, jsonable
from .plans import Plan
from .segments import split_segments, whole_step


@dataclass(frozen=True)
class PassSummary:
    """One pass of a plan."""

    index: int
    source: str
    outputs: tuple[str, ...]
    sums: tuple[str, ...]  # whole-image reductions it sums
    reads: tuple[str, ...]  # statistics (and other inputs) it reads whole
    tile_size: tuple[int | None, ...]
    tiles_per_axis: tuple[int, ...]
    num_tiles: int
    max_tile: tuple[int, ...]  # the largest input tile per axis
    margin: tuple[int, ...]  # context needed on each side of a tile's outputs, per axis
    overlap: tuple[int, ...]  # largest overlap of neighbouring input tiles, per axis
    redundancy: float
    view_input: bool
    pool: bool
    keep: bool


@dataclass(frozen=True)
class PlanSummary:
    """A plan for one input shape, as the report shows it."""

    input_shape: tuple[int, ...]
    passes: tuple[PassSummary, ...]
    cuts: tuple[str, ...]
    stored_bytes: int  # the cut maps' bytes
    full_activation_bytes: int  # every stem tensor on the whole image
    tile_activation_bytes: int  # every stem tensor on the first pass's largest tile
    budget: int | None = None
    estimated_peak: int | None = None
    baseline: int | None = None
    work: float | None = None  # estimated stem work / the full image's
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return jsonable(asdict(self))


def summarize(analysis: Analysis, plan: Plan) -> PlanSummary:
    """The numbers of ``plan`` (made for ``analysis``) that the report shows."""
    segments = split_segments(analysis, plan.cuts)
    nodes = {n.name: n for n in analysis.graph_module.graph.nodes}
    rows = []
    for p in plan.passes:
        seg = segments[p.segment]
        step = whole_step(analysis, seg) if p.whole else seg.steps[p.step]
        n_axes = len(seg.sizes)
        spans = [sorted({(t.starts[k], t.lengths[k]) for t in p.tiles}) for k in range(n_axes)]
        overlap = tuple(max([a[0] + a[1] - b[0] for a, b in zip(s, s[1:])], default=0)
                        for s in spans)
        margin = tuple(max(math.ceil(max(-g.lo, g.hi)) for g in step.geometry[k])
                       for k in range(n_axes))
        rows.append(PassSummary(
            index=p.index, source=p.source, outputs=tuple(o.name for o in p.outputs),
            sums=tuple(s.name for s in p.sums), reads=tuple(p.side_inputs),
            tile_size=p.tile_size, tiles_per_axis=tuple(len(s) for s in spans),
            num_tiles=p.num_tiles, max_tile=tuple(max(length for _, length in s) for s in spans),
            margin=margin, overlap=overlap, redundancy=p.redundancy, view_input=p.view_input,
            pool=p.pool, keep=p.keep))
    full, tile = activation_bytes(analysis, rows[0].max_tile if rows else None)
    est = plan.estimate
    return PlanSummary(
        input_shape=plan.input_shape, passes=tuple(rows), cuts=plan.cuts,
        stored_bytes=sum(_bytes(nodes[c]) for c in plan.cuts),
        full_activation_bytes=full, tile_activation_bytes=tile, budget=plan.budget,
        estimated_peak=est.peak if est else None, baseline=est.baseline if est else None,
        work=est.work if est else None, notes=plan.notes)


def _bytes(node) -> int:
    tm = node.meta.get("tensor_meta")
    return math.prod(tm.shape) * tm.dtype.itemsize if hasattr(tm, "shape") else 0


def activation_bytes(analysis: Analysis, tile_lengths=None):
    """Bytes of all stem tensors on the whole image, and on one tile of the given lengths."""
    symbols = passes.input_symbols(len(analysis.input_shape) - 2)
    tile_values = dict(zip(symbols, tile_lengths or analysis.input_shape[2:]))
    cache = {}
    full = tile = 0
    for node in analysis.graph_module.graph.nodes:
        g = node.meta.get(passes.GEOMETRY)
        shape = passes.concrete_shape(node)
        if node.meta.get(passes.ROLE) not in ("stem", "boundary") or shape is None or \
                not isinstance(g, passes.Local):
            continue
        tshape = list(shape)
        for ax, d in zip(g.axes, g.dims):
            if ax.size not in cache:
                cache[ax.size] = max(0, int(ax.size.subs(tile_values)))
            tshape[d] = cache[ax.size]
        itemsize = node.meta["tensor_meta"].dtype.itemsize
        full += math.prod(shape) * itemsize
        tile += math.prod(tshape) * itemsize
    return full, tile


__all__ = ["PassSummary", "PlanSummary", "activation_bytes", "summarize"]
