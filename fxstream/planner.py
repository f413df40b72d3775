"""The planner: an analysis and the user's options in, a frozen :class:`~fxstream.plans.Plan` out.

For one input shape it decides the cuts and every segment's tile size (the user's, or the
memory-budget search's in :mod:`fxstream.budget`), splits the stem into segments
(:mod:`fxstream.segments`), tiles each segment's map (:mod:`fxstream.tiling`), checks every
distinct tile length by running the segment on the meta device (a tile on which an op would fail
is widened), lowers the tiles to index tuples and records what the user should know.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch

import passes
from passes import GEOMETRY, ROLE, Local

from . import budget as budget_search
from . import memory as memory_model
from .analysis import Analysis
from .errors import PlanError, size_text
from .hostmem import pool_enabled
from .legal import check_stem_sizes, meta_value, plan_segment, smallest_tiles
from .notes import notes
from .lowering import lower, sum_output
from .plans import Estimate, MapOutput, Pass, Plan
from .segments import Segment, image_node, resolve_cuts, split_segments, whole_step
from .tiling import TilePlan, tile_sizes

log = logging.getLogger(__name__)

AUTO = "auto"  # memory_budget="auto": the default budget of fxstream.budget.auto_budget


@dataclass(frozen=True)
class PlanOptions:
    """What the user asked for (see :func:`fxstream.compile`)."""

    tile_size: object = None  # int, one per axis, or None (the budget chooses)
    cuts: tuple[str, ...] | None = None
    memory_budget: object = AUTO  # bytes, "8GiB", "auto" or None (no budget: tile_size plan)
    offload: bool = False
    cudnn_benchmark: bool = False


@dataclass(frozen=True)
class Situation:
    """Where the plan will run: what the budget counts besides the model."""

    device: str = "cpu"
    baseline: int | None = None  # memory in use now (None: measured when planning)
    image_resident: bool = False  # the image is already in memory (counted in the baseline)
    image_grad: bool = False  # the image requires grad (its gradient is a full-size map)
    image_lazy: bool = False  # the image is read tile by tile (fxstream.images): never whole
    output_written: bool = False  # the boundary maps go tile by tile into the user's arrays
    available: int | None = None  # memory the process can reach (None: asked when planning)


def make_plan(analysis: Analysis, options: PlanOptions, situation: Situation = Situation()
              ) -> Plan:
    """The plan the runtime runs for ``analysis.input_shape``.

    Raises :class:`PlanError` for a tile size that has no legal plan, an image too small for
    the stem, or a memory budget no plan meets.
    """
    check_stem_sizes(analysis)
    cuts = resolve_cuts(analysis, options.cuts) if options.cuts is not None else None
    if options.memory_budget is None or (options.memory_budget == AUTO and
                                         options.tile_size is not None) or \
            not split_segments(analysis, ()):
        # the user's tile size (and cuts) as asked: no budget, no estimate (nor for a stem
        # that streams nothing: the image itself is the boundary)
        n = len(split_segments(analysis, cuts or ()))
        pool = situation.device == "cpu" and pool_enabled()
        passes_ = build_passes(analysis, options, cuts or (), [options.tile_size] * n,
                               [pool] * n, [i == n - 1 for i in range(n)])
        return _finish(analysis, options, situation, passes_, cuts or (), None, None)
    # 1. what the budget counts besides the passes: the process, gradients, the head
    memory = budget_memory(analysis, options, situation)
    limit = budget_search.BUDGET_MARGIN * memory.budget
    corrections, cache, measured_cache, smallest = {}, {}, {}, {}
    phases, peak, best = [], math.inf, None  # best: the least measured (peak, phases)
    search = memory  # what the search plans for: the budget, less where plans measured over it
    for attempt in range(MEASURED_ATTEMPTS + SMALLER_ATTEMPTS):
        # 2. the search picks cuts, tiles and kept graphs with the per-node memory model
        try:
            choice = budget_search.choose_plan(analysis, search, tile_size=options.tile_size,
                                               cuts=cuts, keep_graphs=not options.offload,
                                               corrections=corrections, cache=cache,
                                               smallest=smallest)
        except PlanError:
            if search is memory:
                raise
            break  # nothing fits what is left of the budget: the least measured plan's error
        # 3. the segments' tiles, checked on the meta device, lowered to index tuples
        try:
            passes_ = build_passes(analysis, options, choice.cuts, choice.segment_tiles,
                                   choice.segment_pool, choice.segment_keep)
        except PlanError:
            # the search's estimate took a tile that the exact plan refuses (an op fails on
            # it): ask again without the tiles below each chosen segment's smallest legal one
            found = smallest_tiles(analysis, choice.cuts)
            if options.tile_size is not None or all(smallest.get(k) == v
                                                    for k, v in found.items()):
                raise
            smallest.update(found)
            continue
        # 4. the plan measured: the runtime's code on the meta device, pass by pass
        measured, phases = measure_plan(analysis, passes_, choice.cuts, memory, measured_cache)
        peak = max(ph.bytes for ph in phases)
        if peak <= limit:
            break
        best = min(best or (peak, phases), (peak, phases), key=lambda b: b[0])
        corrections = _corrections(analysis, choice, passes_, phases, memory, corrections)
        if attempt >= MEASURED_ATTEMPTS // 2:  # new segments keep appearing at the edge:
            # estimate the unmeasured ones as the worst measured so far
            corrections[None] = max(corrections.values(), default=1.0)
        if attempt >= MEASURED_ATTEMPTS - 1:
            # corrections alone can keep finding another plan just over the limit (the
            # search's estimates are not exact): plan for less of the budget, by the share the
            # last plan measured over it, rather than refuse a budget a smaller one plans under
            search = replace(search, budget=int(search.budget * limit / peak))
    if peak > limit:
        if best is None:
            raise PlanError(f"no legal plan found for a memory budget of "
                            f"{size_text(memory.budget)} for input "
                            f"{tuple(analysis.input_shape)}")
        peak, phases = best
        worst = max(phases, key=lambda ph: ph.bytes)
        raise PlanError(f"no plan fits a memory budget of {size_text(memory.budget)} for "
                        f"input {tuple(analysis.input_shape)}: the best found measures "
                        f"{size_text(peak)} in the {worst.name} (process baseline "
                        f"{size_text(memory.baseline)} included), over the "
                        f"{size_text(limit)} plans may use (they keep "
                        f"{1 - budget_search.BUDGET_MARGIN:.0%} of the budget in reserve)")
    # pooled loops trim their heap past HEAP_BOUND times their live bytes (hostmem.Guard)
    passes_ = tuple(replace(p, heap_bound=int(memory_model.HEAP_BOUND * max(m.forward,
                                                                           m.backward)))
                    if p.pool else p for p, m in zip(passes_, measured))
    estimate = Estimate(peak=int(peak), baseline=memory.baseline, stored=choice.stored_bytes,
                        work=plan_work(analysis, passes_), full_peak=memory.full_peak,
                        phases=tuple((ph.name, ph.bytes) for ph in phases))
    return _finish(analysis, options, situation, passes_, choice.cuts, memory.budget, estimate)


# how often the search is asked again with corrections when the measured plan exceeds the
# budget, and then how often for less of the budget
MEASURED_ATTEMPTS = 6
SMALLER_ATTEMPTS = 4


def plan_work(analysis, passes_) -> float:
    """The stem work of a step under these passes relative to the full image's: each pass's
    nodes' work times its redundancy, forward twice (no grad, then recomputed) and backward
    once, or once each where a pass keeps its graph."""
    costs = memory_model.node_costs(analysis)
    full = sum(c.work for c in costs.values()) or 1.0
    total = 0.0
    for p in passes_:
        work = sum(costs[n.name].work for n in p.graph.graph.nodes if n.name in costs)
        total += p.redundancy * work * (budget_search.WHOLE_LAST_WORK if p.keep else 1.0)
    return round(total / full, 3)


def build_passes(analysis, options, cuts, tiles, pools, keeps) -> tuple[Pass, ...]:
    """The passes of each segment between the cuts (one per step: see
    :class:`fxstream.segments.Step`), each with its tiles checked and lowered."""
    out = []
    for i, seg in enumerate(split_segments(analysis, cuts)):
        # one tile (its whole map) is possible only where the tile size covers the map
        covers = all(t is None or t >= n for t, n in zip(tile_sizes(tiles[i], len(seg.sizes)),
                                                          seg.sizes))
        whole = whole_step(analysis, seg) if len(seg.steps) > 1 and covers else None
        if whole is not None:
            # where one tile holds the whole map, its statistics are computed inside it
            try:
                plan = plan_segment(analysis, seg, tiles[i], whole)
            except PlanError:
                plan = None
            if plan is not None and plan.num_tiles == 1:
                out.append(replace(_pass(analysis, len(out), seg, whole, plan, tiles[i],
                                         pools[i], keeps[i], options, segment=i),
                                   whole=True))
                continue
        for k, step in enumerate(seg.steps):
            plan = plan_segment(analysis, seg, tiles[i], step)
            out.append(_pass(analysis, len(out), seg, step, plan, tiles[i], pools[i], keeps[i],
                             options, segment=i, step_index=k))
    return tuple(out)


def _finish(analysis, options, situation, passes_, cuts, budget, estimate) -> Plan:
    plan = Plan(input_shape=tuple(analysis.input_shape), dtype=analysis.dtype,
                device=situation.device, passes=tuple(passes_), cuts=tuple(cuts),
                boundary=tuple(analysis.boundary), budget=budget, estimate=estimate)
    # a plan that streams statistics in extra passes: its work, and the work of its segments'
    # last passes alone (the same tiles, one pass per segment), for the note on what they cost
    finals = [p for i, p in enumerate(passes_)
              if i + 1 == len(passes_) or passes_[i + 1].segment != p.segment]
    work = None
    if len(finals) < len(passes_):
        work = (estimate.work if estimate is not None else plan_work(analysis, passes_),
                plan_work(analysis, finals))
    return replace(plan, notes=notes(analysis, plan, work))


def budget_memory(analysis, options: PlanOptions, situation: Situation):
    """What a memory budget counts besides the passes, and the budget itself (``"auto"``: see
    :func:`fxstream.budget.auto_budget`, from the full image's measured step)."""
    baseline, available = memory_in_use(situation)
    gm = analysis.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    image = _bytes(nodes[image_node(gm).name])
    params = sum(p.numel() * p.element_size() for p in gm.parameters() if p.requires_grad)
    boundary = 0 if situation.output_written else \
        sum(_bytes(nodes[b]) for b in analysis.boundary if b != image_node(gm).name)
    loaded = 0 if situation.image_resident or situation.image_lazy else image
    fixed = baseline + params + loaded + 2 * boundary + memory_model.head_bytes(analysis)
    full_peak = None
    device_type = torch.device(situation.device).type
    if options.memory_budget == AUTO:
        full_peak = baseline + memory_model.full_step_live(analysis, device_type) - \
            (image if situation.image_resident else 0)
        budget = budget_search.auto_budget(full_peak, baseline, available)
    else:
        budget = budget_search.parse_bytes(options.memory_budget)
    device = torch.device(situation.device).type
    return budget_search.Memory(baseline=baseline, fixed=fixed, budget=budget, device=device,
                                image_grad=situation.image_grad, image_bytes=image,
                                full_peak=full_peak)


def measure_plan(analysis, passes_, cuts, memory, cache=None):
    """Each pass measured on the meta device, and every phase of the step it makes.
    ``cache``: measurements kept between calls (a pass is measured once)."""
    gm = analysis.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    image = image_node(gm).name
    cache = {} if cache is None else cache
    measured = []
    for i, p in enumerate(passes_):
        grad = p.source != image or memory.image_grad
        read = sums_read(nodes, p, passes_[i + 1:])
        key = (p.source, tuple(o.name for o in p.outputs), tuple(s.name for s in p.sums),
               p.side_inputs, p.tiles[0].lengths, p.view_input, p.keep, grad, read)
        if key not in cache:
            tm = nodes[p.source].meta["tensor_meta"]
            side = [_side_value(nodes[s]) for s in p.side_inputs]
            # whether the step back-propagates into a side input (the shape pass knows: it ran
            # with the arguments as given; an image that wants its gradient makes ``grad``)
            side_grad = any(getattr(nodes[s].meta.get("tensor_meta"), "requires_grad", False)
                            for s in p.side_inputs)
            cache[key] = memory_model.measure_pass(p, tm.shape, tm.dtype, side,
                                                   source_grad=grad, backend=memory.device,
                                                   read_sums=read, side_grad=side_grad)
        measured.append(cache[key])
    map_bytes = [sum(_bytes(nodes[o.name]) for o in p.outputs if o.name in cuts)
                 for p in passes_]
    source_grads = [_bytes(nodes[p.source]) if p.source in cuts else
                    (memory.image_bytes if memory.image_grad else 0) for p in passes_]
    factor = memory_model.ALLOCATOR_FACTOR.get(memory.device, 1.0)
    phases = memory_model.plan_phases(passes_, measured, map_bytes, source_grads, memory.fixed,
                                      factor)
    return measured, phases


def _side_value(node):
    """A pass's side input as the measurement hands it in: statistics computed in the step, and
    the model's other inputs that want a gradient, carry one there, and the backward of the
    ops that read them holds tile-sized temporaries for it (14 statistics read in one MONAI
    U-Net pass: 0.11 GiB)."""
    tm = node.meta.get("tensor_meta")
    value = meta_value(tm)
    grad = node.op != "placeholder" or bool(getattr(tm, "requires_grad", False))
    if grad and isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
        value.requires_grad_(True)
    return value


def sums_read(nodes, p: Pass, later) -> tuple[bool, ...]:
    """Per sum of pass ``p``: whether a statistic computed from it is read by a ``later`` pass
    (a side input) or by the head, so that the step back-propagates into it (a segment run in
    one tile computes its statistics inside the tile; its sums then often serve nothing that
    needs their gradient)."""
    side = {s for q in later for s in q.side_inputs}
    out = []
    for s in p.sums:
        seen, stack, read = set(), [nodes[s.name]], False
        while stack and not read:
            node = stack.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            read = node.name in side or node.op == "output" or node.meta.get(ROLE) == "head"
            # statistics derived from it (not the maps that mix it in: those are the pass's)
            stack += [u for u in node.users if u.op == "output" or u.meta.get(ROLE) == "head"
                      or not isinstance(u.meta.get(GEOMETRY), Local)]
        out.append(read)
    return tuple(out)


def _corrections(analysis, choice, passes_, phases, memory, corrections):
    """Per segment, how much more its own memory measured than the search estimated (the
    phase's total less what the process and earlier segments hold, which both count alike)."""
    out = dict(corrections)
    held = 0.0
    gm = analysis.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    points = [image_node(gm).name, *choice.cuts, None]
    for seg, (src, dst) in enumerate(zip(points, points[1:])):
        mine = {f"pass {p.index}" for p in passes_ if p.segment == seg}
        measured = max(ph.bytes for ph in phases if ph.name.split(" of ")[-1] in mine)
        own = choice.segment_mem[seg]
        if measured > memory.fixed + held + own and own > 0:
            used = out.get((src, dst), out.get(None, 1.0))  # the factor the search applied
            out[(src, dst)] = used * (measured - memory.fixed - held) / own
        held += (_bytes(nodes[dst]) if dst is not None else 0) + choice.segment_held[seg]
    return out


def _bytes(node) -> int:
    tm = node.meta.get("tensor_meta")
    return math.prod(tm.shape) * tm.dtype.itemsize if hasattr(tm, "shape") else 0


def memory_in_use(situation: Situation) -> tuple[int, int | None]:
    """The budget's baseline and the memory the process can reach: resident memory and what
    the OS reports available on the CPU; allocated and free device memory on CUDA."""
    device = torch.device(situation.device)
    if device.type == "cuda" and situation.baseline is not None and \
            situation.available is not None:
        return situation.baseline, situation.available
    if device.type == "cuda":
        allocated = torch.cuda.memory_allocated(device)
        baseline = allocated if situation.baseline is None else situation.baseline
        if situation.available is not None:
            return baseline, situation.available
        free, _total = torch.cuda.mem_get_info(device)
        return baseline, allocated + free
    baseline = budget_search.current_rss() if situation.baseline is None else situation.baseline
    return baseline, situation.available


def _pass(analysis, index, seg: Segment, step, tiles: TilePlan, tile_size, pool, keep,
          options: PlanOptions, segment: int = 0, step_index: int = 0) -> Pass:
    gm = analysis.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    rank = len(analysis.input_shape) if seg.source == image_node(gm).name else \
        len(nodes[seg.source].meta["tensor_meta"].shape)
    src_dims = nodes[seg.source].meta[GEOMETRY].dims
    per_output = list(zip(*step.geometry))
    outputs = tuple(MapOutput(o, tuple(nodes[o].meta[GEOMETRY].dims),
                              tuple(g.size for g in geos))
                    for o, geos in zip(step.outputs, per_output))
    lowered = lower(tiles, rank, src_dims, outputs)
    graph = step.graph
    view = all(passes.only_read(n, graph) for n in graph.graph.nodes if n.op == "placeholder"
               and n.name == seg.source)
    random = any(passes.draws_random(n, graph) for n in graph.graph.nodes)
    n_maps = len(step.maps)
    sums = tuple(sum_output(nodes, r, lowered, n_maps + j) for j, r in enumerate(step.sums))
    return Pass(index=index, source=seg.source, side_inputs=step.side_inputs,
                outputs=outputs[:n_maps], tiles=lowered,
                tile_size=tuple(tile_sizes(tile_size, len(seg.sizes))),
                redundancy=round(tiles.redundancy, 4), view_input=view,
                pool=bool(pool) and len(lowered) > 1,
                keep=bool(keep) and len(lowered) == 1, random=random,
                offload=bool(options.offload) and not set(step.maps) & set(analysis.boundary)
                and bool(step.maps), graph=graph, sums=sums, segment=segment, step=step_index)


__all__ = ["AUTO", "PlanOptions", "Situation", "make_plan"]
