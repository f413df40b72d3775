"""Everyday situations that must never be silently wrong: modes, double backward, plans per
input shape, hooks, images handed to the head, other inputs, pickling, meta models."""
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxstream
from fxstream.budget import current_rss
from fxstream.check import check
from fxstream.legal import smallest_tile_size

TOL = 1e-10


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


class ModeNet(nn.Module):
    """Reads ``self.training`` in its own forward, in the stem and in the head (torch.fx
    specialises both when it traces)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.c1(x)
        if self.training:  # a user branch in the stem
            x = x * 2 + 1
        x = self.c2(torch.relu(x))
        x = x.mean((2, 3))
        return self.fc(F.dropout(x, 0.5, self.training))  # functional dropout in the head


def test_streaming_follows_the_mode_the_model_is_in_now():
    torch.manual_seed(0)
    net = ModeNet().double().eval()
    x = torch.randn(1, 3, 40, 36, dtype=torch.float64)
    sm = fxstream.compile(net, tile_size=16, input_shape=x.shape)
    assert rel(sm(x), net(x)) < TOL
    sm.train()
    assert net.training and net.c1.training
    torch.manual_seed(1)
    want = net(x)
    torch.manual_seed(1)
    got = sm(x)
    assert rel(got, want) < TOL
    sm.eval()
    assert rel(sm(x), net(x)) < TOL and rel(sm(x), sm(x)) == 0  # no dropout left on


def test_mode_set_on_the_model_itself_is_seen_too():
    torch.manual_seed(0)
    net = ModeNet().double().train()
    x = torch.randn(1, 3, 40, 36, dtype=torch.float64)
    sm = fxstream.compile(net, tile_size=16, input_shape=x.shape)
    net.eval()  # the user's model, not the streamed module
    assert rel(sm(x), net(x)) < TOL


def test_droppath_compiled_in_train_mode_is_off_after_eval():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("resnet18", drop_path_rate=0.5, drop_rate=0.5,
                            num_classes=3).double()
    net = fxstream.freeze_batchnorm(net)
    shape = (1, 3, 320, 256)
    sm = fxstream.compile(net.train(), tile_size=64, input_shape=shape)  # the stem ends at the
    net.eval()  # first DropPath in training (new_empty has no rule); in eval it is the identity
    with pytest.raises(fxstream.PlanError, match="tile_size 64 is too small"):
        sm.plan(shape, torch.float64)  # the stem in eval mode is longer: a tile of 64 is
    tile = max(smallest_tile_size(fxstream.analyze(net, shape)))  # illegal now
    sm = fxstream.compile(net.train(), tile_size=tile, input_shape=shape)
    net.eval()
    x = torch.randn(shape, dtype=torch.float64)
    assert rel(sm(x), net(x)) < TOL


@pytest.mark.parametrize("cuts", [None, ["1"]])
def test_double_backward_is_exact(cuts):
    """A gradient penalty differentiates the input gradient: every term must be there."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 1)).double()
    x0 = torch.randn(1, 3, 36, 30, dtype=torch.float64)
    sm = fxstream.compile(net, tile_size=16, input_shape=x0.shape, cuts=cuts)

    def penalty(model):
        for p in net.parameters():
            p.grad = None
        x = x0.clone().requires_grad_(True)
        out = model(x).sum()
        (g,) = torch.autograd.grad(out, x, create_graph=True)
        ((g ** 2).sum() + out).backward()
        return [p.grad.clone() for p in net.parameters()] + [x.grad.clone()]

    want, got = penalty(net), penalty(sm)
    assert sm.plan(x0.shape, x0.dtype).passes[0].num_tiles > 1
    scale = max(w.abs().max() for w in want)
    for w, g in zip(want, got):
        assert (w - g).abs().max() / scale < TOL


