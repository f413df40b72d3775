"""Brute-force oracle for the geometry pass.

Two independent ways to know what output index ``i`` of a model reads along a spatial axis:

- :func:`measure_supports`: forward-mode autograd. Weights and inputs are strictly positive, so
  every product along every path is positive and no true dependency can cancel to zero (max
  pooling picks one element of its window: there the measured support is only a subset; an LP
  pool's root of 0 has no finite derivative: its NaN tangent counts as no dependency).
- :func:`reference_supports`: combinatorics on an unbounded grid, from torch's documented index
  maps of each layer (which input taps an output reads), written here without looking at
  ``passes/windows.py``. On an unbounded grid it has no borders, so it gives the exact hull of
  the dependency offsets over a whole period of output residues (:func:`exact_hull`).

Models are described by small frozen layer specs (:class:`Conv`, :class:`Pool`, :class:`ConvT`,
:class:`Up`, :class:`AreaDown`, :class:`Pad`, :class:`Crop`, :class:`Join`), which :func:`build`
turns into float64 modules and which read like the stacks they describe in regression tests.
:func:`check_geometry` runs every assertion on one stack; :func:`measured_hull` measures the
hull with image borders (reflect and replicate padding), :func:`region_mismatches` checks that
"inside" implies exact on tile regions.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from fractions import Fraction

import sympy
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

from fxstream.tracing import trace
from passes import GEOMETRY, Local, infer_geometry, input_symbols, propagate_shapes

# ---------------------------------------------------------------------------------------------
# layer specs: an int means "the same on every axis", a tuple gives one value per axis


def _at(value, j):
    return value[j] if isinstance(value, tuple) else value


def _per_axis(value, ndim):
    return tuple(_at(value, j) for j in range(ndim))


@dataclass(frozen=True)
class Conv:
    """``ConvNd(c, c, k, stride=s, padding=p, dilation=d, padding_mode=mode)``, or
    ``F.convNd`` with its weights when ``fn`` (zero padding only)."""

    k: int | tuple = 3
    s: int | tuple = 1
    p: int | tuple | str = 0
    d: int | tuple = 1
    mode: str = "zeros"
    fn: bool = False

    def module(self, ndim, c):
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]
        p = self.p if isinstance(self.p, str) else _per_axis(self.p, ndim)
        kw = dict(stride=_per_axis(self.s, ndim), padding=p, dilation=_per_axis(self.d, ndim))
        m = cls(c, c, _per_axis(self.k, ndim), padding_mode=self.mode, **kw)
        if self.fn:
            return Functional((F.conv1d, F.conv2d, F.conv3d)[ndim - 1], m, kwargs=kw)
        return m

    def pad_lo(self, j):
        k, d = _at(self.k, j), _at(self.d, j)
        if self.p == "valid":
            return 0
        if self.p == "same":  # torch pads total//2 before, the rest after
            return d * (k - 1) // 2
        return _at(self.p, j)

    def ratio(self, j):
        return Fraction(_at(self.s, j))

    def taps(self, i, j):
        k, s, d = _at(self.k, j), _at(self.s, j), _at(self.d, j)
        return [i * s - self.pad_lo(j) + d * t for t in range(k)]


@dataclass(frozen=True)
class Pool:
    """``MaxPoolNd`` / ``AvgPoolNd`` / ``LPPoolNd`` (``kind`` "max", "avg" or "lp", the last with
    ``norm_type=norm`` and no padding); ``s=None`` means ``s=k``."""

    kind: str = "max"
    k: int | tuple = 2
    s: int | tuple | None = None
    p: int | tuple = 0
    d: int | tuple = 1
    ceil: bool = False
    include_pad: bool = True
    fn: bool = False
    norm: int = 2

    def module(self, ndim, c):
        k, p = _per_axis(self.k, ndim), _per_axis(self.p, ndim)
        s = None if self.s is None else _per_axis(self.s, ndim)
        if self.kind == "lp":
            if ndim == 1:  # torch's lp_pool1d multiplies by kernel_size: an int there
                k, s = k[0], None if s is None else s[0]
            if self.fn:
                return Functional((F.lp_pool1d, F.lp_pool2d, F.lp_pool3d)[ndim - 1], None,
                                  (self.norm, k, s, self.ceil))
            cls = (nn.LPPool1d, nn.LPPool2d, nn.LPPool3d)[ndim - 1]
            return cls(self.norm, k, s, ceil_mode=self.ceil)
        if self.kind == "max":
            if self.fn:
                return Functional((F.max_pool1d, F.max_pool2d, F.max_pool3d)[ndim - 1], None,
                                  (k, s, p, _per_axis(self.d, ndim)), dict(ceil_mode=self.ceil))
            cls = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[ndim - 1]
            return cls(k, s, p, dilation=_per_axis(self.d, ndim), ceil_mode=self.ceil)
        if self.fn:
            return Functional((F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[ndim - 1], None,
                              (k, s, p, self.ceil, self.include_pad))
        cls = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[ndim - 1]
        return cls(k, s, p, ceil_mode=self.ceil, count_include_pad=self.include_pad)

    def stride(self, j):
        return _at(self.k if self.s is None else self.s, j)

    def ratio(self, j):
        return Fraction(self.stride(j))

    def taps(self, i, j):
        k, p, d = _at(self.k, j), _at(self.p, j), _at(self.d, j) if self.kind == "max" else 1
        return [i * self.stride(j) - p + d * t for t in range(k)]


@dataclass(frozen=True)
class ConvT:
    """``ConvTransposeNd(c, c, k, stride=s, padding=p, output_padding=op, dilation=d)``, or
    ``F.conv_transposeNd`` with its weights when ``fn``."""

    k: int | tuple = 2
    s: int | tuple = 2
    p: int | tuple = 0
    op: int | tuple = 0
    d: int | tuple = 1
    fn: bool = False

    def module(self, ndim, c):
        cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[ndim - 1]
        kw = dict(stride=_per_axis(self.s, ndim), padding=_per_axis(self.p, ndim),
                  output_padding=_per_axis(self.op, ndim), dilation=_per_axis(self.d, ndim))
        m = cls(c, c, _per_axis(self.k, ndim), **kw)
        if self.fn:
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[ndim - 1]
            return Functional(fn, m, kwargs=kw)
        return m

    def ratio(self, j):
        return Fraction(1, _at(self.s, j))

    def taps(self, o, j):
        # input i, tap t write output o = i*s - p + d*t
        k, s, p, d = _at(self.k, j), _at(self.s, j), _at(self.p, j), _at(self.d, j)
        return [(o + p - d * t) // s for t in range(k) if (o + p - d * t) % s == 0]


@dataclass(frozen=True)
class Up:
    """``nn.Upsample(scale_factor=f, mode=...)``, or ``F.interpolate`` when ``fn``.

    ``mode`` is "nearest", "nearest-exact", "area" or "linear" (linear/bilinear by the number of
    axes), and linear always uses ``align_corners=False``.
    """

    f: int | tuple = 2
    mode: str = "nearest"
    fn: bool = False

    def module(self, ndim, c):
        mode = self.mode if self.mode != "linear" else ("linear", "bilinear", "trilinear")[
            ndim - 1]
        f = _per_axis(self.f, ndim)
        align = False if self.mode == "linear" else None
        if self.fn:
            return Interpolate(tuple(float(x) for x in f), mode, align)
        return nn.Upsample(scale_factor=tuple(float(x) for x in f), mode=mode,
                           align_corners=align)

    def ratio(self, j):
        return Fraction(1, _at(self.f, j))

    def taps(self, i, j):
        f = _at(self.f, j)
        if self.mode == "nearest":  # src = floor(dst * scale), scale = in/out = 1/f
            return [i // f]
        if self.mode == "nearest-exact":  # src = floor((dst + 0.5) * scale)
            return [math.floor(Fraction(2 * i + 1, 2 * f))]
        if self.mode == "area":  # adaptive average pool: [floor(o*in/out), ceil((o+1)*in/out))
            return list(range(math.floor(Fraction(i, f)), math.ceil(Fraction(i + 1, f))))
        src = Fraction(2 * i + 1, 2 * f) - Fraction(1, 2)  # align_corners=False
        i0 = math.floor(src)
        return [i0] if src == i0 else [i0, i0 + 1]  # the second tap has weight src - i0


@dataclass(frozen=True)
class AreaDown:
    """Pad the end with zeros to a multiple of ``f`` (``F.pad`` by ``(-n) % f``, shape-derived),
    then ``F.interpolate(scale_factor=1/f, mode="area")``; with ``size`` the target size is
    given as ``n_padded // f`` from the shape instead."""

    f: int | tuple = 2
    size: bool = False

    def module(self, ndim, c):
        return AreaDownsample(_per_axis(self.f, ndim), self.size)

    def ratio(self, j):
        return Fraction(_at(self.f, j))

    def taps(self, i, j):
        f = _at(self.f, j)  # adaptive average pool at out = in/f: [o*f, (o+1)*f)
        return list(range(i * f, (i + 1) * f))


