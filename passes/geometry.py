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
  kept as sympy expressions so a rule can ask whether it is the same in every tile;
- :class:`Reduced`   a small tensor computed from sums over the whole image of local tensors
  (a spatial mean, a norm's statistics, what squeeze-excitation makes of them): no spatial
  extent, the same in every tile, computed once between streamed passes.
"""
from __future__ import annotations

import itertools
import math
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

    @property
    def end_slack(self) -> sympy.Rational:
        """How far past an integer the last index inside a tile can fall: the largest fractional
        part of ``(B - 1 - hi) / stride`` over tile ends ``B``.

        Index ``i`` is inside a tile ending at ``B`` when ``i*stride + hi <= B - 1``. With
        ``stride = P/Q`` (lowest terms) the bound ``(B - 1 - hi) * Q/P`` takes, as ``B`` runs over
        the integers, every fractional part ``k/P - hi*Q/P`` (mod 1). A layer whose window is
        measured in fractions of this node's pixels (a transposed convolution) must not count
        on the bound being an integer: the last index the tile holds is its floor.
        """
        p, q = (int(v) for v in sympy.fraction(sympy.Rational(self.stride)))
        c = -sympy.Rational(self.hi) * q / p
        return max(_frac(sympy.Rational(k, p) + c) for k in range(p))

    def then(self, s, a, b, size: sympy.Expr) -> "Axis":
        """Compose with a layer whose output ``i`` reads its input ``[i*s + a, i*s + b]``.

        ``a`` and ``b`` are rationals: a window that varies with the image size (a shape-derived
        pad) is the hull over its values, never an expression (joins compare offsets)."""
        s, a, b = sympy.sympify(s), sympy.sympify(a), sympy.sympify(b)
        if not (a.is_Rational and b.is_Rational):
            raise TypeError(f"window offsets must be rationals, got [{a}, {b}]")
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
class Reduction:
    """How a reduction node sums its local input over the whole image (and which other dims):
    ``kind`` is ``sum``, ``mean``, ``var``, ``std``, ``norm2`` (the 2-norm) or ``moments``
    (mean and biased variance per channel group, :func:`passes.statistics.moments`)."""

    kind: str
    dims: tuple[int, ...]  # tensor dims of the input summed over (every spatial one included)
    keepdim: bool = True
    correction: int = 0  # var, std: divide by count - correction
    groups: int = 0  # moments: channel groups
    batch: bool = False  # moments: over the batch dim too (train-mode BatchNorm)


@dataclass(frozen=True)
class Reduced:
    """A tensor computed from reductions over the whole image of local tensors, and constants.

    ``origin`` is the reduction it derives from (itself when it is one: ``reduction`` then says
    how it sums its input); ``reason`` says what it reduces, for reports.
    """

    origin: str
    reason: str
    reduction: Reduction | None = None


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


def _frac(x: sympy.Rational) -> sympy.Rational:
    return x - sympy.floor(x)


MAX_RESIDUES = 64  # residue classes enumerated to decide that a value is the same in every tile


def residue_values(exprs, aligns) -> list[tuple] | None:
    """The values of ``exprs`` for every residue of the sizes modulo their alignments.

    ``aligns`` maps each size symbol to the alignment of its axis. Tiles are planned so that each
    tile's length is congruent to the image size modulo the alignment, so an expression that
    takes one value per residue class (a U-Net's pad-to-match, a pad to a multiple ``(-W) % 8``)
    is the same in every tile as in the image. Returns one tuple of numbers per combination of
    residues (all of them: a geometry must hold at every image size), or None when some
    expression still grows with a size, or when there are more than ``MAX_RESIDUES``
    combinations to try.
    """
    exprs = [sympy.sympify(e) for e in exprs]
    free = sorted({s for e in exprs for s in e.free_symbols}, key=str)
    if any(s not in aligns for s in free):
        return None
    steps = [int(aligns[s]) for s in free]
    if math.prod(steps) > MAX_RESIDUES:
        return None
    grow = [sympy.Symbol(f"m{k}_", integer=True, nonnegative=True) for k in range(len(free))]
    values = []
    for residues in itertools.product(*[range(a) for a in steps]):
        subs = {s: a * m + r + a for s, a, m, r in zip(free, steps, grow, residues)}
        row = []
        for e in exprs:
            v = e.subs(subs)
            if v.free_symbols:
                v = sympy.simplify(v)
            if v.free_symbols:
                return None
            row.append(v)
        values.append(tuple(row))
    return values


def size_periods(exprs) -> list[int]:
    """Factors by which to coarsen the alignment when it alone does not decide ``exprs`` in
    :func:`residue_values` (a pad to a multiple of 8 on the image). A size ``s`` at stride
    ``J`` grows by one every ``J`` pixels, so ``Mod(s, q)`` repeats every ``J*q``; nested
    (``Mod(floor(s/2), 2)``) every ``J*q*q``. The candidates are the divisors of ``q**depth``
    (``q`` the lcm of the moduli and of the divisors under ``floor``/``ceiling``, ``depth`` how
    many there are), smallest first."""
    q, depth = 1, 0
    for e in exprs:
        for node in sympy.preorder_traversal(sympy.sympify(e)):
            if isinstance(node, sympy.Mod) and node.args[1].is_Integer:
                q, depth = math.lcm(q, int(node.args[1])), depth + 1
            elif isinstance(node, (sympy.floor, sympy.ceiling)):
                q, depth = math.lcm(q, *[int(c.q) for c in
                                         node.args[0].as_coefficients_dict().values()
                                         if c.is_Rational]), depth + 1
    top = min(q ** depth, MAX_RESIDUES)
    return [d for d in range(2, top + 1) if q ** depth % d == 0]


def realign(local: Local, symbols, aligns) -> Local:
    """``local`` with each axis's alignment raised to a multiple of ``aligns[symbol]``.

    A tile plan aligns to the lcm over the stem, so one node asking for a coarser alignment
    (a pad by ``Mod(-W, 8)`` takes one value per residue modulo 8) makes every tile length
    congruent to the image size modulo it."""
    axes = [replace(ax, align=sympy.ilcm(ax.align, aligns.get(sym, 1)))
            for sym, ax in zip(symbols, local.axes)]
    return local.with_axes(axes)


def is_tile_invariant(expr, align: int, symbols) -> bool:
    """True when ``expr`` takes the same value for every size with the same residue mod ``align``.

    Tiles are planned so that each tile's length is congruent to the image size modulo the
    alignment, so such an expression (a pad amount, a target size) is the same in every tile.
    """
    return residue_values([expr], {s: int(align) for s in symbols}) is not None
