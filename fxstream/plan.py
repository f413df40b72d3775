"""Tile plans: symbolic geometry turned into plain integers, once per input shape.

Per spatial axis, the image ``[0, H)`` is cut at multiples of the alignment into owner ranges
``[c_t, c_t+1)``. Tile *t* owns the outputs ``g`` of each boundary tensor with ``g*J`` in its
range; its input region ``[A, B)`` is the hull of their dependencies with ``A`` snapped down to
the alignment and ``B - A`` congruent to ``H`` modulo the alignment (so that every shape-derived
value, such as a U-Net's pad amount, is the same in every tile as in the image).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from fractions import Fraction

from .errors import PlanError


@dataclass(frozen=True)
class AxisGeometry:
    """Plain-number geometry of one boundary tensor along one axis."""

    stride: Fraction
    lo: Fraction
    hi: Fraction
    size: int  # output size at the image size


@dataclass(frozen=True)
class Span:
    """One tile along one axis: input region ``[start, stop)`` and, per boundary tensor, the
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
    """The tiles of one input shape: the product of the per-axis spans."""

    axes: tuple[AxisPlan, ...]

    @property
    def num_tiles(self) -> int:
        return math.prod(len(a.spans) for a in self.axes)

    def tiles(self):
        """Every tile as a tuple of per-axis spans."""
        return itertools.product(*(a.spans for a in self.axes))

    @property
    def redundancy(self) -> float:
        """Input pixels computed over all tiles / image pixels."""
        computed = math.prod(sum(s.length for s in a.spans) for a in self.axes)
        return computed / math.prod(a.size for a in self.axes)


def _owned(c0, c1, geo: AxisGeometry, last: bool):
    g0 = 0 if c0 == 0 else math.ceil(Fraction(c0) / geo.stride)
    g1 = geo.size if last else min(geo.size, math.ceil(Fraction(c1) / geo.stride))
    return min(g0, geo.size), max(min(g0, geo.size), g1)


def _span(size, align, geos, c0, c1, last) -> Span | None:
    """The tile owning ``[c0, c1)`` of the image (``last``: and everything after)."""
    outputs = tuple(_owned(c0, c1, g, last) for g in geos)
    if all(g0 == g1 for g0, g1 in outputs):
        return None
    starts = [g0 * g.stride + g.lo for (g0, g1), g in zip(outputs, geos) if g1 > g0]
    stops = [(g1 - 1) * g.stride + g.hi + 1 for (g0, g1), g in zip(outputs, geos) if g1 > g0]
    start = max(0, math.floor(min(starts)) // align * align)
    stop = min(size, math.ceil(max(stops)))
    stop = stop + (size - stop) % align  # tile length congruent to the image size
    local = []
    for (g0, g1), g in zip(outputs, geos):
        offset = Fraction(start) / g.stride
        if offset.denominator != 1:
            raise PlanError(f"internal: tile start {start} is off the grid of stride {g.stride}")
        local.append((g0 - int(offset), g1 - int(offset)))
    return Span(start, stop, outputs, tuple(local))


def _cuts(size, step):
    return [0, size] if step is None or step >= size else list(range(0, size, step)) + [size]


def plan_axis(size: int, align: int, geos: list[AxisGeometry], step: int | None) -> AxisPlan:
    """Plan one axis with owner ranges of ``step`` pixels (None: one tile)."""
    cuts = _cuts(size, step)
    spans = [_span(size, align, geos, cuts[t], cuts[t + 1], t == len(cuts) - 2)
             for t in range(len(cuts) - 1)]
    return AxisPlan(size, align, tuple(s for s in spans if s is not None))


@functools.lru_cache(maxsize=65536)
def _max_length(size, align, geos, step) -> int:
    """An estimate of ``plan_axis(...).max_length`` for long axes: interior tiles are translates
    of each other (steps are multiples of the alignment), so the first four, a middle one and the
    last four cover every distinct length; short axes (up to 16 tiles) are measured whole.
    ``_plan_one_axis`` verifies the plan it returns. Cached: the budget planner asks for the same
    axes again and again (``geos`` a tuple)."""
    cuts = _cuts(size, step)
    n = len(cuts) - 1
    lengths = [0]
    sample = range(n) if n <= 16 else {0, 1, 2, 3, n // 2, n - 4, n - 3, n - 2, n - 1}
    for t in sorted(set(sample) & set(range(n))):
        span = _span(size, align, geos, cuts[t], cuts[t + 1], t == n - 1)
        if span is not None:
            lengths.append(span.length)
    return max(lengths)


def plan_tiles(sizes, align, geos_per_axis, tile_size) -> TilePlan:
    """Largest owner steps whose tiles fit ``tile_size`` (int or one per axis).

    Args:
        sizes: image size per spatial axis.
        align: alignment per axis (tile starts are multiples of it).
        geos_per_axis: per axis, the list of :class:`AxisGeometry` of the boundary tensors.
        tile_size: largest input tile edge, an int or one per axis; None for one tile.
    Returns:
        a :class:`TilePlan`. Raises :class:`PlanError` naming the smallest legal tile size.
    """
    n = len(sizes)
    if tile_size is None:
        tiles = [None] * n
    elif isinstance(tile_size, int):
        tiles = [tile_size] * n
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
    axes = []
    for k in range(n):
        axes.append(_plan_one_axis(k, sizes[k], align[k], geos_per_axis[k], tiles[k]))
    return TilePlan(tuple(axes))


def smallest_tile(sizes, align, geos_per_axis) -> tuple[int, ...]:
    """Per axis, the smallest legal ``tile_size``: one alignment step of outputs per tile."""
    return tuple(_max_length(sizes[k], align[k], tuple(geos_per_axis[k]), align[k])
                 for k in range(len(sizes)))


def _plan_one_axis(k, size, align, geos, tile):
    geos = tuple(geos)
    if tile is None or _max_length(size, align, geos, None) <= tile:
        return plan_axis(size, align, geos, None)
    smallest = _max_length(size, align, geos, align)
    if smallest > tile:
        raise PlanError(f"tile_size {tile} is too small on axis {k}: the smallest legal tile "
                        f"for this model is {smallest} (receptive field plus alignment "
                        f"{align}); use tile_size >= {smallest}")
    lo, hi = 1, -(-size // align)  # steps in units of align
    while lo < hi:  # largest step whose tiles fit
        mid = (lo + hi + 1) // 2
        if _max_length(size, align, geos, mid * align) <= tile:
            lo = mid
        else:
            hi = mid - 1
    plan = plan_axis(size, align, geos, lo * align)
    while plan.max_length > tile and lo > 1:  # the estimate missed a longer tile
        lo -= 1
        plan = plan_axis(size, align, geos, lo * align)
    if plan.max_length > tile:
        raise PlanError(f"tile_size {tile} is too small on axis {k}: the smallest legal tile "
                        f"for this model is {plan.max_length}; use tile_size >= "
                        f"{plan.max_length}")
    return plan
