"""Sliding-window layers: convolution, pooling, transposed convolution, upsampling, padding."""
from __future__ import annotations

from fractions import Fraction

import sympy
import torch.nn as nn
import torch.nn.functional as F

from ..context import NotLocal, RuleContext
from ..geometry import Local
from ..windows import (expand, integer_factor, linear_axis, nearest_axis, pad_window,
                       padded_axis, pool_axis, transposed_axis)
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
    return _window(ctx, local, n,
                   lambda j, ax: padded_axis(ax.size, kernel[j], stride[j], lo[j], hi[j],
                                             dilation[j], mode))


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


@rule(nn.LPPool1d, nn.LPPool2d, nn.LPPool3d)
def lppool_module(ctx: RuleContext) -> Local:
    """``(avg_pool(x**p) * kernel volume) ** (1/p)``: an average pool's window, no padding."""
    m = ctx.module
    n = int(type(m).__name__[-2])
    return _pool(ctx, n, m.kernel_size, m.stride, 0, 1, m.ceil_mode)


def _lp_pool_function(n):
    def lp_pool_fn(ctx: RuleContext) -> Local:
        kernel = ctx.value(ctx.arg(2, "kernel_size"))
        stride = ctx.value(ctx.arg(3, "stride", None))
        ceil_mode = ctx.value(ctx.arg(4, "ceil_mode", False))
        return _pool(ctx, n, kernel, stride, 0, 1, ceil_mode)

    return lp_pool_fn


rule(F.lp_pool1d)(_lp_pool_function(1))
rule(F.lp_pool2d)(_lp_pool_function(2))
rule(F.lp_pool3d)(_lp_pool_function(3))


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
    return _window(ctx, local, n,
                   lambda j, ax: transposed_axis(ax.size, kernel[j], stride[j], padding[j],
                                                 dilation[j], output_padding[j], ax.end_slack))


# ---------------------------------------------------------------------------------------------
# upsampling


UPSAMPLE_MODES = ("nearest", "nearest-exact", "area", "linear", "bilinear", "trilinear")


def _upsample(ctx, local, size, scale_factor, mode, align_corners):
    rank = _rank(ctx)
    n = rank - 2
    if align_corners:
        raise NotLocal("interpolation with align_corners=True: the scale depends on the image size")
    if mode not in UPSAMPLE_MODES:
        raise NotLocal(f"no geometry rule for interpolate mode '{mode}'", kind="no_rule")
    if size is not None:
        ratios = []
        sizes = expand(size, n, "size")
        for j in range(n):
            k = local.dims.index(rank - n + j) if (rank - n + j) in local.dims else None
            if k is None:
                raise NotLocal("interpolate over a non-spatial tensor dim")
            ratios.append(_size_ratio(ctx, local, k, sympy.sympify(sizes[j]), mode))
    elif mode == "area":
        ratios = [_area_scale(f) for f in expand(scale_factor, n, "scale_factor")]
    else:
        ratios = [sympy.Integer(integer_factor(f, "interpolate"))
                  for f in expand(scale_factor, n, "scale_factor")]
    if mode == "area" and any(r < 1 for r in ratios):
        return _area_down(ctx, local, n, [int(1 / r) for r in ratios])
    # nearest-exact reads floor((o + 1/2)/f), which is floor(o/f) for an integer f; area
    # upsampling by f averages input [floor(o/f), ceil((o+1)/f)) = [floor(o/f), floor(o/f) + 1)
    axis_fn = linear_axis if mode in ("linear", "bilinear", "trilinear") else nearest_axis
    return _window(ctx, local, n, lambda j, ax: axis_fn(ax.size, int(ratios[j])))


def _size_ratio(ctx, local, k, target, mode) -> sympy.Rational:
    """``target / size`` of axis ``k``, which must be the same at every image size: an integer
    (or ``1/f`` for area), with ``target - ratio*size`` zero in every residue class."""
    size = local.axes[k].size
    traced = ctx.shape(ctx.arg(0, "input"))[local.dims[k]]
    ratio = sympy.Rational(int(target.subs(ctx.input_sizes)) if target.free_symbols
                           else int(target), traced)
    values, _ = ctx.tile_values(local, [target - ratio * size])
    fixed = values is not None and all(v == 0 for (v,) in values)
    if not fixed or not (ratio.is_integer and ratio >= 1 or mode == "area" and ratio.p == 1):
        raise NotLocal(f"interpolate to size {target}: not a fixed integer ratio of the input "
                       f"size {size}")
    return ratio


