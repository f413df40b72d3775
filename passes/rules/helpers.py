"""Helpers shared by the rule families."""
from __future__ import annotations

from ..context import NotLocal
from ..geometry import Local


def _rank(ctx, raw=None):
    shape = ctx.shape(ctx.arg(0, "input") if raw is None else raw)
    if shape is None:
        raise NotLocal("input has no recorded shape")
    return len(shape)


def _norm_dim(d, rank):
    return d + rank if d < 0 else d


def _require_non_spatial(ctx, local: Local, dims, what: str):
    for d in dims:
        if d in local.dims:
            k = local.dims.index(d)
            raise NotLocal(f"{what} over spatial axis {k} (tensor dim {d})")


def _window(ctx, local: Local, n: int, axis_fn):
    """Apply a window layer over the last ``n`` tensor dims; ``axis_fn(j, axis) -> (s, a, b, size)``."""
    rank = _rank(ctx)
    wanted = tuple(range(rank - n, rank))
    if len(local.axes) != n or sorted(local.dims) != list(wanted):
        raise NotLocal(f"a {n}-d window layer over tensor dims {wanted}, "
                       f"but the spatial axes are dims {local.dims}")
    axes = list(local.axes)
    for k, d in enumerate(local.dims):
        j = d - (rank - n)
        s, a, b, size = axis_fn(j, axes[k])
        axes[k] = axes[k].then(s, a, b, size)
    return local.with_axes(axes)


def _check_channel_params(ctx, local: Local, what="per-channel parameters"):
    """Layers with per-channel parameters read tensor dim 1 (or 0 when unbatched)."""
    rank = _rank(ctx)
    if 1 in local.dims and rank > 2:
        raise NotLocal(f"{what} on dim 1, which is spatial here")


def _check_constant_args(ctx, indices, names):
    """Weights of a layer (conv weight, linear weight, norm statistics) must be constants."""
    for i, name in zip(indices, names):
        raw = ctx.arg(i, name, None)
        if isinstance(ctx.geom(raw), Local):
            raise NotLocal(f"its {name} is computed from the image")