def test_double_backward_through_streamed_statistics_is_refused():
    """A later pass's recompute keeps the statistics attached for a double backward, so the
    gradient of a parameter also ran back through them into the earlier pass, which autograd
    reaches again through the statistics' own gradient: the first-order weight gradient was
    71% off, the parameters' 54-300% after the penalty's backward. Refused, naming the pass."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
                        nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 2)).double()
    shape = (1, 3, 24, 24)
    sm = fxstream.compile(net, input_shape=shape, tile_size=12, memory_budget=None)
    assert any(p.side_inputs and p.num_tiles > 1 for p in sm.plan(shape, torch.float64).passes)
    x = torch.randn(shape, dtype=torch.float64)
    with pytest.raises(fxstream.UnsupportedError, match=r"pass 1 reads tensors computed outside "
                                                        r"it.*statistics streamed by an earlier "
                                                        r"pass.*create_graph=True"):
        torch.autograd.grad(sm(x)[:, 0].sum(), net[0].weight, create_graph=True)
    # a plain backward through the same plan stays exact
    net.zero_grad()
    net(x)[:, 0].sum().backward()
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    sm(x)[:, 0].sum().backward()
    scale = max(w.abs().max() for w in want)
    for w, p in zip(want, net.parameters()):
        assert (w - p.grad).abs().max() / scale < TOL


def test_a_budget_is_planned_for_each_input_shape():
    import torchvision

    model = torchvision.models.resnet18(num_classes=3).eval()
    # room above what the process holds: the plans keep 5% of the whole budget in reserve, and
    # late in the suite the process holds several GiB
    budget = current_rss() + 1024 * 2**20
    sm = fxstream.compile(model, memory_budget=budget)
    small, large = sm.plan((1, 3, 512, 512)), sm.plan((1, 3, 3072, 3072))
    assert small.budget == large.budget == budget
    assert large.estimate.peak <= large.budget and small.estimate.peak <= small.budget
    assert large.input_shape == (1, 3, 3072, 3072) and large != small
    assert sum(p.num_tiles for p in large.passes) > sum(p.num_tiles for p in small.passes)
    with pytest.raises(fxstream.PlanError, match=r"no plan fits a memory budget of .* GiB "
                                                 r"for input \(1, 3, 32768, 32768\)"):
        sm.plan((1, 3, 32768, 32768))


def test_the_default_plan_has_a_budget_and_runs_small_images_whole():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1)).double()
    sm = fxstream.compile(net)
    x = torch.randn(1, 3, 64, 48, dtype=torch.float64)
    plan = sm.plan(x.shape, x.dtype)
    assert plan.budget is not None and plan.estimate.peak <= plan.budget
    assert plan.num_tiles == 1  # at least 512 MiB of room: a small image runs in one tile
    assert rel(sm(x), net(x)) < TOL


def test_hooks_on_stem_modules_warn_once():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    sm = fxstream.compile(net, tile_size=16)
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(1, 3, 40, 40)
    with pytest.warns(fxstream.FxStreamWarning, match=r"hooks on stem modules \(0\) run once "
                                                      r"per tile"):
        sm(x)
    assert len(seen) > 1  # what the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sm(x)


class ShapeHead(nn.Module):
    """The head reads the image itself (as torchvision's segmentation models read x.shape)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 2, 3, stride=2, padding=1)

    def forward(self, x):
        y = self.c(x)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)


def test_an_image_the_head_reads_is_handed_over_not_copied():
    torch.manual_seed(0)
    net = ShapeHead().double()
    x = torch.randn(1, 3, 40, 36, dtype=torch.float64)
    sm = fxstream.compile(net, tile_size=16, input_shape=x.shape)
    plan = sm.plan(x.shape, x.dtype)
    assert "x" in plan.boundary
    assert [o.name for p in plan.passes for o in p.outputs] == ["c"]
    assert any("reads the image itself" in n for n in plan.notes)
    assert rel(sm(x), net(x)) < TOL


def test_a_stem_with_little_of_the_work_is_reported():
    """A mean over the rows only (not a whole-image statistic, so not streamed) ends the stem
    after a small conv; the big conv runs on the whole image in the head."""

    class Early(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)
            self.big = nn.Conv2d(4, 64, 3, padding=1)

        def forward(self, x):
            y = self.c(x)
            return self.big(y * y.mean(2, keepdim=True))

    assert fxstream.analyze(Early(), (1, 3, 40, 40)).stem_share < 0.5
    sm = fxstream.compile(Early(), tile_size=16)
    with pytest.warns(fxstream.FxStreamWarning, match=r"the stem holds \d+% of the model's "
                                                      r"forward work.*head starts at 'mean'"):
        sm(torch.randn(1, 3, 40, 40))


def test_a_wasteful_plan_says_which_tile_helps():
    net = nn.Sequential(*[nn.Conv2d(3, 3, 5, padding=2) for _ in range(6)],
                        nn.AdaptiveAvgPool2d(1))
    sm = fxstream.compile(net, tile_size=40, memory_budget=None)
    with pytest.warns(fxstream.FxStreamWarning, match=r"pass 0 computes \d+\.\dx the pixels of "
                                                      r"its map.*tile_size=\d+ brings it to"):
        sm(torch.randn(1, 3, 200, 200))


