"""Segment a whole slide with a small U-Net into a zarr array, tile by tile, and draw thumbnails.

Writes a synthetic H&E-like pyramid TIFF slide (``make_slides.py``) unless ``--image`` names
one, fits a small U-Net for a few steps to a tissue mask (dark pixels) on random crops of a
reduced level, then runs it over the chosen level with ``streamed.infer(fxstream.image(...),
out=zarr_array)``: tiles are read from the TIFF and their outputs written into the zarr array,
so neither the slide nor the prediction is ever whole in memory. Thumbnails of the slide and of
the predicted tissue probability go to PNGs (read from the pyramid's smallest level and from the
zarr array in strips).

    python examples/segment_slide.py                               # a 2048² slide, a minute
    python examples/segment_slide.py --image slide.tif --budget 3GiB --out pred.zarr
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import fxstream  # noqa: E402
from gigapixel_check import SmallUNet  # noqa: E402
from make_slides import make_slide  # noqa: E402


def tissue(x: torch.Tensor) -> torch.Tensor:
    """The target: pixels darker than glass (mean intensity below 215)."""
    return (x.float().mean(1, keepdim=True) < 215).float()


def fit(net: nn.Module, img, steps: int, crop: int = 128, seed: int = 0) -> float:
    """A few Adam steps on random crops of ``img`` (read lazily) towards :func:`tissue`."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    _, _, h, w = img.shape
    loss = torch.tensor(0.0)
    for _ in range(steps):
        y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        patch = img[:, :, y:y + crop, x:x + crop]
        loss = nn.functional.binary_cross_entropy_with_logits(net(patch), tissue(patch))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def thumbnail_of_output(z, size: int) -> np.ndarray:
    """A ``size``-pixel-wide thumbnail of channel 0 of a ``(C, H, W)`` zarr array, read in
    strips of its chunk rows (never whole)."""
    _, h, w = z.shape
    step = max(1, w // size)
    rows = z.chunks[1]
    strips = [z[0, y:min(h, y + rows), ::step][::step] for y in range(0, h, rows)]
    return np.concatenate(strips)


def level_count(path) -> int:
    """How many pyramid levels the slide has (1 for a file without a pyramid)."""
    return len(getattr(fxstream.image(path).source, "levels", [None]))


def save_png(array: np.ndarray, path: str) -> None:
    from PIL import Image as PILImage

    PILImage.fromarray(array).save(path)
    print(f"wrote {path} {array.shape}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", help="a slide (default: write a synthetic one)")
    p.add_argument("--size", type=int, default=2048, help="synthetic slide size (2048)")
    p.add_argument("--level", type=int, default=0, help="pyramid level to segment")
    p.add_argument("--out", default="segment_slide.zarr", help="zarr output (C, H, W)")
    p.add_argument("--budget", default="auto", help="memory budget, e.g. 3GiB")
    p.add_argument("--tile", type=int, help="tile size (instead of --budget)")
    p.add_argument("--steps", type=int, default=60, help="fitting steps (default 60)")
    p.add_argument("--thumbnail", type=int, default=512, help="thumbnail width (512)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    import zarr

    path = args.image
    if path is None:
        path = str(Path(args.out).with_suffix(".tif"))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        make_slide(path, args.size, tile=256, lesions=2, seed=1)
        print(f"wrote {path}: {args.size}²")
    torch.manual_seed(0)
    net = SmallUNet(classes=1)
    n_levels = level_count(path)
    coarse = fxstream.image(path, level=min(args.level + 1, n_levels - 1))
    print(f"fitted to the tissue mask on {coarse!r}: loss {fit(net, coarse, args.steps):.3f}")

    img = fxstream.image(path, level=args.level)
    streamed = fxstream.compile(net.eval(), tile_size=args.tile,
                                memory_budget=None if args.tile else args.budget,
                                progress=not args.no_progress)
    shape, _ = streamed.dense_output(img)
    out = zarr.open_array(args.out, mode="w", shape=shape[1:], dtype="float32",
                          chunks=(shape[1], 1024, 1024))
    start = time.perf_counter()
    streamed.infer(img, out, layout="CHW")
    print(f"segmented {img!r} into {args.out} {out.shape} in {time.perf_counter() - start:.1f} s "
          f"({[e.spec.num_tiles for e in streamed.engines]} tiles)")

    thumb = fxstream.image(path, level=n_levels - 1).read()[0].permute(1, 2, 0).numpy()
    stem = str(Path(args.out).with_suffix(""))
    save_png(thumb, f"{stem}_slide.png")
    logits = thumbnail_of_output(out, args.thumbnail)
    save_png((255 / (1 + np.exp(-logits))).astype(np.uint8), f"{stem}_tissue.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
