"""Joins: broadcasting arithmetic, cat, stack."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..context import NotLocal, RuleContext
from ..geometry import Local, Symbolic, hull
from .helpers import _norm_dim, _rank
from .table import rule


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