@dataclass(frozen=True)
class Crop:
    """``x[..., lo:-hi:step]`` on every spatial axis (``hi=0``: to the end), or with the stop
    from the shape (``how="shape"``: ``x.shape[d] - hi``), or ``x.narrow(d, lo, x.shape[d] -
    lo - hi)`` (``how="narrow"``, step 1)."""

    lo: int | tuple = 1
    hi: int | tuple = 1
    step: int | tuple = 1
    how: str = "slice"

    def module(self, ndim, c):
        return Slice(_per_axis(self.lo, ndim), _per_axis(self.hi, ndim),
                     _per_axis(self.step, ndim), self.how)

    def ratio(self, j):
        return Fraction(_at(self.step, j))

    def taps(self, i, j):
        return [_at(self.lo, j) + i * _at(self.step, j)]


@dataclass(frozen=True)
class Pad:
    """``F.pad(x, ..., mode=mode, value=value)`` by ``lo`` before and ``hi`` after (negative
    crops); ``mode`` "constant", "reflect" or "replicate"; with ``module`` the layer is
    ``nn.ConstantPadNd`` / ``nn.ReflectionPadNd`` / ``nn.ReplicationPadNd``."""

    lo: int | tuple = 1
    hi: int | tuple = 1
    value: float = 0.0
    mode: str = "constant"
    module_form: bool = False

    def module(self, ndim, c):
        pads = []
        for j in reversed(range(ndim)):  # F.pad lists the last axis first
            pads += [_at(self.lo, j), _at(self.hi, j)]
        if self.module_form:
            name = {"constant": "ConstantPad", "reflect": "ReflectionPad",
                    "replicate": "ReplicationPad"}[self.mode]
            cls = getattr(nn, f"{name}{ndim}d")
            return cls(tuple(pads), self.value) if self.mode == "constant" else cls(tuple(pads))
        return PadConstant(tuple(pads), self.value, self.mode)

    def ratio(self, j):
        return Fraction(1)

    def taps(self, i, j):
        return [i - _at(self.lo, j)]