def test_a_plan_that_saves_no_memory_says_so():
    """The default budget is at least 512 MiB above what the process holds: on a small image
    that is more than the full image's step, and the plan is free to hold as much."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1))
    sm = fxstream.compile(net)
    with pytest.warns(fxstream.FxStreamWarning, match=r"this plan is estimated to hold .* no "
                                                      r"less than the full image's step"):
        sm(torch.randn(1, 3, 64, 64))
    plan = sm.plan((1, 3, 64, 64))
    assert plan.estimate.peak >= plan.estimate.full_peak
    assert "the full image's step:" in str(plan)


def test_statistics_streamed_at_a_high_price_say_so():
    """Four levels of train-mode BatchNorm in one segment: each level is another pass over the
    image, so the stem runs 3x the work of one pass with the same tiles; the user is told why
    and what helps, also when compile made the plan (input_shape=). Tiles that overlap much
    are not blamed on statistics, and frozen BatchNorm streams in one pass and says nothing."""
    def net(norm=lambda: nn.BatchNorm2d(8), levels=4):
        torch.manual_seed(0)
        layers = [nn.Conv2d(3, 8, 3, padding=1), norm(), nn.ReLU()]
        for _ in range(levels - 1):
            layers += [nn.Conv2d(8, 8, 3, padding=1), norm(), nn.ReLU()]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(8, 2)).train()

    x = torch.randn(1, 3, 64, 64)
    for kwargs in ({}, {"input_shape": tuple(x.shape)}):
        sm = fxstream.compile(net(), tile_size=32, **kwargs)
        with pytest.warns(fxstream.FxStreamWarning, match=r"statistics level by level in 5 "
                          r"passes over one segment: the stem's work is \d\.\d\dx the stem "
                          r"streamed once, [3-9]\.\d times .*a memory_budget lets the planner "
                          r"store maps.*freeze_batchnorm"):
            sm(x)
    # one GroupNorm level on tiles that overlap twice over: the overlap's cost, not theirs
    one = fxstream.compile(net(lambda: nn.GroupNorm(2, 8), levels=1), tile_size=16)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        one(x)
    assert len(one.last_plan.passes) == 2
    assert not any("statistics level by level" in str(w.message) for w in seen)
    frozen = fxstream.compile(fxstream.freeze_batchnorm(net()), tile_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frozen(x)
    assert len(frozen.last_plan.passes) == 1


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 + 5, 2)

    def forward(self, img, clinical, weight=None):
        y = self.c(img).mean((2, 3))
        return self.fc(torch.cat([y, clinical], 1)) * weight


def test_other_inputs_go_to_the_head():
    """Compile sees only the image (the head fails on the meta device without the other
    inputs: no matter); each call's other inputs go to the head as they are."""
    torch.manual_seed(0)
    net = TwoInputs().double()
    x = torch.randn(2, 3, 40, 36, dtype=torch.float64)
    clinical = torch.randn(2, 5, dtype=torch.float64)
    weight = torch.rand(2, 1, dtype=torch.float64)
    sm = fxstream.compile(net, tile_size=16)
    assert rel(sm(x, clinical, weight), net(x, clinical, weight)) < TOL
    assert rel(sm(x, clinical=clinical, weight=weight), net(x, clinical, weight)) < TOL
    assert sm.plan(x.shape, x.dtype).num_tiles > 1
    with pytest.raises(fxstream.UnsupportedError, match="arguments its forward does not take"):
        sm(x, clinical, weight, 3)


class ScaledStem(nn.Module):
    """A stem that reads another argument of ``forward`` (a per-channel scale, as a
    conditioning input would be): it has no default, so compile cannot plan without it."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x, scale):
        y = torch.relu(self.c1(x)) * scale
        return self.fc(torch.relu(self.c2(y)).mean((2, 3)))


def test_a_stem_reading_another_argument_is_planned_with_it():
    """Compile leaves such a model's plans to its calls (its probe failed on the missing scale);
    each call plans with the scale it gets, and back-propagates into it exactly; a plan asked
    for without it says which argument is missing."""
    torch.manual_seed(0)
    net = ScaledStem().double()
    x = torch.randn(2, 3, 40, 36, dtype=torch.float64)
    scale = torch.randn(1, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    sm = fxstream.compile(net, tile_size=16)
    assert sm.last_plan is None  # left to the calls; an argument only the head reads is not:
    assert fxstream.compile(TwoInputs().double(), tile_size=16).last_plan is not None
    out = sm(x, scale)
    grads = torch.autograd.grad(out.sum(), [scale, *net.parameters()])
    ref = torch.autograd.grad(net(x, scale).sum(), [scale, *net.parameters()])
    assert sm.engines[0].spec.num_tiles > 1
    assert rel(out, net(x, scale)) < TOL
    for g, r in zip(grads, ref):
        assert rel(g, r) < TOL
    assert rel(sm(x, scale.detach()), net(x, scale)) < TOL  # a scale without grad: new plan
    with pytest.raises(fxstream.GeometryError, match="argument 'scale', which was not given"):
        sm.plan(x.shape, x.dtype)
    assert sm.plan(x.shape, x.dtype, scale.detach()) == sm.last_plan  # the last call's


class PairStem(nn.Module):
    """FiLM parameters passed as one tuple argument that the stem reads."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x, film):
        return self.fc(torch.relu(self.c1(x) * film[0] + film[1]).mean((2, 3)))


