"""Streaming from lazily read images and writing dense outputs tile by tile: a streamed step on a
uint8 TIFF, zarr array or memmap equals the same model on the same pixels loaded whole (float64,
output and every parameter gradient), and dense outputs written tile by tile equal the whole
model's output. Every error on the way names what to do."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxstream
from fxstream.images import ImageError
from fxstream.planner import PlanOptions, Situation, budget_memory

TOL = 1e-10
MEAN = torch.tensor([0.70, 0.55, 0.75], dtype=torch.float64).view(1, 3, 1, 1)
STD = torch.tensor([0.15, 0.20, 0.12], dtype=torch.float64).view(1, 3, 1, 1)


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


class Strided(nn.Module):
    """uint8 in, normalised in the stem; three stride-2 convs, global pool, linear head."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 2)
        self.register_buffer("mean", MEAN.clone())
        self.register_buffer("std", STD.clone())

    def forward(self, x):
        x = (x.double() / 255 - self.mean) / self.std
        return self.fc(self.convs(x).mean((2, 3)))


class TinyUNet(nn.Module):
    """A fully convolutional two-level U-Net on uint8 input: its output is a stem map."""

    def __init__(self, out_channels: int = 2):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Sequential(nn.Conv2d(14, 6, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(6, out_channels, 1))

    def forward(self, x):
        e = self.enc(x.double() / 255)
        return self.dec(torch.cat([e, self.up(self.down(e))], 1))


def model(cls=Strided, seed: int = 0):
    torch.manual_seed(seed)
    return cls().double()


def whole(a, layout: str) -> torch.Tensor:
    """The eager reference: a stored numpy array as a (1, C, H, W) uint8 tensor."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if layout == "HWC":
        t = t.permute(2, 0, 1)
    return t[None].contiguous()


def step(net, x):
    """Output and parameter gradients of one step with a fixed linear loss."""
    net.zero_grad()
    y = net(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * weights).sum().backward()
    return y.detach(), [p.grad.clone() for p in net.parameters()]


def check_step(img, reference: torch.Tensor, cls=None, **compile_args):
    """A streamed step on the lazy image equals the model on the whole tensor."""
    net = model(cls or Strided)
    y_ref, g_ref = step(net, reference)
    sm = fxstream.compile(net, **{"tile_size": 48, "memory_budget": None, **compile_args})
    y, g = step(sm, img)
    assert sm.engines[0].spec.num_tiles > 1
    assert rel(y, y_ref) <= TOL
    for a, b in zip(g, g_ref):
        assert rel(a, b) <= TOL
    return sm


def pixels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """A tiled RGB pyramid TIFF (HWC, 3 levels), a planar one (CHW), their pixels."""
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("zarr")
    d = tmp_path_factory.mktemp("giga")
    rgb = pixels((232, 200, 3))
    levels = [rgb, rgb[::2, ::2].copy(), rgb[::4, ::4].copy()]
    with tifffile.TiffWriter(d / "rgb.tif", bigtiff=True) as tif:
        tif.write(levels[0], tile=(64, 64), photometric="rgb", compression="zlib", subifds=2)
        for lv in levels[1:]:
            tif.write(lv, tile=(32, 32), photometric="rgb", compression="zlib", subfiletype=1)
    planar = pixels((3, 176, 150), seed=1)
    tifffile.imwrite(d / "planar.tif", planar, tile=(32, 32), photometric="rgb",
                     planarconfig="separate")
    return {"dir": d, "rgb": d / "rgb.tif", "levels": levels, "planar": d / "planar.tif",
            "planar_data": planar}


# ---------------------------------------------------------------------- exact training steps

def test_tiff_hwc_step_equals_the_whole_image(slides):
    img = fxstream.image(slides["rgb"])
    assert img.dtype == torch.uint8 and img.shape == (1, 3, 232, 200)
    check_step(img, whole(slides["levels"][0], "HWC"))


def test_tiff_chw_step_equals_the_whole_image(slides):
    img = fxstream.image(slides["planar"])
    check_step(img, whole(slides["planar_data"], "CHW"))


def test_tiff_pyramid_level_step(slides):
    img = fxstream.image(slides["rgb"], level=1)
    assert img.shape == (1, 3, 116, 100)
    check_step(img, whole(slides["levels"][1], "HWC"), tile_size=40)


def test_tiff_region_step(slides):
    img = fxstream.image(slides["rgb"], region=(37, 21, 150, 131))
    check_step(img, whole(slides["levels"][0][37:187, 21:152], "HWC"))


@pytest.mark.parametrize("layout", ["HWC", "CHW"])
def test_zarr_step_equals_the_whole_image(tmp_path, layout):
    zarr = pytest.importorskip("zarr")
    a = pixels((170, 190, 3) if layout == "HWC" else (3, 170, 190), seed=3)
    z = zarr.open_array(tmp_path / "img.zarr", mode="w", shape=a.shape, dtype="uint8",
                        chunks=(50, 60, 3) if layout == "HWC" else (3, 50, 60))
    z[:] = a
    img = fxstream.image(zarr.open_array(tmp_path / "img.zarr", mode="r"), layout=layout)
    check_step(img, whole(a, layout))


def test_memmap_step_with_cuts(tmp_path):
    a = pixels((210, 180, 3), seed=4)
    np.save(tmp_path / "img.npy", a)
    img = fxstream.image(np.load(tmp_path / "img.npy", mmap_mode="r"))
    sm = check_step(img, whole(a, "HWC"), cuts=["convs.1"])
    assert len(sm.engines) == 2 and sm.engines[0].spec.source == "x"


def test_budget_plans_read_the_image_in_its_dtype_and_keep_it_out_of_memory(slides):
    img = fxstream.image(slides["rgb"])
    sm = fxstream.compile(model(), memory_budget="2GiB")
    step(sm, img)
    assert sm.analysis.dtype == "torch.uint8" and sm.last_plan.dtype == "torch.uint8"
    assert sm.last_plan.budget == 2 * 2**30
    analysis = sm.analysis
    options = PlanOptions(memory_budget="2GiB")
    image_bytes = 232 * 200 * 3
    loaded = budget_memory(analysis, options, Situation(baseline=0, available=2**33))
    lazy = budget_memory(analysis, options, Situation(baseline=0, available=2**33,
                                                      image_lazy=True))
    assert loaded.fixed - lazy.fixed == image_bytes


def test_the_image_stays_uint8_and_a_model_that_does_not_convert_it_is_told_how():
    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1))
    sm = fxstream.compile(net, tile_size=32)
    with pytest.raises(fxstream.GeometryError, match=r"the image is torch.uint8, as stored: "
                                                     r"convert it in the model's forward"):
        sm(fxstream.image(pixels((100, 80, 3))))


def test_a_head_reading_the_image_is_an_error():
    class ReadsImage(Strided):
        def forward(self, x):
            return super().forward(x) + nn.functional.interpolate(x, size=(8, 8)).double().mean()

    sm = fxstream.compile(model(ReadsImage), tile_size=48)
    with pytest.raises(fxstream.UnsupportedError, match=r"reads the image itself outside the "
                                                        r"streamed stem \('interpolate'\).*"
                                                        r"img.read\(\)"):
        sm(fxstream.image(pixels((100, 80, 3))))


def test_a_statistic_of_the_image_streams_from_a_lazy_image(slides):
    class ReadsMean(Strided):
        def forward(self, x):
            return super().forward(x) * x.double().mean()

    reference = whole(slides["levels"][0], "HWC")
    check_step(fxstream.image(slides["rgb"]), reference, cls=ReadsMean)
    check_step(reference, reference, cls=ReadsMean)  # the same without gradient, as a tensor


def test_arrays_must_be_wrapped():
    sm = fxstream.compile(model(), tile_size=48)
    with pytest.raises(fxstream.UnsupportedError, match=r"got ndarray: wrap arrays.*"
                                                        r"fxstream.image\(source"):
        sm(pixels((100, 80, 3)))


def test_progress_observer_sees_every_tile_of_every_pass(slides):
    seen = []
    sm = fxstream.compile(model(), tile_size=48, memory_budget=None, cuts=["convs.1"],
                          progress=True)
    assert isinstance(sm.progress, fxstream.TileProgress)
    object.__setattr__(sm, "progress", lambda *a: seen.append(a))
    step(sm, fxstream.image(slides["rgb"]))
    n = [e.spec.num_tiles for e in sm.engines]
    expected = [(i, ph, k, n[i]) for ph, order in (("forward", (0, 1)), ("backward", (1, 0)))
                for i in order for k in range(n[i] + 1)]
    assert seen == expected


def test_tile_progress_draws_and_clears_bars():
    import io

    from rich.console import Console

    buf = io.StringIO()
    p = fxstream.TileProgress(Console(file=buf, force_terminal=True, width=100),
                              transient=False)
    for k in range(4):
        p(0, "forward", k, 3)
    assert p._live is None and "pass 0 forward" in buf.getvalue() and "3/3" in buf.getvalue()


# --------------------------------------------------------------- dense outputs, tile by tile

def unet_reference(a, layout="HWC"):
    net = model(TinyUNet)
    with torch.no_grad():
        return net, net(whole(a, layout))


def test_infer_into_zarr_equals_the_whole_output(slides, tmp_path):
    zarr = pytest.importorskip("zarr")
    net, ref = unet_reference(slides["levels"][0])
    sm = fxstream.compile(net, tile_size=64, memory_budget=None)
    img = fxstream.image(slides["rgb"])
    shape, dtype = sm.dense_output(img)
    assert shape == (1, 2, 232, 200) and dtype == torch.float64
    z = zarr.open_array(tmp_path / "out.zarr", mode="w", shape=shape, dtype="float64",
                        chunks=(1, 2, 50, 50), fill_value=np.nan)
    assert sm.infer(img, z) is z
    assert sm.engines[0].spec.num_tiles > 1
    assert rel(torch.from_numpy(z[:]), ref) <= TOL


def test_infer_into_a_memmap_region_with_layout(slides, tmp_path):
    a = slides["levels"][0]
    net, ref = unet_reference(a[40:200, 30:190])
    sm = fxstream.compile(net, tile_size=64, memory_budget=None)
    img = fxstream.image(slides["rgb"], region=(40, 30, 160, 160))
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32,
                                    shape=(160, 160, 2))
    sm.infer(img, out, layout="HWC")
    del out
    got = torch.from_numpy(np.load(tmp_path / "out.npy")).permute(2, 0, 1)[None]
    assert rel(got.double(), ref) <= 1e-6  # float32 storage of float64 values
    assert rel(got, ref.float()) == 0


def test_infer_into_a_writer_and_without_out(slides):
    a = slides["levels"][1]
    net, ref = unet_reference(a)
    sm = fxstream.compile(net, tile_size=48, memory_budget=None)
    img = fxstream.image(slides["rgb"], level=1)
    target = torch.full((1, 2, 116, 100), float("nan"), dtype=torch.float64)
    w = fxstream.output(target, (1, 2, 116, 100), torch.float64)
    assert sm.infer(img, w) is w
    assert rel(target, ref) <= TOL
    y = sm.infer(img)
    assert not y.requires_grad and rel(y, ref) <= TOL


def test_infer_output_errors(slides, tmp_path):
    net, _ = unet_reference(slides["levels"][0])
    sm = fxstream.compile(net, tile_size=64, memory_budget=None)
    img = fxstream.image(slides["rgb"])
    with pytest.raises(ImageError, match=r"has shape \(1, 2, 232, 199\), expected "
                                         r"\(1, 2, 232, 200\)"):
        sm.infer(img, np.zeros((1, 2, 232, 199)))
    with pytest.raises(ImageError, match=r"model's output is torch.float64 but the output array "
                                         r"holds torch.uint8: values would change kind"):
        sm.infer(img, np.zeros((1, 2, 232, 200), np.uint8))
    with pytest.raises(ImageError, match=r"writer has logical shape \(1, 3, 232, 200\), but the "
                                         r"model's output is \(1, 2, 232, 200\)"):
        sm.infer(img, fxstream.output(np.zeros((3, 232, 200)), (1, 3, 232, 200), "float64",
                                      layout="CHW"))
    with pytest.raises(ImageError, match=r"has shape \(232, 200, 2\), expected \(2, 232, 200\)"):
        sm.infer(img, np.zeros((232, 200, 2)), layout="CHW")
    with pytest.raises(ImageError, match=r"cannot write an output into a list"):
        sm.infer(img, [[0.0]])
    with pytest.raises(fxstream.UnsupportedError, match=r"fully convolutional model.*Strided "
                                                        r"computes its output in the head"):
        fxstream.compile(model(), tile_size=64).infer(img, np.zeros((1, 2)))


def test_input_errors_end_to_end(slides, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageError, match=r"notes.txt' is not an image fxstream can read"):
        fxstream.image(tmp_path / "notes.txt")
    with pytest.raises(ImageError, match=r"does not exist"):
        fxstream.image(tmp_path / "missing.tif")
    with pytest.raises(ImageError, match=r"layout 'CHW' puts channels on axis 0 \(size 232\), "
                                         r"but .* stores 3 channels on axis 2"):
        fxstream.image(slides["rgb"], layout="CHW")
    with pytest.raises(ImageError, match=r"region \(200, 0, 64, 64\) .* is outside level 0"):
        fxstream.image(slides["rgb"], region=(200, 0, 64, 64))
    with pytest.raises(ImageError, match=r"level 3 does not exist in .*: its levels are 0 "
                                         r"\(232, 200, 3\), 1 \(116, 100, 3\), 2 \(58, 50, 3\)"):
        fxstream.image(slides["rgb"], level=3)
    sm = fxstream.compile(nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1)),
                          tile_size=48)
    with pytest.raises(fxstream.UnsupportedError, match=r"expected 3 channels, got 1"):
        sm(fxstream.image(pixels((100, 80))))
