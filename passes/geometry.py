"""Geometry values stored on fx nodes, and how they compose.

One spatial axis of a node is an :class:`Axis`: output index ``i`` depends only on model-input
indices ``[i*stride + lo, i*stride + hi]``. Strides are sympy ``Rational`` (upsampling gives 1/2),
offsets are rationals too (hulls over the residues of ``i``), sizes are sympy expressions of the
input-size symbols. Everything is immutable: passes write new values, never mutate old ones.

Every node gets exactly one of these under ``node.meta[GEOMETRY]``:

- :class:`Local`     a tensor that depends on the model input through local ops only;
- :class:`NonLocal`  a tensor (or value) that depends on the input non-locally, with the reason;
- :class:`Constant`  anything not derived from the input (parameters, literals, buffers);
- :class:`Symbolic`  a Python value derived from shapes of local tensors (``x.size(2) // 2``),
  kept as sympy expressions so a rule can ask whether it is the same in every tile.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import sympy

GEOMETRY = "fxstream.geometry"
INPUT_SYMBOLS_1D = ("L",)
INPUT_SYMBOLS_2D = ("H", "W")
INPUT_SYMBOLS_3D = ("D", "H", "W")


def input_symbols(ndim: int) -> tuple[sympy.Symbol, ...]:
    """The size symbols of a model input with ``ndim`` spatial axes (``H, W`` for images)."""
    names = {1: INPUT_SYMBOLS_1D, 2: INPUT_SYMBOLS_2D, 3: INPUT_SYMBOLS_3D}.get(ndim)
    if names is None:
        names = tuple(f"S{k}" for k in range(ndim))
    return tuple(sympy.Symbol(n, integer=True, positive=True) for n in names)


@dataclass(frozen=True)
class Axis:
    """Geometry of one spatial axis of one node, relative to the model input."""

    stride: sympy.Rational
    lo: sympy.Rational
    hi: sympy.Rational
    size: sympy.Expr
    align: sympy.Integer

    @property
    def receptive_field(self) -> sympy.Rational:
        return self.hi - self.lo + 1

    def then(self, s, a, b, size: sympy.Expr) -> "Axis":
        """Compose with a layer whose output ``i`` reads its input ``[i*s + a, i*s + b]``."""
        s, a, b = sympy.sympify(s), sympy.sympify(a), sympy.sympify(b)
        stride = self.stride * s
        return Axis(
            stride=stride,
            lo=self.lo + a * self.stride,
            hi=self.hi + b * self.stride,
            size=size,
            align=sympy.ilcm(self.align, sympy.fraction(stride)[0]),
        )


@dataclass(frozen=True)
class Local:
    """A tensor computed from the model input by local ops.

    ``dims[k]`` is the tensor dimension that holds spatial axis ``k``; ``axes[k]`` its geometry.
    """

    axes: tuple[Axis, ...]
    dims: tuple[int, ...]

    def with_axes(self, axes, dims=None) -> "Local":
        return replace(self, axes=tuple(axes), dims=self.dims if dims is None else tuple(dims))

    @property
    def align(self) -> int:
        return int(sympy.ilcm(*[a.align for a in self.axes], 1))


@dataclass(frozen=True)
class NonLocal:
    """A value some output of which depends on the whole extent of a spatial axis.

    ``origin`` is the node where non-locality starts (itself, or an ancestor); ``kind`` is a short
    machine-readable tag (``rule``, ``no_rule``, ``depends``, ``train_batchnorm``).
    """

    reason: str
    origin: str
    kind: str = "rule"


@dataclass(frozen=True)
class Constant:
    """A value that does not depend on the model input (parameters, buffers, literals)."""


@dataclass(frozen=True)
class Symbolic:
    """A Python value (int, tuple, ...) computed from shapes of local tensors, as sympy."""

    value: Any


def hull(axes: list[Axis]) -> Axis:
    """Join of several inputs on the same grid: the interval is the hull of theirs."""
    first = axes[0]
    return Axis(
        stride=first.stride,
        lo=min(a.lo for a in axes),
        hi=max(a.hi for a in axes),
        size=first.size,
        align=sympy.ilcm(*[a.align for a in axes], 1),
    )


def is_tile_invariant(expr, align: int, symbols) -> bool:
    """True when ``expr`` takes the same value for every size with the same residue mod ``align``.

    Tiles are planned so that each tile's input length is congruent to the image size modulo the
    alignment, so such an expression (a pad amount, a target size) is the same in every tile.
    """
    expr = sympy.sympify(expr)
    free = [s for s in symbols if s in expr.free_symbols]
    if not free:
        return True
    m = sympy.Symbol("m_", integer=True, nonnegative=True)
    align = int(align)
    if align > 64:
        return False
    for sym in free:
        for r in range(align):
            reduced = sympy.simplify(expr.subs(sym, align * m + r + align))
            if m in reduced.free_symbols:
                return False
    return True
