"""``fxstream infer``: a slide in, a dense .zarr/.npy output equal to the whole model's output;
errors exit 2 with one line."""
from __future__ import annotations

import re
import textwrap

import numpy as np
import pytest
import torch

from fxstream.cli import main
from fxstream.infer_cli import parse_region

MODEL = textwrap.dedent('''
    import torch, torch.nn as nn

    class Net(nn.Module):
        def __init__(self, scaled):
            super().__init__()
            self.scaled = scaled
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 2, 3, stride=2, padding=1)
            self.up = nn.Upsample(scale_factor=2)

        def forward(self, x):
            x = x if self.scaled else x.float() / 255
            return self.up(self.b(torch.relu(self.a(x))))

    def build():
        torch.manual_seed(0)
        return Net(False)

    def build_scaled():
        torch.manual_seed(0)
        return Net(True)

    def classifier():
        return nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
''')


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("zarr")
    d = tmp_path_factory.mktemp("infer")
    rgb = np.random.default_rng(0).integers(0, 256, (200, 172, 3), dtype=np.uint8)
    with tifffile.TiffWriter(d / "slide.tif", bigtiff=True) as tif:
        tif.write(rgb, tile=(64, 64), photometric="rgb", compression="zlib", subifds=1)
        tif.write(rgb[::2, ::2].copy(), tile=(32, 32), photometric="rgb", compression="zlib",
                  subfiletype=1)
    (d / "model.py").write_text(MODEL)
    return {"dir": d, "slide": str(d / "slide.tif"), "rgb": rgb, "spec": str(d / "model.py")}


def reference(files, a, attr="build"):
    import importlib.util

    spec = importlib.util.spec_from_file_location("infer_model", files["spec"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = getattr(module, attr)().eval()
    x = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]
    with torch.no_grad():
        return net(x.float() / 255 if attr == "build_scaled" else x)[0].numpy()


def test_infer_writes_zarr_equal_to_the_whole_output(files, tmp_path):
    import zarr

    out = tmp_path / "pred.zarr"
    assert main(["infer", f"{files['spec']}:build", "--image", files["slide"], "--out", str(out),
                 "--tile", "64", "--no-progress"]) == 0
    got = zarr.open_array(out, mode="r")
    assert got.shape == (2, 200, 172) and got.dtype == np.float32
    np.testing.assert_allclose(got[:], reference(files, files["rgb"]), rtol=0, atol=2e-6)


def test_infer_level_region_npy_and_scale(files, tmp_path):
    out = tmp_path / "pred.npy"
    assert main(["infer", f"{files['spec']}:build_scaled", "--image", files["slide"],
                 "--level", "1", "--region", "10,6,80,64", "--out", str(out), "--scale", "255",
                 "--budget", "16GiB", "--out-dtype", "float64", "--no-progress"]) == 0
    got = np.load(out)
    assert got.shape == (2, 80, 64) and got.dtype == np.float64
    a = files["rgb"][::2, ::2][10:90, 6:70]
    np.testing.assert_allclose(got, reference(files, a, "build_scaled"), rtol=0, atol=2e-6)


@pytest.mark.parametrize("extra, message", [
    (["--region", "150,0,64,64"], r"region \(150, 0, 64, 64\) .* is outside level 0"),
    (["--region", "1,2,3"], r"bad --region '1,2,3'"),
    (["--level", "2"], r"level 2 does not exist"),
    (["--layout", "CHW"], r"layout 'CHW' puts channels on axis 0"),
    (["--out-dtype", "uint8"], r"values would change kind"),
])
def test_infer_errors_exit_2_with_one_line(files, tmp_path, capsys, extra, message):
    args = ["infer", f"{files['spec']}:build", "--image", files["slide"], "--out",
            str(tmp_path / "p.zarr"), "--tile", "64", "--no-progress", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fxstream: error: ")
    assert re.search(message, err[-1]), err[-1]


def test_infer_refuses_what_it_cannot_write(files, tmp_path, capsys):
    base = ["--image", files["slide"], "--tile", "64", "--no-progress"]
    (tmp_path / "notes.txt").write_text("x")
    cases = [
        (["infer", f"{files['spec']}:classifier", *base, "--scale", "255", "--out",
          str(tmp_path / "a.zarr")],
         r"fully convolutional model"),
        (["infer", f"{files['spec']}:build", "--image", str(tmp_path / "notes.txt"),
          "--out", str(tmp_path / "b.zarr"), "--tile", "64"], r"is not an image fxstream can read"),
        (["infer", f"{files['spec']}:build", *base, "--out", str(tmp_path / "c.png")],
         r"expected a .zarr directory or a .npy file"),
    ]
    (tmp_path / "d.zarr").mkdir()
    cases.append((["infer", f"{files['spec']}:build", *base, "--out", str(tmp_path / "d.zarr")],
                  r"exists: pass --overwrite"))
    for args, message in cases:
        assert main(args) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert re.search(message, last), last


def test_parse_region():
    assert parse_region("1,2,3,4") == (1, 2, 3, 4)
