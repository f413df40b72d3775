"""The two halves of a norm over the image's statistics (see :mod:`passes.statistics`)."""
from __future__ import annotations

from ..context import NotLocal, RuleContext
from ..geometry import Local, Reduced, Reduction
from ..statistics import moments, normalize
from .helpers import _check_channel_params
from .table import rule


@rule(moments)
def moments_rule(ctx: RuleContext) -> Reduced:
    """Mean and variance over every spatial axis (and channel groups, and maybe the batch): a
    streamed reduction."""
    local = ctx.local()
    _check_channel_params(ctx, local, "per-channel-group statistics")
    if any(d == 0 for d in local.dims):
        raise NotLocal("statistics over a batch dim that is spatial")
    groups = ctx.value(ctx.arg(1, "groups"))
    batch = bool(ctx.value(ctx.arg(2, "batch", False)))
    over = "the batch and the whole image" if batch else "the whole image"
    return Reduced(ctx.node.name, f"mean and variance over {over} (a norm's statistics)",
                   Reduction("moments", tuple(sorted(local.dims)), False, 0, int(groups), batch))


@rule(normalize)
def normalize_rule(ctx: RuleContext) -> Local:
    """Pointwise once the statistics are known (they are the same in every tile)."""
    local = ctx.local()
    _check_channel_params(ctx, local, "normalisation per channel group")
    if isinstance(ctx.geom(ctx.arg(1, "stats")), Local):
        raise NotLocal("normalises with statistics that vary over the image")
    return local
