"""Whole-image sums, tile by tile: the partial of each tile and their exact merge.

A reduction over every spatial axis of a local tensor (a mean, a variance, a 2-norm, a norm's
moments) is summed by the pass that computes its input: each tile contributes a partial over
the positions it owns (every position once), and :func:`combine`, between passes, merges the
partials into what the reduction computes on the whole image. Means and variances merge as
per-tile ``(count, mean, M2)`` (Chan et al.'s parallel variance, in one step over the tiles), as
accurate as one pass over the whole map; ``E[x²] - E[x]²`` would not be. Both steps are torch
operations, so autograd differentiates them: the gradients of the partials flow back into each
tile's recompute.
"""
from __future__ import annotations

import torch

from .plans import SumOutput


def partial(s: SumOutput, y: torch.Tensor) -> torch.Tensor:
    """One tile's partial of ``s`` over ``y``, the positions it owns: the sum (of squares for
    the 2-norm) over the reduced dims kept as size one, or ``(mean, M2)`` stacked."""
    y = y if y.dtype in (torch.float32, torch.float64) else y.float()
    if s.kind in ("sum", "mean"):
        return y.sum(s.dims, keepdim=True)
    if s.kind == "norm2":
        return (y * y).sum(s.dims, keepdim=True)
    if s.kind == "moments":  # per group (and sample), without copying the tile's crop; the
        # same reduction as passes.statistics.moments, which the runtime may not import
        if s.batch:  # one group per channel, over the batch too
            dims = [0, *range(2, y.dim())]
        else:
            y = y.unflatten(1, (s.groups, -1))
            dims = list(range(2, y.dim()))
        var, mean = torch.var_mean(y, dim=dims, correction=0)
        return torch.stack([mean, var * (y.numel() // mean.numel())])
    var, mean = torch.var_mean(y, s.dims, correction=0, keepdim=True)  # var, std
    count = 1
    for d in s.dims:
        count *= y.shape[d]
    return torch.stack([mean, var * count])


def combine(partials: torch.Tensor, s: SumOutput) -> torch.Tensor:
    """The reduction on the whole image from the tiles' stacked partials (first dim)."""
    if s.kind in ("sum", "mean", "norm2"):
        total = partials.sum(0)
        if s.kind == "mean":
            total = total / sum(s.counts)
        elif s.kind == "norm2":
            total = total.sqrt()
        return total.reshape(s.shape).to(_dtype(s))
    counts = torch.tensor(s.counts, dtype=partials.dtype, device=partials.device)
    counts = counts.reshape((-1,) + (1,) * (partials.dim() - 2))
    means, m2s = partials[:, 0], partials[:, 1]
    n = float(sum(s.counts))
    mean = (counts * means).sum(0) / n
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    if s.kind == "moments":
        return torch.stack([mean, m2 / n]).reshape(s.shape).to(_dtype(s))
    var = m2 / (n - s.correction)
    out = var.sqrt() if s.kind == "std" else var
    return out.reshape(s.shape).to(_dtype(s))


def _dtype(s: SumOutput) -> torch.dtype:
    return getattr(torch, s.dtype.replace("torch.", ""))


__all__ = ["combine", "partial"]


class Combine(torch.nn.Module):
    """A reduction's value from its pass's stacked partials (a node of the generated module)."""

    def __init__(self, s: SumOutput):
        super().__init__()
        object.__setattr__(self, "spec", s)

    def forward(self, partials: torch.Tensor) -> torch.Tensor:
        return combine(partials, self.spec)

    def extra_repr(self) -> str:
        return f"{self.spec.kind} of '{self.spec.summed}' over {len(self.spec.counts)} tiles"


__all__ += ["Combine"]
