"""The StreamingModule behaves like the module it replaces; bad input gets a clear error."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxstream
from fxstream.check import check


def small_net(bn=False):
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)]
    return nn.Sequential(*layers)


def test_generated_code_and_shared_parameters():
    net = small_net()
    sm = fxstream.compile(net, tile_size=16)
    sm(torch.randn(1, 3, 40, 40))
    assert "fxstream_pass_0" in sm.code
    assert set(sm.state_dict()) == set(net.state_dict())
    assert {id(p) for p in sm.parameters()} == {id(p) for p in net.parameters()}
    sm.load_state_dict(net.state_dict())


def test_optimizer_over_model_parameters_trains_streamed_module():
    net = small_net()
    sm = fxstream.compile(net, tile_size=16)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(2, 3, 40, 40)
    before = net[0].weight.detach().clone()
    sm(x).sum().backward()
    opt.step()
    assert not torch.equal(before, net[0].weight)


def test_inference_keeps_no_graph():
    sm = fxstream.compile(small_net(), tile_size=16)
    with torch.no_grad():
        out = sm(torch.randn(1, 3, 40, 40))
    assert out.grad_fn is None


def test_backward_runs_when_only_parameters_require_grad():
    net = small_net().double()
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)  # image does not require grad
    net(x).sum().backward()
    want = net[0].weight.grad.clone()
    net.zero_grad()
    fxstream.compile(net, tile_size=16)(x).sum().backward()
    assert (net[0].weight.grad - want).abs().max() / want.abs().max() < 1e-10


def test_tuple_and_dict_outputs():
    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)

        def forward(self, x):
            a = F.relu(self.a(x))
            b = self.b(a)
            return {"fine": a, "coarse": b, "pooled": b.mean((2, 3))}

    torch.manual_seed(0)
    net = TwoOut().double()
    result = check(net, (1, 3, 37, 41), 16)
    assert result.num_tiles > 1 and result.passed, result.diffs
    out = fxstream.compile(net, tile_size=16)(torch.randn(1, 3, 37, 41, dtype=torch.float64))
    assert set(out) == {"fine", "coarse", "pooled"}


def test_dropout_replays_the_same_mask_in_the_recompute():
    """Y = 2*mask for an all-ones image, and dL/dx = 2*mask only if the recompute replays the
    forward's random stream tile by tile."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    conv.weight.data.fill_(1.0)
    net = nn.Sequential(nn.Dropout(0.5), conv).train()
    sm = fxstream.compile(net, tile_size=8, input_shape=(1, 1, 30, 30))
    x = torch.ones(1, 1, 30, 30, requires_grad=True)
    y = sm(x)
    y.sum().backward()
    assert sm.plan(x.shape, x.dtype).num_tiles > 1
    assert 0 < (y == 0).sum() < y.numel()
    assert torch.equal(x.grad, y.detach())


def test_float32_and_bfloat16_autocast_close_to_full_image():
    net = small_net()
    x = torch.randn(1, 3, 48, 40)
    sm = fxstream.compile(net, tile_size=20)
    assert (sm(x) - net(x)).abs().max() < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full, streamed = net(x), sm(x)
    assert streamed.dtype == full.dtype
    assert (streamed.float() - full.float()).abs().max() < 5e-2