def test_arguments_the_stem_cannot_take_are_errors():
    """A tuple of tensors read by the stem is refused at the call, naming it (it used to fail
    with 'the stem fails on the whole map'); commands that call the model with an image alone
    refuse a model that needs more."""
    x = torch.randn(1, 3, 32, 32)
    film = (torch.randn(1, 4, 1, 1), torch.randn(1, 4, 1, 1))
    sm = fxstream.compile(PairStem(), tile_size=16)
    with pytest.raises(fxstream.UnsupportedError, match="argument 'film', a tuple of tensors"):
        sm(x, film)
    with pytest.raises(fxstream.UnsupportedError, match="also needs 'scale'"):
        check(ScaledStem(), (1, 3, 32, 32), tile_size=16)


def test_pickle_and_torch_save_round_trip(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    sm = fxstream.compile(net, tile_size=16)
    x = torch.randn(1, 3, 40, 40)
    y = sm(x)
    again = pickle.loads(pickle.dumps(sm))
    assert torch.equal(again(x), y)
    buf = io.BytesIO()
    torch.save(sm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, fxstream.StreamingModule) and torch.equal(loaded(x), y)
    assert set(loaded.state_dict()) == set(net.state_dict())


def test_meta_models_run_on_meta_images():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2)).to("meta")
    sm = fxstream.compile(net, tile_size=16)
    out = sm(torch.empty(2, 3, 40, 40, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 2)


def test_check_is_reachable_from_the_package():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1))
    assert fxstream.check.check(net, (1, 3, 40, 40), 16).passed


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_check_on_cuda_without_a_gpu_is_a_clear_error(capsys):
    from fxstream.cli import main

    code = main(["check", "torchvision.models:resnet18", "--input", "1x3x64x64", "--tile", "32",
                 "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "CUDA is not available on this machine" in err


def test_segmentation_spec_downloads_no_weights(monkeypatch):
    from fxstream.spec import load_model

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model = load_model("torchvision.models.segmentation:fcn_resnet50")
    assert type(model).__name__ == "FCN"


def test_train_batchnorm_with_momentum_none_is_analysed():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1)).train()
    a = fxstream.analyze(net, (2, 3, 32, 32))
    # the BatchNorm streams its moments: the stem ends at the ReLU before the global pool
    assert a.boundary == ("_2",)
    assert a.row("moments").role == "stem" and a.row("moments").qualname == "1"
    assert a.row("update_running_stats").origin == "moments"
    assert int(net[1].num_batches_tracked) == 0  # the analysis left the model alone
    assert torch.equal(net[1].running_mean, torch.zeros(4))
    assert torch.equal(net[1].running_var, torch.ones(4))


class ItemHead(nn.Module):
    """A head that reads a number off a tensor (``.item()``): fine on real data, impossible on
    the meta device; it lies past the global pool, so the analysis goes on without it."""

    def forward(self, x):
        return x * (1.0 if x.sum().item() > 0 else -1.0)


def test_a_head_that_cannot_run_on_meta_does_not_stop_the_analysis():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        ItemHead()).double()
    a = fxstream.analyze(net, (1, 3, 40, 40), leaf_modules=(ItemHead,))
    assert a.boundary == ("_0",)
    sm = fxstream.compile(net, tile_size=16, leaf_modules=(ItemHead,))
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    assert rel(sm(x), net(x)) < TOL


def test_check_uses_the_streamed_plan_it_reports():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1))
    result = check(net, (1, 3, 40, 40), 16)
    assert result.passed and result.num_tiles > 1
