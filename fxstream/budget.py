"""Choosing cuts and tile sizes under a memory budget: a shortest path over the cut points.

Candidates are the stem's valid cut points (all of them up to MAX_CANDIDATES, else thinned
evenly within each stride level). The forward holds every cut's full map at once; the backward
streams the segments in reverse, so while segment j runs only what the segments before it hold
is alive (their cut maps, and the graphs of those that keep theirs), beside its own memory: one
tile's live bytes (:mod:`fxstream.memory`) plus the gradients of its input and output maps. A
segment's options are every tile size (work: its nodes' work times the redundancy of its tile
plan on its own input map) and, in one tile, keeping its graph for the backward (no recompute;
what autograd saves held until then). Each cut also costs the passes over its map (CUT_WORK).
The least-cost plan is a shortest path over the cut points (:func:`_search`; ties: fewer cuts).
Estimates must stay under BUDGET_MARGIN of the budget; the planner then measures the chosen
plan exactly (:func:`fxstream.memory.measure_pass`) and asks again with the segments it found
larger than estimated (``corrections``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import NamedTuple

from .costs import Stem, segment_cost, segment_layout
from .errors import PlanError, size_text
from .hostmem import pool_enabled
from .memory import ALLOCATOR_FACTOR, node_costs
from .segments import cut_candidates, image_node, resolve_cuts
from .tiling import tile_sizes

TILE_OPTIONS = (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
MAX_CANDIDATES = 40  # the search is quadratic in them
# plans are made for this share of the budget: the rest is a reserve for what no model sees
# (the allocator's own bookkeeping, Python objects, page-granular growth)
BUDGET_MARGIN = 0.95
WHOLE_LAST_WORK = 0.75  # a kept graph runs F + B instead of F + F + B, with B = 2F
# a cut's own work, per element of its map, in MAC units: the map is written, copied into tiles,
# and its gradient zeroed and accumulated (memory-bound passes, each ~ a few MACs per element
# at the speed of a convolution): it keeps the search from cuts that save less than they cost
CUT_WORK = 32
# a tile loop without the host memory pool (fxstream.hostmem) re-faults every page of every
# tile: ResNet-18 4096² measured 45.7 s without it and 36.5-37.7 s with it (1.2-1.25x); the
# pooled loop's heap holds ALLOCATOR_FACTOR["cpu"] times its live bytes, so where memory is
# tight the search runs a segment's tiles unpooled instead. One segment alone costs more
# unpooled (image -> layer2.0 of ResNet-18 in tiles of 768: 37.5 s against 22 s a step, 1.7x),
# but costing every segment so chose plans with fewer cuts and more overlap that were slower
# (`fxstream bench ... --budget 1.94GiB --variants streamed`: 47.9 s against 42.7 s): the cost
# of page faults grows with a segment's bytes per FLOP, which one factor does not capture
UNPOOLED_COST = 1.2
# the default budget: this share of the full image's estimated peak, and never less than
# AUTO_MIN_STEP above what the process holds (a small image gains nothing from tiny tiles).
# A quarter (0.25) left ResNet-18 at 4096² (full step 7.8 GiB) a 1.94 GiB budget whose plans
# all ran some segments unpooled: 45-47 s against 38-45 s for the full step. At 0.28 (2.17 GiB)
# every segment is pooled, the plan has less overlap and the measured peak is still a quarter
# of the full step's: `fxstream bench torchvision.models:resnet18 --input 1x3x4096x4096
# --variants full,streamed --repeat 3`: 44.6 s against 44.8 s, 1.9 against 7.8 GiB
AUTO_SHARE = 0.28
AUTO_MIN_STEP = 512 * 2**20
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
          "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
          "tib": 2**40}


def parse_bytes(value) -> int:
    """``8GiB``, ``512MB``, ``1.5g`` or a number of bytes -> int bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise PlanError(f"memory budget {value!r}: expected a size like 8GiB, 512MiB or 2e9")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def auto_budget(full_peak: int, baseline: int, available: int | None = None) -> int:
    """The default memory budget: AUTO_SHARE (28%) of the full image's estimated peak, at least
    AUTO_MIN_STEP above the memory in use, and at most 90% of the memory available."""
    return int(min(max(AUTO_SHARE * full_peak, baseline + AUTO_MIN_STEP),
                   0.9 * (available_memory(baseline) if available is None else available)))


