"""Global statistics inside the stem: whole-image reductions streamed as per-tile partial sums,
norms over the image's statistics taken apart, train-mode BatchNorm with its running statistics.

Exactness is checked in float64 against the full image (relative difference <= 1e-10 for the
output, every parameter gradient and the image gradient) on models nobody here wrote
(torchvision, timm, MONAI) and on small ones written to reach every kind of reduction."""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import fxstream
from fxstream.check import check
from fxstream.plans import SumOutput
from fxstream.reductions import combine, partial
from fxstream.segments import cut_candidates

TOL = 1e-10


def exact(model, shape, tile, **kwargs):
    result = check(model, shape, tile, **kwargs)
    bad = [d for d in result.diffs if not d.ok]
    assert not bad, bad
    return result


# ---------------------------------------------------------------------------------------------
# partial sums merged exactly


@given(st.sampled_from(["sum", "mean", "var", "std", "norm2", "moments"]),
       st.lists(st.integers(1, 9), min_size=1, max_size=4), st.integers(1, 2),
       st.sampled_from([1, 2]), st.integers(0, 2**31 - 1))
def test_tiles_partials_merge_into_the_whole_reduction(kind, cuts, batch, groups, seed):
    """Any split of a map's positions into tiles: the merged partials equal the reduction of the
    whole map (float64)."""
    g = torch.Generator().manual_seed(seed)
    width = sum(cuts)
    y = torch.randn(batch, 4, 5, width, generator=g, dtype=torch.float64) * 3 + 1
    dims = (2, 3) if kind != "sum" else (1, 2, 3)
    bounds = [0]
    for c in cuts:
        bounds.append(bounds[-1] + c)
    if kind == "moments":
        want = torch.stack(torch.var_mean(y.reshape(batch, groups, -1), -1, correction=0)[::-1])
        spec = dict(groups=groups)
    else:
        want = {"sum": lambda: y.sum(dims, keepdim=True), "mean": lambda: y.mean(dims, True),
                "var": lambda: y.var(dims, keepdim=True), "std": lambda: y.std(dims, keepdim=True),
                "norm2": lambda: y.norm(2, dims, keepdim=True)}[kind]()
        spec = dict(correction=1 if kind in ("var", "std") else 0)
    s = SumOutput(name="r", summed="y", kind=kind, dims=dims, counts=tuple(
        c * (5 * (4 // groups) if kind == "moments" else
             (5 * 4 if kind == "sum" else 5)) for c in cuts), shape=tuple(want.shape),
        dtype="torch.float64", **spec)
    parts = torch.stack([partial(s, y[..., a:b]) for a, b in zip(bounds, bounds[1:])])
    got = combine(parts, s)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max().clamp_min(1)


# ---------------------------------------------------------------------------------------------
# small models that reach every reduction


class Statistics(nn.Module):
    """Squeeze-excitation (a spatial mean feeding a small MLP), a GroupNorm, a 2-norm over the
    image (GRN-style) and a variance, each read back by the stem."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c3 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = y * torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        y = self.gn(self.c2(y))
        g = y.norm(p=2, dim=(2, 3), keepdim=True)
        y = y + y * (g / (g.mean(dim=1, keepdim=True) + 1e-6))
        y = self.c3(y) / (y.var((2, 3), keepdim=True).mean(1, keepdim=True) + 1).sqrt()
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("cuts", [None, ["gn"]])
def test_statistics_stream_exactly(batch, cuts):
    torch.manual_seed(0)
    shape = (batch, 3, 44, 38)
    result = exact(Statistics(), shape, 16, cuts=cuts)
    assert result.num_tiles > 1
    sm = fxstream.compile(Statistics().double(), tile_size=16, input_shape=shape, cuts=cuts)
    plan = sm.plan(shape, torch.float64)
    kinds = sorted(s.kind for p in plan.passes for s in p.sums)
    assert kinds == ["mean", "moments", "norm2", "var"]
    assert all(p.num_tiles > 1 for p in plan.passes[:2])
    assert "fxstream_sum_mean" in sm.code and "self.fc1(mean)" in sm.code


def test_the_stem_reaches_the_head_through_the_statistics():
    a = fxstream.analyze(Statistics(), (1, 3, 64, 64))
    assert a.boundary == ("truediv_1",) and a.stem_share > 0.99
    assert [r.name for r in a.global_rows] == ["mean_3"]  # the classifier's pool: the head


def test_a_reduction_over_part_of_the_image_stays_refused():
    class Half(nn.Module):
        def forward(self, x):
            return x * x.mean(2, keepdim=True)

    a = fxstream.analyze(nn.Sequential(nn.Conv2d(3, 4, 3), Half()), (1, 3, 32, 32))
    (row,) = a.global_rows
    assert "mean reduces over spatial axis 0 but not over all of them" in row.reason


def test_max_over_the_image_stays_refused():
    class Max(nn.Module):
        def forward(self, x):
            return x * x.amax((2, 3), keepdim=True)

    a = fxstream.analyze(nn.Sequential(nn.Conv2d(3, 4, 3), Max()), (1, 3, 32, 32))
    (row,) = a.global_rows
    assert "amax over the whole image: only sums" in row.reason


# ---------------------------------------------------------------------------------------------
# real models


def _cuts(model, shape, every=6):
    cands = cut_candidates(fxstream.analyze(model, shape))
    return list(cands[::max(1, len(cands) // every)])


def _zoo():
    import timm
    import torchvision

    return {
        "efficientnet_b0": torchvision.models.efficientnet_b0,
        "mobilenet_v3_small": torchvision.models.mobilenet_v3_small,
        "regnet_y_400mf": torchvision.models.regnet_y_400mf,
        "seresnet18": lambda: timm.create_model("seresnet18"),
        "convnextv2_atto": lambda: timm.create_model("convnextv2_atto"),
        "groupnorm_resnet18": lambda: torchvision.models.resnet18(
            norm_layer=lambda c: nn.GroupNorm(8, c)),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "regnet_y_400mf", "seresnet18",
                                  "groupnorm_resnet18"])
def test_squeeze_excitation_and_groupnorm_models_stream_exactly(name):
    torch.manual_seed(0)
    model = _zoo()[name]().eval()
    shape = (1, 3, 160, 128)
    result = exact(model, shape, 64, cuts=_cuts(model, shape))
    assert result.num_tiles > 1


def _same_step(model, shape, **compile_kwargs):
    """One training step of ``model`` and of its streamed copy: the output, every running
    statistic and every gradient equal; returns the streamed plan."""
    x = torch.randn(shape, dtype=torch.float64)
    full, streamed = copy.deepcopy(model), copy.deepcopy(model)
    sm = fxstream.compile(streamed, input_shape=shape, **compile_kwargs)
    w = torch.randn(shape[0], 3, dtype=torch.float64)
    outs = []
    for m in (full, sm):
        torch.manual_seed(1)  # the same dropout masks
        outs.append((m(x) * w).sum())
        outs[-1].backward()
    assert abs(outs[0] - outs[1]) <= TOL * abs(outs[0])
    for (name, a), (_, b) in zip(full.named_buffers(), streamed.named_buffers()):
        assert (a.double() - b.double()).abs().max() <= TOL * a.double().abs().max(), name
    scale = max(p.grad.abs().max() for p in full.parameters() if p.grad is not None)
    for (name, p), q in zip(full.named_parameters(), streamed.parameters()):
        if p.grad is None:  # unused by this model's forward
            assert q.grad is None, name
            continue
        assert (p.grad - q.grad).abs().max() <= TOL * scale, name
    return sm.plan(shape, torch.float64)


def _resnet18_train(momentum=0.1):
    import torchvision

    model = torchvision.models.resnet18(num_classes=3).double().train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return model


def test_train_mode_batchnorm_updates_running_statistics_exactly():
    """ResNet-18 in train mode (momentum 0.1 and None): the output, every gradient and every
    running statistic after a step equal the full-image model's."""
    torch.manual_seed(0)
    for momentum in (0.1, None):
        plan = _same_step(_resnet18_train(momentum), (2, 3, 96, 80), tile_size=48,
                          cuts=["maxpool", "layer1", "layer2"])
        assert plan.passes[0].num_tiles > 1 and sum(len(p.sums) for p in plan.passes) == 20


def test_a_segment_in_one_tile_computes_its_statistics_inside_it():
    """A segment that runs in one tile (its whole map) computes its statistics inside that tile
    in one pass, instead of one streamed pass per level of statistics, each recomputing the one
    before: ResNet-18's 20 train-mode BatchNorms after layer1 in two passes, one recomputed in
    the backward (its running statistics must still be updated once) and one keeping its
    graph; and a squeeze-excitation and GroupNorm model in one."""
    torch.manual_seed(0)
    plan = _same_step(_resnet18_train(), (2, 3, 64, 64), tile_size=None, memory_budget=None,
                      cuts=["layer1", "layer3"])
    assert [(p.whole, p.keep, len(p.sums)) for p in plan.passes] == [
        (True, False, 5), (True, False, 10), (True, True, 5)]
    import timm

    model = timm.create_model("seresnet18", num_classes=3).double().eval()
    plan = _same_step(model, (1, 3, 64, 64), tile_size=None, memory_budget=None)
    assert len(plan.passes) == 1 and plan.passes[0].whole and len(plan.passes[0].sums) == 8


class GateWithSideEffects(nn.Module):
    """Squeeze-excitation whose gate draws dropout (``random``) or reads a running average of
    the squeeze updated in place (``inplace``)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("ema", torch.zeros(1, 8, 1, 1))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        m = y.mean((2, 3), keepdim=True)
        if self.kind == "random":
            gate = torch.sigmoid(self.fc2(self.drop(torch.relu(self.fc1(m)))))
        else:
            gate = torch.sigmoid(self.ema.mul_(0.9).add_(0.1 * m.detach().mean(0, True)))
        return self.head(self.c2(y * gate).mean((2, 3)))


@pytest.mark.parametrize("kind", ["random", "inplace"])
@pytest.mark.parametrize("cuts", [None, ["c1"]])
def test_statistics_with_side_effects_are_computed_once(kind, cuts):
    """A statistic that draws random numbers or writes in place is not computed inside a one-tile
    pass (the driver computes it from the sums, and a recompute would compute it again: another
    dropout mask, a running average updated twice); the segment then keeps its steps. Found
    by a review of the one-tile passes."""
    torch.manual_seed(0)
    model = GateWithSideEffects(kind).double().train()
    plan = _same_step(model, (2, 3, 32, 32), tile_size=None, memory_budget=None, cuts=cuts)
    assert not any(p.whole for p in plan.passes) and len(plan.passes) >= 2


class InstanceNormUNet(nn.Module):
    """A two-level U-Net with InstanceNorm (affine) in every block, as nnU-Net builds them."""

    def __init__(self, c=4):
        super().__init__()

        def block(cin, cout, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.InstanceNorm2d(
                cout, affine=True), nn.LeakyReLU(0.01))

        self.enc1, self.enc2 = block(3, c), block(c, 2 * c, 2)
        self.bottom = block(2 * c, 4 * c, 2)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, 2)
        self.dec2 = block(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, 2)
        self.dec1 = block(2 * c, c)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        d2 = self.dec2(torch.cat([e2, self.up2(self.bottom(e2))], 1))
        return self.out(self.dec1(torch.cat([e1, self.up1(d2)], 1)))


@pytest.mark.parametrize("batch", [1, 2])
def test_an_instancenorm_unet_streams_exactly(batch):
    torch.manual_seed(0)
    result = exact(InstanceNormUNet(), (batch, 3, 48, 40), 24)
    assert result.num_tiles > 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["UNet", "DynUNet", "SegResNet"])
def test_monai_networks_stream_exactly(name):
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    model = {
        "UNet": lambda: nets.UNet(spatial_dims=2, in_channels=3, out_channels=2,
                                  channels=(4, 8, 16), strides=(2, 2), num_res_units=1),
        "DynUNet": lambda: nets.DynUNet(spatial_dims=2, in_channels=3, out_channels=2,
                                        kernel_size=[3, 3, 3], strides=[1, 2, 2],
                                        upsample_kernel_size=[2, 2], filters=[4, 8, 16]),
        "SegResNet": lambda: nets.SegResNet(spatial_dims=2, in_channels=3, out_channels=2,
                                            init_filters=8, blocks_down=(1, 1),
                                            blocks_up=(1,)),
    }[name]().eval()
    result = exact(model, (1, 3, 64, 56), 48)
    assert result.num_tiles > 1


@pytest.mark.slow
def test_backbones_with_global_statistics_stream_almost_all_their_work():
    """The models of the issue: at least 95% of the forward FLOPs in the stem at 1024²."""
    import timm
    import torchvision

    models = {
        "efficientnet_b0": torchvision.models.efficientnet_b0,
        "efficientnet_v2_s": torchvision.models.efficientnet_v2_s,
        "mobilenet_v3_large": torchvision.models.mobilenet_v3_large,
        "regnet_y_400mf": torchvision.models.regnet_y_400mf,
        "seresnet50": lambda: timm.create_model("seresnet50"),
        "convnextv2_atto": lambda: timm.create_model("convnextv2_atto"),
        "groupnorm_resnet50": lambda: torchvision.models.resnet50(
            norm_layer=lambda c: nn.GroupNorm(32, c)),
        "instancenorm_unet": InstanceNormUNet,
    }
    nets = pytest.importorskip("monai.networks.nets")
    models.update({
        "monai_unet": lambda: nets.UNet(spatial_dims=2, in_channels=3, out_channels=2,
                                        channels=(16, 32, 64, 128), strides=(2, 2, 2),
                                        num_res_units=2),
        "monai_dynunet": lambda: nets.DynUNet(spatial_dims=2, in_channels=3, out_channels=2,
                                              kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2],
                                              upsample_kernel_size=[2, 2, 2]),
        "monai_segresnet": lambda: nets.SegResNet(spatial_dims=2, in_channels=3,
                                                  out_channels=2),
    })
    shares = {name: fxstream.analyze(build().eval(), (1, 3, 1024, 1024)).stem_share
              for name, build in models.items()}
    assert all(share >= 0.95 for share in shares.values()), shares


def test_the_report_lists_the_passes_and_what_they_sum(capsys):
    from fxstream.cli import main

    code = main(["analyze", f"{__file__}:Statistics", "--input", "1x3x64x64", "--tile", "16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "sums" in out and "moments" in out and "mean" in out
