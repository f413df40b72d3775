"""Geometry of sliding-window layers: convolution, pooling, transposed convolution, upsampling.

Each function maps one spatial axis to ``(s, a, b, size)``: the layer's output ``i`` reads its
input ``[i*s + a, i*s + b]``, and ``size`` is its output size given the input size ``n``.
"""
from __future__ import annotations

import sympy

from .context import NotLocal


def conv_axis(n, k, stride, pad_lo, pad_hi, dilation):
    span = dilation * (k - 1)
    size = sympy.floor((n + pad_lo + pad_hi - span - 1) / stride) + 1
    return stride, -pad_lo, -pad_lo + span, size


def pool_axis(n, k, stride, pad, dilation, ceil_mode):
    span = dilation * (k - 1)
    if not ceil_mode:
        return conv_axis(n, k, stride, pad, pad, dilation)
    # ceil_mode: one more window if it starts inside the image or the left padding
    size = sympy.Min(
        sympy.ceiling((n + 2 * pad - span - 1) / sympy.Integer(stride)) + 1,
        sympy.floor((n + pad - 1) / sympy.Integer(stride)) + 1,
    )
    return stride, -pad, -pad + span, size


def transposed_axis(n, k, stride, pad, dilation, output_padding):
    # output o = i*stride - pad + dilation*kk, so i - o/stride = (pad - dilation*kk)/stride
    s = sympy.Rational(1, stride)
    a = sympy.Rational(pad - dilation * (k - 1), stride)
    b = sympy.Rational(pad, stride)
    # padding beyond the kernel's reach crops the output: a tile then lacks values next to its
    # edges that the image has, so the window is widened to keep those outputs invalid
    a = min(a, sympy.Integer(0))
    b = max(b, sympy.Rational(2 * pad - dilation * (k - 1) - output_padding, stride))
    size = (n - 1) * stride - 2 * pad + dilation * (k - 1) + output_padding + 1
    return s, a, b, size


def nearest_axis(n, factor: int):
    f = sympy.Integer(factor)
    return 1 / f, -(f - 1) / f, sympy.Integer(0), n * f


def linear_axis(n, factor: int):
    """Bilinear/linear with align_corners=False: hull over residues of floor((i+1/2)/f - 1/2), +1."""
    f = sympy.Integer(factor)
    offsets = []
    for r in range(factor):
        src = sympy.Rational(2 * r + 1, 2 * factor) - sympy.Rational(1, 2)
        i0 = sympy.floor(src)
        lam = src - i0
        offsets.append(i0 - sympy.Rational(r, factor))
        # the second tap only matters when its weight is non-zero
        if lam != 0:
            offsets.append(i0 + 1 - sympy.Rational(r, factor))
    return 1 / f, min(offsets), max(offsets), n * f


def integer_factor(scale, what: str) -> int:
    """A scale factor that is a positive integer, else not local."""
    try:
        f = sympy.nsimplify(scale)
    except (TypeError, ValueError, sympy.SympifyError):
        raise NotLocal(f"{what} scale factor {scale!r} is not a number") from None
    if not (f.is_integer and f >= 1):
        raise NotLocal(f"{what} scale factor {scale} is not a positive integer; "
                       "only integer upsampling keeps a fixed grid")
    return int(f)


def expand(value, n: int, what: str):
    """Broadcast an int-or-tuple layer argument to ``n`` spatial axes."""
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return tuple(value) * n
        if len(value) != n:
            raise NotLocal(f"{what} has {len(value)} entries for {n} spatial axes")
        return tuple(value)
    return (value,) * n