def _area_scale(scale) -> sympy.Rational:
    """An area scale factor: an integer ``f`` (upsampling), or ``1/f`` whose float times a
    multiple ``f*m`` of ``f`` gives exactly ``m`` (torch sizes the output ``int(n * scale)``)."""
    f = sympy.nsimplify(scale)
    if f.is_integer and f >= 1:
        return sympy.Integer(f)
    if f.is_Rational and f.p == 1:
        # float(scale) * f*m rounds to m when |f*scale - 1| <= 2**-54 (within half a unit in the
        # last place of any m); 1/2, 1/3, 1/4 qualify
        err = abs(Fraction(float(scale)) * f.q - 1)
        if err <= Fraction(1, 2 ** 54):
            return sympy.Rational(1, f.q)
        raise NotLocal(f"area interpolation by scale factor {scale}: torch sizes the output "
                       f"int(n * {scale}), which in floating point is not n/{f.q} at every "
                       f"multiple n of {f.q}; pass size= instead")
    raise NotLocal(f"area interpolation by scale factor {scale}: neither an integer nor "
                   "1/integer, so its windows differ from tile to tile")


def _area_down(ctx, local, n, factors):
    """Area interpolation to ``1/f`` of the size is adaptive average pooling: output ``o``
    averages ``[floor(o*n/m), ceil((o+1)*n/m))`` with ``m`` outputs. At sizes ``n = f*m`` that
    is ``[o*f, (o+1)*f)``, an average pool (kernel and stride ``f``); at other sizes the
    windows drift, so the size must be a multiple of ``f`` at every image size."""
    rank = _rank(ctx)
    for k, d in enumerate(local.dims):
        f = factors[d - (rank - n)]
        ax = local.axes[k]
        values, _ = ctx.tile_values(local, [ax.size - f * sympy.floor(ax.size / f)])
        if values is None or any(v != 0 for (v,) in values):
            raise NotLocal(f"area interpolation to 1/{f} of size {ax.size}, which is not a "
                           f"multiple of {f} at every image size: torch then averages windows "
                           "of varying width (adaptive pooling)")
    return _window(ctx, local, n,
                   lambda j, ax: pool_axis(ax.size, factors[j], factors[j], 0, 1, False))


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
    for i in range(0, len(pads), 2):
        d = rank - 1 - i // 2
        if d not in local.dims:
            for p in pads[i:i + 2]:
                ctx.value(p) if isinstance(p, sympy.Basic) and p.free_symbols else None
            continue
        local = pad_axis(ctx, local, local.dims.index(d), pads[i], pads[i + 1],
                         "constant" if mode == "circular" else mode)
    return local


def pad_axis(ctx, local: Local, k: int, lo, hi, mode="constant") -> Local:
    """Spatial axis ``k`` of ``local`` padded by ``lo`` before and ``hi`` after (negative: a
    crop). A shape-derived amount must take one value per residue of the sizes (the same in
    every tile); the window is then the hull of :func:`~passes.windows.pad_window` over those
    values (a U-Net's pad-to-match crops one pixel at odd sizes only)."""
    lo, hi = sympy.sympify(lo), sympy.sympify(hi)
    for p, side in ((lo, "start"), (hi, "end")):
        if ctx.tile_values(local, [p])[0] is None:
            raise NotLocal(f"pads axis {k} at the {side} by {p}, which is not the same in "
                           "every tile")
    values, local = ctx.tile_values(local, [lo, hi])
    windows = [pad_window(1, 1, int(p_lo), int(p_hi), 1, mode) for p_lo, p_hi in values]
    a, b = min(w[0] for w in windows), max(w[1] for w in windows)
    axes = list(local.axes)
    axes[k] = axes[k].then(1, a, b, axes[k].size + lo + hi)
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
