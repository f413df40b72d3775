"""fxstream.images: lazy image inputs read exactly their region, pickle by reference, keep
resident memory bounded; outputs check their target and write tiles."""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fxstream.errors import FxStreamError
from fxstream.images import ImageError, image, output

ROOT = Path(__file__).resolve().parents[1]
SLIDES = 'pip install -e "\\.\\[slides\\]"'


def run_here(*args):
    """Run a Python script in a fresh process importing this checkout's fxstream."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=120)


def rng_image(shape, dtype=np.uint8, seed=0):
    return np.random.default_rng(seed).integers(0, 250, shape).astype(dtype)


def chw(a):
    """Eager reference: an HWC array as a (1, C, H, W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]


# ---------------------------------------------------------------------------------- TIFF files

@pytest.fixture(scope="module")
def tiffs(tmp_path_factory):
    """Small tiled pyramid TIFFs: RGB (HWC), planar RGB (CHW), grey uint16, written by tifffile."""
    tifffile = pytest.importorskip("tifffile")
    d = tmp_path_factory.mktemp("tiffs")
    rgb = rng_image((300, 420, 3))
    levels = [rgb, rgb[::2, ::2], rgb[::4, ::4]]
    with tifffile.TiffWriter(d / "rgb.tif", bigtiff=True) as tif:
        tif.write(levels[0], tile=(64, 64), photometric="rgb", compression="zlib", subifds=2)
        for lv in levels[1:]:
            tif.write(lv, tile=(64, 64), photometric="rgb", compression="zlib", subfiletype=1)
    planar = rng_image((3, 200, 130), seed=1)
    tifffile.imwrite(d / "planar.tif", planar, tile=(32, 32), photometric="rgb",
                     planarconfig="separate")
    grey = rng_image((150, 170), np.uint16, seed=2) * 200
    tifffile.imwrite(d / "grey.tif", grey, tile=(48, 48))
    return {"dir": d, "rgb": d / "rgb.tif", "levels": levels, "planar": d / "planar.tif",
            "planar_data": planar, "grey": d / "grey.tif", "grey_data": grey}


def eager_level(path, level):
    import tifffile
    with tifffile.TiffFile(path) as tif:
        return tif.series[0].levels[level].asarray()


INDICES = [
    (),
    (slice(None), slice(None), slice(0, 64), slice(0, 64)),
    (slice(None), slice(1, 3), slice(37, 250), slice(100, 419)),
    (slice(0, 1), slice(None), slice(-50, None), slice(-7, None)),     # negative: from the end
    (slice(None), slice(None), slice(290, 999), slice(400, 10**6)),    # clamped like Python
    (slice(None), slice(None), slice(5, 5), slice(0, 10)),             # empty
]


@pytest.mark.parametrize("index", INDICES)
def test_tiff_hwc_reads_the_region_of_the_eager_image(tiffs, index):
    img = image(tiffs["rgb"])
    ref = chw(eager_level(tiffs["rgb"], 0))
    assert img.layout.stored == "HWC" and img.shape == (1, 3, 300, 420)
    got = img[index]
    assert got.dtype == torch.uint8 and got.is_contiguous()
    assert torch.equal(got, ref[index])


def test_tiff_pyramid_level_and_region(tiffs):
    img = image(tiffs["rgb"], level=1, region=(10, 20, 100, 150))
    assert img.shape == (1, 3, 100, 150) and img.level == 1
    ref = chw(eager_level(tiffs["rgb"], 1))[:, :, 10:110, 20:170]
    assert torch.equal(img[:, :, :, :], ref)
    assert torch.equal(img[:, :, 90:, 140:160], ref[:, :, 90:, 140:160])
    assert torch.equal(image(tiffs["rgb"], level=2).read(), chw(tiffs["levels"][2]))


def test_tiff_planar_is_chw_and_grey_is_hw(tiffs):
    planar = image(tiffs["planar"])
    assert planar.layout.stored == "CHW" and planar.shape == (1, 3, 200, 130)
    assert torch.equal(planar[:, :, 30:90, 7:120],
                       torch.from_numpy(tiffs["planar_data"])[None, :, 30:90, 7:120])
    grey = image(tiffs["grey"])
    assert grey.layout.stored == "HW" and grey.dtype == torch.uint16
    assert grey.shape == (1, 1, 150, 170)
    assert torch.equal(grey[:, :, 10:100, 60:61],
                       torch.from_numpy(tiffs["grey_data"])[None, None, 10:100, 60:61])


