"""Layout: permute, transpose, (un)squeeze, reshape, flatten, chunk/split, getitem, pixel shuffle."""
from __future__ import annotations

import operator

import sympy
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..context import NotLocal, RuleContext
from ..geometry import Local
from ..windows import conv_axis, nearest_axis
from .helpers import _norm_dim, _rank, _require_non_spatial, _window
from .sliding import pad_axis
from .table import rule


@rule("permute", torch.permute)
def permute(ctx: RuleContext) -> Local:
    local = ctx.local()
    args = ctx.node.args[1:]
    order = ctx.value(args[0] if len(args) == 1 and isinstance(args[0], (list, tuple))
                      else list(args) if args else ctx.arg(None, "dims"))
    rank = _rank(ctx)
    order = [_norm_dim(d, rank) for d in order]
    return local.with_axes(local.axes, [order.index(d) for d in local.dims])


@rule("transpose", torch.transpose, "swapaxes", torch.swapaxes)
def transpose(ctx: RuleContext) -> Local:
    local = ctx.local()
    rank = _rank(ctx)
    d0 = _norm_dim(ctx.value(ctx.arg(1, "dim0")), rank)
    d1 = _norm_dim(ctx.value(ctx.arg(2, "dim1")), rank)
    swap = {d0: d1, d1: d0}
    return local.with_axes(local.axes, [swap.get(d, d) for d in local.dims])


@rule("unsqueeze", torch.unsqueeze)
def unsqueeze(ctx: RuleContext) -> Local:
    local = ctx.local()
    dim = _norm_dim(ctx.value(ctx.arg(1, "dim")), _rank(ctx) + 1)
    return local.with_axes(local.axes, [d + 1 if d >= dim else d for d in local.dims])


@rule("squeeze", torch.squeeze, "view", "reshape", torch.reshape, "flatten", torch.flatten,
      nn.Flatten, "unflatten", torch.unflatten, nn.Unflatten, "view_as", "reshape_as")
def reshape(ctx: RuleContext) -> Local:
    """Any reshape keeps a spatial axis iff the dims before it and after it keep their products,
    and the new shape does not hard-code the spatial size."""
    local = ctx.local()
    in_shape, out_shape = ctx.shape(ctx.arg(0, "input")), ctx.out_shape
    dims = []
    for k, d in enumerate(local.dims):
        before, after = _prod(in_shape[:d]), _prod(in_shape[d + 1:])
        matches = [e for e in range(len(out_shape))
                   if out_shape[e] == in_shape[d] and _prod(out_shape[:e]) == before
                   and _prod(out_shape[e + 1:]) == after]
        if len(matches) != 1:
            raise NotLocal(f"reshape merges or splits spatial axis {k} (tensor dim {d}, "
                           f"shape {tuple(in_shape)} -> {tuple(out_shape)})")
        dims.append(matches[0])
    if ctx.node.target in ("view", "reshape", torch.reshape):
        _check_reshape_sizes(ctx, local, dims)
    if ctx.node.target in ("unflatten", torch.unflatten) or isinstance(ctx.module, nn.Unflatten):
        _check_unflatten_sizes(ctx, local, dims, rank=len(in_shape))
    return local.with_axes(local.axes, dims)


def _check_reshape_sizes(ctx, local, dims):
    raw = list(ctx.node.args[1:])
    if len(raw) == 1 and isinstance(raw[0], (list, tuple)):
        raw = list(raw[0])
    elif "shape" in ctx.node.kwargs:
        raw = list(ctx.node.kwargs["shape"])
    sizes = ctx.symbolic(raw)
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):  # x.reshape(y.shape)
        sizes = list(sizes[0])
    for k, e in enumerate(dims):
        _check_spatial_size(local, k, sizes, e)


def _check_spatial_size(local, k, sizes, e):
    """``sizes[e]`` gives spatial axis ``k`` its size: it must follow the image size."""
    s = sizes[e]
    if isinstance(s, sympy.Basic) and sympy.simplify(s - local.axes[k].size) == 0:
        return
    if not isinstance(s, sympy.Basic) and s == -1:
        others = [sizes[i] for i in range(len(sizes)) if i != e]
        if all(not (isinstance(o, sympy.Basic) and o.free_symbols) for o in others):
            return
    raise NotLocal(f"reshape gives spatial axis {k} the size {s}, fixed at this image size; "
                   "use x.shape to keep it")


def _check_unflatten_sizes(ctx, local, dims, rank):
    if ctx.module is not None:
        dim, sizes = ctx.module.dim, ctx.module.unflattened_size
    else:
        dim, sizes = ctx.value(ctx.arg(1, "dim")), ctx.symbolic(ctx.arg(2, "sizes"))
    dim = _norm_dim(dim, rank)
    sizes = list(sizes)
    for k, (d, e) in enumerate(zip(local.dims, dims)):
        if d == dim:  # the unflattened dim is spatial: one of its new sizes is the axis size
            _check_spatial_size(local, k, sizes, e - dim)


def _prod(xs):
    p = 1
    for x in xs:
        p *= int(x)
    return p


@rule("chunk", torch.chunk, "split", torch.split, "unbind", torch.unbind, "tensor_split",
      torch.tensor_split)
def split(ctx: RuleContext) -> Local:
    local = ctx.local()
    rank = _rank(ctx)
    default = 0
    dim = ctx.value(ctx.arg(2, "dim", default)) if ctx.node.target not in (
        "unbind", torch.unbind) else ctx.value(ctx.arg(1, "dim", 0))
    dim = _norm_dim(dim, rank)
    _require_non_spatial(ctx, local, [dim], "splits")
    if ctx.node.target in ("unbind", torch.unbind):
        return local.with_axes(local.axes, [d - 1 if d > dim else d for d in local.dims])
    return local


