"""``fxstream infer``: run a fully convolutional model over a slide (or a level or region of it),
reading the image tile by tile and writing the dense output tile by tile into a ``.zarr`` array
or ``.npy`` file, so that neither is ever whole in memory.

    fxstream infer models/unet.py:build --image slide.tif --level 1 --out pred.zarr --budget 4GiB

The output is stored ``(C, H, W)`` (the batch axis of one image left out), float32 unless
``--out-dtype`` says otherwise. The model gets the image in its stored dtype (uint8 for most
slides); ``--scale 255`` divides it into float32 ``[0, 1]`` first for models that expect that.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import SpecError

SUFFIXES = (".zarr", ".npy")


def parse_region(text: str) -> tuple[int, ...]:
    """``"y,x,h,w"`` (or ``"z,y,x,d,h,w"``) as integers.

    Example:
        >>> parse_region("0, 512,1024,1024")
        (0, 512, 1024, 1024)
    """
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (2, 4, 6):
        raise SpecError(f"bad --region {text!r}: expected starts then lengths, e.g. "
                        f"y,x,h,w = 0,0,4096,4096")
    return values


def open_target(path: str, shape, dtype: str, overwrite: bool, chunk: int):
    """A new ``(C, *spatial)`` array at ``path`` (``.zarr`` directory or ``.npy`` file)."""
    import numpy as np

    stored = tuple(shape[1:])
    if not path.endswith(SUFFIXES):
        raise SpecError(f"--out {path!r}: expected a .zarr directory or a .npy file")
    if os.path.exists(path) and not overwrite:
        raise SpecError(f"--out {path!r} exists: pass --overwrite to replace it")
    try:
        np_dtype = np.dtype(dtype)
    except TypeError as e:
        raise SpecError(f"bad --out-dtype {dtype!r}: expected a numpy dtype such as float32, "
                        f"float16 or uint8") from e
    if path.endswith(".npy"):
        return np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=stored)
    from .images.errors import require

    zarr = require("zarr", "writing a .zarr output")
    chunks = (stored[0],) + tuple(min(chunk, n) for n in stored[1:])
    return zarr.open_array(path, mode="w", shape=stored, dtype=np_dtype, chunks=chunks)


def scaled(model, scale: float):
    """``model`` on ``x.float() / scale``: the conversion becomes part of the streamed stem."""
    import torch.nn as nn

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x.float() / scale)

    return Scaled()


def cmd_infer(args: argparse.Namespace) -> int:
    """Run ``fxstream infer``; returns the exit status."""
    from rich.console import Console

    from .images import image
    from .spec import load_model, parse_tile
    from .streaming import compile as compile_model

    err = Console(stderr=True, highlight=False)
    region = parse_region(args.region) if args.region else None
    tile = parse_tile(args.tile) if args.tile is not None else None
    img = image(args.image, layout=args.layout, level=args.level, region=region)
    model = load_model(args.spec).eval()
    if args.scale:
        model = scaled(model, args.scale)
    model = model.to(args.device)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    sm = compile_model(model, tile_size=tile, leaf_modules=tuple(args.leaf),
                       memory_budget=args.budget or ("auto" if tile is None else None),
                       progress=progress)
    shape, _ = sm.dense_output(img)
    if shape[0] != 1:
        raise SpecError(f"the image has {shape[0]} batch items: fxstream infer writes one")
    out = open_target(args.out, shape, args.out_dtype, args.overwrite, args.chunk)
    plan = sm.last_plan
    err.print(f"{img!r}\n  -> {args.out} {tuple(shape[1:])} {args.out_dtype}: "
              f"{len(plan.passes)} pass(es), {[p.num_tiles for p in plan.passes]} tiles of "
              f"{[list(p.tile_size) for p in plan.passes]}")
    start = time.perf_counter()
    sm.infer(img, out, layout="C" + "DHW"[-(len(shape) - 2):])
    if hasattr(out, "flush"):
        out.flush()
    err.print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def add_infer(subparsers) -> None:
    """Register ``fxstream infer``."""
    p = subparsers.add_parser(
        "infer", help="run a fully convolutional model over a slide into a .zarr/.npy output",
        description="Read the image tile by tile (a TIFF-like slide, .zarr or .npy; a pyramid "
                    "level, a region), run the model (in eval mode, without gradients) and "
                    "write its dense output tile by tile, stored (C, H, W). The model must be "
                    "fully convolutional: its output is a map of its streamed stem.")
    p.add_argument("spec", metavar="SPEC",
                   help="model SPEC: 'package.module:callable', 'path/to/model.py:callable' or "
                        "'timm:NAME'; no weights are downloaded")
    p.add_argument("--image", required=True, help="slide (.tif, .svs, ...), .zarr or .npy")
    p.add_argument("--level", type=int, help="pyramid level (default 0, full resolution)")
    p.add_argument("--region", metavar="Y,X,H,W",
                   help="box of that level to read: starts then lengths, e.g. 0,0,4096,4096")
    p.add_argument("--layout", help="the image's stored axes when the file does not say "
                                    "(e.g. HWC, CHW)")
    p.add_argument("--out", required=True, help="output: a new .zarr directory or .npy file")
    p.add_argument("--out-dtype", default="float32", help="output dtype (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--chunk", type=int, default=1024,
                   help="zarr chunk edge in pixels (default 1024)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tile", metavar="SIZE",
                      help="largest input tile: one size (2048) or one per axis (2048x1024)")
    size.add_argument("--budget", metavar="BYTES",
                      help="choose tiles (and cuts) under this peak memory, e.g. 4GiB "
                           "(default: fxstream.compile's 'auto')")
    p.add_argument("--scale", type=float, metavar="DIV",
                   help="feed the model x.float() / DIV (e.g. 255) instead of the stored dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--leaf", action="append", default=[], metavar="QUALNAME",
                   help="keep this submodule as one call when tracing (repeatable)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")
    p.set_defaults(run=cmd_infer)


__all__ = ["add_infer", "cmd_infer", "open_target", "parse_region"]