@dataclass(frozen=True)
class Join:
    """Two branches on the same input, added (``how="add"``) or concatenated on channels."""

    how: str = "add"
    left: tuple = ()
    right: tuple = ()


class Functional(nn.Module):
    """``fn(x, [weight, bias,] *args, **kwargs)``: a layer called in its functional form,
    with the parameters of ``layer`` (a module built only for its initialised weights)."""

    def __init__(self, fn, layer=None, args=(), kwargs=None):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, tuple(args), dict(kwargs or {})
        if layer is not None:
            self.weight, self.bias = layer.weight, layer.bias

    def forward(self, x):
        params = (self.weight, self.bias) if hasattr(self, "weight") else ()
        return self.fn(x, *params, *self.args, **self.kwargs)


class Interpolate(nn.Module):
    def __init__(self, scale_factor, mode, align_corners):
        super().__init__()
        self.scale_factor, self.mode, self.align_corners = scale_factor, mode, align_corners

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode,
                             align_corners=self.align_corners)


class PadConstant(nn.Module):
    def __init__(self, pads, value, mode="constant"):
        super().__init__()
        self.pads, self.value, self.mode = pads, value, mode

    def forward(self, x):
        if self.mode != "constant":
            return F.pad(x, self.pads, mode=self.mode)
        return F.pad(x, self.pads, value=self.value)


