"""Tile plans in plain integers: the owner ranges and input regions of one streamed map.

Per spatial axis, the map ``[0, size)`` is cut at multiples of the alignment into owner ranges
``[c_t, c_t+1)``. Tile *t* owns the outputs ``g`` of each output tensor with ``g*J`` in its range;
its input region ``[A, B)`` is the hull of their dependencies with ``A`` snapped down to the
alignment and ``B - A`` congruent to ``size`` modulo the alignment (so that every shape-derived
value, such as a U-Net's pad amount, is the same in every tile as in the image). A region is
never empty, and with a ``valid`` check (the planner runs the segment on the meta device at each
distinct tile length) a region on which some op would fail, or which would not produce the
outputs it owns, is widened one alignment step at a time (more context never changes an owned
output). Nothing here knows sympy or torch: the planner turns symbolic geometry into
:class:`AxisGeometry` first.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from .errors import PlanError


@dataclass(frozen=True)
class AxisGeometry:
    """Plain-number geometry of one output tensor along one axis, relative to the streamed map:
    output ``i`` reads the map's ``[i*stride + lo, i*stride + hi]``; ``size`` is the output's
    length when the whole map is processed."""

    stride: Fraction
    lo: Fraction
    hi: Fraction
    size: int


@dataclass(frozen=True)
class Span:
    """One tile along one axis: input region ``[start, stop)`` and, per output tensor, the
    global outputs ``[g0, g1)`` it owns and where they sit in the tile's own output."""

    start: int
    stop: int
    outputs: tuple[tuple[int, int], ...]
    local: tuple[tuple[int, int], ...]

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class AxisPlan:
    size: int
    align: int
    spans: tuple[Span, ...]

    @property
    def max_length(self) -> int:
        return max(s.length for s in self.spans)


@dataclass(frozen=True)
class TilePlan:
    """The tiles of one map: the product of the per-axis spans."""

    axes: tuple[AxisPlan, ...]

    @property
    def num_tiles(self) -> int:
        return math.prod(len(a.spans) for a in self.axes)

    def tiles(self):
        """Every tile as a tuple of per-axis spans."""
        return itertools.product(*(a.spans for a in self.axes))

    @property
    def redundancy(self) -> float:
        """Input pixels computed over all tiles / map pixels."""
        computed = math.prod(sum(s.length for s in a.spans) for a in self.axes)
        return computed / math.prod(a.size for a in self.axes)


# valid(axis, length) -> the output sizes along that axis of a tile of that length, or None when
# the segment fails on it
Validator = Callable[[int, int], "tuple[int, ...] | None"]


def _owned(c0, c1, geo: AxisGeometry, last: bool):
    g0 = 0 if c0 == 0 else math.ceil(Fraction(c0) / geo.stride)
    g1 = geo.size if last else min(geo.size, math.ceil(Fraction(c1) / geo.stride))
    return min(g0, geo.size), max(min(g0, geo.size), g1)