def test_bfloat16_model():
    net = small_net().to(torch.bfloat16)
    x = torch.randn(1, 3, 40, 40, dtype=torch.bfloat16, requires_grad=True)
    out = fxstream.compile(net, tile_size=16)(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad is not None


# --------------------------------------------------------------------------------------------
# errors


def test_wrong_number_of_dims():
    sm = fxstream.compile(small_net(), tile_size=16)
    with pytest.raises(fxstream.UnsupportedError, match=r"expected an image with 4 dims"):
        sm(torch.randn(3, 40, 40))


def test_wrong_channels():
    sm = fxstream.compile(small_net(), tile_size=16)
    with pytest.raises(fxstream.UnsupportedError, match=r"expected 3 channels, got 5"):
        sm(torch.randn(1, 5, 40, 40))


@pytest.mark.parametrize("tile", [0, -3, 2.5])
def test_bad_tile_size(tile):
    with pytest.raises(fxstream.PlanError, match=r"tile_size must be a positive int"):
        fxstream.compile(small_net(), tile_size=tile)


def test_tile_too_small_names_smallest_legal_tile():
    with pytest.raises(fxstream.PlanError, match=r"the smallest legal tile for this model is "
                                                 r"\d+.*use tile_size >= \d+"):
        fxstream.compile(small_net(), tile_size=4)


def test_image_smaller_than_the_stem_accepts():
    net = nn.Sequential(nn.Conv2d(3, 4, 7), nn.Conv2d(4, 4, 7), nn.AdaptiveAvgPool2d(1))
    sm = fxstream.compile(net, tile_size=64)
    with pytest.raises(fxstream.GeometryError, match=r"the model fails on an input of shape "
                                                     r"\(1, 3, 10, 10\) at node '_1'.*Kernel "
                                                     r"size can't be greater"):
        sm(torch.randn(1, 3, 10, 10))


class BatchNormAct(nn.BatchNorm2d):
    """A BatchNorm that calls ``F.batch_norm`` itself, then a ReLU (as timm's BatchNormAct2d):
    its statistics are not taken apart, so in train mode the stem refuses it."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                   self.bias, self.training, self.momentum, self.eps))


def test_train_mode_functional_batchnorm_is_an_error_with_the_fix():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchNormAct(4),
                        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2)).train()
    with pytest.raises(fxstream.UnsupportedError, match=r"train-mode BatchNorm.*freeze_batchnorm"):
        fxstream.compile(net, tile_size=16)
    sm = fxstream.compile(net.eval(), tile_size=16)
    sm.train()
    with pytest.raises(fxstream.UnsupportedError, match=r"train-mode BatchNorm where the stem "
                                                        r"would continue \(1\)"):
        sm(torch.randn(1, 3, 40, 40))
    # the fix it names
    fxstream.freeze_batchnorm(net).double()
    sm = fxstream.compile(net.train(), tile_size=16)
    x = torch.randn(1, 3, 40, 40, dtype=torch.float64)
    assert ((sm(x) - net(x)).abs().max() <= 1e-10 * net(x).abs().max()).item()


def test_train_mode_batchnorm_streams_after_a_switch_from_eval():
    """nn.BatchNorm2d in train mode streams its batch statistics (docs/design.md section 7):
    a module compiled in eval mode and switched to train gives the output and the running
    statistics of the model in train mode."""
    import copy

    net = small_net(bn=True).double()
    full = copy.deepcopy(net).train()
    sm = fxstream.compile(net.eval(), tile_size=16)
    sm.train()
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    y, want = sm(x), full(x)
    assert ((y - want).abs().max() <= 1e-10 * want.abs().max()).item()
    assert sm.plan(x.shape, x.dtype).passes[0].num_tiles > 1
    assert int(net[1].num_batches_tracked) == 1
    for (name, a), (_, b) in zip(full.named_buffers(), net.named_buffers()):
        assert ((a - b).abs().max() <= 1e-10 * a.abs().max()).item(), name


def test_freeze_batchnorm_allows_training():
    net = fxstream.freeze_batchnorm(small_net(bn=True)).double()
    sm = fxstream.compile(net, tile_size=16).train()
    assert not net[1].training
    result = check(net, (1, 3, 40, 40), 16)
    assert result.passed
    sm(torch.randn(1, 3, 40, 40, dtype=torch.float64)).sum().backward()
    assert net[1].weight.grad is not None


def test_split_past_a_non_local_node():
    net = small_net()
    # past the global pool (a whole-image mean): the classifier's output is no image tensor
    with pytest.raises(fxstream.SplitError, match=r"split='6' ends at '_6', which is not an "
                                                  r"image tensor"):
        fxstream.compile(net, tile_size=16, split="6")
    # past a pool to 4x4: non-local, and the error names where non-locality starts
    torch.manual_seed(0)
    pooled = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                           nn.Conv2d(4, 4, 1))
    with pytest.raises(fxstream.SplitError, match=r"split='3' ends at '_3', which is not "
                                                  r"local: '_2' adaptive pooling"):
        fxstream.compile(pooled, tile_size=16, split="3")
    with pytest.raises(fxstream.SplitError, match=r"split='layer9' names no node"):
        fxstream.compile(net, tile_size=16, split="layer9")


def test_split_streams_only_the_named_part():
    net = small_net().double()
    sm = fxstream.compile(net, tile_size=16, split="1")
    assert sm.analysis.boundary == ("_1",)
    assert check(net, (1, 3, 40, 40), 16, split="1").passed


def test_untraceable_model():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.conv(x)
            return x

    with pytest.raises(fxstream.TraceError, match=r"cannot trace Dynamic at .*test_runtime.py:"
                                                  r"\d+: if x.sum\(\) > 0.*leaf_modules"):
        fxstream.compile(Dynamic(), tile_size=16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_image_cuda_stem():
    net = small_net().double().cuda()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    sm = fxstream.compile(net, tile_size=24)
    out = sm(x)
    assert out.device.type == "cuda"
    out.sum().backward()
    assert x.grad.device.type == "cpu"
    ref_x = x.detach().cuda().requires_grad_(True)
    net.zero_grad()
    net(ref_x).sum().backward()
    assert (x.grad.cuda() - ref_x.grad).abs().max() / ref_x.grad.abs().max() < 1e-10


def test_channels_last_model_gets_channels_last_tiles_and_stays_exact():
    seen = []
    net = small_net()

    def record(module, args):
        x = args[0]
        if not x.is_meta:  # shape propagation runs on the meta device
            # channels innermost: a channels-last copy, or a view of a channels-last image
            seen.append(x.stride(1) == 1 and x.stride(3) == x.shape[1])

    net[0].register_forward_pre_hook(record)
    result = check(net, (1, 3, 48, 40), 20, channels_last=True)
    assert result.num_tiles > 1 and result.passed, [d for d in result.diffs if not d.ok]
    assert seen and all(seen)


def test_a_hook_that_writes_the_input_gets_copies_not_views():
    """The stem's first conv has a pre-hook scaling its input in place. Tiles must be copies:
    views would scale the user's image once per overlapping tile."""
    def build():
        net = small_net()
        net[0].register_forward_pre_hook(lambda m, args: args[0].mul_(0.5))
        return net.eval()

    x0 = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        full = build()(x0.clone())
        sm = fxstream.compile(build(), tile_size=20, input_shape=x0.shape)
        x = x0.clone()
        streamed = sm(x)
    (p,) = sm.plan(x.shape, x.dtype).passes
    assert not p.view_input and p.num_tiles > 1
    assert torch.equal(x, x0)
    assert (streamed - full).abs().max() < 1e-6
