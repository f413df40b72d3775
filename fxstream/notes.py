"""What a user should be told once about a plan (the streamed module warns with these notes).

Work the stem leaves to the head (a stem that stops at a global statistic it cannot stream), an
image handed to the head as it is, passes whose tiles recompute most of themselves, with the
tile size or budget that would not, and statistics that cost the stem its work several times over.
"""
from __future__ import annotations

import torch.nn as nn

from . import budget as budget_search
from .analysis import Analysis
from .errors import PlanError
from .plans import Pass, Plan
from .segments import split_segments
from .tiling import plan_tiles

# a pass computing more than WASTEFUL_REDUNDANCY times its map's pixels is reported, with a tile
# size that brings it under GOOD_REDUNDANCY
WASTEFUL_REDUNDANCY = 3.0
GOOD_REDUNDANCY = 1.5
# a plan whose statistics passes multiply its stem work by more than this (against the same
# tiles run once per segment) is reported
STATISTICS_WORK = 2.0


def notes(analysis: Analysis, plan: Plan, work: tuple | None = None) -> tuple[str, ...]:
    """What a user should be told once about this plan: work the stem leaves to the head, an
    image handed to the head as it is, a plan that holds no less than the full image would,
    tiles that recompute most of themselves, statistics streamed at several times the stem's
    work (``work``: the plan's stem work and that of its segments' last passes alone, both
    relative to the stem streamed once without overlap; None without statistics passes)."""
    out = []
    share = analysis.stem_share
    if share is not None and share < 0.5:
        heads = [r for r in analysis.global_rows][:1]
        where = (f" (the head starts at '{heads[0].name}': {heads[0].reason})" if heads else "")
        out.append(f"the stem holds {share:.0%} of the model's forward work; the rest runs on "
                   f"the whole image in the head{where}")
    if analysis.image_in_boundary:
        out.append("the head reads the image itself (it is handed over as it is, not copied)")
    est = plan.estimate
    if est is not None and est.full_peak and est.peak >= est.full_peak:
        gib = 2**30
        out.append(f"this plan is estimated to hold {est.peak / gib:.2f} GiB, no less than the "
                   f"full image's step ({est.full_peak / gib:.2f} GiB): at this size the image "
                   "fits whole (the default budget is at least 512 MiB above what the process "
                   "holds); streaming saves memory on larger images")
    statistics = _statistics(analysis, plan, work)
    if statistics:
        out.append(statistics)
    for p in plan.passes:
        if p.redundancy > WASTEFUL_REDUNDANCY and p.num_tiles > 1:
            better = _better_tile(analysis, p, plan)
            out.append(f"pass {p.index} computes {p.redundancy:.1f}x the pixels of its map "
                       f"(tiles overlap by their receptive field){better}")
    return tuple(out)


def _statistics(analysis, plan: Plan, work) -> str:
    """Statistics streamed at a high price: every level of whole-image statistics (a norm
    reading the ones below it) is one more pass over its segment, from the image or the map
    stored before it, forward and backward (the backward of each level's statistics is a sum
    over the map too, needed before the level below), so a segment of k levels runs its first
    layers k times. Reported when those passes multiply the stem's work by more than
    STATISTICS_WORK against the same tiles run once per segment (overlap is the other note's)."""
    if work is None:
        return ""
    total, once = work
    if once <= 0 or total / once <= STATISTICS_WORK:
        return ""
    counts = {}
    for p in plan.passes:
        counts[p.segment] = counts.get(p.segment, 0) + 1
    extra = [p for i, p in enumerate(plan.passes)
             if i + 1 < len(plan.passes) and plan.passes[i + 1].segment == p.segment]
    where = ("one segment" if len(counts) == 1 else f"{len(counts)} segments "
             f"({', '.join(str(n) for n in counts.values())})")
    more = ("a larger memory_budget stores more maps and recomputes less"
            if plan.budget is not None else "a memory_budget lets the planner store maps "
            "between the levels (cuts= chooses them yourself), which recomputes less")
    freeze = any(s.batch for p in extra for s in p.sums) and _batchnorm_in_train(analysis)
    return (f"this plan streams whole-image statistics level by level in {len(plan.passes)} "
            f"passes over {where}: the stem's work is {total:.2f}x the stem streamed once, "
            f"{total / once:.1f} times the {once:.2f}x of one pass per segment. Each level of "
            "statistics is one more pass over its segment, from the image or the map stored "
            f"before it, forward and backward; {more}" +
            ("; fxstream.freeze_batchnorm(model) leaves train-mode BatchNorm nothing to stream"
             if freeze else ""))


def _batchnorm_in_train(analysis) -> bool:
    """Whether the model has a BatchNorm that freeze_batchnorm would put in eval mode and that
    then stops using batch statistics (``track_running_stats``)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and
               m.track_running_stats for m in analysis.graph_module.modules())


def _better_tile(analysis, p: Pass, plan: Plan) -> str:
    """A hint that brings a wasteful pass under GOOD_REDUNDANCY: a larger tile or a budget."""
    segs = split_segments(analysis, plan.cuts)
    seg = next(s for s in segs if s.source == p.source)
    for tile in budget_search.TILE_OPTIONS:
        if tile <= max(p.tile_size[k] or 0 for k in range(len(p.tile_size))):
            continue
        try:
            red = plan_tiles(seg.sizes, seg.align, seg.geometry, tile).redundancy
        except PlanError:
            continue
        if red <= GOOD_REDUNDANCY:
            return (f"; tile_size={tile} brings it to {red:.2f}x, or pass memory_budget= and "
                    "let the planner choose")
    return "; memory_budget= lets the planner cut the stem so tiles overlap little"


__all__ = ["GOOD_REDUNDANCY", "STATISTICS_WORK", "WASTEFUL_REDUNDANCY", "notes"]
