"""Geometry of sliding-window layers: convolution, pooling, padding, transposed convolution,
upsampling.

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


def padded_axis(n, k, stride, pad_lo, pad_hi, dilation, mode="zeros"):
    """A convolution with ``padding_mode`` ``mode``: see :func:`pad_window`."""
    a, b = pad_window(k, stride, pad_lo, pad_hi, dilation, mode)
    size = sympy.floor((n + pad_lo + pad_hi - dilation * (k - 1) - 1) / stride) + 1
    return stride, a, b, size


def pad_window(k, stride, pad_lo, pad_hi, dilation, mode="zeros"):
    """``(a, b)`` of a window ``(k, stride, dilation)`` over ``F.pad(x, (pad_lo, pad_hi), mode)``:
    a convolution with ``padding_mode``, or ``F.pad`` itself (``k = stride = 1``; a negative
    pad crops).

    Output ``i`` reads padded positions ``t = i*stride - pad_lo + dilation*m``; position ``t``
    is input ``t`` inside the image, else a constant (``zeros``/``constant``), the mirror image
    ``-t`` or ``2(n-1) - t`` (``reflect``), or the border ``0`` or ``n - 1`` (``replicate``).
    Inside the image the offsets from ``i*stride`` are ``[-pad_lo, reach - pad_lo]``. At the
    start, output 0 reads mirror ``pad_lo`` (reflect) or position 0 (replicate). At the end
    the last output ``i`` has ``n - i*stride >= reach + 1 - pad_lo - pad_hi`` (equality for
    some ``n``), and its last tap ``n - 1 + pad_hi`` reads ``n - 1 - pad_hi`` (reflect) or
    ``n - 1`` (replicate), offsets ``reach - pad_lo - 2*pad_hi`` and ``reach - pad_lo - pad_hi``.

    Reflected reads are border effects, but the interval holds for every output, so it is the
    hull over all of them: wider than the window of an interior output when the padding
    exceeds what the window covers anyway (``2*pad <= reach`` for reflect, ``pad <= reach``
    for replicate). Then ``a <= 0`` and ``b >= reach - pad_lo - pad_hi``: a tile's outputs
    start at its first position and end where its own crop ends them (docs/design.md section 2's
    "inside" must imply that the tile holds the output).
    """
    reach = dilation * (k - 1)
    a, b = -pad_lo, reach - pad_lo
    if mode == "reflect":
        if pad_lo > 0:
            b = max(b, pad_lo)
        if pad_hi > 0:
            a = min(a, reach - pad_lo - 2 * pad_hi)
    elif mode == "replicate":
        if pad_lo > 0:
            b = max(b, 0)
        if pad_hi > 0:
            a = min(a, reach - pad_lo - pad_hi)
    elif mode not in ("zeros", "constant"):
        raise NotLocal(f"no geometry rule for padding mode '{mode}'", kind="no_rule")
    a, b = min(a, 0), max(b, reach - pad_lo - pad_hi)
    return sympy.Integer(a), sympy.Integer(b)


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


def transposed_axis(n, k, stride, pad, dilation, output_padding, slack=0):
    """Output ``o = i*stride - pad + dilation*t`` reads input taps ``i`` in
    ``[ceil((o + pad - reach)/stride), floor((o + pad)/stride)]``; outputs between the taps
    (kernel shorter than the stride) read none and hold the bias, wherever the tile has them.

    ``slack`` is the input node's :attr:`~passes.geometry.Axis.end_slack`. A tile holds input
    ``i`` up to ``F = floor(I)``, where ``I`` is the (fractional) last inside index, and so
    outputs up to ``stride*F + reach - 2*pad + output_padding``; an output inside the tile
    satisfies ``o/stride + b <= I``. Both agree only if ``b > slack - (reach - 2*pad +
    output_padding + 1)/stride``, so ``b`` is widened to the least multiple of ``1/stride`` past
    that (a tile would otherwise lack outputs it counts as inside: a padding that crops the
    output, or a fractional bound after a strided layer).
    """
    reach = dilation * (k - 1)
    s = sympy.Rational(1, stride)
    a = min(sympy.Rational(pad - reach, stride), sympy.Integer(0))
    extent = reach - 2 * pad + output_padding  # the last output is stride*(n - 1) + extent
    least = sympy.Rational(slack) - sympy.Rational(extent + 1, stride)
    b = max(sympy.Rational(pad, stride), sympy.Rational(sympy.floor(least * stride) + 1, stride))
    size = (n - 1) * stride - 2 * pad + reach + output_padding + 1
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
