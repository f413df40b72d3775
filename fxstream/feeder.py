"""Each tile's input on the stem's device, and the device settings of the tile loops.

On the CPU, or when the image already lives on the stem's device, a tile is a view of its slice
when the stem only reads its input (``passes.only_read``), else a copy (an in-place first op
must not write into the image or a stored map that other tiles read). For a host image and a
CUDA stem the next tile is fetched while the current one computes: its slice is gathered into
pinned host memory and copied on a side stream, and the compute stream waits on that copy's
event only when it needs the tile.

The source may also be a lazily read :class:`~fxstream.images.Image` (a slide, zarr array or
memmap): each tile's region is read from it when the tile is needed, as a fresh tensor of the
stored dtype, and only that region is ever in memory.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .images import Image


def is_lazy(x) -> bool:
    """Whether ``x`` is a lazily read image (tiles are read from it, never viewed)."""
    return isinstance(x, Image)


def tile_format(x):
    """``torch.channels_last`` for a 4-d tensor stored channels-last, else contiguous format:
    tiles follow the layout of the image (so a channels-last model gets channels-last tiles), and
    stored maps that of the tile outputs."""
    if is_lazy(x):
        return torch.contiguous_format
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def iter_tiles(x: torch.Tensor, tiles, device: torch.device, fmt=torch.contiguous_format,
               copy: bool = True) -> Iterator[tuple[object, torch.Tensor]]:
    """Yield ``(tile, input)`` for every tile: the input on ``device`` in ``fmt``, a fresh
    tensor, or with ``copy=False`` a view of ``x`` (in ``x``'s layout) where ``x`` is already
    on ``device``. A lazy image's tiles are always read afresh."""
    if device.type == "cuda" and (is_lazy(x) or x.device.type == "cpu"):
        yield from _prefetched(x, tiles, device, fmt)
        return
    for tile in tiles:
        if is_lazy(x):
            yield tile, read_tile(x, tile, device, fmt)
        elif not copy and x.device == device:
            yield tile, x[tile.region]
        else:
            yield tile, copy_tile(x, tile, device, fmt)


def copy_tile(x: torch.Tensor, tile, device: torch.device, fmt=torch.contiguous_format):
    """A fresh (differentiable) copy of one tile's slice of ``x`` on ``device`` in ``fmt``."""
    if is_lazy(x):
        return read_tile(x, tile, device, fmt)
    return x[tile.region].to(device, copy=True).contiguous(memory_format=fmt)


def read_tile(image: Image, tile, device: torch.device, fmt=torch.contiguous_format):
    """One tile's region read from a lazy image (a fresh host tensor) and moved to ``device``."""
    return image.read(tile.region).to(device).contiguous(memory_format=fmt)


def _gather(x, region):
    """A tile's slice of ``x``: a view of a tensor, or the region read from a lazy image."""
    return x.read(region) if is_lazy(x) else x[region]


def _prefetched(x, tiles, device, fmt):
    side = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)

    def fetch(tile):
        src = _gather(x, tile.region)
        # pinned: the host->device copy is asynchronous; the caching host allocator keeps the
        # buffer until that copy has finished, even after it is dropped here
        # on the host whatever torch's default device is (pinning applies to CPU tensors only)
        staged = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=True,
                             memory_format=fmt)
        staged.copy_(src)
        with torch.cuda.stream(side):
            out = staged.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        return out, done

    upcoming = fetch(tiles[0]) if tiles else None
    for i, tile in enumerate(tiles):
        out, done = upcoming
        if i + 1 < len(tiles):  # queue the next copy before this tile's kernels
            upcoming = fetch(tiles[i + 1])
        compute.wait_event(done)
        out.record_stream(compute)  # allocated on the side stream, used and freed on this one
        yield tile, out


@contextlib.contextmanager
def device_settings(device: torch.device, benchmark: bool = False):
    """With ``benchmark``, cuDNN autotuning in the tile loops: tiles repeat a few shapes, so each
    shape is tuned once and reused. The flag is restored after; the user's other cuDNN flags are
    kept; nothing changes on the CPU."""
    if device.type != "cuda" or not benchmark:
        yield
        return
    cudnn = torch.backends.cudnn
    before = cudnn.benchmark
    cudnn.benchmark = True
    try:
        yield
    finally:
        cudnn.benchmark = before


__all__ = ["copy_tile", "device_settings", "is_lazy", "iter_tiles", "read_tile", "tile_format"]
