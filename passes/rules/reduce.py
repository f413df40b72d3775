"""Reductions, per-position layers over one dim, and explicitly global ops."""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..context import NotLocal, RuleContext
from ..geometry import Local, Reduced, Reduction, hull
from .helpers import _check_constant_args, _norm_dim, _rank, _require_non_spatial
from .joins import elementwise
from .table import RULES, rule


REDUCE_FUNCTIONS = (torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min,
                    torch.std, torch.var, torch.prod, torch.logsumexp, torch.norm,
                    torch.argmax, torch.argmin, torch.all, torch.any)
REDUCE_METHODS = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod",
                  "logsumexp", "norm", "argmax", "argmin", "all", "any")
ALONG_FUNCTIONS = (torch.softmax, F.softmax, torch.log_softmax, F.log_softmax, torch.cumsum,
                   F.normalize, F.glu, torch.cumprod)
ALONG_METHODS = ("softmax", "log_softmax", "cumsum", "cumprod")


@rule(*REDUCE_FUNCTIONS, *REDUCE_METHODS)
def reduce(ctx: RuleContext) -> Local:
    local = ctx.local()
    rank = _rank(ctx)
    dim = ctx.arg(1, "dim", None)
    if isinstance(ctx.geom(dim), Local):  # torch.max(a, b) is elementwise
        return elementwise(ctx)
    name = getattr(ctx.node.target, "__name__", ctx.node.target)
    if name == "norm":
        dim = ctx.arg(2, "dim", None)
    dim = ctx.value(dim)
    if dim is None or isinstance(dim, bool):  # torch.var(x, True): `unbiased`, all dims
        raise NotLocal(f"{name} over all dims, spatial axes included")
    dims = [_norm_dim(d, rank) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
    # torch.norm(x, p, dim, keepdim); torch.var/std(x, dim, unbiased, keepdim)
    keepdim_index = 3 if name in ("norm", "var", "std") else 2
    keepdim = ctx.value(ctx.arg(keepdim_index, "keepdim", ctx.node.kwargs.get("keepdims",
                                                                                False)))
    if set(dims) & set(local.dims):
        return _whole_image_reduction(ctx, local, name, dims, bool(keepdim))
    if keepdim:
        return local
    return local.with_axes(local.axes, [d - sum(1 for r in dims if r < d) for d in local.dims])


# reductions that are sums over the image (streamed as per-tile partial sums); the others
# (max, prod, logsumexp, arg-reductions) are refused with their reason
SUM_REDUCTIONS = {"mean": "mean", "sum": "sum", "var": "var", "std": "std"}


def _whole_image_reduction(ctx, local, name, dims, keepdim) -> Reduced:
    """A reduction over every spatial axis of a local tensor, as a streamed sum."""
    spatial = set(local.dims)
    if not spatial <= set(dims):
        raise NotLocal(f"{name} reduces over spatial axis "
                       f"{local.dims.index(min(set(dims) & spatial))} but not over all of them")
    correction = 0
    if name == "norm":
        p = ctx.value(ctx.arg(1, "p", "fro"))
        if p not in (2, 2.0, "fro"):
            raise NotLocal(f"norm with p={p!r} over the image: only the 2-norm is a streamed sum")
        kind = "norm2"
    elif name in SUM_REDUCTIONS:
        kind = SUM_REDUCTIONS[name]
        if name in ("var", "std"):
            unbiased = ctx.node.kwargs.get("unbiased", ctx.node.args[2] if
                                           len(ctx.node.args) > 2 else None)
            correction = ctx.value(ctx.node.kwargs.get("correction", 1 if unbiased in
                                                       (None, True) else 0))
    else:
        raise NotLocal(f"{name} over the whole image: only sums (mean, sum, var, std, the "
                       "2-norm) are streamed")
    return Reduced(ctx.node.name, f"{name} over the whole image",
                   Reduction(kind, tuple(sorted(dims)), keepdim, int(correction or 0)))


@rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, F.adaptive_avg_pool1d,
      F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)
def adaptive_avg_pool(ctx: RuleContext):
    """To one output per channel it is the spatial mean (a streamed sum); to more it averages a
    fraction of the image that depends on its size."""
    local = ctx.local()
    size = ctx.module.output_size if ctx.module is not None else \
        ctx.value(ctx.arg(1, "output_size"))
    n = len(local.dims)
    sizes = size if isinstance(size, (list, tuple)) else (size,) * n
    if all(s == 1 for s in sizes) and len(sizes) == n:
        return Reduced(ctx.node.name, "adaptive average pooling to 1: the mean of the whole "
                                      "image", Reduction("mean", tuple(local.dims), True))
    raise NotLocal("adaptive pooling: each output averages a fraction of the whole image")


@rule(*ALONG_FUNCTIONS, *ALONG_METHODS, nn.Softmax, nn.LogSoftmax, nn.GLU, nn.Softmax2d)
def along_dim(ctx: RuleContext) -> Local:
    local = ctx.local()
    rank = _rank(ctx)
    if ctx.module is not None:
        dim = getattr(ctx.module, "dim", 1)
        dim = -3 if isinstance(ctx.module, nn.Softmax2d) else dim
    else:
        default = 1 if ctx.node.target is F.normalize else -1 if ctx.node.target is F.glu else None
        dim = ctx.value(ctx.arg(2 if ctx.node.target is F.normalize else 1, "dim", default))
    if dim is None:
        raise NotLocal("softmax without dim")
    _require_non_spatial(ctx, local, [_norm_dim(dim, rank)], "normalises")
    if ctx.node.target is F.glu or isinstance(ctx.module, nn.GLU):
        return local
    return local


