"""Local ops from the fuzzing findings (issue 14), streamed == full image in float64.

Crops by slicing and ``narrow``, reflect/replicate padding (``F.pad``, the pad modules, a conv's
``padding_mode`` beyond half its window), transposed convs with outputs that read no input,
LP pooling, area and nearest-exact resizing, and a U-Net pad-to-match that crops at odd sizes.
Each sits between two convs and runs over four plans: one tile, tiles that do not divide the
image, the smallest legal tile, and two segments with a cut at the conv before the op. Every
output, parameter gradient and the image gradient must agree to 1e-10.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxstream
from fxstream.legal import smallest_tile_size
from fxstream.check import check
from tests.test_rules import Fn

TOL = 1e-10
SHAPE = (1, 2, 23, 19)


class Between(nn.Module):
    """``c2(op(c1(x)))``: a conv before the op (the cut point) and one after it."""

    def __init__(self, op, c1=None, c2=None):
        super().__init__()
        self.c1 = c1 or nn.Conv2d(2, 2, 3, padding=1)
        self.op = op
        self.c2 = c2 or nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.c2(self.op(self.c1(x)))


def _pad_to(x, f, mode="constant"):
    return F.pad(x, [0, (-x.shape[-1]) % f, 0, (-x.shape[-2]) % f], mode=mode)


class UNetBlock(nn.Module):
    """The repro of the cat truncation: a stride-2 conv down, nearest up, pad-to-match that is a
    crop of one pixel at odd sizes (the upsampled map is one larger), cat with the skip."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 2, 3, padding=1)
        self.down = nn.Conv2d(2, 2, 3, stride=2, padding=1)
        self.out = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        x = self.c(x)
        u = F.interpolate(self.down(x), scale_factor=2, mode="nearest")
        dh, dw = x.shape[2] - u.shape[2], x.shape[3] - u.shape[3]
        u = F.pad(u, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
        return self.out(torch.cat([x, u], 1))


MODELS = {
    "slice_crop": lambda: Between(Fn(lambda s, x: x[..., 1:-1, 2:])),
    "slice_shape_bound": lambda: Between(
        Fn(lambda s, x: x[:, :, :x.shape[2] - 1, 1:x.shape[-1] - 2])),
    "slice_step": lambda: Between(Fn(lambda s, x: x[..., 1::2, ::3])),
    "narrow": lambda: Between(Fn(lambda s, x: x.narrow(2, 1, x.size(2) - 3))),
    "pad_reflect": lambda: Between(Fn(lambda s, x: F.pad(x, [2, 1, 3, 0], mode="reflect"))),
    "pad_replicate_module": lambda: Between(nn.ReplicationPad2d((1, 3, 2, 2))),
    "pad_reflect_module_then_valid_conv": lambda: Between(
        nn.ReflectionPad2d(3), c2=nn.Conv2d(2, 2, 7)),
    "pad_reflect_to_multiple_then_stride": lambda: Between(
        Fn(lambda s, x: s.d(_pad_to(x, 4, "reflect")), d=nn.Conv2d(2, 2, 4, stride=4))),
    "conv_reflect_beyond_half": lambda: Between(
        nn.Conv2d(2, 2, 3, padding=2, padding_mode="reflect")),
    "conv_reflect_same_even": lambda: Between(
        nn.Conv2d(2, 2, 4, padding="same", padding_mode="reflect")),
    "conv_replicate_beyond_reach": lambda: Between(
        nn.Conv2d(2, 2, 2, stride=2, padding=3, padding_mode="replicate")),
    "conv_transpose_holes": lambda: Between(
        nn.ConvTranspose2d(2, 2, 1, stride=2), c1=nn.Conv2d(2, 2, 1, stride=2)),
    "conv_transpose_k2_s3": lambda: Between(nn.ConvTranspose2d(2, 2, 2, stride=3, padding=1)),
    "conv_transpose_crop_after_stride": lambda: Between(
        nn.ConvTranspose2d(2, 2, 3, stride=3, padding=2), c1=nn.Conv2d(2, 2, 3, stride=2)),
    "lp_pool": lambda: Between(nn.LPPool2d(2, 3, stride=2)),
    "lp_pool_function_ceil": lambda: Between(
        Fn(lambda s, x: F.lp_pool2d(x, 1, (2, 3), ceil_mode=True))),
    "area_up": lambda: Between(Fn(lambda s, x: F.interpolate(x, scale_factor=2, mode="area"))),
    "area_down_after_pad": lambda: Between(
        Fn(lambda s, x: F.interpolate(_pad_to(x, 2), scale_factor=0.5, mode="area"))),
    "area_down_by_size": lambda: Between(Fn(lambda s, x: F.interpolate(
        _pad_to(x, 3), size=(-(-x.shape[2] // 3), -(-x.shape[3] // 3)), mode="area"))),
    "nearest_exact": lambda: Between(nn.Upsample(scale_factor=3, mode="nearest-exact")),
    "unet_pad_to_match_crop": lambda: UNetBlock(),
}


# models whose smallest legal tile is not below SHAPE get a larger image
SHAPES = {"pad_reflect_to_multiple_then_stride": (1, 2, 45, 38)}


def build(name):
    torch.manual_seed(0)
    return MODELS[name]().double().eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_op_is_in_the_stem(name):
    """The whole model is the stem: the op is local, nothing is left to the head."""
    a = fxstream.analyze(build(name), SHAPES.get(name, SHAPE))
    assert not a.global_rows, [(r.name, r.reason) for r in a.global_rows]
    assert len(a.boundary) == 1


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("plan", ["one_tile", "non_dividing", "smallest", "cut"])
def test_streamed_equals_full_image(name, plan):
    model, shape = build(name), SHAPES.get(name, SHAPE)
    cuts = None
    if plan == "one_tile":
        tile = None
    else:
        small = smallest_tile_size(fxstream.analyze(model, shape))
        tile = small if plan == "smallest" else tuple(
            min(s, max(m, (s * 2) // 3 + 1)) for s, m in zip(shape[2:], small))
    if plan == "cut":  # non-dividing tiles of the whole stem fit each segment too
        cuts = ["c1" if hasattr(model, "c1") else "c"]
    result = check(model, shape, tile, tol=TOL, cuts=cuts)
    if plan != "one_tile":
        assert result.num_tiles > 1, "the plan should really tile this image"
    bad = [d for d in result.diffs if not d.ok]
    assert not bad, bad


def test_the_smallest_legal_tile_holds_for_every_pass():
    """A GroupNorm makes two passes over the segment: its statistics (a dilated conv deep) and
    the whole segment (two more). A tile too small for either names the tile both accept, the
    same whatever was asked, and that tile plans (it used to name the smallest of the pass
    that failed first, so following the advice failed again on the next one)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=4, dilation=4), nn.GroupNorm(2, 4),
                          nn.Conv2d(4, 4, 3, padding=6, dilation=6),
                          nn.Conv2d(4, 4, 3, padding=6, dilation=6), nn.AdaptiveAvgPool2d(1))
    named = set()
    for tile in range(2, 40, 4):  # too small for the first pass, then for the second
        try:
            fxstream.compile(model, tile_size=tile, input_shape=(1, 3, 64, 64),
                             memory_budget=None)
        except fxstream.PlanError as e:
            named.add(int(str(e).split("use tile_size >= ")[1]))
    (smallest,) = named
    sm = fxstream.compile(model, tile_size=smallest, input_shape=(1, 3, 64, 64),
                          memory_budget=None)
    assert len(sm.last_plan.passes) == 2 and sm.last_plan.num_tiles > 1


def test_too_small_tile_names_the_smallest_legal_one():
    """Reflect padding 3 then a valid 7x7 conv reads [-9, 9] around each output (the mirror
    reads at both ends), so the smallest legal tile is larger than the receptive field 9 of the
    layers' windows alone would suggest."""
    model = build("pad_reflect_module_then_valid_conv")
    small = smallest_tile_size(fxstream.analyze(model, SHAPE))
    with pytest.raises(fxstream.PlanError, match=f"the smallest legal tile for this model is "
                                                 f"{small[0]}"):
        fxstream.compile(model, tile_size=small[0] - 1, input_shape=SHAPE)
