"""Norms with statistics over the whole image, taken apart into a reduction and a pointwise step.

GroupNorm, InstanceNorm (with its input's statistics) and BatchNorm in training are ``y = f(x, s)``
with ``s`` the mean and variance of ``x`` over the image (and channel groups, and for BatchNorm
the batch): :func:`decompose_statistics` rewrites each whose input is local into

- ``stats = moments(x, groups, batch)``: a reduction (streamed as per-tile partial moments,
  merged exactly), its geometry :class:`~passes.geometry.Reduced`;
- ``y = normalize(x, stats, weight, bias, eps, groups, batch)``: pointwise once ``stats`` is
  known, so local;
- for BatchNorm with running statistics, ``update_running_stats(stats, ...)``: their update,
  once per forward, as PyTorch makes it (the unbiased variance, ``momentum=None`` as a
  cumulative average).

The functions are plain torch code: the rewritten graph computes what the model computes (to
rounding) whether it is streamed or not.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from .context import concrete_shape


def moments(x: torch.Tensor, groups: int, batch: bool = False) -> torch.Tensor:
    """Mean and biased variance of ``x`` ``(N, C, *spatial)`` over its spatial dims and the
    channels of each of ``groups`` groups: shape ``(2, N, groups)``; with ``batch`` (one group
    per channel) over the batch dim too: ``(2, C)``. Never copies ``x``."""
    if batch:
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
    else:
        xg = x.unflatten(1, (groups, -1))  # a view, also of a tile's crop
        var, mean = torch.var_mean(xg, dim=list(range(2, xg.dim())), correction=0)
    return torch.stack([mean, var])


def normalize(x: torch.Tensor, stats: torch.Tensor, weight=None, bias=None, eps: float = 1e-5,
              groups: int = 1, batch: bool = False) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with the statistics of
    :func:`moments`, computed as PyTorch's CPU norm kernels compute it: a per-channel scale
    ``a = weight / sqrt(var + eps)`` and shift ``b = bias - mean * a`` (tiny tensors), then one
    pass over the map, ``x * a + b``, which saves only ``x`` (alive anyway) and ``a`` for the
    backward instead of two more maps."""
    n, c = x.shape[:2]
    mean, var = stats[0], stats[1]
    if not batch and groups != c:  # one statistic per group: per channel, per sample
        mean = mean.repeat_interleave(c // groups, dim=1)
        var = var.repeat_interleave(c // groups, dim=1)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    shape = (1 if batch else n, c) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))


def update_running_stats(stats, running_mean, running_var, num_batches_tracked, momentum,
                         count: int) -> None:
    """BatchNorm's running statistics after one batch, as ``nn.BatchNorm`` updates them: the
    batch mean, and the variance made unbiased over ``count`` values per channel."""
    with torch.no_grad():
        factor = momentum
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if momentum is None:
                factor = 1.0 / float(num_batches_tracked)
        mean, var = stats[0].detach(), stats[1].detach()
        running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        running_var.mul_(1 - factor).add_(var * (count / max(count - 1, 1)), alpha=factor)


_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_INSTANCENORM = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _spec(node: fx.Node, gm: fx.GraphModule):
    """How to take ``node`` apart: (groups, batch, eps, weight, bias, running stats or None,
    momentum), or None when it is not a norm over the image's statistics."""
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    if type(m) is nn.GroupNorm:
        return m.num_groups, False, m.eps, m.affine, None, None
    if type(m) in _INSTANCENORM:
        if m.track_running_stats and m.training:
            return None  # instance statistics averaged into running ones: not taken apart
        if m.track_running_stats and m.running_mean is not None:
            return None  # eval with running statistics: pointwise already
        return m.num_features, False, m.eps, m.affine, None, None
    if type(m) in _BATCHNORM:
        if not m.training and m.running_mean is not None:
            return None  # eval: running statistics, pointwise already
        running = m.training and m.track_running_stats and m.running_mean is not None
        return m.num_features, True, m.eps, m.affine, running, m.momentum
    return None


def decompose_statistics(gm: fx.GraphModule) -> bool:
    """Rewrite every norm over the statistics of an input with spatial axes (after shape
    propagation) into :func:`moments`, :func:`normalize` and :func:`update_running_stats`.
    Returns whether anything changed (shapes must then be propagated again)."""
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        spec = _spec(node, gm)
        shape = concrete_shape(node.args[0]) if node.args and \
            isinstance(node.args[0], fx.Node) else None
        if spec is None or shape is None or len(shape) < 3:
            continue
        groups, batch, eps, affine, running, momentum = spec
        x = node.args[0]
        target = node.target
        with graph.inserting_before(node):
            stats = graph.call_function(moments, (x,), {"groups": groups, "batch": batch})
            weight = graph.get_attr(f"{target}.weight") if affine else None
            bias = graph.get_attr(f"{target}.bias") if affine else None
            y = graph.call_function(normalize, (x, stats, weight, bias),
                                    {"eps": eps, "groups": groups, "batch": batch})
            if running:
                shape = concrete_shape(x)
                count = (shape[0] * int(torch.Size(shape[2:]).numel())) if shape else 2
                buffers = [graph.get_attr(f"{target}.{b}") for b in
                           ("running_mean", "running_var", "num_batches_tracked")]
                update = graph.call_function(update_running_stats, (stats, *buffers),
                                             {"momentum": momentum, "count": count})
        for new in (stats, weight, bias, y) + ((update, *buffers) if running else ()):
            if new is not None:
                _inherit(new, node)
        # the norm's output shape, for a norm right after this one (its input is now ``y``)
        y.meta["tensor_meta"] = node.meta.get("tensor_meta")
        node.replace_all_uses_with(y)
        graph.erase_node(node)
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return changed


def _inherit(new: fx.Node, old: fx.Node) -> None:
    """The user's source line and module path of the module call it replaces."""
    new.stack_trace = old.stack_trace
    stack = dict(old.meta.get("nn_module_stack") or {})
    if old.op == "call_module":
        stack.setdefault(str(old.target), (str(old.target), type(None)))
    new.meta["nn_module_stack"] = stack


__all__ = ["decompose_statistics", "moments", "normalize", "update_running_stats"]
