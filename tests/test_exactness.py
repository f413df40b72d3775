"""Streamed == full image, in float64, forward and backward, on layer families.

Each model runs over three tile plans: one tile, tiles that do not divide the image, and the
smallest legal tile. Every output, parameter gradient and the image gradient must agree to 1e-10.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxstream
from fxstream.legal import smallest_tile_size
from fxstream.check import check

TOL = 1e-10


def head(c):
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3)]


class LayerScaleBlock(nn.Module):
    """ConvNeXt-style: depthwise conv, permute, channel-last LayerNorm + Linear, layer-scale."""

    def __init__(self, c=4):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class SEAfterStem(nn.Module):
    """Squeeze-excitation after two convs: the boundary must move before the SE."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Conv2d(4, 4, 1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        w = torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)))
        x = self.conv3(x * w)
        return x.mean((2, 3))


class UpDown(nn.Module):
    """Strided conv down, nearest and bilinear up, transposed conv, skip concatenation."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.up_t = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.out = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x):
        d1 = F.relu(self.down(x))
        d2 = F.relu(self.down2(d1))
        if self.mode == "transposed":
            u = self.up_t(d2)
        else:
            u = F.interpolate(d2, scale_factor=2, mode=self.mode,
                              align_corners=False if self.mode == "bilinear" else None)
        return self.out(torch.cat([u, d1], 1))


MODELS = {
    "zeros_padding": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                           nn.Conv2d(4, 4, 3, stride=2, padding=1), *head(4)),
    "reflect_padding": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(4, 4, 5, stride=2, padding=2, padding_mode="reflect"), *head(4)),
    "replicate_padding": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate"), nn.Tanh(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="replicate"), *head(4)),
    "dilation_groups": lambda: nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=3, dilation=3, groups=3), nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2, groups=2), *head(4)),
    "nonsquare_even_kernels": lambda: nn.Sequential(
        nn.Conv2d(3, 4, (2, 5), padding=(0, 2)), nn.ReLU(),
        nn.Conv2d(4, 4, (4, 2), stride=(2, 3), padding=(1, 0)), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding="same"), *head(4)),
    "ceil_mode_pools": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.Conv2d(4, 4, 3), nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True,
                                         count_include_pad=False),
        nn.AvgPool2d(2, ceil_mode=True), *head(4)),
    "batchnorm_affine": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), *head(4)),
    "layer_scale_layernorm": lambda: nn.Sequential(nn.Conv2d(3, 4, 2, stride=2),
                                                   LayerScaleBlock(4), *head(4)),
    "groupnorm_after_stem": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.PReLU(4), nn.Conv2d(4, 4, 3, stride=2),
        nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3), *head(4)),
    "squeeze_excitation": SEAfterStem,
    "nearest_upsampling": lambda: UpDown("nearest"),
    "bilinear_upsampling": lambda: UpDown("bilinear"),
    "transposed_conv": lambda: UpDown("transposed"),
}


def _randomize_bn(model):
    """Non-trivial running statistics, so eval-mode BatchNorm is not the identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def build(name):
    torch.manual_seed(0)
    return _randomize_bn(MODELS[name]()).double().eval()


def tile_cases(model, shape):
    """One tile, a tile that does not divide the image, the smallest legal tile."""
    analysis = fxstream.analyze(model, shape)
    small = smallest_tile_size(analysis)
    odd = tuple(min(s, max(m, (s * 2) // 3 + 1)) for s, m in zip(shape[2:], small))
    return {"one_tile": None, "non_dividing": odd, "smallest": small}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("plan", ["one_tile", "non_dividing", "smallest"])
def test_streamed_equals_full_image(name, plan):
    model = build(name)
    shape = (2, 3, 44, 36) if isinstance(model, UpDown) else (2, 3, 45, 38)
    tile = tile_cases(model, shape)[plan]
    result = check(model, shape, tile, tol=TOL)
    if plan != "one_tile":
        assert result.num_tiles > 1, "the plan should really tile this image"
    bad = [d for d in result.diffs if not d.ok]
    assert not bad, bad
    assert len(result.diffs) >= 2 + sum(1 for p in model.parameters())


def test_squeeze_excitation_and_groupnorm_stay_in_the_stem():
    """Their statistics are streamed reductions: the whole model is the stem."""
    for name in ("squeeze_excitation", "groupnorm_after_stem"):
        a = fxstream.analyze(build(name), (1, 3, 40, 40))
        # the head is only the final spatial mean: every convolution is in the stem
        assert len(a.global_rows) == 1, name
        assert "mean" in a.global_rows[0].reason, name
        assert a.stem_share > 0.999, name


def test_image_smaller_than_a_tile():
    model = build("zeros_padding")
    result = check(model, (1, 3, 21, 17), 512)
    assert result.num_tiles == 1 and result.passed


def test_broken_plan_is_caught(monkeypatch):
    """A plan that drops context at interior tile edges must fail the check, loudly."""
    import fxstream.tiling as plan_mod

    real = plan_mod.plan_axis

    def shifted(size, align, geos, step):
        p = real(size, align, geos, step)
        spans = []
        for s in p.spans:
            if s.start == 0:
                spans.append(s)
                continue
            shift = align  # start one alignment step later: the first outputs lose context
            local = tuple((l0 - int(shift / g.stride), l1 - int(shift / g.stride))
                          for (l0, l1), g in zip(s.local, geos))
            spans.append(plan_mod.Span(s.start + shift, s.stop, s.outputs, local))
        return plan_mod.AxisPlan(p.size, p.align, tuple(spans))

    monkeypatch.setattr(plan_mod, "plan_axis", shifted)
    model = build("zeros_padding")
    result = check(model, (1, 3, 45, 38), (20, 20))
    assert result.num_tiles > 1
    assert not result.passed
    assert result.worst.max_rel > 1e-6