def test_tiffslide_reads_what_tifffile_cannot(tiffs, monkeypatch):
    pytest.importorskip("tiffslide")
    import tifffile

    def refuse(*a, **k):
        raise tifffile.TiffFileError("not a TIFF tifffile likes")

    monkeypatch.setattr(tifffile, "TiffFile", refuse)       # tiffslide holds its own reference
    img = image(tiffs["rgb"], level=1)
    assert type(img.source).__name__ == "SlideSource"
    assert torch.equal(img[:, :, 5:70, 33:99], chw(tiffs["levels"][1])[:, :, 5:70, 33:99])


def test_repr_numel_nbytes(tiffs):
    img = image(tiffs["rgb"], level=1, region=(0, 10, 20, 30))
    r = repr(img)
    for part in ["rgb.tif", "layout='HWC'", "level=1", "region=(0, 10, 20, 30)",
                 "shape=(1, 3, 20, 30)", "dtype=torch.uint8"]:
        assert part in r
    assert (img.ndim, img.numel, img.nbytes) == (4, 1800, 1800)
    grey = image(tiffs["grey"])
    assert grey.nbytes == 150 * 170 * 2 and "level" not in repr(grey)


# ------------------------------------------------------------------------------- numpy, torch

# (layout, stored shape, the eager permutation of the stored tensor into (N, C, *spatial))
LAYOUTS = [
    ("HWC", (20, 30, 3), lambda t: t.permute(2, 0, 1)[None]),
    ("CHW", (3, 20, 30), lambda t: t[None]),
    ("NHWC", (2, 20, 30, 4), lambda t: t.permute(0, 3, 1, 2)),
    ("NCHW", (2, 4, 20, 30), lambda t: t),
    ("HW", (20, 30), lambda t: t[None, None]),
    ("WH", (30, 20), lambda t: t.T[None, None]),
    ("LC", (50, 2), lambda t: t.T[None]),
    ("CL", (2, 50), lambda t: t[None]),
    ("NLC", (3, 50, 2), lambda t: t.permute(0, 2, 1)),
    ("DHWC", (6, 20, 30, 2), lambda t: t.permute(3, 0, 1, 2)[None]),
    ("CDHW", (2, 6, 20, 30), lambda t: t[None]),
    ("NCDHW", (1, 2, 6, 20, 30), lambda t: t),
]