class AreaDownsample(nn.Module):
    def __init__(self, f, size):
        super().__init__()
        self.f, self.size = f, size

    def forward(self, x):
        pads = []
        for j in reversed(range(len(self.f))):
            pads += [0, (-x.shape[2 + j]) % self.f[j]]
        x = F.pad(x, pads)
        if self.size:
            size = [x.shape[2 + j] // self.f[j] for j in range(len(self.f))]
            return F.interpolate(x, size=size, mode="area")
        return F.interpolate(x, scale_factor=[1 / f for f in self.f], mode="area")


class Slice(nn.Module):
    def __init__(self, lo, hi, step, how):
        super().__init__()
        self.lo, self.hi, self.step, self.how = lo, hi, step, how

    def forward(self, x):
        ndim = len(self.lo)
        if self.how == "narrow":
            for j in range(ndim):
                d = 2 + j
                x = x.narrow(d, self.lo[j], x.shape[d] - self.lo[j] - self.hi[j])
            return x
        index = [Ellipsis]
        for j in range(ndim):
            if self.how == "shape":
                stop = x.shape[2 + j] - self.hi[j]
            else:
                stop = -self.hi[j] if self.hi[j] else None
            index.append(slice(self.lo[j], stop, self.step[j]))
        return x[tuple(index)]


class Chain(nn.Module):
    """The layers in order; ``specs[k]`` describes ``body[k]``."""

    def __init__(self, specs, body):
        super().__init__()
        self.specs = tuple(specs)
        self.body = nn.ModuleList(body)

    def forward(self, x):
        for layer in self.body:
            x = layer(x)
        return x


class JoinBlock(nn.Module):
    def __init__(self, spec: Join, left: Chain, right: Chain):
        super().__init__()
        self.spec, self.left, self.right = spec, left, right

    def forward(self, x):
        a, b = self.left(x), self.right(x)
        if self.spec.how == "add":
            return a + b
        return torch.cat([a, b], 1)


# ---------------------------------------------------------------------------------------------
# building


def _build_chain(specs, ndim, channels):
    body = []
    for spec in specs:
        if isinstance(spec, Join):
            left, cl = _build_chain(spec.left, ndim, channels)
            right, cr = _build_chain(spec.right, ndim, channels)
            body.append(JoinBlock(spec, left, right))
            channels = cl + cr if spec.how == "cat" else channels
        else:
            body.append(spec.module(ndim, channels))
    return Chain(specs, body), channels


def build(specs, ndim: int, channels: int = 2, seed: int = 0) -> Chain:
    """A float64 model of ``specs`` with weights and biases drawn from [0.5, 1.5]."""
    model, _ = _build_chain(tuple(specs), ndim, channels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.5)
    return model.double().eval()


def run(model: Chain, x: torch.Tensor):
    """The model's output on ``x``, or None when torch rejects the model at this size or when
    a join's branches differ in shape (torch would broadcast a size-1 axis: not local)."""
    outs, hooks = {}, []
    for m in model.modules():
        if isinstance(m, JoinBlock):
            for branch in (m.left, m.right):
                hooks.append(branch.register_forward_hook(
                    lambda mod, args, out: outs.__setitem__(id(mod), out.shape)))
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError):
        return None
    finally:
        for h in hooks:
            h.remove()
    for m in model.modules():
        if isinstance(m, JoinBlock) and outs[id(m.left)][2:] != outs[id(m.right)][2:]:
            return None
    return out


def positive_input(shape, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float64) + 0.5


def has_max_pool(specs) -> bool:
    for spec in specs:
        if isinstance(spec, Join) and (has_max_pool(spec.left) or has_max_pool(spec.right)):
            return True
        if isinstance(spec, Pool) and spec.kind == "max":
            return True
    return False


# ---------------------------------------------------------------------------------------------
# oracle 1: autograd (forward mode)


def measure_supports(model: nn.Module, x: torch.Tensor) -> list[list[frozenset[int]]]:
    """``supports[k][i]``: input indices along axis ``k`` that output index ``i`` depends on.

    One forward-mode pass per axis: the batch holds one copy of ``x`` per input index ``r``,
    whose tangent is 1 on the slice ``r`` of axis ``k`` (every channel, all of the other axes)
    and 0 elsewhere; output ``i`` depends on ``r`` iff its tangent in copy ``r`` is non-zero
    somewhere along the other axes.
    """
    ndim = x.dim() - 2
    supports = []
    for k in range(ndim):
        n = x.shape[2 + k]
        primal = x.expand(n, *x.shape[1:]).clone()
        tangent = torch.eye(n, dtype=x.dtype).reshape(
            [n, 1] + [n if a == k else 1 for a in range(ndim)]).expand_as(primal).clone()
        with fwAD.dual_level():
            out = fwAD.unpack_dual(model(fwAD.make_dual(primal, tangent))).tangent
        # 0 * inf: the root of an LP pool at an output that is 0 (a window of zero padding)
        # has an infinite derivative times a zero tangent; such an output does not move
        out = torch.nan_to_num(out, nan=0.0)
        other = [d for d in range(1, out.dim()) if d != 2 + k]
        hit = out.abs().sum(dim=other) if other else out.abs()  # (input r, output i)
        supports.append([frozenset(torch.nonzero(hit[:, i]).flatten().tolist())
                         for i in range(hit.shape[1])])
    return supports


