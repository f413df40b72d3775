"""Rules for optional packages (torchvision.ops), registered once the package is imported."""
from __future__ import annotations

from ..context import NotLocal, RuleContext
from ..geometry import Local
from .table import OPTIONAL_RULES
from .table import rule


# torchvision.ops (optional): functions that torch.fx keeps as single calls (torch.fx.wrap)


def _train_flag(ctx, index, name):
    return bool(ctx.value(ctx.arg(index, name, True)))


def stochastic_depth_rule(ctx: RuleContext) -> Local:
    """``stochastic_depth(input, p, mode, training)``: the identity in eval mode or with p=0;
    in training, ``input * noise`` with noise of shape ``(N, 1, ...)`` ("row") or ``(1, ...)``
    ("batch"): a per-sample scale, so local (each tile draws its own noise, like dropout)."""
    local = ctx.local()
    if ctx.module is not None:
        p, mode = ctx.module.p, ctx.module.mode
    else:
        p, mode = ctx.value(ctx.arg(1, "p")), ctx.value(ctx.arg(2, "mode"))
    if mode not in ("row", "batch") or not isinstance(p, (int, float)):
        raise NotLocal(f"stochastic_depth with mode={mode!r}, p={p!r} is not understood")
    return local


def drop_block_rule(ctx: RuleContext) -> Local:
    """``drop_block2d/3d(input, p, block_size, inplace, eps, training)``: the identity in eval
    mode or with p=0; in training it rescales by the kept fraction of the whole image."""
    local = ctx.local()
    if ctx.module is not None:
        p, training = ctx.module.p, ctx.module.training
    else:
        p, training = ctx.value(ctx.arg(1, "p")), _train_flag(ctx, 5, "training")
    if training and p != 0:
        raise NotLocal("DropBlock in training mode rescales by the fraction of positions kept "
                       "over the whole image; call model.eval() or set p=0")
    return local


def _register_torchvision() -> None:
    """Rules for torchvision.ops, registered once torchvision is imported (a model that uses
    them has imported it); passes never import torchvision themselves (it costs ~1 s)."""
    from torchvision.ops import DropBlock2d, DropBlock3d, StochasticDepth
    from torchvision.ops import drop_block2d, drop_block3d, stochastic_depth

    rule(StochasticDepth, stochastic_depth)(stochastic_depth_rule)
    rule(DropBlock2d, DropBlock3d, drop_block2d, drop_block3d)(drop_block_rule)


OPTIONAL_RULES["torchvision"] = _register_torchvision