@pytest.mark.parametrize("layout,shape,to_logical", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_layouts_match_an_eager_permute(layout, shape, to_logical):
    a = rng_image(shape, np.float32)
    ref = to_logical(torch.from_numpy(a))
    img = image(a, layout=layout)
    assert img.shape == tuple(ref.shape) and img.dtype == torch.float32
    assert torch.equal(img.read(), ref)
    box = (slice(0, 1), slice(1, None)) + tuple(slice(1, n - 2) for n in ref.shape[2:])
    assert torch.equal(img[box], ref[box])


def test_layout_is_inferred_only_when_unambiguous():
    assert image(np.zeros((64, 48, 3), np.uint8)).layout.stored == "HWC"
    assert image(np.zeros((4, 64, 48), np.uint8)).layout.stored == "CHW"
    assert image(np.zeros((64, 48), np.uint8)).layout.stored == "HW"
    assert image(torch.zeros(2, 5, 16, 16)).layout.stored == "NCHW"
    assert image(torch.zeros(1, 5, 4, 16, 16)).layout.stored == "NCDHW"
    for shape in [(3, 64, 3), (16, 64, 48), (2, 3, 64, 64), (50,)]:
        with pytest.raises(ImageError, match=r"cannot tell the axes of .*pass layout="):
            image(np.zeros(shape, np.uint8))


def test_reads_are_fresh_copies_and_tensors_stay_tensors():
    a = rng_image((32, 32, 3))
    img = image(a)
    t = img[:, :, 0:4, 0:4]
    t += 1
    assert torch.equal(img[:, :, 0:4, 0:4], t - 1)                # the source is untouched
    src = torch.arange(2 * 3 * 8 * 8, dtype=torch.float64).reshape(2, 3, 8, 8)
    got = image(src)[:, :, 2:6, :]
    assert torch.equal(got, src[:, :, 2:6]) and got.data_ptr() != src.data_ptr()
    assert got.is_contiguous()


def test_zero_size_and_full_reads():
    img = image(rng_image((20, 30, 3)))
    assert img[:, :, 5:5].shape == (1, 3, 0, 30)
    assert img[:, :, 3:1].shape == (1, 3, 0, 30)                  # like Python slicing
    assert img.read(slice(None)).shape == (1, 3, 20, 30)


def test_npy_and_memmap_views(tmp_path):
    a = rng_image((120, 90, 3), np.uint16)
    np.save(tmp_path / "a.npy", a)
    ref = chw(a)
    assert torch.equal(image(tmp_path / "a.npy")[:, :, 7:99, 3:80], ref[:, :, 7:99, 3:80])
    np.save(tmp_path / "f.npy", np.asfortranarray(a))
    assert torch.equal(image(str(tmp_path / "f.npy"))[:, :, 50:, :11], ref[:, :, 50:, :11])
    np.save(tmp_path / "be.npy", a.astype(">u2"))
    assert torch.equal(image(tmp_path / "be.npy")[:, 1:], ref[:, 1:])
    m = np.memmap(tmp_path / "raw.bin", np.uint16, "w+", offset=100, shape=a.shape)
    m[:] = a
    m.flush()
    img = image(m)
    assert type(img.source).__name__ == "RawFileSource"
    assert torch.equal(img[:, :, 60:70, 20:21], ref[:, :, 60:70, 20:21])
    view = m[30:100, 10:80:3, ::-1]                               # a strided view of the memmap
    assert torch.equal(image(view)[:, :, 5:9, 2:20], chw(np.asarray(view))[:, :, 5:9, 2:20])


# --------------------------------------------------------------------------------------- zarr

def test_zarr_array_group_and_directory(tmp_path):
    zarr = pytest.importorskip("zarr")
    a = rng_image((3, 100, 140))
    z = zarr.create_array(store=tmp_path / "chw.zarr", shape=a.shape, chunks=(3, 32, 32),
                          dtype="uint8")
    z[:] = a
    ref = torch.from_numpy(a)[None]
    assert torch.equal(image(z)[:, :, 10:50, 99:], ref[:, :, 10:50, 99:])
    assert torch.equal(image(tmp_path / "chw.zarr", region=(5, 6, 7, 8)).read(),
                       ref[:, :, 5:12, 6:14])
    g = zarr.open_group(tmp_path / "pyr.zarr", mode="w")
    levels = [a, a[:, ::2, ::2]]
    for i, lv in enumerate(levels):
        g.create_array(str(i), shape=lv.shape, chunks=(3, 32, 32), dtype="uint8")[:] = lv
    g.attrs["multiscales"] = [{"axes": [{"name": "c"}, {"name": "y"}, {"name": "x"}],
                               "datasets": [{"path": "0"}, {"path": "1"}]}]
    named = zarr.create_array(store=tmp_path / "named.zarr", shape=(3, 40, 3), dtype="uint8",
                              dimension_names=("y", "x", "c"))   # ambiguous by shape alone
    assert image(named).layout.stored == "HWC"
    for src in (g, tmp_path / "pyr.zarr"):
        img = image(src, level=1)
        assert img.layout.stored == "CHW" and img.shape == (1, 3, 50, 70)
        assert torch.equal(img[:, :, 3:40, 1:2], torch.from_numpy(levels[1])[None, :, 3:40, 1:2])


# ----------------------------------------------------------------------------------- pickling

def check_pickles_by_reference(img):
    img[:, :, :8, :8]                                       # opens the file in this process
    blob = pickle.dumps(img)
    assert len(blob) < 4096, len(blob)                      # no pixels inside
    back = pickle.loads(blob)
    assert back.shape == img.shape and back.region == img.region
    assert torch.equal(back[:, :, 10:40, 5:50], img[:, :, 10:40, 5:50])


def test_files_pickle_by_reference_and_arrays_as_themselves(tmp_path):
    np.save(tmp_path / "a.npy", rng_image((400, 300, 3)))
    check_pickles_by_reference(image(tmp_path / "a.npy", region=(1, 2, 100, 200)))
    m = np.memmap(tmp_path / "m.bin", np.uint8, "w+", shape=(400, 300, 3))
    m[:] = rng_image((400, 300, 3), seed=4)
    check_pickles_by_reference(image(m))
    in_memory = image(rng_image((400, 300, 3)))
    assert len(pickle.dumps(in_memory)) > in_memory.nbytes     # an array pickles as itself


def test_tiff_pickles_by_reference(tiffs):
    check_pickles_by_reference(image(tiffs["rgb"], level=1, region=(3, 4, 50, 60)))


class Rows(torch.utils.data.Dataset):
    """Strips of 16 rows of an image, read in DataLoader workers."""

    def __init__(self, img):
        self.img = img

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.img[:, :, 16 * i:16 * i + 16, :][0]


def test_forked_dataloader_workers_reopen_the_file(tiffs):
    img = image(tiffs["rgb"], level=1)
    img[:, :, :1, :1]                        # the parent has the file open before the fork
    loader = torch.utils.data.DataLoader(Rows(img), batch_size=2, num_workers=2,
                                         multiprocessing_context="fork")
    got = torch.cat([b for batch in loader for b in batch], dim=1)
    assert torch.equal(got, chw(tiffs["levels"][1])[0, :, :128])


# ---------------------------------------------------- a fresh process: pickles, resident memory

PROBE = """
import filecmp, pickle, sys, time, numpy as np, torch
from fxstream.images import image, output
def mib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
for i, blob in enumerate(sys.argv[5:]):                     # images pickled by the parent
    img = pickle.loads(open(blob, "rb").read())
    print(f"pickled{i}_sum", int(img.read().numpy().sum(dtype=np.int64)))
TILES = [(y, x) for y in range(0, 8192, 512) for x in range(0, 8192, 512)]
def sweep(img, tiles):
    return sum(int(img[:, :, y:y + 512, x:x + 512].numpy().sum(dtype=np.int64)) for y, x in tiles)
def report(name, fn):                  # fn over the first 16 tiles, then the other 240
    first = fn(TILES[:16])
    rss16 = mib("VmRSS")
    total = first + fn(TILES[16:])
    print(name + "_rss16", rss16 - base, name + "_rss", mib("VmRSS") - base,
          name + "_hwm", mib("VmHWM") - base)
    return total
path, raw, out, expected = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
shape = (8192, 8192, 4)
t0 = time.perf_counter()
image(np.zeros((8, 8)))[:, :, :1]                          # warm up lazily built state
base = mib("VmRSS")
assert report("npy", lambda t: sweep(image(path), t)) == expected          # a .npy path
m = np.memmap(raw, np.uint8, "r", shape=shape)                                # the user's memmap
assert report("memmap", lambda t: sweep(image(m), t)) == expected
w = output(np.memmap(out, np.uint8, "w+", shape=shape), (1, 4, 8192, 8192), torch.uint8,
           layout="HWC")
def copy(tiles):
    for y, x in tiles:
        w[:, :, y:y + 512, x:x + 512] = image(m)[:, :, y:y + 512, x:x + 512]
    return 0
report("write", copy)
w.close()
assert filecmp.cmp(raw, out, shallow=False)
for y in range(0, 8192, 512):                              # reading through a long-lived map
    m[y:y + 512].sum()
print("control_rss", mib("VmRSS") - base, "base", base, "seconds", round(time.perf_counter() - t0))
"""


@pytest.fixture(scope="module")
def fresh_process(request, tmp_path_factory):
    """Run PROBE once in a new process: it reads images pickled here, then sweeps a 256 MiB
    file tile by tile; returns what it printed as ``{name: int}`` and the parent's sums."""
    d = tmp_path_factory.mktemp("fresh")
    shape = (8192, 8192, 4)                                  # 256 MiB of uint8, HWC
    block = (np.arange(512 * 8192 * 4) % 251).astype(np.uint8).reshape(512, 8192, 4)
    expected = 0
    with open(d / "big.npy", "wb") as npy, open(d / "big.raw", "wb") as raw:
        np.lib.format.write_array_header_1_0(npy, np.lib.format.header_data_from_array_1_0(
            np.empty((0,), np.uint8)) | {"shape": shape})
        for k in range(shape[0] // 512):                     # the same bytes in both files
            rows = block + np.uint8(k)
            expected += int(rows.sum(dtype=np.int64))
            npy.write(rows.data)
            raw.write(rows.data)
    pickled = [image(d / "big.npy", region=(100, 200, 300, 400))]
    try:                                                     # and a slide, where tifffile is
        pickled.append(image(request.getfixturevalue("tiffs")["rgb"], level=1,
                             region=(3, 4, 50, 60)))
    except pytest.skip.Exception:
        pass
    sums = []
    for i, img in enumerate(pickled):
        (d / f"img{i}.pkl").write_bytes(pickle.dumps(img))
        sums.append(int(img.read().numpy().sum(dtype=np.int64)))
    script = d / "probe.py"
    script.write_text(PROBE)
    r = run_here(script, d / "big.npy", d / "big.raw", d / "out.raw", expected,
                 *(d / f"img{i}.pkl" for i in range(len(pickled))))
    assert r.returncode == 0, r.stderr[-3000:]
    words = r.stdout.split()
    return {k: int(v) for k, v in zip(words[::2], words[1::2])}, sums


def test_pickled_images_read_in_a_fresh_process(fresh_process):
    printed, sums = fresh_process
    assert [printed[f"pickled{i}_sum"] for i in range(len(sums))] == sums


def test_resident_memory_stays_bounded_reading_a_256_mib_file(fresh_process):
    mib = fresh_process[0]
    print(mib)
    # a 512² tile of 4 channels is 1 MiB, the file 256 MiB: after 16 tiles resident memory
    # stops growing, and stays far below the file
    for name in ["npy", "memmap", "write"]:
        assert mib[name + "_rss"] - mib[name + "_rss16"] < 8, (name, mib)
        assert mib[name + "_rss"] < 48 and mib[name + "_hwm"] < 64, (name, mib)
    assert mib["control_rss"] > 200, mib       # the probe sees pages a long-lived mapping keeps


# ------------------------------------------------------------------------------------ outputs

def test_output_writers_round_trip(tmp_path):
    full = torch.from_numpy(rng_image((1, 2, 70, 90), np.float32))
    tiles = [(slice(None), slice(None), slice(y, y + 32), slice(x, x + 32))
             for y in range(0, 70, 32) for x in range(0, 90, 32)]
    targets = {
        "tensor NCHW": (torch.zeros(1, 2, 70, 90), None, lambda t: t),
        "array CHW": (np.zeros((2, 70, 90), np.float32), "CHW", lambda a: torch.from_numpy(a)[None]),
        "memmap HWC": (np.memmap(tmp_path / "o.bin", np.float32, "w+", shape=(70, 90, 2)), "HWC",
                       lambda a: chw(np.asarray(a))),
    }
    try:
        import zarr
        targets["zarr HWC"] = (zarr.zeros((70, 90, 2), chunks=(16, 16, 2), dtype="float32"),
                               "HWC", lambda z: chw(z[:]))
    except ImportError:
        pass
    for name, (target, layout, logical) in targets.items():
        with output(target, (1, 2, 70, 90), torch.float32, layout=layout) as w:
            for t in tiles:
                w[t] = full[t].clone().requires_grad_()
        assert torch.equal(logical(target), full), name
    again = np.memmap(tmp_path / "o.bin", np.float32, "r", shape=(70, 90, 2))
    assert torch.equal(chw(np.asarray(again)), full)


def test_output_converts_within_a_kind():
    out = np.zeros((1, 1, 4, 4), np.uint8)
    w = output(out, (1, 1, 4, 4), "uint8")
    w[:, :, :2, :2] = torch.full((1, 1, 2, 2), 7, dtype=torch.int64)
    assert out[0, 0, :2, :2].tolist() == [[7, 7], [7, 7]]
    with pytest.raises(ImageError, match=r"cannot write torch.float32 values into a torch.uint8 "
                                         r"output without changing their kind"):
        w[:, :, :2, :2] = torch.ones(1, 1, 2, 2)
    with pytest.raises(ImageError, match=r"cannot write a tensor of shape \(1, 1, 3, 2\) into "
                                         r"the output region \(1, 1, 2, 2\)"):
        w[:, :, :2, :2] = torch.ones(1, 1, 3, 2, dtype=torch.uint8)


@pytest.mark.parametrize("target,shape,dtype,layout,message", [
    (np.zeros((2, 64, 64), np.float32), (1, 2, 64, 64), torch.float32, None,
     (r"the output ndarray has shape \(2, 64, 64\), expected \(1, 2, 64, 64\) \(logical shape "
      r"\(1, 2, 64, 64\) stored as 'NCHW'\): pass layout= for a target stored otherwise")),
    (np.zeros((64, 64, 3), np.float32), (1, 2, 64, 64), torch.float32, "HWC",
     (r"the output ndarray has shape \(64, 64, 3\), expected \(64, 64, 2\) "
      r"\(logical shape \(1, 2, 64, 64\) stored as 'HWC'\)")),
    (torch.zeros(1, 2, 64, 64), (1, 2, 64, 64), torch.float16, None,
     r"the output Tensor has dtype torch.float32, expected torch.float16"),
    (np.zeros((64, 64, 2), np.float32), (2, 2, 64, 64), torch.float32, "HWC",
     r"layout 'HWC' has no N axis but the output shape \(2, 2, 64, 64\) has N=2"),
    (np.zeros((64, 64, 2), np.float32), (1, 2, 64), torch.float32, "HWC",
     r"layout 'HWC' has 2 spatial axes but the output shape \(1, 2, 64\) has 1"),
    (np.broadcast_to(np.zeros((4, 4), np.float32), (1, 1, 4, 4)), (1, 1, 4, 4), torch.float32,
     None, r"the output ndarray is read-only"),
    ([[0.0]], (1, 1, 1, 1), torch.float32, None, r"cannot write an output into a list"),
    (np.zeros((1, 1, 4, 4)), (1, 1), torch.float32, None,
     r"an output's logical shape is \(N, C, \*spatial\) with 1-3 spatial axes"),
])
def test_output_errors(target, shape, dtype, layout, message):
    with pytest.raises(ImageError, match=message):
        output(target, shape, dtype, layout=layout)


# ------------------------------------------------------------------------------------- errors

def test_errors_are_fxstream_errors():
    assert issubclass(ImageError, FxStreamError)


def test_path_errors(tmp_path):
    with pytest.raises(ImageError, match=r"image '.*nope.tif' does not exist"):
        image(tmp_path / "nope.tif")
    (tmp_path / "notes.txt").write_text("not an image")
    pytest.importorskip("tifffile")
    with pytest.raises(ImageError, match=r"'.*notes.txt' is not an image fxstream can read "
                                         r"\(tifffile: .*\); it reads TIFF/SVS/NDPI slides"):
        image(tmp_path / "notes.txt")
    (tmp_path / "dir").mkdir()
    pytest.importorskip("zarr")
    with pytest.raises(ImageError, match=r"'.*dir' is a directory but not a zarr array or group"):
        image(tmp_path / "dir")
    np.save(tmp_path / "objects.npy", np.array([{}, None], dtype=object))
    with pytest.raises(ImageError, match=r"'.*objects.npy' is not a readable .npy array"):
        image(tmp_path / "objects.npy")


def test_missing_optional_library_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "slide.svs").write_bytes(b"II*\x00")
    (tmp_path / "a.zarr").mkdir()
    monkeypatch.setitem(sys.modules, "tifffile", None)          # importing them now fails
    monkeypatch.setitem(sys.modules, "zarr", None)
    with pytest.raises(ImageError, match=r"reading '.*slide.svs' needs the optional library "
                                         r"'tifffile', which is not installed: " + SLIDES):
        image(tmp_path / "slide.svs")
    with pytest.raises(ImageError, match=r"reading the directory '.*a.zarr' needs the optional "
                                         r"library 'zarr'"):
        image(tmp_path / "a.zarr")


def test_layout_errors():
    a = np.zeros((32, 48, 3), np.uint8)
    cases = [
        ("CHWN", r"layout 'CHWN' has 4 axes but array has 3 \(shape \(32, 48, 3\)\)"),
        ("HWX", r"layout 'HWX' has unknown axis letters 'X'"),
        ("HHC", r"layout 'HHC' names an axis twice"),
        ("HDC", r"layout 'HDC' needs the spatial axes L \(1-D\), HW \(2-D\) or DHW \(3-D\)"),
        (3, r"layout= must be a string of axis letters"),
    ]
    for layout, message in cases:
        with pytest.raises(ImageError, match=message):
            image(a, layout=layout)


def test_layout_must_agree_with_the_axes_a_tiff_declares(tiffs):
    with pytest.raises(ImageError, match=r"layout 'CHW' puts channels on axis 0 \(size 300\), but "
                                         r"'.*rgb.tif' stores 3 channels on axis 2 \(its axes are "
                                         r"'HWC'\): pass layout='HWC'"):
        image(tiffs["rgb"], layout="CHW")
    with pytest.raises(ImageError, match=r"layout 'WHC' does not match the axes 'HWC' that "
                                         r"'.*rgb.tif' declares"):
        image(tiffs["rgb"], layout="WHC")
    assert image(tiffs["rgb"], layout="hwc").shape == (1, 3, 300, 420)


def test_level_and_region_errors(tiffs):
    with pytest.raises(ImageError, match=r"level 3 does not exist in '.*rgb.tif': its levels are "
                                         r"0 \(300, 420, 3\), 1 \(150, 210, 3\), 2 \(75, 105, 3\)"):
        image(tiffs["rgb"], level=3)
    with pytest.raises(ImageError, match=r"region \(100, 0, 60, 10\) \(h0, w0, h, w\) is outside "
                                         r"level 1 of '.*rgb.tif', which is 150x210 \(H x W\)"):
        image(tiffs["rgb"], level=1, region=(100, 0, 60, 10))
    with pytest.raises(ImageError, match=r"region= of a 2-D image is 4 integers \(h0, w0, h, w\); "
                                         r"got \(1, 2\)"):
        image(tiffs["rgb"], region=(1, 2))


def test_index_and_source_errors():
    with pytest.raises(ImageError, match=r"level 1 does not exist in an array: its levels are "
                                         r"0 \(8, 8\)"):
        image(np.zeros((8, 8)), level=1)
    with pytest.raises(ImageError, match=r"region \(0, 0, 0, 4\) \(h0, w0, h, w\) is outside "
                                         r"level 0 of array"):
        image(np.zeros((8, 8)), region=(0, 0, 0, 4))            # empty regions are refused too
    img = image(np.zeros((8, 8), np.uint8))
    with pytest.raises(ImageError, match=r"image slices have step 1; got slice\(None, None, 2\)"):
        img[:, :, ::2]
    with pytest.raises(ImageError, match=r"an image index is a tuple of at most 4 slices"):
        img[0]
    with pytest.raises(ImageError, match=r"cannot read an image from a list: pass a path"):
        image([[1, 2], [3, 4]])
    with pytest.raises(ImageError, match=r"array has dtype <U1, which torch cannot hold"):
        image(np.array([["a", "b"], ["c", "d"]]))


def test_damaged_tiff_fails_on_read_with_the_reason(tiffs, tmp_path):
    damaged = tmp_path / "damaged.tif"
    damaged.write_bytes(tiffs["rgb"].read_bytes())
    img = image(damaged)                                     # the header is still whole
    with open(damaged, "r+b") as f:
        f.truncate(damaged.stat().st_size // 3)
    with pytest.raises(ImageError, match=r"cannot read '.*damaged.tif' level 0 \(.*\); a damaged "
                                         r"file, or a missing codec: " + SLIDES):
        img[:, :, 250:, 400:]


def test_zarr_group_without_levels(tmp_path):
    zarr = pytest.importorskip("zarr")
    g = zarr.open_group(tmp_path / "g.zarr", mode="w")
    g.create_array("image", shape=(8, 8), dtype="uint8")
    with pytest.raises(ImageError, match=r"the zarr group .* holds no pyramid levels"):
        image(g)


# ------------------------------------------------------------------------------- the example

def test_make_slides_writes_a_readable_pyramid(tmp_path):
    pytest.importorskip("tifffile")
    spec = importlib.util.spec_from_file_location("make_slides", ROOT / "examples/make_slides.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--size", "1024x768", "--tile", "256", "--count", "2", "--lesions", "2",
              "--out", str(tmp_path), "--seed", "5"])
    manifest = json.loads((tmp_path / "slides.json").read_text())
    assert [d["label"] for d in manifest] == [1, 0]
    assert len(manifest[0]["lesions"]) == 2 and manifest[1]["lesions"] == []
    img = image(tmp_path / "slide_000.tif")
    assert img.shape == (1, 3, 1024, 768) and img.layout.stored == "HWC"
    top = image(tmp_path / "slide_000.tif", level=len(manifest[0]["levels"]) - 1)
    assert max(top.shape[2:]) <= 256
    les = manifest[0]["lesions"][0]
    y, x = int(les["y"]), int(les["x"])
    patch = img[:, :, y - 4:y + 4, x - 4:x + 4].float()
    blue_over_red = (patch[:, 2] - patch[:, 0]).mean()
    assert blue_over_red > 0, "a lesion is bluer than the pink tissue around it"
