"""Pointwise and per-channel ops, BatchNorm, and norms with statistics over space."""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..context import NotLocal, RuleContext
from ..geometry import Local, Symbolic
from .helpers import _check_channel_params, _check_constant_args
from .table import rule


POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.AlphaDropout,
    nn.Hardshrink, nn.Softshrink,
)
CHANNEL_MODULES = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.FeatureAlphaDropout, nn.PReLU,
                   nn.ChannelShuffle)
POINTWISE_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu, F.selu, F.celu, F.gelu, F.silu,
    F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.hardtanh_, F.sigmoid, F.tanh, F.softplus,
    F.softsign, F.logsigmoid, F.dropout, F.alpha_dropout, F.threshold,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.abs, torch.neg, torch.clamp, torch.clip, torch.erf, torch.square,
    torch.sign, torch.reciprocal, torch.nan_to_num, torch.floor, torch.ceil, torch.round,
    operator.neg, operator.pos, torch.sin, torch.cos, torch.log1p, torch.expm1,
    F.dropout1d, F.dropout2d, F.dropout3d,
)
CHANNEL_FUNCTIONS = (F.channel_shuffle, torch.channel_shuffle, torch.native_channel_shuffle)
POINTWISE_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt", "rsqrt",
    "abs", "neg", "clamp", "clamp_", "clip", "clip_", "contiguous", "float", "double", "half",
    "bfloat16", "to", "type", "type_as", "clone", "detach", "square", "sign", "reciprocal",
    "erf", "floor", "ceil", "round", "exp_", "hardtanh_", "nan_to_num", "cpu", "cuda",
    "requires_grad_", "sin", "cos",
)


@rule(*POINTWISE_MODULES, *POINTWISE_FUNCTIONS, *POINTWISE_METHODS)
def pointwise(ctx: RuleContext) -> Local:
    local = ctx.local()
    _check_scalar_args(ctx)
    return local


@rule(*CHANNEL_MODULES, *CHANNEL_FUNCTIONS)
def channelwise(ctx: RuleContext) -> Local:
    """Ops that treat dim 1 as channels (per-channel weights, channel shuffle)."""
    local = ctx.local()
    _check_channel_params(ctx, local, "a per-channel op")
    _check_scalar_args(ctx)
    return local


def _check_scalar_args(ctx):
    """Other arguments of a pointwise op must be constants, not image-size values."""
    for raw in list(ctx.node.args[1:]) + list(ctx.node.kwargs.values()):
        g = ctx.geom(raw) if not isinstance(raw, (list, tuple)) else None
        if isinstance(g, Symbolic):
            ctx.value(raw)
        elif isinstance(g, Local):
            raise NotLocal("a second tensor argument where a pointwise op expects a scalar")


@rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
def batchnorm(ctx: RuleContext) -> Local:
    local = ctx.local()
    m = ctx.module
    if m.training or not m.track_running_stats or m.running_mean is None:
        raise NotLocal(
            "train-mode BatchNorm normalises with statistics over the batch and the whole image; "
            "call model.eval() or fxstream.freeze_batchnorm(model)",
            kind="train_batchnorm",
        )
    _check_channel_params(ctx, local, "BatchNorm statistics")
    return local


@rule(F.batch_norm)
def batchnorm_function(ctx: RuleContext) -> Local:
    local = ctx.local()
    training = ctx.value(ctx.arg(5, "training", False))
    if training:
        raise NotLocal("F.batch_norm with training=True uses statistics over the whole image",
                       kind="train_batchnorm")
    _check_channel_params(ctx, local, "BatchNorm statistics")
    return local


@rule(nn.GroupNorm, F.group_norm)
def statistics_over_space(ctx: RuleContext) -> Local:
    name = getattr(ctx.node.target, "__name__", type(ctx.module).__name__)
    raise NotLocal(f"{name} normalises with statistics over the whole spatial extent")


@rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def instance_norm_module(ctx: RuleContext) -> Local:
    """Per-channel and local only in eval mode with tracked running statistics."""
    m = ctx.module
    if m.training or not m.track_running_stats or m.running_mean is None:
        raise NotLocal(f"{type(m).__name__} normalises with statistics over the whole spatial "
                       "extent")
    local = ctx.local()
    _check_channel_params(ctx, local, "InstanceNorm running statistics")
    return local


@rule(F.instance_norm)
def instance_norm_function(ctx: RuleContext) -> Local:
    use_input_stats = ctx.value(ctx.arg(5, "use_input_stats", True))
    if use_input_stats or ctx.arg(1, "running_mean", None) is None:
        raise NotLocal("instance_norm normalises with statistics over the whole spatial extent")
    local = ctx.local()
    _check_channel_params(ctx, local, "InstanceNorm running statistics")
    _check_constant_args(ctx, [1, 2, 3, 4], ["running_mean", "running_var", "weight", "bias"])
    return local


@rule(nn.LocalResponseNorm, F.local_response_norm)
def local_response_norm(ctx: RuleContext) -> Local:
    """A window over neighbouring channels (dim 1) at each position: local in space."""
    local = ctx.local()
    _check_channel_params(ctx, local, "LocalResponseNorm's channel window")
    return local
