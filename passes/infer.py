"""The geometry pass: annotate every node with Local / NonLocal / Constant / Symbolic."""
from __future__ import annotations

import builtins
import operator

import sympy
import torch.fx as fx

from .context import NotLocal, RuleContext, concrete_shape
from .geometry import (GEOMETRY, Axis, Constant, Local, NonLocal, Reduced, Symbolic,
                       input_symbols)
from .nodes import target_name
from .rules import SHAPE_ATTRS, SHAPE_METHODS, lookup

# Python-level ops evaluated directly on symbolic shape values.
VALUE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
    operator.neg, operator.getitem, operator.pow, builtins.getattr, builtins.len, builtins.min,
    builtins.max, builtins.int, builtins.tuple, builtins.list, operator.eq, operator.ne,
}


def infer_geometry(gm: fx.GraphModule, input_shape) -> tuple[sympy.Symbol, ...]:
    """Annotate ``node.meta[GEOMETRY]`` for every node of ``gm`` (after shape propagation).

    The first placeholder is the image, shaped ``(N, C, *spatial)``. Returns the size symbols
    of its spatial axes (``H, W`` for 2-D). Pure: reads and writes node meta only.
    """
    n_spatial = len(input_shape) - 2
    symbols = input_symbols(n_spatial)
    values = dict(zip(symbols, input_shape[2:]))
    first = True
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if first:
                axes = tuple(Axis(sympy.Integer(1), sympy.Integer(0), sympy.Integer(0), s,
                                  sympy.Integer(1)) for s in symbols)
                node.meta[GEOMETRY] = Local(axes, tuple(range(2, 2 + n_spatial)))
                first = False
            else:
                node.meta[GEOMETRY] = Constant()
            continue
        if node.op in ("get_attr", "output"):
            node.meta[GEOMETRY] = Constant()
            continue
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        geometry = _node_geometry(node, module, symbols)
        if isinstance(geometry, Local):
            geometry = _check_sizes(node, geometry, values)
        node.meta[GEOMETRY] = geometry
    return symbols


def _node_geometry(node, module, symbols):
    inputs = [n.meta[GEOMETRY] for n in node.all_input_nodes]
    for g in inputs:
        if isinstance(g, NonLocal):
            return NonLocal(f"depends on non-local '{g.origin}'", g.origin, "depends")
    has_local = any(isinstance(g, Local) for g in inputs)
    has_symbolic = any(isinstance(g, Symbolic) for g in inputs)
    reduced = [g for g in inputs if isinstance(g, Reduced)]
    if reduced and not has_local:  # computed once from the statistics, outside the tiles
        return Reduced(reduced[0].origin, f"derives from the whole-image statistics of "
                                          f"'{reduced[0].origin}'")
    if not has_local and not has_symbolic:
        return Constant()
    if has_local and _is_shape_query(node):
        return _shape_query(node)
    if not has_local:
        return _symbolic_value(node)
    fn = lookup(node, module)
    if fn is None:
        return NonLocal(f"no geometry rule for {target_name(node, module)}", node.name, "no_rule")
    try:
        return fn(RuleContext(node, module, symbols))
    except NotLocal as e:
        return NonLocal(e.reason, node.name, e.kind)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
        return NonLocal(f"{target_name(node, module)}: arguments not understood ({e})",
                        node.name, "no_rule")


def _is_shape_query(node):
    if node.op == "call_method" and node.target in SHAPE_METHODS:
        return True
    return (node.op == "call_function" and node.target is builtins.getattr
            and node.args[1] in SHAPE_ATTRS)


def symbolic_shape(node) -> tuple:
    """Shape of a local tensor with spatial sizes as expressions of the input size."""
    g = node.meta[GEOMETRY]
    shape = list(concrete_shape(node))
    for axis, d in zip(g.axes, g.dims):
        shape[d] = axis.size
    return tuple(shape)


def _shape_query(node):
    source = node.args[0]
    shape = symbolic_shape(source)
    if node.op == "call_function":  # getattr(x, 'shape'|'ndim'|'dtype'|...)
        attr = node.args[1]
        if attr == "shape":
            return Symbolic(shape)
        if attr == "ndim":
            return Symbolic(len(shape))
        return Constant()
    if node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return Symbolic(shape if dim is None else shape[dim])
    if node.target in ("dim", "ndimension"):
        return Symbolic(len(shape))
    numel = sympy.Integer(1)
    for s in shape:
        numel = numel * s
    return Symbolic(numel)


def _symbolic_value(node):
    """A node fed only by constants and shape values: evaluate it on the symbolic values."""
    is_tensor = hasattr(node.meta.get("tensor_meta"), "shape")
    if node.op == "call_function" and node.target in VALUE_FUNCTIONS and not is_tensor:
        try:
            args = fx.node.map_arg(node.args, _value_of)
            kwargs = fx.node.map_arg(node.kwargs, _value_of)
            return Symbolic(node.target(*args, **kwargs))
        except Exception as e:  # evaluation of user arithmetic on sizes
            return NonLocal(f"cannot evaluate {target_name(node)} on image sizes ({e})",
                            node.name, "no_rule")
    values = [n.meta[GEOMETRY].value for n in node.all_input_nodes
              if isinstance(n.meta[GEOMETRY], Symbolic)]
    if all(not _free(v) for v in values):
        return Constant()
    return NonLocal(f"{target_name(node)} takes a value that depends on the image size",
                    node.name, "rule")


def _value_of(n):
    g = n.meta[GEOMETRY]
    if isinstance(g, Symbolic):
        return g.value
    raise NotLocal(f"'{n.name}' has no known value")


def _free(value) -> bool:
    if isinstance(value, sympy.Basic):
        return bool(value.free_symbols)
    if isinstance(value, (list, tuple)):
        return any(_free(v) for v in value)
    return False


def _check_sizes(node, geometry: Local, values) -> Local | NonLocal:
    """Invariant: the derived size expressions reproduce the traced shape at the input size."""
    shape = concrete_shape(node)
    if shape is None:
        # a tuple of tensors (chunk/split): check the first element
        tm = node.meta.get("tensor_meta")
        shapes = [t.shape for t in tm] if isinstance(tm, (list, tuple)) else []
        if not shapes or not all(hasattr(s, "__len__") for s in shapes):
            return geometry
        shape = tuple(shapes[0])
    for k, (axis, d) in enumerate(zip(geometry.axes, geometry.dims)):
        if d >= len(shape):
            return NonLocal(f"spatial axis {k} mapped to dim {d} of a {len(shape)}-d tensor "
                            "(geometry rule bug)", node.name, "mismatch")
        derived = axis.size.subs(values)
        if derived != shape[d]:
            return NonLocal(f"derived size {axis.size} = {derived} differs from the traced size "
                            f"{shape[d]} on axis {k} (geometry rule bug)", node.name, "mismatch")
    return geometry


__all__ = ["infer_geometry", "symbolic_shape"]
