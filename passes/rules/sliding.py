"""Sliding-window layers: convolution, pooling, transposed convolution, upsampling, padding."""
from __future__ import annotations

import sympy
import torch.nn as nn
import torch.nn.functional as F

from ..context import NotLocal, RuleContext
from ..geometry import Local, is_tile_invariant
from ..windows import (conv_axis, expand, integer_factor, linear_axis, nearest_axis, pool_axis,
                       transposed_axis)
from .helpers import _check_constant_args, _rank, _window
from .table import rule


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
