"""The rule table: one entry per op (module type, function, or method name) -> geometry rule.

A rule takes a :class:`RuleContext` and returns the node's new :class:`Local` geometry, or raises
:class:`NotLocal` with the reason. Ops missing from :data:`RULES` are non-local
("no geometry rule for ..."): never guessed local.
"""
from __future__ import annotations

import operator
import sys

import sympy
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .context import NotLocal, RuleContext
from .geometry import Local, Symbolic, hull, is_tile_invariant
from .windows import (conv_axis, expand, integer_factor, linear_axis, nearest_axis, pool_axis,
                      transposed_axis)

RULES: dict = {}


def rule(*keys):
    """Register a rule under module types, functions, or method names (strings)."""

    def register(fn):
        for key in keys:
            RULES[key] = fn
        return fn

    return register


def lookup(node, module):
    """The rule for a node, or None. Module subclasses inherit a rule only if forward is kept."""
    for package in [p for p in OPTIONAL_RULES if p in sys.modules]:
        OPTIONAL_RULES.pop(package)()
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in RULES:
                return RULES[cls] if cls.forward is type(module).forward else None
        return None
    if node.op == "call_method":
        return RULES.get(node.target)
    if node.op == "call_function":
        return RULES.get(node.target)
    return None


# ---------------------------------------------------------------------------------------------
# helpers


def _rank(ctx, raw=None):
    shape = ctx.shape(ctx.arg(0, "input") if raw is None else raw)
    if shape is None:
        raise NotLocal("input has no recorded shape")
    return len(shape)


def _norm_dim(d, rank):
    return d + rank if d < 0 else d


def _require_non_spatial(ctx, local: Local, dims, what: str):
    for d in dims:
        if d in local.dims:
            k = local.dims.index(d)
            raise NotLocal(f"{what} over spatial axis {k} (tensor dim {d})")


def _window(ctx, local: Local, n: int, axis_fn):
    """Apply a window layer over the last ``n`` tensor dims; ``axis_fn(j, axis) -> (s, a, b, size)``."""
    rank = _rank(ctx)
    wanted = tuple(range(rank - n, rank))
    if len(local.axes) != n or sorted(local.dims) != list(wanted):
        raise NotLocal(f"a {n}-d window layer over tensor dims {wanted}, "
                       f"but the spatial axes are dims {local.dims}")
    axes = list(local.axes)
    for k, d in enumerate(local.dims):
        j = d - (rank - n)
        s, a, b, size = axis_fn(j, axes[k])
        axes[k] = axes[k].then(s, a, b, size)
    return local.with_axes(axes)


def _check_channel_params(ctx, local: Local, what="per-channel parameters"):
    """Layers with per-channel parameters read tensor dim 1 (or 0 when unbatched)."""
    rank = _rank(ctx)
    if 1 in local.dims and rank > 2:
        raise NotLocal(f"{what} on dim 1, which is spatial here")


# ---------------------------------------------------------------------------------------------
# pointwise


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
            f"train-mode BatchNorm normalises with statistics over the batch and the whole image; "
            f"call model.eval() or fxstream.freeze_batchnorm(model)",
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


def _check_constant_args(ctx, indices, names):
    """Weights of a layer (conv weight, linear weight, norm statistics) must be constants."""
    for i, name in zip(indices, names):
        raw = ctx.arg(i, name, None)
        if isinstance(ctx.geom(raw), Local):
            raise NotLocal(f"its {name} is computed from the image")


# ---------------------------------------------------------------------------------------------
# joins: binary arithmetic, cat, stack


BINARY = (operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
          operator.pow, operator.iadd, operator.isub, operator.imul, operator.itruediv,
          torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.pow,
          torch.where, torch.lerp, torch.addcmul, torch.true_divide, torch.subtract,
          torch.multiply)
BINARY_METHODS = ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow",
                  "maximum", "minimum", "masked_fill", "lerp", "expand_as")