# ---------------------------------------------------------------------------------------------
# oracle 2: combinatorics on the unbounded grid


def _record_sizes(model: nn.Module, x: torch.Tensor) -> dict[int, tuple[int, ...]]:
    """Spatial input size of every layer module in a forward pass on ``x``."""
    sizes, hooks = {}, []
    for m in model.modules():
        if not isinstance(m, (Chain, JoinBlock)):
            hooks.append(m.register_forward_hook(
                lambda mod, args, out: sizes.__setitem__(id(mod), tuple(args[0].shape[2:]))))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return sizes


def _walk(chain: Chain, axis: int, indices: set[int], sizes) -> tuple[set[int], bool]:
    """Indices of the chain's input read by ``indices`` of its output, and whether every read
    index was inside its tensor (``sizes`` None: the unbounded grid, always inside)."""
    clean = True
    for spec, layer in reversed(list(zip(chain.specs, chain.body))):
        if isinstance(spec, Join):
            a, ca = _walk(layer.left, axis, indices, sizes)
            b, cb = _walk(layer.right, axis, indices, sizes)
            indices, clean = a | b, clean and ca and cb
            continue
        indices = {r for i in indices for r in spec.taps(i, axis)}
        if sizes is not None:
            n = sizes[id(layer)][axis]
            clean = clean and all(0 <= r < n for r in indices)
    return indices, clean


def measured_hull(specs, sizes, channels: int = 2):
    """``(lo, hi)``: the hull of ``r - i*J`` over every measured dependency ``r`` of every
    output ``i`` of the 1-D stack ``specs``, over every input size in ``sizes`` (sizes torch
    rejects are skipped). With borders, unlike :func:`exact_hull`: reflect and replicate
    padding read mirrored positions at the image's ends."""
    J = exact_stride(specs, 0)
    offsets = []
    with one_thread():
        model = build(specs, 1, channels)
        for n in sizes:
            x = positive_input((1, channels, n))
            if run(model, x) is None:
                continue
            for i, support in enumerate(measure_supports(model, x)[0]):
                offsets += [r - i * J for r in support]
    return min(offsets), max(offsets)


def reference_supports(model: Chain, x: torch.Tensor, axis: int, n_out: int):
    """``[(support, clean)]`` for each output index along ``axis``; ``clean`` when no layer
    read a padding or out-of-range position for it (then the support is the true one)."""
    sizes = _record_sizes(model, x)
    return [_walk(model, axis, {i}, sizes) for i in range(n_out)]


def _node_strides(specs, axis, stride=Fraction(1), seen=None):
    """The output's stride of ``specs`` on ``axis``; appends every layer's stride to ``seen``."""
    seen = [] if seen is None else seen
    for spec in specs:
        if isinstance(spec, Join):
            left = _node_strides(spec.left, axis, stride, seen)
            right = _node_strides(spec.right, axis, stride, seen)
            if left != right:
                raise ValueError(f"join of branches with strides {left} and {right}")
            stride = left
        else:
            stride = stride * spec.ratio(axis)
            seen.append(stride)
    return stride


def exact_stride(specs, axis: int) -> Fraction:
    return _node_strides(specs, axis)


def period(specs, axis: int) -> int:
    """Shifting the output index by this shifts every node's indices by integers."""
    seen = [Fraction(1)]
    out = _node_strides(specs, axis, Fraction(1), seen)
    return math.lcm(*[(out / s).denominator for s in seen])


