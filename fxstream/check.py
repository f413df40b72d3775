"""``fxstream check``: streamed vs full-image forward and backward, compared number by number."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from .calls import check_image_only
from .errors import UnsupportedError
from .streaming import compile as compile_model


@dataclass(frozen=True)
class Diff:
    """Difference of one tensor: max |a - b| and that over max |b| (b: full image)."""

    name: str
    max_abs: float
    max_rel: float
    ok: bool


@dataclass(frozen=True)
class CheckResult:
    input_shape: tuple[int, ...]
    tile_size: object
    dtype: str
    tol: float
    num_tiles: int
    diffs: tuple[Diff, ...]

    @property
    def passed(self) -> bool:
        return all(d.ok for d in self.diffs)

    @property
    def worst(self) -> Diff:
        return max(self.diffs, key=lambda d: d.max_rel)


def tensors_of(out) -> list[torch.Tensor]:
    """The floating tensors of a model output (tensor, tuple, list, dict), in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for k in sorted(out, key=str) for t in tensors_of(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in tensors_of(o)]
    return []


# a parameter gradient this many times smaller than the largest one is zero in exact arithmetic
# (a bias before a norm: the norm takes the mean away) and its values are rounding noise: it is
# compared against that fraction of the largest gradient instead of against itself
NOISE_FLOOR = 1e-6


def diff(name: str, got: torch.Tensor | None, want: torch.Tensor | None, tol: float,
         floor: float = 0.0) -> Diff:
    """Largest absolute difference, and that over the largest ``|want|``; over ``floor`` (the
    largest gradient) where ``want`` is under ``NOISE_FLOOR`` times it."""
    if got is None and want is None:
        return Diff(name, 0.0, 0.0, True)
    if got is None or want is None:
        missing = "streamed" if got is None else "full-image"
        return Diff(name + f" (no {missing} gradient)", float("inf"), float("inf"), False)
    got, want = got.detach().double(), want.detach().double()
    max_abs = (got - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    if scale < NOISE_FLOOR * floor:  # zero in exact arithmetic: against the largest gradient
        scale = floor
    max_rel = max_abs / scale if scale > 0 else max_abs
    return Diff(name, max_abs, max_rel, max_rel <= tol)


def _loss(outputs, weights):
    return sum((o * w).sum() for o, w in zip(outputs, weights))


def check(model: nn.Module, input_shape, tile_size, dtype=torch.float64, tol: float = 1e-10,
          split=None, leaf_modules=(), seed: int = 0, device="cpu", cuts=None,
          memory_budget=None, channels_last: bool = False, offload: bool = False,
          image_on_host: bool = False) -> CheckResult:
    """Run full-image and streamed forward+backward with a random linear loss; compare.

    The model is deep-copied and cast to ``dtype`` (the caller's model is left alone); both runs
    use the same weights, image and loss. A parameter gradient under ``NOISE_FLOOR`` times the
    largest one (zero in exact arithmetic, such as a bias before a norm), and an image gradient
    under it (a spatial mean after a train-mode norm), is compared against that floor rather
    than against its own rounding noise. Returns a :class:`CheckResult` with one row for the
    output(s), one for the image gradient and one per parameter gradient. ``cuts`` and
    ``memory_budget`` are passed to :func:`fxstream.compile` (multi-cut plans).
    ``channels_last`` stores the model and image channels-last (4-d images); ``offload`` keeps
    cut maps on the host (CUDA); ``image_on_host`` leaves the streamed run's image on the CPU
    with the model on ``device`` (tiles are then fetched ahead, see :mod:`fxstream.feeder`).

    Example:
        >>> import torch.nn as nn, fxstream.check as fc
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1))
        >>> fc.check(net, (1, 3, 40, 40), tile_size=16).passed
        True
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError(f"device {device!r}: CUDA is not available on this machine "
                               "(torch.cuda.is_available() is False); use device='cpu'")
    check_image_only(model, "check")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = copy.deepcopy(model).to(device=device, dtype=dtype, memory_format=fmt)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(input_shape), generator=gen, dtype=dtype).to(device, memory_format=fmt)
    sm = compile_model(model, tile_size=tile_size, split=split, leaf_modules=leaf_modules,
                       input_shape=tuple(input_shape), cuts=cuts, memory_budget=memory_budget,
                       offload=offload)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def run(fn, image=x):
        for _, p in params:
            p.grad = None
        xi = image.clone().requires_grad_(True)
        torch.manual_seed(seed)
        outs = tensors_of(fn(xi))
        return outs, xi

    full_outs, x_full = run(model)
    g = torch.Generator().manual_seed(seed + 1)
    weights = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device) for o in full_outs]
    _loss(full_outs, weights).backward()
    full_grads = {n: None if p.grad is None else p.grad.clone() for n, p in params}
    stream_outs, x_stream = run(sm, x.cpu() if image_on_host else x)
    _loss(stream_outs, weights).backward()
    diffs = [diff(f"output[{i}]" if len(full_outs) > 1 else "output", s, f, tol)
             for i, (s, f) in enumerate(zip(stream_outs, full_outs))]
    largest = max([g.abs().max().item() for g in full_grads.values()
                   if g is not None and g.numel()] + [0.0])
    diffs.append(diff("input gradient", x_stream.grad.to(x_full.device), x_full.grad, tol,
                      largest))
    diffs += [diff(n, p.grad, full_grads[n], tol, largest) for n, p in params]
    return CheckResult(tuple(input_shape), tile_size, str(dtype), tol,
                       sm.plan(x.shape, x.dtype).num_tiles, tuple(diffs))