def available_memory(baseline: int) -> int:
    """Memory this process can reach: what it holds plus what the OS reports available."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 50
    return baseline + free


def current_rss() -> int:
    """This process's resident memory, rounded up to 64 MiB (so estimates are stable)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        rss = pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        rss = 2**30
    step = 64 * 2**20
    return -(-rss // step) * step


@dataclass(frozen=True)
class PlanChoice:
    """The chosen cuts and per-segment options, and what the per-node model says they cost."""

    budget: int
    cuts: tuple[str, ...]
    segment_tiles: tuple[tuple[int, ...], ...]  # per segment, in its own input's pixels
    segment_pool: tuple[bool, ...]  # per segment: its tile loops pool host memory (hostmem)
    # per segment: it runs in one tile with grad and keeps its graph for the backward (no
    # recompute); what autograd saves stays alive until then
    segment_keep: tuple[bool, ...]
    estimated_peak: int
    stored_bytes: int
    work_ratio: float  # estimated stem work / full-image stem work (forward + backward)
    baseline: int
    segment_mem: tuple[float, ...] = ()  # per segment: the bytes its phases add (estimated)
    segment_held: tuple[float, ...] = ()  # per segment: its kept graph, held until its backward


@dataclass(frozen=True)
class Memory:
    """What a budget counts besides the plan's passes."""

    baseline: int  # in use when planning: the process (or the device's allocated memory)
    fixed: int  # the baseline plus what every phase holds: parameter gradients, the image when
    # it is not resident, the boundary tensors, the head's activations
    budget: int
    device: str = "cpu"
    image_grad: bool = False
    image_bytes: int = 0
    full_peak: int | None = None  # the full image's estimated peak (for the "auto" budget)


class _State(NamedTuple):
    """A partial plan: the image streamed up to its last cut."""

    held: float  # bytes held from the forward until later backwards: cut maps, kept graphs
    value: tuple  # (cost, number of cuts): what the search minimises
    peak: float  # the largest estimated peak so far
    cuts: tuple
    picks: tuple  # one _Option per segment


def _search(points, nodes, fixed, limit, options, consecutive):
    """The least-cost chain of segments image -> cuts -> boundary (a shortest path over the cut
    points, ``points[0]`` the image), or with ``limit=None`` the one with the least estimated
    peak. What a segment holds from the forward until the backward (its output map, its graph if
    it keeps it) is alive in every later segment; a segment's backward holds ``fixed``, what the
    segments before it hold and its own transient memory; the forward ends holding all of it.
    Partial plans at a cut are kept while no other one holds less and costs less (what they hold
    is all that couples segments), so every cut point can be a candidate. ``consecutive``: the
    cuts are given, take them all."""
    least_peak = limit is None
    end = len(points)
    frontier = [[] for _ in points] + [[]]  # the last slot: complete plans
    frontier[0].append(_State(0.0, (0.0, 0), float(fixed), (), ()))
    for i in range(end):
        states = _pareto(frontier[i], least_peak)
        targets = [i + 1] if consecutive else range(i + 1, end + 1)
        for state in states:
            alive = fixed + state.held
            for k in targets:
                dst = points[k] if k < end else None
                out = nodes[dst].map_bytes if dst is not None else 0
                opts = options(points[i], dst)
                if least_peak:  # keeping a graph only adds memory
                    opts = [o for o in opts if not o.keep or dst is None]
                    picks = [min(opts, key=lambda o: (o.mem, o))] if opts else []
                else:
                    opts = [o for o in opts
                            if alive + o.mem <= limit and alive + out + o.held <= limit]
                    if not opts:
                        continue
                    # the cheapest way, and the cheapest that does not keep its graph
                    plain = [o for o in opts if not o.keep]
                    picks = {min(opts), *([min(plain)] if plain else [])}
                for pick in picks:
                    held = state.held + out + pick.held
                    peak = max(state.peak, alive + pick.mem, fixed + held)
                    cuts = state.cuts + ((dst,) if dst is not None else ())
                    value = (state.value[0] + pick.cost
                             + (CUT_WORK * nodes[dst].numel if dst is not None else 0),
                             len(cuts))
                    frontier[k].append(_State(held, value, peak, cuts, state.picks + (pick,)))
    done = frontier[end]
    if not done:
        return None
    return min(done, key=_score(least_peak))


def _score(least_peak):
    """What ranks plans: the estimated peak first when searching for the least one, else the
    value (cost, cuts)."""
    return (lambda st: (st.peak, st.value)) if least_peak else (lambda st: (st.value, st.peak))


def _pareto(states, least_peak):
    """The states no other one beats in both held bytes and score."""
    score = _score(least_peak)
    kept, best = [], None
    for st in sorted(states, key=lambda st: (st.held, score(st))):
        if best is None or score(st) < best:
            kept.append(st)
            best = score(st)
    return kept


def _thin(candidates, nodes) -> list[str]:
    """At most MAX_CANDIDATES cut candidates: all of them if there are few enough, else the
    first and last of each stride level (stage entries and exits) and evenly spaced ones
    between, the same share of each level."""
    if len(candidates) <= MAX_CANDIDATES:
        return list(candidates)
    by_stride = {}
    for c in candidates:
        by_stride.setdefault(nodes[c].stride, []).append(c)
    keep = set()
    for group in by_stride.values():
        keep |= {group[0], group[-1]}
    spare = MAX_CANDIDATES - len(keep)
    if spare > 0:
        inner = sum(max(len(g) - 2, 0) for g in by_stride.values())
        for group in by_stride.values():
            n = min(len(group) - 2, spare * (len(group) - 2) // inner) if inner else 0
            for j in range(1, n + 1):
                keep.add(group[round(j * (len(group) - 1) / (n + 1))])
    order = {c: i for i, c in enumerate(candidates)}
    keep = sorted(keep, key=order.__getitem__)
    while len(keep) > MAX_CANDIDATES:  # drop the largest maps first: they are the costly cuts
        keep.remove(max(keep[:-1], key=lambda c: nodes[c].map_bytes))
    return keep


class _Option(NamedTuple):
    """One way to run a segment: ordered by cost, then the larger tile, then less memory."""

    cost: float  # work, weighted by what it costs in time
    neg_tile: int  # minus the largest tile edge
    mem: float  # bytes its phases add to what earlier segments hold
    redundancy: float
    tile: tuple  # per axis
    pool: bool
    work: float  # work x redundancy (x 3/4 for a one-tile segment that keeps its graph)
    keep: bool = False  # one tile, run with grad, graph kept for the backward (no recompute)
    held: float = 0.0  # bytes it holds beyond its output map until its backward (a kept graph)


def choose_plan(analysis, memory: Memory, tile_size=None, cuts=None, keep_graphs: bool = True,
                corrections=None, cache: dict | None = None, smallest=None) -> PlanChoice:
    """Cuts and tile sizes with the least estimated work under ``memory.budget``.

    ``tile_size``/``cuts`` fix that part of the plan. ``keep_graphs``: whether a one-tile
    segment may keep its graph for the backward instead of recomputing it (not with offloaded
    maps). ``corrections``: per ``(source, destination)`` segment, a factor on its estimated
    memory (from an exact measurement); the key ``None`` holds the factor for segments not
    measured yet (default 1). ``cache``: a dict kept between calls for the same
    analysis and memory (segment costs do not change with the corrections). ``smallest``: per
    ``(source, destination)`` segment, its smallest legal tile per axis where a plan found it
    larger than the estimate allows (smaller tile options are left out). Raises
    :class:`PlanError` when nothing fits.
    """
    input_shape = analysis.input_shape
    costs = node_costs(analysis)
    gm = analysis.graph_module
    st = Stem(analysis, costs, memory.image_grad)

    if cuts is not None:
        chain, consecutive = list(resolve_cuts(analysis, cuts)), True
    else:
        chain = _thin(list(cut_candidates(analysis)), costs)
        consecutive = False
    n_axes = len(input_shape) - 2
    tiles = [tuple(tile_sizes(tile_size, n_axes))] if tile_size is not None else [
        (t,) * n_axes for t in TILE_OPTIONS if t <= 2 * max(input_shape[2:])] or \
        [(TILE_OPTIONS[0],) * n_axes]
    image = image_node(gm).name
    limit = BUDGET_MARGIN * memory.budget  # what the estimates must stay under
    full_work = sum(n.work for n in costs.values())
    factor = ALLOCATOR_FACTOR.get(memory.device, 1.0)
    pooled = memory.device == "cpu" and pool_enabled()
    corrections = corrections or {}
    cache = {} if cache is None else cache
    seg_cache = {}

    def segment_costs(src, dst):
        """(tile, cost) of the segment src -> dst for every tile size (None: no plan)."""
        low = (smallest or {}).get((src, dst))
        if (src, dst, low) not in cache:
            found, whole = [], None
            layout = segment_layout(st, src, dst)
            for tile in sorted(tiles, key=max):
                if low is not None and any(t < m for t, m in zip(tile, low)):
                    found.append((tile, None))  # the exact plan refuses it
                    continue
                # a tile that already covers the input in one: larger ones plan the same
                cost = whole or segment_cost(st, layout, tile)
                if cost is not None and cost.tiles == 1:
                    whole = cost
                found.append((tile, cost))
            cache[(src, dst, low)] = found
        return cache[(src, dst, low)]

    def options(src, dst):
        """Every way to run the segment src -> dst (None: to the boundary)."""
        key = (src, dst)
        if key not in seg_cache:
            seg_cache[key] = [o for tile, cost in segment_costs(src, dst)
                              for o in _options(cost, tile, dst is None, keep_graphs, pooled,
                                                factor, corrections.get(
                                                    key, corrections.get(None, 1.0)))]
        return seg_cache[key]

    points = [image, *chain]
    best = _search(points, costs, memory.fixed, limit, options, consecutive)
    if best is None:
        least = _search(points, costs, memory.fixed, None, options, consecutive)
        smallest_peak = least.peak if least is not None else None
        least_budget = size_text(smallest_peak / BUDGET_MARGIN, up=True) if smallest_peak \
            else ""  # rounded up: the budget named plans as it reads
        need = (f"; the smallest estimated peak is {size_text(smallest_peak)}, so the "
                f"budget must be at least {least_budget} (plans "
                f"keep {1 - BUDGET_MARGIN:.0%} in reserve)") if smallest_peak else ""
        if least is None and tile_size is not None:  # the tile, not the budget, is the problem
            for src, dst in zip(points, points[1:] + [None]) if consecutive else [(image, None)]:
                segment_cost(st, segment_layout(st, src, dst), tiles[0], raise_errors=True)
        raise PlanError(f"no plan fits a memory budget of {size_text(memory.budget)} for "
                        f"input {tuple(input_shape)} (process baseline "
                        f"{size_text(memory.baseline)} included){need}")
    subset, picks, peak = best.cuts, best.picks, best.peak
    return PlanChoice(budget=memory.budget, cuts=tuple(subset),
                      segment_tiles=tuple(p.tile for p in picks),
                      segment_pool=tuple(p.pool for p in picks),
                      segment_keep=tuple(p.keep for p in picks), estimated_peak=int(peak),
                      stored_bytes=sum(costs[c].map_bytes for c in subset),
                      work_ratio=round(sum(p.work for p in picks) / full_work, 3),
                      baseline=memory.baseline,
                      segment_mem=tuple(p.mem for p in picks),
                      segment_held=tuple(p.held for p in picks))


def _options(cost, tile: tuple, last: bool, keep_graphs: bool, pooled: bool, factor: float,
             correction: float = 1.0) -> list[_Option]:
    """The segment in tiles of ``tile``: pooled where the pool is possible (faster; the
    allocator factor applies to its live bytes) or not (UNPOOLED_COST), or in one tile keeping
    its graph (always for the last segment: nothing runs after it but the head)."""
    if cost is None:
        return []
    edge = -max(tile)
    if cost.tiles == 1:
        m = cost.memory
        base = cost.maps + correction * max(m.forward, m.backward)
        # kept: runs once with grad (forward + backward instead of forward twice + backward);
        # its backward holds what it saved plus its gradients, as a recompute would
        kept = _Option(cost.work * WHOLE_LAST_WORK, edge, base, cost.redundancy, tile, False,
                       cost.work * WHOLE_LAST_WORK, True, 0.0 if last else correction * m.kept)
        if last:
            return [kept]
        plain = _Option(cost.work, edge, base, cost.redundancy, tile, False, cost.work)
        return [plain, kept] if keep_graphs else [plain]
    live = correction * max(cost.memory.forward, cost.memory.backward)
    plain = _Option(cost.work * UNPOOLED_COST, edge, cost.maps + live, cost.redundancy, tile,
                    False, cost.work)
    if not pooled:
        return [plain]
    return [_Option(cost.work, edge, cost.maps + factor * live, cost.redundancy, tile, True,
                    cost.work), plain]


__all__ = ["BUDGET_MARGIN", "Memory", "PlanChoice", "auto_budget", "available_memory",
           "choose_plan", "current_rss", "parse_bytes"]