@rule(nn.Linear, F.linear)
def linear(ctx: RuleContext) -> Local:
    local = ctx.local()
    rank = _rank(ctx)
    _require_non_spatial(ctx, local, [rank - 1], "Linear mixes")
    if ctx.module is None:
        _check_constant_args(ctx, [1, 2], ["weight", "bias"])
    return local


@rule(nn.Bilinear, F.bilinear)
def bilinear(ctx: RuleContext) -> Local:
    """Two inputs mixed along their last dim: a join of both, on the same grid."""
    first, second = ctx.arg(0, "input1"), ctx.arg(1, "input2")
    parts = []
    for raw in (first, second):
        g = ctx.geom(raw)
        if not isinstance(g, Local):
            raise NotLocal("Bilinear of an image tensor with a constant of fixed shape")
        _require_non_spatial(ctx, g, [_rank(ctx, raw) - 1], "Bilinear mixes")
        parts.append(g)
    if ctx.module is None:
        _check_constant_args(ctx, [2, 3], ["weight", "bias"])
    a, b = parts
    if a.dims != b.dims or any(x.stride != y.stride for x, y in zip(a.axes, b.axes)):
        raise NotLocal("Bilinear of tensors on different grids")
    return a.with_axes([hull([x, y]) for x, y in zip(a.axes, b.axes)])


@rule(nn.LayerNorm, F.layer_norm, nn.RMSNorm, F.rms_norm)
def layer_norm(ctx: RuleContext) -> Local:
    local = ctx.local()
    rank = _rank(ctx)
    if ctx.module is not None:
        shape = ctx.module.normalized_shape
    else:
        shape = ctx.value(ctx.arg(1, "normalized_shape"))
    n = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
    _require_non_spatial(ctx, local, range(rank - n, rank), "LayerNorm normalises")
    return local


# ---------------------------------------------------------------------------------------------
# explicitly global ops (named reasons instead of "no geometry rule")


GLOBAL_REASONS = {
    nn.AdaptiveMaxPool1d: "adaptive pooling: each output reads a fraction of the whole image",
    nn.AdaptiveMaxPool2d: "adaptive pooling: each output reads a fraction of the whole image",
    nn.AdaptiveMaxPool3d: "adaptive pooling: each output reads a fraction of the whole image",
    F.adaptive_max_pool1d: "adaptive pooling: each output reads a fraction of the whole image",
    F.adaptive_max_pool2d: "adaptive pooling: each output reads a fraction of the whole image",
    F.adaptive_max_pool3d: "adaptive pooling: each output reads a fraction of the whole image",
    nn.MultiheadAttention: "attention mixes every position with every other",
    F.scaled_dot_product_attention: "attention mixes every position with every other",
    torch.matmul: "matmul over a spatial axis",
    torch.bmm: "matmul over a spatial axis",
    torch.einsum: "einsum may contract a spatial axis",
    operator.matmul: "matmul over a spatial axis",
    "matmul": "matmul over a spatial axis",
    "bmm": "matmul over a spatial axis",
}


def _global(reason):
    def fn(ctx):
        raise NotLocal(reason)

    return fn


for _key, _reason in GLOBAL_REASONS.items():
    RULES[_key] = _global(_reason)


@rule(torch.matmul, operator.matmul, "matmul")
def matmul(ctx: RuleContext) -> Local:
    """Local only when both operands keep their spatial axes off the contracted dims."""
    a, b = ctx.arg(0), ctx.arg(1)
    ga, gb = ctx.geom(a), ctx.geom(b)
    if isinstance(ga, Local) and isinstance(gb, Local):
        raise NotLocal("matmul of two image tensors mixes positions")
    local = ga if isinstance(ga, Local) else gb
    raw = a if isinstance(ga, Local) else b
    rank = _rank(ctx, raw)
    contracted = rank - 1 if raw is a else rank - 2
    _require_non_spatial(ctx, local, [contracted], "matmul contracts")
    if rank < 2 or len(ctx.out_shape) != rank:
        raise NotLocal("matmul with broadcasting over a spatial axis")
    other = b if raw is a else a
    shape = ctx.shape(other)
    if shape is not None:  # batch dims of the constant align with the output's from the right
        shift = rank - len(shape)
        for k, d in enumerate(local.dims):
            j = d - shift
            if 0 <= j < len(shape) - 2 and shape[j] != 1:
                raise NotLocal(f"matmul with '{other.name}', a tensor of fixed size {shape[j]} "
                               f"along spatial axis {k}")
    return local


# Shape queries are handled by the pass itself (they produce Symbolic values); these names are
# listed so that the pass knows them.
SHAPE_METHODS = ("size", "dim", "numel", "ndimension")
SHAPE_ATTRS = ("shape", "ndim", "dtype", "device", "is_cuda", "layout")