@rule(*BINARY, *BINARY_METHODS)
def elementwise(ctx: RuleContext) -> Local:
    """Broadcasting arithmetic: local operands must share a grid; constants must not vary in space."""
    out_shape = ctx.out_shape
    if out_shape is None:
        raise NotLocal("result is not a tensor")
    out_rank = len(out_shape)
    operands = [a for a in list(ctx.node.args) + list(ctx.node.kwargs.values())]
    locals_, consts = [], []
    for raw in operands:
        g = ctx.geom(raw)
        if isinstance(g, Local):
            locals_.append((raw, g))
        elif isinstance(g, Symbolic):
            ctx.value(raw)  # scalar derived from shapes: must be size-independent
        elif isinstance(raw, fx.Node) and ctx.shape(raw) is not None:
            consts.append(raw)
    shifted = []
    for raw, g in locals_:
        shift = out_rank - _rank(ctx, raw)
        shifted.append(g.with_axes(g.axes, [d + shift for d in g.dims]))
        in_shape = ctx.shape(raw)
        for k, d in enumerate(g.dims):
            if in_shape[d] != out_shape[d + shift]:
                raise NotLocal(f"operand '{raw.name}' is broadcast along spatial axis {k}")
    first = shifted[0]
    for other in shifted[1:]:
        if other.dims != first.dims or any(a.stride != b.stride for a, b in
                                           zip(other.axes, first.axes)):
            raise NotLocal("joins tensors on different grids (strides "
                           f"{[str(a.stride) for a in first.axes]} vs "
                           f"{[str(a.stride) for a in other.axes]})")
    for raw in consts:
        _check_broadcast_constant(ctx, raw, first.dims, out_rank)
    axes = [hull([loc.axes[k] for loc in shifted]) for k in range(len(first.axes))]
    return first.with_axes(axes)


def _check_broadcast_constant(ctx, raw, spatial_dims, out_rank):
    shape = ctx.shape(raw)
    shift = out_rank - len(shape)
    for d in spatial_dims:
        j = d - shift
        if j >= 0 and shape[j] != 1:
            raise NotLocal(f"combines with '{raw.name}', a tensor of fixed size {shape[j]} "
                           f"along a spatial axis")


@rule(torch.cat, torch.concat, torch.concatenate)
def cat(ctx: RuleContext) -> Local:
    tensors = ctx.arg(0, "tensors")
    dim = ctx.value(ctx.arg(1, "dim", 0))
    rank = len(ctx.out_shape)
    dim = _norm_dim(dim, rank)
    parts = []
    for raw in tensors:
        g = ctx.geom(raw)
        if isinstance(g, Local):
            parts.append(g)
        elif ctx.shape(raw) is not None:
            parts.append(None)
    locals_ = [p for p in parts if p is not None]
    first = locals_[0]
    if dim in first.dims:
        raise NotLocal(f"concatenates along spatial axis {first.dims.index(dim)}")
    if len(locals_) != len(parts):
        raise NotLocal("concatenates a local tensor with a constant of fixed spatial size")
    for other in locals_[1:]:
        if other.dims != first.dims or any(a.stride != b.stride for a, b in
                                           zip(other.axes, first.axes)):
            raise NotLocal("concatenates tensors on different grids")
    return first.with_axes([hull([p.axes[k] for p in locals_]) for k in range(len(first.axes))])


@rule(torch.stack)
def stack(ctx: RuleContext) -> Local:
    tensors = ctx.arg(0, "tensors")
    dim = _norm_dim(ctx.value(ctx.arg(1, "dim", 0)), len(ctx.out_shape))
    locals_ = [ctx.geom(t) for t in tensors]
    if not all(isinstance(g, Local) for g in locals_):
        raise NotLocal("stacks a local tensor with a constant of fixed spatial size")
    first = locals_[0]
    for other in locals_[1:]:
        if other.dims != first.dims or any(a.stride != b.stride for a, b in
                                           zip(other.axes, first.axes)):
            raise NotLocal("stacks tensors on different grids")
    dims = [d + 1 if d >= dim else d for d in first.dims]
    return first.with_axes([hull([p.axes[k] for p in locals_]) for k in range(len(first.axes))],
                           dims)


# ---------------------------------------------------------------------------------------------
# convolution, pooling, transposed convolution


