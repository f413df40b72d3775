"""Choosing cuts and a tile size under a memory budget (DESIGN section 5).

Candidates are the stem's valid cut points (all of them up to MAX_CANDIDATES, else thinned
evenly within each stride level). The forward holds every cut's full map at once; the backward
streams the segments in reverse, so while segment j runs only what the segments before it hold
is alive (their cut maps, and the graphs of those that keep theirs), beside its transient memory:
one tile's activations and gradients plus the gradients of its input and output maps. A
segment's options are every tile size (work: the MACs of its layers times the redundancy of its
tile plan on its own input map), with or without the host memory pool (fxstream.hostmem: faster,
more memory; its absence is charged as measured), and, in one tile, keeping its graph for the
backward (no recompute; its activations held until then). Each cut also costs the passes over
its map (CUT_WORK). The least-cost plan is a shortest path over the cut points
(:func:`_search`; ties: fewer cuts). Estimates must stay under 95% of the budget
(BUDGET_MARGIN).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import NamedTuple
from fractions import Fraction

import passes
import sympy

from .errors import PlanError
from .hostmem import pool_enabled
from .plan import AxisGeometry

TILE_OPTIONS = (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
MAX_CANDIDATES = 40  # the search is quadratic in them
# a tile's transient memory ~ this x its share of the segment's activations (tensors it
# allocates: in-place ops such as ReLU(inplace=True) add none). Calibrated against per-segment
# peaks measured on resnet18/34 at 4096^2 (VmHWM reset per segment): one-tile segments come out
# 0.02-0.1 GiB over, the worst multi-tile one 0.03 GiB (1.7%) under, inside BUDGET_MARGIN
TILE_GRAD_FACTOR = 1.4
# what a kept graph holds, per byte of the activations and input copy it counts: the resident
# growth over kept segments' forwards measured 0.80-0.89x of that on resnet18 (2048^2) but
# 1.43-1.45x on mobilenet_v2 (2048^2; a plan went 2% over a 1.5 GiB budget without this factor)
KEPT_GRAPH_FACTOR = 1.5
# a tile of a stored map that the segment may write in place lives three times in the backward:
# copied, cloned, and its gradient (resnet34 at 4096^2: leaving them out made two segments'
# estimates 0.17-0.21 GiB low); a map it only reads, once (its tiles are views: resnet18 at
# 4096^2, a one-tile segment on a 128 MiB map peaked 0.28 GiB lower with views)
INPUT_TILE_COPIES = 3
# the host memory pool (fxstream.hostmem) saves the page faults of a segment's tiles but its heap
# holds more than the live tensors: measured 1.8x to 2.3x the tile part of the estimate
# (resnet18 and resnet34 at 4096^2, segments of 9 to 49 tiles)
POOL_FACTOR = 2.2
# without the pool a many-tile segment's backward re-faults every tile's pages: measured on
# resnet18 at 4096^2 (2 cores), its first segment took 1.33x as long in the backward and 1.4x in
# the forward; the forward always pools (its heap is small), so about 1.25x over the segment
NO_POOL_PENALTY = 1.25
# plans are made for this share of the budget: measured peaks came out up to 2% above the
# estimate (resnet18 at 2048^2 with two pooled segments)
BUDGET_MARGIN = 0.95
WHOLE_LAST_WORK = 0.75  # (F + B) / (F + F + B) with B = 2F
# a cut's own work, per element of its map, in MAC units: the map is written, copied into tiles,
# and its gradient zeroed and accumulated (memory-bound passes, each ~ a few MACs per element
# at the speed of a convolution): it keeps the search from cuts that save less than they cost
CUT_WORK = 32
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
    """The chosen multi-cut plan and what the estimates say it costs."""

    budget: int
    cuts: tuple[str, ...]
    tile_size: int  # of the first segment (the one that reads the image)
    segment_tiles: tuple[int, ...]  # one per segment, in each segment's own input pixels
    segment_pool: tuple[bool, ...]  # per segment: its backward pools host memory (hostmem)
    # per segment: it runs in one tile with grad and keeps its graph for the backward (no
    # recompute); its activations stay alive until then
    segment_keep: tuple[bool, ...]
    estimated_peak: int
    stored_bytes: int
    work_ratio: float  # estimated stem work / full-image stem work (forward + backward)
    segment_redundancy: tuple[float, ...]
    baseline: int


@dataclass
class _Node:
    name: str
    bytes: int
    cost: int
    stride: tuple
    lo: tuple
    hi: tuple
    sizes: tuple
    numel: int = 0
    inplace: bool = False  # writes into its input: allocates nothing
    # every user only reads it (passes.only_read): a segment starting here gets views as tiles
    read_only: bool = False


def _nodes(analysis) -> dict[str, _Node]:
    from .analysis import itemsize as dtype_size, stem_tensors

    gm = analysis.graph_module
    itemsize = dtype_size(analysis)
    symbols = passes.input_symbols(len(analysis.input_shape) - 2)
    values = dict(zip(symbols, analysis.input_shape[2:]))
    out = {}
    for node, g, shape in stem_tensors(analysis):
        numel = math.prod(shape)
        cost = numel
        if node.op == "call_module":
            w = getattr(gm.get_submodule(node.target), "weight", None)
            if w is not None and w.dim() >= 2:
                cost = numel * math.prod(w.shape[1:])
        out[node.name] = _Node(node.name, numel * itemsize, cost,
                               tuple(_f(a.stride) for a in g.axes),
                               tuple(_f(sympy.sympify(a.lo).subs(values)) for a in g.axes),
                               tuple(_f(sympy.sympify(a.hi).subs(values)) for a in g.axes),
                               tuple(shape[d] for d in g.dims), numel,
                               passes.writes_in_place(node, gm), passes.only_read(node, gm))
    return out


def allocated_activation_bytes(analysis) -> int:
    """Bytes of the stem's activations on the whole input that allocate memory: in-place ops
    (``ReLU(inplace=True)``, ``x += y``) write into their input and are left out."""
    return sum(n.bytes for n in _nodes(analysis).values() if not n.inplace)


def _f(x) -> Fraction:
    n, d = sympy.fraction(sympy.Rational(x))
    return Fraction(int(n), int(d))


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
        keep.remove(max(keep[:-1], key=lambda c: nodes[c].bytes))
    return keep


def choose_plan(analysis, input_shape, budget, tile_size=None, cuts=None,
                baseline: int | None = None, host_pool: bool | None = None,
                keep_graphs: bool = True) -> PlanChoice:
    """Cuts and tile size with the least estimated work under ``budget`` (see module doc).

    ``tile_size``/``cuts`` fix that part of the plan. ``host_pool``: whether segments may pool
    host memory (fxstream.hostmem; default: unless ``FXSTREAM_HOST_POOL=0``); pass False for a
    stem on CUDA, where the pool does nothing and its cost and gain do not apply.
    ``keep_graphs``: whether a one-tile segment may keep its graph for the backward instead of
    recomputing it (not with offloaded maps). Raises :class:`PlanError` when nothing fits.
    """
    from .streaming import resolve_cuts, stem_boundary

    budget = parse_bytes(budget)
    limit = BUDGET_MARGIN * budget  # what the estimates must stay under
    baseline = current_rss() if baseline is None else baseline
    nodes = _nodes(analysis)
    gm = analysis.graph_module
    boundary = stem_boundary(analysis)
    dg = passes.data_graph(gm.graph)
    stem = [n for n in boundary.stem if n in nodes]
    before = {}

    def ancestors(c):
        if c not in before:
            import networkx as nx

            before[c] = (nx.ancestors(dg, c) | {c}) & set(stem)
        return before[c]

    if cuts is not None:
        chain, consecutive = list(resolve_cuts(analysis, cuts)), True
    else:
        chain = _thin(list(passes.cut_candidates(gm.graph, boundary)), nodes)
        consecutive = False
    tiles = [tile_size] if tile_size is not None else [
        t for t in TILE_OPTIONS if t <= 2 * max(input_shape[2:])] or [TILE_OPTIONS[0]]
    image = next(n for n in gm.graph.nodes if n.op == "placeholder").name
    # the baseline holds the model (and often the image); add the parameters' gradients, the
    # image (safe side if it is already resident) and the boundary tensors
    fixed = baseline + sum(p.numel() * p.element_size() for p in gm.parameters()) \
        + nodes[image].bytes + sum(nodes[b].bytes for b in boundary.tensors)
    full_work = sum(n.cost for n in nodes.values())
    pooled = pool_enabled() if host_pool is None else host_pool and pool_enabled()
    seg_cache = {}

    def options(src, dst):
        """Every way to run the segment src -> dst (None: to the boundary)."""
        key = (src, dst)
        if key not in seg_cache:
            found, whole = [], None
            for tile in sorted(tiles):
                # a tile that already covers the input in one: larger ones plan the same
                cost = whole or _segment_cost(nodes, src, dst, tile, ancestors, stem, boundary,
                                              image)
                if cost is not None and cost[3] == 1:
                    whole = cost
                found += _options(cost, tile, dst is None, pooled, keep_graphs)
            seg_cache[key] = found
        return seg_cache[key]

    points = [image, *chain]
    best = _search(points, nodes, fixed, limit, options, consecutive)
    if best is None:
        least = _search(points, nodes, fixed, None, options, consecutive)
        smallest_peak = least.peak if least is not None else None
        need = (f"; the smallest estimated peak is {smallest_peak / 2**30:.2f} GiB, so the "
                f"budget must be at least {smallest_peak / BUDGET_MARGIN / 2**30:.2f} GiB (plans "
                f"keep {1 - BUDGET_MARGIN:.0%} in reserve)") if smallest_peak else ""
        raise PlanError(f"no plan fits a memory budget of {budget / 2**30:.2f} GiB for input "
                        f"{tuple(input_shape)} (process baseline {baseline / 2**30:.2f} GiB "
                        f"included){need}")
    subset, picks, peak = best.cuts, best.picks, best.peak
    stored = sum(nodes[c].bytes for c in subset)
    return PlanChoice(budget=budget, cuts=tuple(subset), tile_size=picks[0].tile,
                      segment_tiles=tuple(p.tile for p in picks),
                      segment_pool=tuple(p.pool for p in picks),
                      segment_keep=tuple(p.keep for p in picks), estimated_peak=peak,
                      stored_bytes=stored,
                      work_ratio=round(sum(p.work for p in picks) / full_work, 3),
                      segment_redundancy=tuple(round(p.redundancy, 3) for p in picks),
                      baseline=baseline)


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
                out = nodes[dst].bytes if dst is not None else 0
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


class _Option(NamedTuple):
    """One way to run a segment: ordered by cost, then the larger tile, then less memory."""

    cost: float  # work, weighted by what the measurements say it costs in time
    neg_tile: int
    mem: float  # transient peak bytes
    redundancy: float
    tile: int
    pool: bool
    work: float  # MACs x redundancy (x 3/4 for a one-tile segment that keeps its graph)
    keep: bool = False  # one tile, run with grad, graph kept for the backward (no recompute)
    held: float = 0.0  # bytes it holds beyond its output map until its backward (a kept graph)


def _options(cost, tile: int, last: bool, pooled: bool, keep_graphs: bool = True
             ) -> list[_Option]:
    """The segment in tiles of ``tile``: with and without the host memory pool (``pooled``:
    whether pooling is possible at all; without it no penalty applies), or in one tile keeping
    its graph (always for the last segment: nothing runs after it but the head)."""
    if cost is None:
        return []
    work, mem, red, n_tiles, tile_mem, graph = cost
    if n_tiles == 1:
        # kept: runs once with grad (forward + backward instead of forward twice + backward);
        # the backward's peak is the same as a recompute's
        kept = _Option(work * WHOLE_LAST_WORK, -tile, mem, red, tile, False,
                       work * WHOLE_LAST_WORK, True, 0.0 if last else graph)
        if last:
            return [kept]
        plain = _Option(work, -tile, mem, red, tile, False, work)
        return [plain, kept] if keep_graphs else [plain]
    if not pooled:
        return [_Option(work, -tile, mem, red, tile, False, work)]
    return [_Option(work, -tile, mem + (POOL_FACTOR - 1) * tile_mem, red, tile, True, work),
            _Option(work * NO_POOL_PENALTY, -tile, mem, red, tile, False, work)]


def _segment_cost(nodes, src, dst, tile, ancestors, stem, boundary, image):
    """(work, transient peak bytes, redundancy, tiles, the tile part of the transient bytes,
    the bytes a kept graph of the whole segment holds) of streaming src -> dst, or None if no
    plan."""
    done = ancestors(src) if src != image else {image}
    names = ancestors(dst) - done if dst is not None else set(stem) - done
    outs = [dst] if dst is not None else list(boundary.tensors)
    s = nodes[src]
    red, frac, n_tiles = 1.0, 1.0, 1
    for k, size in enumerate(s.sizes):
        geos = [AxisGeometry(nodes[o].stride[k] / s.stride[k],
                             (nodes[o].lo[k] - s.lo[k]) / s.stride[k],
                             (nodes[o].hi[k] - s.hi[k]) / s.stride[k],
                             nodes[o].sizes[k]) for o in outs]
        align = 1
        for n in names:
            align = math.lcm(align, (nodes[n].stride[k] / s.stride[k]).numerator)
        try:
            plan = _fit(size, align, geos, tile)
        except PlanError:
            return None
        red *= sum(sp.length for sp in plan.spans) / size
        frac *= min(plan.max_length, size) / size
        n_tiles *= len(plan.spans)
    work = red * sum(nodes[n].cost for n in names)
    # a tile's saved activations plus the gradients alive during its backward (measured on
    # resnet18: about half the activations at once)
    acts = sum(nodes[n].bytes for n in names if not nodes[n].inplace)
    tile_mem = TILE_GRAD_FACTOR * frac * acts
    # and the input tile's own copies: for a cut map its gradient, and where the segment may
    # write its input in place also the tile's copy and the clone the recompute runs on (else
    # tiles are views); the image's tile alone (it rarely needs a gradient)
    copies = 1 if nodes[src].read_only else INPUT_TILE_COPIES
    tile_mem += (copies if src != image else 1) * frac * nodes[src].bytes
    grads = sum(nodes[o].bytes for o in outs) + (nodes[src].bytes if src != image else 0)
    # a kept graph: every activation and the copy of the input the segment runs on, x
    # KEPT_GRAPH_FACTOR; its outputs are the stored map, counted apart
    graph = KEPT_GRAPH_FACTOR * (acts + nodes[src].bytes) - sum(nodes[o].bytes for o in outs)
    return work, tile_mem + grads, red, n_tiles, tile_mem, graph


def _fit(size, align, geos, tile):
    from .plan import _plan_one_axis

    return _plan_one_axis(0, size, align, geos, tile)


__all__ = ["PlanChoice", "choose_plan", "current_rss", "parse_bytes"]
