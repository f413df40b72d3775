"""The CUDA path: prefetched host tiles, cut maps offloaded to the host, cuDNN autotuning,
channels-last and bfloat16 autocast. Skipped without a GPU."""
import pytest
import torch
import torchvision

import fxstream
from fxstream.check import check

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).eval()


def _bad(result):
    return [d for d in result.diffs if not d.ok]


# ResNet-18's receptive field is 435 px: the smallest legal tile on a 640-px axis is 512
SHAPE, TILE = (1, 3, 640, 608), 512


def test_host_image_prefetched_tiles_exact():
    result = check(resnet18(), SHAPE, TILE, device="cuda", image_on_host=True)
    assert result.num_tiles > 1 and not _bad(result), _bad(result)


def test_offloaded_cut_maps_exact():
    result = check(resnet18(), (1, 3, 192, 160), 64, device="cuda", image_on_host=True,
                   cuts=["maxpool", "layer2"], offload=True)
    assert not _bad(result), _bad(result)


def test_offloaded_map_into_a_segment_without_parameters_exact():
    """The last segment is a lone max-pool: it must run on CUDA, not on the host map's device
    (its output feeds the head's Linear on CUDA)."""
    from .test_multicut import pool_after_cut_net

    result = check(pool_after_cut_net(), (1, 3, 64, 64), 16, device="cuda", cuts=["1"],
                   offload=True)
    assert not _bad(result), _bad(result)


def test_offloaded_maps_live_on_the_host():
    model = resnet18().cuda()
    sm = fxstream.compile(model, tile_size=64, input_shape=(1, 3, 192, 160),
                          cuts=["layer1"], offload=True)
    sm.plan((1, 3, 192, 160))
    first = sm.engines[0]
    with torch.no_grad():
        (stored,) = first(torch.randn(1, 3, 192, 160))
    assert stored.device.type == "cpu" and stored.is_pinned()


@pytest.mark.parametrize("tuned", [False, True])
def test_cudnn_benchmark_only_in_the_tile_loops_when_asked(tuned):
    torch.backends.cudnn.benchmark = False
    model = resnet18().cuda()
    sm = fxstream.compile(model, tile_size=TILE, input_shape=SHAPE, cudnn_benchmark=tuned)
    seen = []  # hooked after compile, whose shape analysis runs the model once
    model.layer1[0].conv1.register_forward_hook(
        lambda *_: seen.append(torch.backends.cudnn.benchmark))
    sm(torch.randn(SHAPE, device="cuda")).sum().backward()
    assert len(seen) > 2 and set(seen) == {tuned}
    assert torch.backends.cudnn.benchmark is False


def test_channels_last_exact_on_cuda():
    result = check(resnet18(), SHAPE, TILE, device="cuda", channels_last=True)
    assert not _bad(result), _bad(result)


def test_bfloat16_autocast_close_to_full_image():
    model = resnet18().cuda()
    x = torch.randn(SHAPE, device="cuda")
    sm = fxstream.compile(model, tile_size=TILE, input_shape=x.shape)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        full, streamed = model(x), sm(x)
        streamed.float().sum().backward()
    assert streamed.dtype == full.dtype
    assert (streamed.float() - full.float()).abs().max() <= 0.05 * full.float().abs().max()


def test_memory_budget_uses_device_memory():
    model = resnet18().cuda()
    sm = fxstream.compile(model, input_shape=(1, 3, 1024, 1024), memory_budget="1GiB")
    torch.cuda.reset_peak_memory_stats()
    x = torch.randn(1, 3, 1024, 1024)
    sm(x).sum().backward()
    assert torch.cuda.max_memory_allocated() <= 2**30