def _conv_padding(padding, n, kernel, dilation):
    if padding == "valid":
        return (0,) * n, (0,) * n
    if padding == "same":
        lo, hi = [], []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            lo.append(total // 2)
            hi.append(total - total // 2)
        return tuple(lo), tuple(hi)
    p = expand(padding, n, "padding")
    return p, p


def _conv(ctx, n, kernel, stride, padding, dilation, mode="zeros"):
    local = ctx.local()
    kernel = expand(kernel, n, "kernel_size")
    stride = expand(stride, n, "stride")
    dilation = expand(dilation, n, "dilation")
    lo, hi = _conv_padding(padding, n, kernel, dilation)
    if mode == "circular":
        raise NotLocal("circular padding wraps around the image: border outputs read the far side")
    if mode in ("reflect", "replicate"):
        for j in range(n):
            reach = dilation[j] * (kernel[j] - 1)
            limit = reach // 2 if mode == "reflect" else reach
            if max(lo[j], hi[j]) > limit:
                raise NotLocal(f"{mode} padding of {max(lo[j], hi[j])} reads outside the "
                               f"kernel's window at the border (at most {limit} is local)")
    return _window(ctx, local, n,
                   lambda j, ax: conv_axis(ax.size, kernel[j], stride[j], lo[j], hi[j],
                                           dilation[j]))


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_module(ctx: RuleContext) -> Local:
    m = ctx.module
    n = len(m.kernel_size)
    return _conv(ctx, n, m.kernel_size, m.stride, m.padding, m.dilation, m.padding_mode)


@rule(F.conv1d, F.conv2d, F.conv3d)
def conv_function(ctx: RuleContext) -> Local:
    _check_constant_args(ctx, [1, 2], ["weight", "bias"])
    weight_shape = ctx.param_shape(ctx.arg(1, "weight"))
    kernel = weight_shape[2:]
    n = len(kernel)
    return _conv(ctx, n, kernel, ctx.value(ctx.arg(3, "stride", 1)),
                 ctx.value(ctx.arg(4, "padding", 0)), ctx.value(ctx.arg(5, "dilation", 1)))


def _pool(ctx, n, kernel, stride, padding, dilation, ceil_mode):
    local = ctx.local()
    kernel = expand(kernel, n, "kernel_size")
    stride = expand(stride if stride not in (None, [], ()) else kernel, n, "stride")
    padding = expand(padding, n, "padding")
    dilation = expand(dilation, n, "dilation")
    return _window(ctx, local, n,
                   lambda j, ax: pool_axis(ax.size, kernel[j], stride[j], padding[j],
                                           dilation[j], ceil_mode))


@rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def maxpool_module(ctx: RuleContext) -> Local:
    m = ctx.module
    if m.return_indices:
        raise NotLocal("max pooling with return_indices gives indices into the whole image")
    n = int(type(m).__name__[-2])
    return _pool(ctx, n, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


@rule(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
def avgpool_module(ctx: RuleContext) -> Local:
    m = ctx.module
    n = int(type(m).__name__[-2])
    return _pool(ctx, n, m.kernel_size, m.stride, m.padding, 1, m.ceil_mode)


def _pool_function(n, has_dilation):
    def pool_fn(ctx: RuleContext) -> Local:
        kernel = ctx.value(ctx.arg(1, "kernel_size"))
        stride = ctx.value(ctx.arg(2, "stride", None))
        padding = ctx.value(ctx.arg(3, "padding", 0))
        if has_dilation:
            dilation = ctx.value(ctx.arg(4, "dilation", 1))
            ceil_mode = ctx.value(ctx.arg(5, "ceil_mode", False))
            if ctx.value(ctx.arg(6, "return_indices", False)):
                raise NotLocal("max pooling with return_indices gives indices into the image")
        else:
            dilation = 1
            ceil_mode = ctx.value(ctx.arg(4, "ceil_mode", False))
        return _pool(ctx, n, kernel, stride, padding, dilation, ceil_mode)

    return pool_fn


rule(F.max_pool1d)(_pool_function(1, True))
rule(F.max_pool2d)(_pool_function(2, True))
rule(F.max_pool3d)(_pool_function(3, True))
rule(F.avg_pool1d)(_pool_function(1, False))
rule(F.avg_pool2d)(_pool_function(2, False))
rule(F.avg_pool3d)(_pool_function(3, False))


@rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose_module(ctx: RuleContext) -> Local:
    m = ctx.module
    n = len(m.kernel_size)
    if len(ctx.node.args) > 1 or "output_size" in ctx.node.kwargs:
        raise NotLocal("ConvTranspose with output_size: the size is not a fixed ratio")
    return _conv_transpose(ctx, n, m.kernel_size, m.stride, m.padding, m.dilation,
                           m.output_padding)


@rule(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
def conv_transpose_function(ctx: RuleContext) -> Local:
    _check_constant_args(ctx, [1, 2], ["weight", "bias"])
    kernel = ctx.param_shape(ctx.arg(1, "weight"))[2:]
    n = len(kernel)
    return _conv_transpose(ctx, n, kernel, ctx.value(ctx.arg(3, "stride", 1)),
                           ctx.value(ctx.arg(4, "padding", 0)),
                           ctx.value(ctx.arg(7, "dilation", 1)),
                           ctx.value(ctx.arg(5, "output_padding", 0)))


def _conv_transpose(ctx, n, kernel, stride, padding, dilation, output_padding):
    local = ctx.local()
    kernel, stride = expand(kernel, n, "kernel_size"), expand(stride, n, "stride")
    padding, dilation = expand(padding, n, "padding"), expand(dilation, n, "dilation")
    output_padding = expand(output_padding, n, "output_padding")
    for j in range(n):
        if len({dilation[j] * t % stride[j] for t in range(kernel[j])}) < stride[j]:
            raise NotLocal(f"transposed conv with kernel {kernel[j]} < stride {stride[j]} (after "
                           "dilation) leaves outputs that read no input; a tile cannot place "
                           "them, so it is not streamed")
    return _window(ctx, local, n,
                   lambda j, ax: transposed_axis(ax.size, kernel[j], stride[j], padding[j],
                                                 dilation[j], output_padding[j]))


# ---------------------------------------------------------------------------------------------
# upsampling


def _upsample(ctx, local, size, scale_factor, mode, align_corners):
    rank = _rank(ctx)
    n = rank - 2
    if align_corners:
        raise NotLocal("interpolation with align_corners=True: the scale depends on the image size")
    if mode not in ("nearest", "linear", "bilinear", "trilinear"):
        raise NotLocal(f"no geometry rule for interpolate mode '{mode}'", kind="no_rule")
    if size is not None:
        factors = []
        sizes = expand(size, n, "size")
        for j in range(n):
            k = local.dims.index(rank - n + j) if (rank - n + j) in local.dims else None
            if k is None:
                raise NotLocal("interpolate over a non-spatial tensor dim")
            ratio = sympy.simplify(sympy.sympify(sizes[j]) / local.axes[k].size)
            if not (ratio.is_integer and ratio >= 1):
                raise NotLocal(f"interpolate to size {sizes[j]}: not a fixed integer ratio of "
                               f"the input size {local.axes[k].size}")
            factors.append(int(ratio))
    else:
        factors = [integer_factor(f, "interpolate") for f in expand(scale_factor, n,
                                                                      "scale_factor")]
    axis_fn = nearest_axis if mode == "nearest" else linear_axis
    return _window(ctx, local, n, lambda j, ax: axis_fn(ax.size, factors[j]))


@rule(F.interpolate, F.upsample)
def interpolate(ctx: RuleContext) -> Local:
    local = ctx.local()
    size = ctx.symbolic(ctx.arg(1, "size", None))
    scale = ctx.value(ctx.arg(2, "scale_factor", None))
    mode = ctx.value(ctx.arg(3, "mode", "nearest"))
    align = ctx.value(ctx.arg(4, "align_corners", None))
    if ctx.value(ctx.arg(6, "antialias", False)):
        raise NotLocal("antialiased interpolation has no geometry rule", kind="no_rule")
    return _upsample(ctx, local, size, scale, mode, align)


@rule(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def upsample_module(ctx: RuleContext) -> Local:
    m = ctx.module
    align = m.align_corners if not isinstance(m, nn.UpsamplingBilinear2d) else True
    return _upsample(ctx, ctx.local(), m.size, m.scale_factor, m.mode, align)


# ---------------------------------------------------------------------------------------------
# padding


def _pad(ctx, local: Local, pads, mode):
    """``pads`` is F.pad's list: (last_lo, last_hi, second_last_lo, ...), possibly symbolic."""
    rank = _rank(ctx)
    if mode == "circular" and any(
            (rank - 1 - i // 2) in local.dims and sympy.sympify(p) != 0
            for i, p in enumerate(pads)):
        raise NotLocal("circular padding wraps around the image: border outputs read the far side")
    axes = list(local.axes)
    for i in range(0, len(pads), 2):
        d = rank - 1 - i // 2
        if d not in local.dims:
            for p in pads[i:i + 2]:
                ctx.value(p) if isinstance(p, sympy.Basic) and p.free_symbols else None
            continue
        k = local.dims.index(d)
        lo, hi = sympy.sympify(pads[i]), sympy.sympify(pads[i + 1])
        ax = axes[k]
        for p, side in ((lo, "start"), (hi, "end")):
            if not is_tile_invariant(p, ax.align, ctx.symbols):
                raise NotLocal(f"pads axis {k} at the {side} by {p}, which is not the same in "
                               f"every tile")
        if mode in ("reflect", "replicate") and (not lo.is_number or not hi.is_number or
                                                 lo > 0 or hi > 0):
            raise NotLocal(f"{mode} padding by F.pad reads the border rows it mirrors: "
                           "no geometry rule", kind="no_rule")
        # a crop (negative pad) leaves a tile without values next to its edges that the image
        # has: widen the window so the outputs that would read them stay invalid
        a, b = sympy.Min(-lo, 0), -lo + sympy.Max(0, -hi)
        axes[k] = ax.then(1, a, b, ax.size + lo + hi)
    return local.with_axes(axes)


@rule(F.pad)
def pad_function(ctx: RuleContext) -> Local:
    local = ctx.local()
    pads = ctx.symbolic(ctx.arg(1, "pad"))
    mode = ctx.value(ctx.arg(2, "mode", "constant"))
    return _pad(ctx, local, list(pads), mode)


@rule(nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
      nn.ConstantPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
      nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
      nn.ReplicationPad2d, nn.ReplicationPad3d)
def pad_module(ctx: RuleContext) -> Local:
    m = ctx.module
    name = type(m).__name__
    mode = ("circular" if "Circular" in name else "reflect" if "Reflection" in name
            else "replicate" if "Replication" in name else "constant")
    return _pad(ctx, ctx.local(), list(m.padding), mode)


# ---------------------------------------------------------------------------------------------
# layout: permute, transpose, (un)squeeze, reshape, flatten, chunk/split, getitem


@rule("permute", torch.permute)
def permute(ctx: RuleContext) -> Local:
    local = ctx.local()
    args = ctx.node.args[1:]
    order = ctx.value(args[0] if len(args) == 1 and isinstance(args[0], (list, tuple))
                      else list(args) if args else ctx.arg(None, "dims"))
    rank = _rank(ctx)
    order = [_norm_dim(d, rank) for d in order]
    return local.with_axes(local.axes, [order.index(d) for d in local.dims])


@rule("transpose", torch.transpose, "swapaxes", torch.swapaxes)
def transpose(ctx: RuleContext) -> Local:
    local = ctx.local()
    rank = _rank(ctx)
    d0 = _norm_dim(ctx.value(ctx.arg(1, "dim0")), rank)
    d1 = _norm_dim(ctx.value(ctx.arg(2, "dim1")), rank)
    swap = {d0: d1, d1: d0}
    return local.with_axes(local.axes, [swap.get(d, d) for d in local.dims])


@rule("unsqueeze", torch.unsqueeze)
def unsqueeze(ctx: RuleContext) -> Local:
    local = ctx.local()
    dim = _norm_dim(ctx.value(ctx.arg(1, "dim")), _rank(ctx) + 1)
    return local.with_axes(local.axes, [d + 1 if d >= dim else d for d in local.dims])


@rule("squeeze", torch.squeeze, "view", "reshape", torch.reshape, "flatten", torch.flatten,
      nn.Flatten, "unflatten", torch.unflatten, nn.Unflatten, "view_as", "reshape_as")
def reshape(ctx: RuleContext) -> Local:
    """Any reshape keeps a spatial axis iff the dims before it and after it keep their products,
    and the new shape does not hard-code the spatial size."""
    local = ctx.local()
    in_shape, out_shape = ctx.shape(ctx.arg(0, "input")), ctx.out_shape
    dims = []
    for k, d in enumerate(local.dims):
        before, after = _prod(in_shape[:d]), _prod(in_shape[d + 1:])
        matches = [e for e in range(len(out_shape))
                   if out_shape[e] == in_shape[d] and _prod(out_shape[:e]) == before
                   and _prod(out_shape[e + 1:]) == after]
        if len(matches) != 1:
            raise NotLocal(f"reshape merges or splits spatial axis {k} (tensor dim {d}, "
                           f"shape {tuple(in_shape)} -> {tuple(out_shape)})")
        dims.append(matches[0])
    if ctx.node.target in ("view", "reshape", torch.reshape):
        _check_reshape_sizes(ctx, local, dims)
    if ctx.node.target in ("unflatten", torch.unflatten) or isinstance(ctx.module, nn.Unflatten):
        _check_unflatten_sizes(ctx, local, dims, rank=len(in_shape))
    return local.with_axes(local.axes, dims)


def _check_reshape_sizes(ctx, local, dims):
    raw = list(ctx.node.args[1:])
    if len(raw) == 1 and isinstance(raw[0], (list, tuple)):
        raw = list(raw[0])
    elif "shape" in ctx.node.kwargs:
        raw = list(ctx.node.kwargs["shape"])
    sizes = ctx.symbolic(raw)
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):  # x.reshape(y.shape)
        sizes = list(sizes[0])
    for k, e in enumerate(dims):
        _check_spatial_size(local, k, sizes, e)


def _check_spatial_size(local, k, sizes, e):
    """``sizes[e]`` gives spatial axis ``k`` its size: it must follow the image size."""
    s = sizes[e]
    if isinstance(s, sympy.Basic) and sympy.simplify(s - local.axes[k].size) == 0:
        return
    if not isinstance(s, sympy.Basic) and s == -1:
        others = [sizes[i] for i in range(len(sizes)) if i != e]
        if all(not (isinstance(o, sympy.Basic) and o.free_symbols) for o in others):
            return
    raise NotLocal(f"reshape gives spatial axis {k} the size {s}, fixed at this image size; "
                   "use x.shape to keep it")


def _check_unflatten_sizes(ctx, local, dims, rank):
    if ctx.module is not None:
        dim, sizes = ctx.module.dim, ctx.module.unflattened_size
    else:
        dim, sizes = ctx.value(ctx.arg(1, "dim")), ctx.symbolic(ctx.arg(2, "sizes"))
    dim = _norm_dim(dim, rank)
    sizes = list(sizes)
    for k, (d, e) in enumerate(zip(local.dims, dims)):
        if d == dim:  # the unflattened dim is spatial: one of its new sizes is the axis size
            _check_spatial_size(local, k, sizes, e - dim)


def _prod(xs):
    p = 1
    for x in xs:
        p *= int(x)
    return p


@rule("chunk", torch.chunk, "split", torch.split, "unbind", torch.unbind, "tensor_split",
      torch.tensor_split)
def split(ctx: RuleContext) -> Local:
    local = ctx.local()
    rank = _rank(ctx)
    default = 0
    dim = ctx.value(ctx.arg(2, "dim", default)) if ctx.node.target not in (
        "unbind", torch.unbind) else ctx.value(ctx.arg(1, "dim", 0))
    dim = _norm_dim(dim, rank)
    _require_non_spatial(ctx, local, [dim], "splits")
    if ctx.node.target in ("unbind", torch.unbind):
        return local.with_axes(local.axes, [d - 1 if d > dim else d for d in local.dims])
    return local


@rule(operator.getitem)
def getitem(ctx: RuleContext) -> Local:
    """Indexing a tuple of local tensors, or a tensor along non-spatial dims only."""
    local = ctx.local()
    source = ctx.arg(0)
    index = ctx.value(ctx.arg(1))
    if not hasattr(source.meta.get("tensor_meta"), "shape"):
        return local  # an element of a tuple output (chunk, split, max with dim)
    if not isinstance(index, tuple):
        index = (index,)
    rank = _rank(ctx)
    if Ellipsis in index:
        i = index.index(Ellipsis)
        fill = rank - (len(index) - 1 - sum(1 for x in index if x is None))
        index = index[:i] + (slice(None),) * fill + index[i + 1:]
    mapping, d_in, d_out = {}, 0, 0
    for item in index:
        if item is None:
            d_out += 1
            continue
        if isinstance(item, slice):
            if d_in in local.dims and item != slice(None):
                raise NotLocal(f"slices spatial axis {local.dims.index(d_in)} with {item}")
            mapping[d_in] = d_out
            d_in, d_out = d_in + 1, d_out + 1
        elif isinstance(item, int):
            if d_in in local.dims:
                raise NotLocal(f"indexes spatial axis {local.dims.index(d_in)}")
            d_in += 1
        else:
            raise NotLocal(f"indexing with {type(item).__name__}")
    for rest in range(d_in, rank):
        mapping[rest] = d_out + rest - d_in
    return local.with_axes(local.axes, [mapping[d] for d in local.dims])


# ---------------------------------------------------------------------------------------------
# reductions and per-position layers over one dim


REDUCE_FUNCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min,
                    torch.std, torch.var, torch.prod, torch.logsumexp, torch.norm,
                    torch.argmax, torch.argmin, torch.all, torch.any)
REDUCE_METHODS = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod",
                  "logsumexp", "norm", "argmax", "argmin", "all", "any")
ALONG_FUNCTIONS = (torch.softmax, F.softmax, torch.log_softmax, F.log_softmax, torch.cumsum,
                   F.normalize, F.glu, torch.cumprod)
ALONG_METHODS = ("softmax", "log_softmax", "cumsum", "cumprod")


@rule(*REDUCE_FUNCTIONS, *REDUCE_METHODS)
def reduce(ctx: RuleContext) -> Local:
    local = ctx.local()
    rank = _rank(ctx)
    dim = ctx.arg(1, "dim", None)
    if isinstance(ctx.geom(dim), Local):  # torch.max(a, b) is elementwise
        return elementwise(ctx)
    name = getattr(ctx.node.target, "__name__", ctx.node.target)
    if name == "norm":
        dim = ctx.arg(2, "dim", None)
    dim = ctx.value(dim)
    if dim is None or isinstance(dim, bool):  # torch.var(x, True): `unbiased`, all dims
        raise NotLocal(f"{name} over all dims, spatial axes included")
    dims = [_norm_dim(d, rank) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
    _require_non_spatial(ctx, local, dims, f"{name} reduces")
    # torch.norm(x, p, dim, keepdim); torch.var/std(x, dim, unbiased, keepdim)
    keepdim_index = 3 if name in ("norm", "var", "std") else 2
    keepdim = ctx.value(ctx.arg(keepdim_index, "keepdim", False))
    if keepdim:
        return local
    return local.with_axes(local.axes, [d - sum(1 for r in dims if r < d) for d in local.dims])


@rule(*ALONG_FUNCTIONS, *ALONG_METHODS, nn.Softmax, nn.LogSoftmax, nn.GLU, nn.Softmax2d)
def along_dim(ctx: RuleContext) -> Local:
    local = ctx.local()
    rank = _rank(ctx)
    if ctx.module is not None:
        dim = getattr(ctx.module, "dim", 1)
        dim = -3 if isinstance(ctx.module, nn.Softmax2d) else dim
    else:
        default = 1 if ctx.node.target is F.normalize else -1 if ctx.node.target is F.glu else None
        dim = ctx.value(ctx.arg(2 if ctx.node.target is F.normalize else 1, "dim", default))
    if dim is None:
        raise NotLocal("softmax without dim")
    _require_non_spatial(ctx, local, [_norm_dim(dim, rank)], "normalises")
    if ctx.node.target is F.glu or isinstance(ctx.module, nn.GLU):
        return local
    return local


@rule(nn.Linear, F.linear)
def linear(ctx: RuleContext) -> Local:
    local = ctx.local()
    rank = _rank(ctx)
    _require_non_spatial(ctx, local, [rank - 1], "Linear mixes")
    if ctx.module is None:
        _check_constant_args(ctx, [1, 2], ["weight", "bias"])
    return local


@rule(nn.Bilinear, F.bilinear)
def bilinear(ctx: RuleContext) -> Local:
    """Two inputs mixed along their last dim: a join of both, on the same grid."""
    first, second = ctx.arg(0, "input1"), ctx.arg(1, "input2")
    parts = []
    for raw in (first, second):
        g = ctx.geom(raw)
        if not isinstance(g, Local):
            raise NotLocal("Bilinear of an image tensor with a constant of fixed shape")
        _require_non_spatial(ctx, g, [_rank(ctx, raw) - 1], "Bilinear mixes")
        parts.append(g)
    if ctx.module is None:
        _check_constant_args(ctx, [2, 3], ["weight", "bias"])
    a, b = parts
    if a.dims != b.dims or any(x.stride != y.stride for x, y in zip(a.axes, b.axes)):
        raise NotLocal("Bilinear of tensors on different grids")
    return a.with_axes([hull([x, y]) for x, y in zip(a.axes, b.axes)])


@rule(nn.LayerNorm, F.layer_norm, nn.RMSNorm, F.rms_norm)
def layer_norm(ctx: RuleContext) -> Local:
    local = ctx.local()
    rank = _rank(ctx)
    if ctx.module is not None:
        shape = ctx.module.normalized_shape
    else:
        shape = ctx.value(ctx.arg(1, "normalized_shape"))
    n = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
    _require_non_spatial(ctx, local, range(rank - n, rank), "LayerNorm normalises")
    return local


# ---------------------------------------------------------------------------------------------
# explicitly global ops (named reasons instead of "no geometry rule")


GLOBAL_REASONS = {
    nn.AdaptiveAvgPool1d: "adaptive pooling: each output averages a fraction of the whole image",
    nn.AdaptiveAvgPool2d: "adaptive pooling: each output averages a fraction of the whole image",
    nn.AdaptiveAvgPool3d: "adaptive pooling: each output averages a fraction of the whole image",
    nn.AdaptiveMaxPool1d: "adaptive pooling: each output reads a fraction of the whole image",
    nn.AdaptiveMaxPool2d: "adaptive pooling: each output reads a fraction of the whole image",
    nn.AdaptiveMaxPool3d: "adaptive pooling: each output reads a fraction of the whole image",
    F.adaptive_avg_pool1d: "adaptive pooling: each output averages a fraction of the whole image",
    F.adaptive_avg_pool2d: "adaptive pooling: each output averages a fraction of the whole image",
    F.adaptive_avg_pool3d: "adaptive pooling: each output averages a fraction of the whole image",
    F.adaptive_max_pool1d: "adaptive pooling: each output reads a fraction of the whole image",
    F.adaptive_max_pool2d: "adaptive pooling: each output reads a fraction of the whole image",
    F.adaptive_max_pool3d: "adaptive pooling: each output reads a fraction of the whole image",
    nn.MultiheadAttention: "attention mixes every position with every other",
    F.scaled_dot_product_attention: "attention mixes every position with every other",
    torch.matmul: "matmul over a spatial axis",
    torch.bmm: "matmul over a spatial axis",
    torch.einsum: "einsum may contract a spatial axis",
    operator.matmul: "matmul over a spatial axis",
    "matmul": "matmul over a spatial axis",
    "bmm": "matmul over a spatial axis",
}


def _global(reason):
    def fn(ctx):
        raise NotLocal(reason)

    return fn


for _key, _reason in GLOBAL_REASONS.items():
    RULES[_key] = _global(_reason)


@rule(torch.matmul, operator.matmul, "matmul")
def matmul(ctx: RuleContext) -> Local:
    """Local only when both operands keep their spatial axes off the contracted dims."""
    a, b = ctx.arg(0), ctx.arg(1)
    ga, gb = ctx.geom(a), ctx.geom(b)
    if isinstance(ga, Local) and isinstance(gb, Local):
        raise NotLocal("matmul of two image tensors mixes positions")
    local = ga if isinstance(ga, Local) else gb
    raw = a if isinstance(ga, Local) else b
    rank = _rank(ctx, raw)
    contracted = rank - 1 if raw is a else rank - 2
    _require_non_spatial(ctx, local, [contracted], "matmul contracts")
    if rank < 2 or len(ctx.out_shape) != rank:
        raise NotLocal("matmul with broadcasting over a spatial axis")
    other = b if raw is a else a
    shape = ctx.shape(other)
    if shape is not None:  # batch dims of the constant align with the output's from the right
        shift = rank - len(shape)
        for k, d in enumerate(local.dims):
            j = d - shift
            if 0 <= j < len(shape) - 2 and shape[j] != 1:
                raise NotLocal(f"matmul with '{other.name}', a tensor of fixed size {shape[j]} "
                               f"along spatial axis {k}")
    return local


# Shape queries are handled by the pass itself (they produce Symbolic values); these names are
# listed so that the pass knows them.
SHAPE_METHODS = ("size", "dim", "numel", "ndimension")
SHAPE_ATTRS = ("shape", "ndim", "dtype", "device", "is_cuda", "layout")


# ---------------------------------------------------------------------------------------------
# pixel shuffle (sub-pixel convolution)


@rule(nn.PixelShuffle, F.pixel_shuffle)
def pixel_shuffle(ctx: RuleContext) -> Local:
    """Output ``(c, h*r + i, w*r + j)`` is input ``(c*r*r + i*r + j, h, w)``: nearest's grid."""
    r = ctx.module.upscale_factor if ctx.module is not None else \
        ctx.value(ctx.arg(1, "upscale_factor"))
    return _window(ctx, ctx.local(), 2, lambda j, ax: nearest_axis(ax.size, int(r)))


@rule(nn.PixelUnshuffle, F.pixel_unshuffle)
def pixel_unshuffle(ctx: RuleContext) -> Local:
    """Output ``(c*r*r + i*r + j, h, w)`` is input ``(c, h*r + i, w*r + j)``: an r x r/r window."""
    r = ctx.module.downscale_factor if ctx.module is not None else \
        ctx.value(ctx.arg(1, "downscale_factor"))
    r = int(r)
    return _window(ctx, ctx.local(), 2, lambda j, ax: conv_axis(ax.size, r, r, 0, 0, 1))


# ---------------------------------------------------------------------------------------------
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


OPTIONAL_RULES = {"torchvision": _register_torchvision}  # package -> registers its rules
