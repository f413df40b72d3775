"""Streamed == full image on every model of the zoo, in float64, forward and backward.

Every case runs :func:`fxstream.check.check`: the same image, weights and random linear loss
through the full model and through the streamed one; the output(s), the image gradient and
every parameter gradient must agree to a relative 1e-10 (never loosened). Each model runs over
three tile plans: one tile, tiles that do not divide the image, and the smallest legal tile.

Torchvision models are built with ``weights=None`` in eval mode, with random BatchNorm
statistics and affine parameters (their defaults make eval BatchNorm nearly the identity),
layer-scale factors near 1 for ConvNeXt (the default 1e-6 would hide the residual branches
from the output and the image gradient) and a small classifier for vgg11_bn (see ``build``).

Their receptive fields are 150-2100 px, so their images are skinny to stay cheap on a CPU: 32
px across (the least that vgg, densenet and convnext accept; that axis is one tile) and just
long enough for a plan with few tiles. E.g. resnet18 on 32x480: the smallest legal tile is 448
and gives two tiles, [0, 448) and [32, 480). The non-dividing cases of resnet18 and
mobilenet_v2 tile the rows (480x32) instead of the columns. densenet121's (2071 px),
convnext_tiny's (1688 px) and efficientnet_b0's (851 px: its squeeze-excitations are streamed,
so its stem is the whole network up to the classifier's pool) full stems exceed any affordable
image: they run as one tile at 32x32 (14x18 for efficientnet_b0), and their tiled plans stream
only up to an earlier stage (``split="features.denseblock2"``, ``split="features.3"``;
efficientnet_b0's ``split="features.2"``, stride 4 and 19 px, tiled on both axes, holds three
squeeze-excitations and a residual add).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import fxstream
from fxstream.legal import smallest_tile_size
from fxstream.check import check
from tests.zoo import HANDWRITTEN, ZOO

TOL = 1e-10


@dataclass(frozen=True)
class Case:
    """One model, input shape and tile plan: ``plan`` is ``"one_tile"`` (tile None),
    ``"non_dividing"`` (``tile`` given) or ``"smallest"`` (computed from the analysis)."""

    model: str
    shape: tuple[int, ...]
    plan: str
    tile: int | tuple[int, ...] | None = None
    split: str | None = None

    @property
    def id(self) -> str:
        size = "x".join(map(str, self.shape[2:]))
        tile = "" if self.tile is None else "-" + (
            str(self.tile) if isinstance(self.tile, int) else "x".join(map(str, self.tile)))
        split = "" if self.split is None else f"-split={self.split}"
        return f"{self.model}{split}-{size}-{self.plan}{tile}"


def _non_dividing(shape, smallest):
    """Per axis about two thirds of the image, at least the smallest legal tile."""
    return tuple(min(s, max(m, (s * 2) // 3 + 1)) for s, m in zip(shape[2:], smallest))


def _handwritten_cases():
    cases = []
    for entry in HANDWRITTEN:
        shapes = [entry.input_shape]
        if entry.name == "unet":  # H, W not multiples of 4: non-zero pad-to-match amounts
            shapes.append((1, 3, 62, 75))
        for shape in shapes:
            cases += [Case(entry.name, shape, "one_tile"),
                      Case(entry.name, shape, "non_dividing"),  # tile from the smallest
                      Case(entry.name, shape, "smallest")]
    return cases


# Torchvision: skinny images sized so that each plan has few tiles (see the module docstring).
TORCHVISION_CASES = [
    Case("resnet18", (1, 3, 32, 480), "one_tile"),
    Case("resnet18", (1, 3, 480, 32), "non_dividing", 470),  # rows tiled
    Case("resnet18", (1, 3, 32, 480), "smallest"),
    Case("resnet50", (1, 3, 32, 472), "one_tile"),
    Case("resnet50", (1, 3, 32, 472), "non_dividing", 460),
    Case("resnet50", (1, 3, 32, 472), "smallest"),
    Case("mobilenet_v2", (1, 3, 32, 536), "one_tile"),
    Case("mobilenet_v2", (1, 3, 536, 32), "non_dividing", 530),  # rows tiled
    Case("mobilenet_v2", (1, 3, 32, 536), "smallest"),
    Case("vgg11_bn", (1, 3, 32, 220), "one_tile"),
    Case("vgg11_bn", (1, 3, 32, 220), "non_dividing", 190),
    Case("vgg11_bn", (1, 3, 32, 188), "smallest"),
    Case("efficientnet_b0", (1, 3, 14, 18), "one_tile"),
    Case("efficientnet_b0", (1, 3, 32, 36), "non_dividing", split="features.2"),
    Case("efficientnet_b0", (1, 3, 32, 32), "smallest", split="features.2"),
    Case("densenet121", (1, 3, 32, 32), "one_tile"),
    Case("densenet121", (1, 3, 32, 274), "non_dividing", 266, split="features.denseblock2"),
    Case("densenet121", (1, 3, 32, 266), "smallest", split="features.denseblock2"),
    Case("convnext_tiny", (1, 3, 32, 32), "one_tile"),
    Case("convnext_tiny", (1, 3, 32, 244), "non_dividing", 236, split="features.3"),
    Case("convnext_tiny", (1, 3, 32, 236), "smallest", split="features.3"),
]

CASES = _handwritten_cases() + TORCHVISION_CASES


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for this module, restored afterwards.

    These are hundreds of small ops per tile. With two threads on a 2-core machine that other
    jobs share, each op's thread barrier waits for a preempted thread: the convnext_tiny
    ``features.3`` smallest-tile case took 74 s with two threads and 2.9 s with one (load 5).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random eval BatchNorm statistics and affine parameters; layer scales near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            if hasattr(m, "layer_scale") and isinstance(m.layer_scale, nn.Parameter):
                m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=g) + 0.5)
    return model


@functools.lru_cache(maxsize=1)  # cases of one model are consecutive; one model in memory
def build(name: str) -> nn.Module:
    entry = ZOO[name]
    model = entry.build(torch.float64)  # hand-written: random BatchNorm statistics already
    if name == "vgg11_bn":
        # The classifier (123M of 133M parameters, after the global average pool, so never
        # streamed) made check() hold ~10 GB of float64 copies and gradients; a small Linear
        # keeps the head differentiable and leaves the stem, `features`, as it is.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.classifier = nn.Linear(512 * 7 * 7, 10).to(torch.float64)
    return model if entry.handwritten else _randomize(model)


def resolve_tile(case: Case, model: nn.Module):
    if case.plan == "one_tile":
        return None
    smallest = smallest_tile_size(fxstream.analyze(model, case.shape, split=case.split))
    if case.plan == "smallest":
        return smallest
    return case.tile if case.tile is not None else _non_dividing(case.shape, smallest)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_streamed_equals_full_image(case):
    model = build(case.model)
    tile = resolve_tile(case, model)
    if case.plan == "non_dividing":
        tiles = (tile,) * (len(case.shape) - 2) if isinstance(tile, int) else tile
        assert any(s % t for s, t in zip(case.shape[2:], tiles) if t < s), tile
    result = check(model, case.shape, tile, tol=TOL, split=case.split)
    if case.plan == "one_tile":
        assert result.num_tiles == 1
    else:
        assert result.num_tiles > 1, f"tile {tile} should really tile {case.shape}"
    bad = [d for d in result.diffs if not d.ok]
    assert not bad, f"{result.num_tiles} tiles of {tile}: {bad}"
    num_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(result.diffs) >= num_params + 2  # output(s), image gradient, every parameter
