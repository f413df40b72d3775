"""Scale runs of lazy inputs and dense outputs: one step or one inference on images far larger than
memory, read tile by tile from a tiled uint8 TIFF, each run in this (fresh) process, reporting
its time and peak resident memory (VmHWM) as one JSON line.

    python examples/gigapixel_check.py write --size 65536 --out /tmp/g/65k.tif
    python examples/gigapixel_check.py strided --image /tmp/g/65k.tif --budget 2.5GiB
    python examples/gigapixel_check.py resnet18 --image /tmp/g/16k.tif --budget 3GiB
    python examples/gigapixel_check.py unet --image /tmp/g/32k.tif --out /tmp/g/pred.zarr \\
        --budget 2.5GiB --check-region 4096

``write`` makes a synthetic RGB slide fast and in bounded memory: uncompressed 512² tiles, each
a fixed random block mixed with its tile coordinates (no JPEG: writing a 65,536² slide with
``make_slides.py`` takes about half an hour of CPU). These are checks to run by hand, not tests.

Measured 2026-12-02 on the shared 2-core CPU machine (load average 5-9 from other work, so
times are several times what an idle machine gives; peak RSS is VmHWM of the run's process,
torch/zarr/tifffile imports included, about 0.68 GiB before the model runs):

- strided CNN, one training step, 65,536² uint8 RGB (12.9 GB uncompressed TIFF), budget 2.5GiB:
  484 tiles of 3072², no cuts; 3631 s (forward 1552 s; 691 s user + 758 s system CPU); peak
  RSS 1.83 GiB. At 16,384²: 180 s, 2.02 GiB (cut after features_5, 25 tiles of 4096²).
- ResNet-18 (frozen BatchNorm, ImageNet normalisation in the stem), one training step, budget
  3GiB: at 4096², 424 s, peak RSS 2.35 GiB (estimated 2.52 GiB; cuts after layer2.0 and
  layer3.0's ReLUs, 9 tiles of 1536²). At 16,384² (measured later, load 2-4): 729 tiles of
  1024², no cuts, 5040 s, peak RSS 1.82 GiB (estimated 2.26 GiB).
- small U-Net inference into zarr (float32, 1024² chunks), budget 2.5GiB: at 16,384², 121 tiles,
  362 s, peak RSS 1.88 GiB during inference; the central 4096² region equal (max abs diff 0.0)
  to the in-memory streamed output of that region with a 64-pixel margin. At 8192²: 284 s,
  1.45 GiB, region equal. At 32,768² (measured later): 1156 tiles, 1254 s, peak RSS 1.30 GiB,
  the central 4096² region equal.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fxstream  # noqa: E402
from train_slides import Normalized  # noqa: E402  (this directory is on sys.path when run)


def peak_rss() -> int:
    """The process's peak resident memory in bytes (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def gib(n: int) -> float:
    return round(n / 2**30, 3)


# ----------------------------------------------------------------------------- synthetic slide

def write_slide(path, size: int, tile: int = 512, seed: int = 0) -> None:
    """An uncompressed tiled RGB uint8 BigTIFF of ``size``², one tile in memory at a time."""
    import tifffile

    rng = np.random.default_rng(seed)
    block = rng.integers(0, 256, (tile, tile, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:tile, 0:tile]
    wave = ((np.sin(yy / 37.0) + np.cos(xx / 23.0)) * 40).astype(np.int16)[..., None]
    n = -(-size // tile)

    def tiles():
        for ty in range(n):
            for tx in range(n):
                shift = (ty * 7 + tx * 13) % 256
                t = (block.astype(np.int16) // 2 + wave + shift) % 256
                yield t.astype(np.uint8)

    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile),
                  photometric="rgb", compression=None, metadata=None)


# ------------------------------------------------------------------------------------ models

class StridedCNN(nn.Module):
    """Five stride-2 convolutions on uint8 RGB, global average pool, linear head."""

    def __init__(self, widths=(8, 16, 16, 32, 32), classes: int = 2):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = x.float() / 255
        return self.fc(self.features(x).mean((2, 3)))


class SmallUNet(nn.Module):
    """A three-level U-Net on uint8 RGB (one convolution per stage), ``classes`` logit maps."""

    def __init__(self, classes: int = 1, w=(8, 16, 16)):
        super().__init__()
        act = nn.ReLU
        self.enc1 = nn.Sequential(nn.Conv2d(3, w[0], 3, padding=1), act())
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(w[0], w[1], 3, padding=1), act())
        self.enc3 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(w[1], w[2], 3, padding=1), act())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec2 = nn.Sequential(nn.Conv2d(w[2] + w[1], w[1], 3, padding=1), act())
        self.dec1 = nn.Sequential(nn.Conv2d(w[1] + w[0], w[0], 3, padding=1), act())
        self.head = nn.Conv2d(w[0], classes, 1)

    def forward(self, x):
        e1 = self.enc1(x.float() / 255)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([self.up(e3), e2], 1))
        d1 = self.dec1(torch.cat([self.up(d2), e1], 1))
        return self.head(d1)