def _region(size, align, geos, outputs) -> tuple[int, int]:
    starts = [g0 * g.stride + g.lo for (g0, g1), g in zip(outputs, geos) if g1 > g0]
    stops = [(g1 - 1) * g.stride + g.hi + 1 for (g0, g1), g in zip(outputs, geos) if g1 > g0]
    start = max(0, math.floor(min(starts)) // align * align)
    start = min(start, (size - 1) // align * align)  # outputs that read only padding
    stop = min(size, max(math.ceil(max(stops)), start + 1))  # never empty
    return start, _congruent(stop, size, align)


def _congruent(stop, size, align):
    """The smallest stop >= ``stop`` with ``size - stop`` a multiple of ``align``."""
    return stop + (size - stop) % align


def _make_span(start, stop, outputs, geos) -> Span:
    local = []
    for (g0, g1), g in zip(outputs, geos):
        offset = Fraction(start) / g.stride
        if offset.denominator != 1:
            raise PlanError(f"internal: tile start {start} is off the grid of stride {g.stride}")
        local.append((g0 - int(offset), g1 - int(offset)))
    return Span(start, stop, outputs, tuple(local))


def _span(size, align, geos, c0, c1, last) -> Span | None:
    """The tile owning ``[c0, c1)`` of the map (``last``: and everything after)."""
    outputs = tuple(_owned(c0, c1, g, last) for g in geos)
    if all(g0 == g1 for g0, g1 in outputs):
        return None
    start, stop = _region(size, align, geos, outputs)
    return _make_span(start, stop, outputs, geos)


def _cuts(size, step):
    return [0, size] if step is None or step >= size else list(range(0, size, step)) + [size]


def plan_axis(size: int, align: int, geos: list[AxisGeometry], step: int | None) -> AxisPlan:
    """Plan one axis with owner ranges of ``step`` pixels (None: one tile)."""
    cuts = _cuts(size, step)
    spans = [_span(size, align, geos, cuts[t], cuts[t + 1], t == len(cuts) - 2)
             for t in range(len(cuts) - 1)]
    return AxisPlan(size, align, tuple(s for s in spans if s is not None))


def widen(plan: AxisPlan, geos, ok: Callable[[Span], bool], limit: int | None) -> AxisPlan:
    """Widen every span that fails ``ok`` one alignment step at a time (towards the far end,
    else the near end) until it passes; its owned outputs stay the same. Raises
    :class:`PlanError` when a span would grow past ``limit`` or the whole axis does not pass."""
    spans = []
    for span in plan.spans:
        while not ok(span):
            if span.stop < plan.size:
                start, stop = span.start, span.stop + plan.align
            elif span.start > 0:
                start, stop = span.start - plan.align, span.stop
            else:
                raise PlanError("the stem fails on the whole map along this axis "
                                f"(length {plan.size})")
            stop = min(stop, plan.size)
            if limit is not None and stop - start > limit:
                raise _TooSmall(stop - start)
            span = _make_span(start, stop, span.outputs, geos)
        spans.append(span)
    return AxisPlan(plan.size, plan.align, tuple(spans))


class _TooSmall(PlanError):
    def __init__(self, need: int):
        super().__init__(f"a tile needs at least {need}")


@functools.lru_cache(maxsize=65536)
def _max_length(size, align, geos, step) -> int:
    """An estimate of ``plan_axis(...).max_length`` for long axes: interior tiles are translates
    of each other (steps are multiples of the alignment), so the first four, a middle one and the
    last four cover every distinct length; short axes (up to 16 tiles) are measured whole.
    :func:`plan_one_axis` verifies the plan it returns. Cached: the budget planner asks for the
    same axes again and again (``geos`` a tuple)."""
    cuts = _cuts(size, step)
    n = len(cuts) - 1
    lengths = [0]
    sample = range(n) if n <= 16 else {0, 1, 2, 3, n // 2, n - 4, n - 3, n - 2, n - 1}
    for t in sorted(set(sample) & set(range(n))):
        span = _span(size, align, geos, cuts[t], cuts[t + 1], t == n - 1)
        if span is not None:
            lengths.append(span.length)
    return max(lengths)


def tile_sizes(tile_size, n: int) -> list[int | None]:
    """``tile_size`` (None, an int, or one per axis) as one entry per axis, checked."""
    if tile_size is None:
        tiles = [None] * n
    elif isinstance(tile_size, (tuple, list)):
        tiles = list(tile_size)
        if len(tiles) != n:
            raise PlanError(f"tile_size {tuple(tiles)} has {len(tiles)} entries for {n} "
                            "spatial axes")
    else:
        tiles = [tile_size] * n
    for t in tiles:
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t <= 0):
            raise PlanError(f"tile_size must be a positive int (or one per axis), got {t!r}")
    return tiles


def plan_tiles(sizes, align, geos_per_axis, tile_size, valid: Validator | None = None
               ) -> TilePlan:
    """Largest owner steps whose tiles fit ``tile_size`` (int or one per axis).

    Args:
        sizes: map size per spatial axis.
        align: alignment per axis (tile starts are multiples of it).
        geos_per_axis: per axis, the list of :class:`AxisGeometry` of the output tensors.
        tile_size: largest input tile edge, an int or one per axis; None for one tile.
        valid: ``valid(axis, length)``: the outputs' sizes along that axis when the segment runs
            on a tile of that length (the other axes whole), or None when it fails there.
    Returns:
        a :class:`TilePlan`. Raises :class:`PlanError` naming the smallest legal tile size.
    """
    tiles = tile_sizes(tile_size, len(sizes))
    axes = []
    for k in range(len(sizes)):
        ok = None if valid is None else _span_check(k, valid)
        axes.append(plan_one_axis(k, sizes[k], align[k], geos_per_axis[k], tiles[k], ok))
    return TilePlan(tuple(axes))


def _span_check(k, valid):
    """Whether a span's tile runs and produces every output it owns (cached per length)."""
    cache = {}

    def ok(span: Span) -> bool:
        if span.length not in cache:
            cache[span.length] = valid(k, span.length)
        produced = cache[span.length]
        return produced is not None and all(
            l1 <= n for (l0, l1), (g0, g1), n in zip(span.local, span.outputs, produced)
            if g1 > g0)

    return ok


def smallest_tile(sizes, align, geos_per_axis, valid: Validator | None = None
                  ) -> tuple[int, ...]:
    """Per axis, the smallest legal ``tile_size``: one alignment step of outputs per tile."""
    out = []
    for k in range(len(sizes)):
        plan = plan_axis(sizes[k], align[k], geos_per_axis[k], align[k])
        if valid is not None:
            plan = widen(plan, geos_per_axis[k], _span_check(k, valid), None)
        out.append(plan.max_length)
    return tuple(out)


def plan_one_axis(k, size, align, geos, tile, ok=None, explain: bool = True) -> AxisPlan:
    """One axis: the largest step whose (widened) tiles fit ``tile``; PlanError if none (with
    ``explain``, naming the smallest legal tile, which costs a plan of its own)."""
    geos = tuple(geos)

    def build(step, limit):
        plan = plan_axis(size, align, list(geos), step)
        return plan if ok is None else widen(plan, geos, ok, limit)

    def smallest():
        return build(align, None).max_length if explain else "larger"

    if tile is None or _max_length(size, align, geos, None) <= tile:
        try:
            return build(None, tile)
        except _TooSmall:
            pass
    if tile is None:
        return build(None, None)
    if _max_length(size, align, geos, align) > tile:
        raise too_small(k, tile, smallest(), align)
    lo, hi = 1, -(-size // align)  # steps in units of align
    while lo < hi:  # largest step whose tiles fit (before widening)
        mid = (lo + hi + 1) // 2
        if _max_length(size, align, geos, mid * align) <= tile:
            lo = mid
        else:
            hi = mid - 1
    while True:
        try:
            plan = build(lo * align, tile)
        except _TooSmall:
            if lo == 1:
                raise too_small(k, tile, smallest(), align) from None
            lo -= 1
            continue
        if plan.max_length <= tile:
            return plan
        if lo == 1:  # the estimate missed a longer tile
            raise too_small(k, tile, smallest(), align)
        lo -= 1


def estimate_axis(size: int, align: int, geos, tile: int | None):
    """A quick estimate of :func:`plan_one_axis` for the budget search, which weighs thousands
    of segments: ``(redundancy, largest tile, number of tiles)``, or None when no tile fits.
    Owner ranges of ``step`` pixels (a multiple of ``align``) need regions of about ``step``
    plus the outputs' dependency span plus alignment slack; the plan made afterwards is exact."""
    lo = min(g.lo for g in geos)
    hi = max(g.hi for g in geos)
    stride = max(g.stride for g in geos)
    span = math.ceil(hi - lo)
    bound = span + math.ceil(stride) + 2 * (align - 1)  # a region beyond its owner range, at most
    if tile is None or tile >= size:
        return 1.0, size, 1
    step = (tile - bound) // align * align
    if step < align:
        return None
    n = -(-size // step)
    if n == 1:
        return 1.0, size, 1
    overlap = span + align  # on average: the span, and the slack of snapping to the alignment
    return min(n * (step + overlap), size + (n - 1) * overlap) / size, min(size, step + bound), n


def too_small(k, tile, smallest, align) -> PlanError:
    """The error for a ``tile`` under the ``smallest`` legal one on axis ``k`` (it carries
    ``axis`` and ``tile``, so that a caller planning several steps can name their largest)."""
    err = PlanError(f"tile_size {tile} is too small on axis {k}: the smallest legal tile for "
                    f"this model is {smallest} (receptive field plus alignment {align}); use "
                    f"tile_size >= {smallest}")
    err.axis, err.tile = k, tile
    return err