def exact_hull(model: Chain, axis: int):
    """``(J, lo, hi)``: the tightest ``[i*J + lo, i*J + hi]`` holding every dependency of every
    output ``i``, from the unbounded reference over one period of output residues; ``lo`` and
    ``hi`` are None when no output reads any input (a stride that skips every written tap)."""
    J = exact_stride(model.specs, axis)
    offsets = []
    for i in range(period(model.specs, axis)):
        support, _ = _walk(model, axis, {i}, None)
        offsets += [r - i * J for r in support]
    return J, min(offsets, default=None), max(offsets, default=None)


def hull_is_tight_by_construction(specs, axis: int) -> bool:
    """Whether composing exact per-layer hulls gives the exact hull of the stack.

    Composition reads ``lo' = lo + a*J``; both bounds are met at once only if some output ``i``
    reads, at its window's first tap ``m = i*s + a``, an index ``m`` whose own offset is the
    node's ``lo``. On a node with an integer stride every ``m`` has the same offsets; on a
    fractional stride (after upsampling) the offsets vary with ``m``'s residue modulo the node's
    period ``q``, and a layer of integer stride ``s`` only reaches residues ``a mod gcd(s, q)``.
    Every other layer (stride 1, upsampling, transposed conv) reaches every residue.

    Not tight either, by design of the rules: crops (:func:`has_crop`), padding whose border
    reads leave the window (:func:`has_border_reads`), transposed convs that skip output
    residues (:func:`has_holes`), and a transposed conv on a node of stride other than 1 (its
    window is widened so that a tile holds every output it counts as inside, see
    ``passes.windows.transposed_axis``).
    """
    if has_crop(specs, axis) or has_border_reads(specs, axis) or has_holes(specs, axis):
        return False

    def walk(chain, strides):
        for spec in chain:
            if isinstance(spec, Join):
                left, right = list(strides), list(strides)
                if not (walk(spec.left, left) and walk(spec.right, right)):
                    return False
                strides[:] = left + right[len(strides):]
                continue
            s = spec.ratio(axis)
            node = strides[-1]
            if isinstance(spec, ConvT) and node != 1:
                return False
            q = math.lcm(*[(node / a).denominator for a in strides])
            if s.denominator == 1 and math.gcd(s.numerator, q) > 1:
                return False
            strides.append(node * s)
        return True

    return walk(specs, [Fraction(1)])


# ---------------------------------------------------------------------------------------------
# the geometry pass under test


def derive_geometry(model: nn.Module, shape):
    """Trace ``model`` and run the geometry pass; returns ``(output geometry, symbols, gm)``."""
    gm = trace(model)
    propagate_shapes(gm, tuple(shape), dtype=torch.float64)
    symbols = infer_geometry(gm, tuple(shape))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return out.meta[GEOMETRY], symbols, gm


def as_fraction(value) -> Fraction:
    """A geometry value as a Fraction; it must be a sympy Rational (never a float)."""
    value = sympy.sympify(value)
    if not isinstance(value, sympy.Rational):
        raise AssertionError(f"geometry value {value!r} is a {type(value).__name__}, "
                             "not a sympy Rational")
    return Fraction(int(value.p), int(value.q))


@dataclass
class Report:
    """What :func:`check_geometry` saw (for hypothesis ``event``s and debugging)."""

    clean: int = 0
    loose: bool = False
    independent: bool = False
    tight_checked: bool = False