# -------------------------------------------------------------------------------------- runs

def compile_args(args) -> dict:
    if args.tile:
        return {"tile_size": args.tile, "memory_budget": None}
    return {"memory_budget": args.budget}


def train_step(model, args) -> dict:
    """One training step (forward, cross-entropy, backward, SGD) on the lazy image."""
    img = fxstream.image(args.image)
    sm = fxstream.compile(model, progress=args.progress, **compile_args(args))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = peak_rss()
    t0 = time.perf_counter()
    loss = nn.functional.cross_entropy(sm(img), torch.tensor([1]))
    t1 = time.perf_counter()
    loss.backward()
    opt.step()
    t2 = time.perf_counter()
    plan = sm.last_plan
    return {"image": str(args.image), "shape": list(img.shape), "dtype": str(img.dtype),
            "loss": float(loss.detach()), "forward_s": round(t1 - t0, 1), "step_s": round(t2 - t0, 1),
            "rss_before_gib": gib(before), "peak_rss_gib": gib(peak_rss()),
            "budget": args.budget if not args.tile else None,
            "plan": {"cuts": list(plan.cuts), "tiles": [p.num_tiles for p in plan.passes],
                     "tile_size": [list(p.tile_size) for p in plan.passes],
                     "estimated_peak_gib": gib(plan.estimate.peak) if plan.estimate else None}}


def run_strided(args) -> dict:
    torch.manual_seed(0)
    return train_step(StridedCNN(), args)


def run_resnet18(args) -> dict:
    import torchvision

    torch.manual_seed(0)
    net = fxstream.freeze_batchnorm(torchvision.models.resnet18(num_classes=2))
    return train_step(Normalized(net), args)


def run_unet(args) -> dict:
    """Inference into a zarr array; then the output of a region checked against the in-memory
    streamed output of that region with a margin (cropped: the margin's border effects)."""
    import zarr

    torch.manual_seed(0)
    net = SmallUNet().eval()
    img = fxstream.image(args.image)
    sm = fxstream.compile(net, progress=args.progress, **compile_args(args))
    shape, dtype = sm.dense_output(img)
    n, c, h, w = shape
    out = zarr.open_array(args.out, mode="w", shape=(c, h, w), dtype="float32",
                          chunks=(c, 1024, 1024))
    before = peak_rss()
    t0 = time.perf_counter()
    sm.infer(img, out, layout="CHW")
    elapsed = time.perf_counter() - t0
    peak = peak_rss()
    result = {"image": str(args.image), "shape": list(img.shape), "out": str(args.out),
              "infer_s": round(elapsed, 1), "rss_before_gib": gib(before),
              "peak_rss_gib": gib(peak), "budget": args.budget if not args.tile else None,
              "tiles": [p.num_tiles for p in sm.last_plan.passes]}
    if args.check_region:
        r, margin = args.check_region, 64
        y0 = x0 = (min(h, w) // 2 - r // 2) // 4 * 4
        region = fxstream.image(args.image, region=(y0 - margin, x0 - margin, r + 2 * margin,
                                                    r + 2 * margin))
        in_memory = fxstream.compile(net, tile_size=2048, memory_budget=None)
        ref = in_memory.infer(region.read())[0, :, margin:-margin, margin:-margin]
        got = torch.from_numpy(out[:, y0:y0 + r, x0:x0 + r])
        result["check"] = {"region": [y0, x0, r, r],
                           "max_abs_diff": float((got - ref).abs().max()),
                           "max_abs": float(ref.abs().max())}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write a synthetic uncompressed tiled RGB TIFF")
    w.add_argument("--size", type=int, required=True)
    w.add_argument("--out", required=True)
    for name in ("strided", "resnet18", "unet"):
        r = sub.add_parser(name)
        r.add_argument("--image", required=True)
        r.add_argument("--budget", default="3GiB")
        r.add_argument("--tile", type=int)
        r.add_argument("--progress", action="store_true")
        if name == "unet":
            r.add_argument("--out", required=True)
            r.add_argument("--check-region", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
    if args.cmd == "write":
        t0 = time.perf_counter()
        write_slide(args.out, args.size)
        result = {"wrote": args.out, "size": args.size, "bytes": os.path.getsize(args.out),
                  "s": round(time.perf_counter() - t0, 1), "peak_rss_gib": gib(peak_rss())}
    else:
        result = {"strided": run_strided, "resnet18": run_resnet18, "unet": run_unet}[
            args.cmd](args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
