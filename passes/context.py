"""What a geometry rule sees of one node: its arguments, their geometry, their shapes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx

from .geometry import (GEOMETRY, Constant, Local, Symbolic, realign, residue_values,
                       size_periods)

_MISSING = object()


class NotLocal(Exception):
    """Raised inside a rule: the node is not local, for the reason given."""

    def __init__(self, reason: str, kind: str = "rule"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


def concrete_shape(node: fx.Node):
    """Shape recorded by shape propagation (``tensor_meta``), or None for non-tensors."""
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if hasattr(tm, "shape") else None


@dataclass
class RuleContext:
    """Everything a rule may read; rules return a new ``Local`` or raise ``NotLocal``."""

    node: fx.Node
    module: torch.nn.Module | None
    symbols: tuple

    # -- arguments -------------------------------------------------------------------------
    def arg(self, index: int | None, name: str | None = None, default: Any = _MISSING):
        """The raw argument by position (after ``self`` for modules) or keyword."""
        args, kwargs = self.node.args, self.node.kwargs
        if index is not None and index < len(args):
            return args[index]
        if name is not None and name in kwargs:
            return kwargs[name]
        if default is _MISSING:
            raise NotLocal(f"missing argument {name or index}")
        return default

    def value(self, raw):
        """The Python value of an argument; shape-derived values must not depend on the size."""
        if isinstance(raw, fx.Node):
            g = raw.meta.get(GEOMETRY)
            if isinstance(g, Symbolic):
                return _constant_value(g.value)
            raise NotLocal(f"argument '{raw.name}' is a tensor where a value was expected")
        if isinstance(raw, (list, tuple)):
            return type(raw)(self.value(r) for r in raw)
        return raw

    def symbolic(self, raw):
        """Like :meth:`value` but keeps sympy expressions of the input size."""
        if isinstance(raw, fx.Node):
            g = raw.meta.get(GEOMETRY)
            if isinstance(g, Symbolic):
                return g.value
            raise NotLocal(f"argument '{raw.name}' is a tensor where a value was expected")
        if isinstance(raw, (list, tuple)):
            return type(raw)(self.symbolic(r) for r in raw)
        return raw

    # -- geometry and shapes ---------------------------------------------------------------
    @staticmethod
    def geom(raw):
        if isinstance(raw, fx.Node):
            return raw.meta[GEOMETRY]
        return Constant()

    def local(self, raw=None) -> Local:
        """The geometry of a tensor argument (the first argument by default), which must be local."""
        raw = self.arg(0, "input") if raw is None else raw
        g = self.geom(raw)
        if not isinstance(g, Local):
            raise NotLocal("expected a local tensor argument")
        return g

    @property
    def input_sizes(self) -> dict:
        """Each size symbol with its value at the traced input shape."""
        image = next(n for n in self.node.graph.nodes if n.op == "placeholder")
        return dict(zip(self.symbols, concrete_shape(image)[2:]))

    def aligns(self, local: Local) -> dict:
        """Each size symbol with the alignment of its axis in ``local``: tiles are congruent to
        the image modulo (a multiple of) it, see :func:`~passes.geometry.residue_values`."""
        return {sym: int(ax.align) for sym, ax in zip(self.symbols, local.axes)}

    def tile_values(self, local: Local, exprs):
        """``(values, local)``: the values of the shape-derived ``exprs`` per residue class of
        the sizes (:func:`~passes.geometry.residue_values`), and ``local`` realigned when they
        take one value per class only modulo a coarser alignment (a pad to a multiple of 8
        on the image); ``(None, local)`` when some expression differs from tile to tile."""
        aligns = self.aligns(local)
        values = residue_values(exprs, aligns)
        if values is not None:
            return values, local
        free = {s for e in exprs for s in sympy.sympify(e).free_symbols}
        for factor in size_periods(exprs):
            coarser = {s: a * factor if s in free else a for s, a in aligns.items()}
            values = residue_values(exprs, coarser)
            if values is not None:
                return values, realign(local, self.symbols, {s: coarser[s] for s in free})
        return None, local

    @staticmethod
    def shape(raw):
        return concrete_shape(raw) if isinstance(raw, fx.Node) else None

    @property
    def out_shape(self):
        return concrete_shape(self.node)

    def param_shape(self, raw):
        """Shape of a constant tensor argument (a parameter or buffer)."""
        if isinstance(raw, torch.Tensor):
            return tuple(raw.shape)
        return self.shape(raw)


def _constant_value(value):
    if isinstance(value, sympy.Basic):
        if value.free_symbols:
            raise NotLocal(f"an argument depends on the image size ({value})")
        return int(value) if value.is_integer else float(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_constant_value(v) for v in value)
    return value