@contextlib.contextmanager
def one_thread():
    """Tiny tensors: threads only add overhead, and on a loaded machine a lot of it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_geometry(specs, sizes, channels: int = 2, seed: int = 0) -> Report:
    """Every geometry assertion for the stack ``specs`` on an input of spatial ``sizes``.

    1. the output is ``Local`` with one axis per spatial dim, at the last tensor dims;
    2. each axis's size expression, at ``sizes``, is the real output size;
    3. every measured dependency of every output ``i`` lies in ``[i*J + lo, i*J + hi]``;
    4. the derived stride is the exact one, and the interval contains the exact hull
       (:func:`exact_hull`); it equals it where the hull composition is tight
       (:func:`hull_is_tight_by_construction`);
    5. for every clean output (no padding read anywhere), the measured support is the
       reference support (a subset of it with max pooling).
    """
    with one_thread():
        return _check_geometry(specs, sizes, channels, seed)


def _check_geometry(specs, sizes, channels, seed) -> Report:
    ndim = len(sizes)
    model = build(specs, ndim, channels, seed)
    x = positive_input((1, channels, *sizes), seed + 1)
    with torch.no_grad():
        out = model(x)
    geometry, _, _ = derive_geometry(model, x.shape)
    where = f"stack {specs} on input {tuple(sizes)}"
    assert isinstance(geometry, Local), f"output not Local: {geometry} for {where}"
    assert geometry.dims == tuple(range(2, 2 + ndim)), f"dims {geometry.dims} for {where}"

    supports = measure_supports(model, x)
    report = Report()
    exact_support = not has_max_pool(specs)
    symbols = input_symbols(ndim)  # L, or H and W
    values = dict(zip(symbols, sizes))
    for k, axis in enumerate(geometry.axes):
        n_out = out.shape[2 + k]
        size = axis.size.subs(values)
        assert axis.size.free_symbols <= set(symbols), f"axis {k}: size {axis.size} for {where}"
        assert size == n_out, (f"axis {k}: size {axis.size} = {size}, real output size {n_out} "
                               f"for {where}")
        J, lo, hi = as_fraction(axis.stride), as_fraction(axis.lo), as_fraction(axis.hi)
        for i, support in enumerate(supports[k]):
            outside = sorted(r for r in support if not (i * J + lo <= r <= i * J + hi))
            assert not outside, (f"axis {k}: output {i} reads {outside} outside "
                                 f"[{i * J + lo}, {i * J + hi}] (J={J}, lo={lo}, hi={hi}); "
                                 f"support {sorted(support)} for {where}")

        ref_J, ref_lo, ref_hi = exact_hull(model, k)
        assert J == ref_J, f"axis {k}: stride {J}, exact stride {ref_J} for {where}"
        if ref_lo is None:
            report.independent = True
        else:
            assert lo <= ref_lo and hi >= ref_hi, (
                f"axis {k}: interval [{lo}, {hi}] misses the exact hull [{ref_lo}, {ref_hi}] "
                f"for {where}")
            report.loose |= (lo, hi) != (ref_lo, ref_hi)
            if hull_is_tight_by_construction(specs, k):
                report.tight_checked = True
                assert (lo, hi) == (ref_lo, ref_hi), (
                    f"axis {k}: interval [{lo}, {hi}] is not the exact hull "
                    f"[{ref_lo}, {ref_hi}] for {where}")

        # Along axis k the oracle sees the union over the other axes' outputs: the reference
        # support where some output reads the input along every other axis, else nothing.
        if any(not any(supports[m]) for m in range(ndim) if m != k):
            continue
        for i, (ref, clean) in enumerate(reference_supports(model, x, k, n_out)):
            if not clean:
                continue
            report.clean += 1
            measured = supports[k][i]
            ok = measured == ref if exact_support else measured <= ref
            assert ok, (f"axis {k}: clean output {i} measured {sorted(measured)}, reference "
                        f"{sorted(ref)} for {where}")
    return report


# ---------------------------------------------------------------------------------------------
# what the geometry is for: a tile's inside outputs equal the full image's (docs/design.md section 2)


def tile_mismatches(specs, n: int, start: int, stop: int, channels: int = 2) -> list[str]:
    """Run a 1-D stack on the image and on its region ``[start, stop)``; list the outputs whose
    interval lies inside the region (or crosses an image border the region touches) but that
    the tile lacks or computes differently. ``start`` must be a multiple of the alignment."""
    return region_mismatches(specs, n, [(start, stop)], channels)


def aligned_regions(n: int, align: int, most: int = 60) -> list[tuple[int, int]]:
    """Regions ``[start, stop)`` of ``[0, n)`` as tile plans cut them: ``start`` a multiple of
    ``align`` and ``stop - start`` congruent to ``n`` modulo ``align``; every one, or (when
    there are more than ``most``) an evenly spread selection that keeps every start and
    every region reaching the end."""
    regions = [(a, a + m) for a in range(0, n, align) for m in range(1, n - a + 1)
               if (m - n) % align == 0]
    if len(regions) <= most:
        return regions
    step = -(-len(regions) // most)
    keep = set(regions[::step]) | {r for r in regions if r[1] == n}
    return sorted(keep)


def region_mismatches(specs, n: int, regions, channels: int = 2) -> list[str]:
    """:func:`tile_mismatches` for several regions of one image (the model is built, traced
    and run on the image once); regions torch rejects (a reflect pad wider than the region)
    are skipped."""
    wrong = []
    with one_thread():
        model = build(specs, 1, channels)
        x = positive_input((1, channels, n))
        geometry, _, _ = derive_geometry(model, x.shape)
        axis = geometry.axes[0]
        J, lo, hi = as_fraction(axis.stride), as_fraction(axis.lo), as_fraction(axis.hi)
        full = run(model, x)
        for start, stop in regions:
            tile = run(model, x[..., start:stop])
            if tile is None:
                continue
            for i in range(full.shape[-1]):
                inside = ((start == 0 or i * J + lo >= start)
                          and (stop == n or i * J + hi <= stop - 1))
                if not inside:
                    continue
                u = i - Fraction(start) / J
                where = f"[{start}, {stop})"
                if u.denominator != 1 or not 0 <= u < tile.shape[-1]:
                    wrong.append(f"output {i} missing from the tile {where} (local index {u})")
                elif not torch.allclose(full[..., i], tile[..., int(u)], rtol=1e-12,
                                        atol=1e-12):
                    wrong.append(f"output {i} differs in the tile {where}")
    return wrong


def _layers(specs):
    for spec in specs:
        if isinstance(spec, Join):
            yield from _layers(spec.left)
            yield from _layers(spec.right)
        else:
            yield spec


def has_crop(specs, axis: int = 0) -> bool:
    """Whether a stack crops: ``F.pad`` by a negative amount, a slice that drops positions at
    either end, or a transposed conv whose padding exceeds its reach. The rules widen such
    windows beyond the dependency hull (a tile lacks the cropped positions next to its edges),
    so the interval is not the exact hull there."""
    for spec in _layers(specs):
        if isinstance(spec, Pad) and any(_at(v, axis) < 0 for v in (spec.lo, spec.hi)):
            return True
        if isinstance(spec, Crop) and (_at(spec.lo, axis) > 0 or _at(spec.hi, axis) > 0):
            return True
        if isinstance(spec, ConvT):
            k, s, p, op, d = (_at(v, axis) for v in (spec.k, spec.s, spec.p, spec.op, spec.d))
            if p > d * (k - 1) or 2 * p > d * (k - 1) + op:
                return True
    return False


def has_border_reads(specs, axis: int = 0) -> bool:
    """Whether some output reads, through reflect or replicate padding, a position outside its
    window on the unbounded grid (which has no borders, so :func:`exact_hull` cannot see it).

    torch's index maps: reflect reads padded position ``-t`` as ``t`` and ``n - 1 + t`` as
    ``n - 1 - t``; replicate reads them as ``0`` and ``n - 1``. A conv's first output covers
    ``[-p_lo, reach - p_lo]``, so the mirror ``p_lo`` stays in it iff ``2*p_lo <= reach``; the
    last output's window ends at ``n - 1 + p_hi`` and starts at ``n - 1 + p_hi - reach``, so
    the mirror ``n - 1 - p_hi`` stays in it iff ``2*p_hi <= reach``, and ``n - 1`` iff
    ``p_hi <= reach``. ``F.pad`` alone is a window of reach 0: any positive pad.
    """
    for spec in _layers(specs):
        if isinstance(spec, Pad) and spec.mode != "constant" and any(
                _at(v, axis) > 0 for v in (spec.lo, spec.hi)):
            return True
        if isinstance(spec, Conv) and spec.mode in ("reflect", "replicate"):
            reach = _at(spec.d, axis) * (_at(spec.k, axis) - 1)
            p_lo = spec.pad_lo(axis)
            p_hi = reach - p_lo if spec.p == "same" else (0 if spec.p == "valid" else p_lo)
            limit = reach if spec.mode == "replicate" else reach / 2
            if max(p_lo, p_hi) > limit:
                return True
    return False


def has_holes(specs, axis: int = 0) -> bool:
    """Whether a transposed conv writes no tap at some output residue: such outputs read
    nothing and hold the bias; the hull over residues of a later layer's window then counts
    offsets that no output reads."""
    for spec in _layers(specs):
        if isinstance(spec, ConvT):
            k, s, d = (_at(v, axis) for v in (spec.k, spec.s, spec.d))
            if len({d * t % s for t in range(k)}) < s:
                return True
    return False