@rule(operator.getitem)
def getitem(ctx: RuleContext) -> Local:
    """Indexing a tuple of local tensors, or a tensor: non-spatial dims by constants, spatial
    axes by slices that crop the same number of pixels from each end in every tile
    (``x[..., 1:-1]``, ``x[..., :x.shape[-1] - 1]``), with a constant step."""
    local = ctx.local()
    source = ctx.arg(0)
    raw = ctx.arg(1)
    if not hasattr(source.meta.get("tensor_meta"), "shape"):
        return local  # an element of a tuple output (chunk, split, max with dim)
    index = raw if isinstance(raw, tuple) else (raw,)  # a list is one (advanced) index
    rank = _rank(ctx)
    if Ellipsis in index:
        i = index.index(Ellipsis)
        fill = rank - (len(index) - 1 - sum(1 for x in index if x is None))
        index = index[:i] + (slice(None),) * fill + index[i + 1:]
    mapping, slices, d_in, d_out = {}, {}, 0, 0
    for item in index:
        if item is None:
            d_out += 1
            continue
        if isinstance(item, slice):
            if d_in in local.dims:
                slices[local.dims.index(d_in)] = item
            else:
                ctx.value((item.start, item.stop, item.step))
            mapping[d_in] = d_out
            d_in, d_out = d_in + 1, d_out + 1
            continue
        if isinstance(item, fx.Node):
            item = ctx.value(item)
        if isinstance(item, int):
            if d_in in local.dims:
                raise NotLocal(f"indexes spatial axis {local.dims.index(d_in)}")
            d_in += 1
        else:  # advanced indexing (fx keeps a list as its immutable_list)
            kind = "list" if isinstance(item, list) else type(item).__name__
            raise NotLocal(f"indexing with {kind}")
    for rest in range(d_in, rank):
        mapping[rest] = d_out + rest - d_in
    for k, item in slices.items():
        local = _slice_axis(ctx, local, k, ctx.symbolic(item.start), ctx.symbolic(item.stop),
                            ctx.value(item.step))
    return local.with_axes(local.axes, [mapping[d] for d in local.dims])


@rule("narrow", torch.narrow)
def narrow(ctx: RuleContext) -> Local:
    """``x.narrow(dim, start, length)`` is ``x[..., start:start + length]`` on ``dim`` (torch
    refuses a range past the end; a negative start counts from the end)."""
    local = ctx.local()
    dim = _norm_dim(ctx.value(ctx.arg(1, "dim")), _rank(ctx))
    start, length = ctx.arg(2, "start"), ctx.arg(3, "length")
    if dim not in local.dims:
        ctx.value((start, length))
        return local
    start, length = ctx.symbolic(start), ctx.symbolic(length)
    return _slice_axis(ctx, local, local.dims.index(dim), start, start + length, 1)


def _slice_axis(ctx, local: Local, k: int, start, stop, step) -> Local:
    """Spatial axis ``k`` of ``local`` sliced ``[start:stop:step]`` (Python's bounds): a crop,
    then every ``step``-th position (a 1-tap window of stride ``step``)."""
    step = 1 if step is None else step  # torch: a positive int
    n = local.axes[k].size
    start = sympy.Integer(0) if start is None else sympy.sympify(start)
    values, _ = ctx.tile_values(local, [start])
    if values is None or any(v < 0 for (v,) in values):
        raise NotLocal(f"slice start {start} on spatial axis {k} is not the same distance from "
                       "the start of every tile (a negative start counts from the end)")
    if stop is None:
        crop = sympy.Integer(0)
    else:
        stop = sympy.sympify(stop)
        crop = -stop if stop.is_number and stop < 0 else n - stop
        values, _ = ctx.tile_values(local, [crop])
        if (stop.is_number and stop >= 0) or values is None:
            raise NotLocal(f"slice stop {stop} on spatial axis {k} is not the same distance "
                           f"from the end of every tile; to crop m pixels use -m or "
                           "x.shape[...] - m")
        if any(v < 0 for (v,) in values):  # a stop past the end stops at the end
            crop = sympy.Max(crop, 0)
    local = pad_axis(ctx, local, k, -start, -crop)
    if step > 1:
        axes = list(local.axes)
        axes[k] = axes[k].then(*conv_axis(axes[k].size, 1, step, 0, 0, 1))
        local = local.with_axes(axes)
    return local


# ---------------------------------------------------------------------------------------------
# pixel shuffle (sub-pixel convolution)


@rule(nn.PixelShuffle, F.pixel_shuffle)
def pixel_shuffle(ctx: RuleContext) -> Local:
    """Output ``(c, h*r + i, w*r + j)`` is input ``(c*r*r + i*r + j, h, w)``: nearest's grid."""
    r = ctx.module.upscale_factor if ctx.module is not None else \
        ctx.value(ctx.arg(1, "upscale_factor"))
    return _window(ctx, ctx.local(), 2, lambda j, ax: nearest_axis(ax.size, int(r)))


@rule(nn.PixelUnshuffle, F.pixel_unshuffle)
def pixel_unshuffle(ctx: RuleContext) -> Local:
    """Output ``(c*r*r + i*r + j, h, w)`` is input ``(c, h*r + i, w*r + j)``: an r x r/r window."""
    r = ctx.module.downscale_factor if ctx.module is not None else \
        ctx.value(ctx.arg(1, "downscale_factor"))
    r = int(r)
    return _window(ctx, ctx.local(), 2, lambda j, ax: conv_axis(ax.size, r, r, 0, 0, 1))
