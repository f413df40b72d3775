"""Writable outputs: :func:`output` checks a user's zarr array, memmap, array or tensor against a
dense prediction's logical shape and dtype, and returns a :class:`Writer` of its tiles."""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

from .errors import ImageError
from .inputs import box_of
from .layout import SPATIAL, Layout, parse_layout
from .sources import RawFileSource, memmap_source, torch_dtype


def as_torch_dtype(dtype) -> torch.dtype:
    """A torch dtype from a torch dtype, numpy dtype or name (``"uint8"``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return torch_dtype(np.dtype(dtype), "the output")
    except TypeError as e:
        raise ImageError(f"dtype= must be a torch or numpy dtype, not {dtype!r}") from e


class Writer:
    """Writes regions of a dense output: ``writer[index] = tensor`` with ``index`` a tuple of
    step-1 slices in logical ``(N, C, *spatial)`` order; made by :func:`output`."""

    def __init__(self, target, layout: Layout, shape: tuple[int, ...], dtype: torch.dtype):
        self.target, self.layout, self.shape, self.dtype = target, layout, shape, dtype
        self._raw = None
        if isinstance(target, np.memmap):
            source = memmap_source(target, "the output")
            self._raw = source if isinstance(source, RawFileSource) else None

    def __setitem__(self, index, value) -> None:
        box = box_of(index, self.shape)
        lens = tuple(b - a for a, b in box)
        value = torch.as_tensor(value).detach()
        if tuple(value.shape) != lens:
            raise ImageError(f"cannot write a tensor of shape {tuple(value.shape)} into the "
                             f"output region {lens} (index {index!r}, logical (N, C, *spatial))")
        if not torch.can_cast(value.dtype, self.dtype):
            raise ImageError(f"cannot write {value.dtype} values into a {self.dtype} output "
                             f"without changing their kind: convert them first (e.g. round)")
        where = dict(zip(self.layout.logical, box))
        stored = tuple(slice(*where[a]) for a in self.layout.stored)
        present = tuple(n for a, n in zip(self.layout.logical, lens) if a in self.layout.stored)
        value = value.reshape(present).permute(self.layout.to_stored())
        if isinstance(self.target, torch.Tensor):
            with torch.no_grad():
                self.target[stored] = value.to(self.target.device, self.dtype)
            return
        array = value.to("cpu", self.dtype).numpy()
        if self._raw is not None:
            self._raw.write(stored, array)
        else:
            self.target[stored] = array

    def close(self) -> None:
        """Flush what was written to its file (for a file-backed memmap)."""
        if self._raw is not None:
            with open(self._raw.path, "r+b") as f:
                os.fsync(f.fileno())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"Writer({type(self.target).__name__}, layout={self.layout.stored!r}, "
                f"shape={self.shape}, dtype={self.dtype})")


def output(target, shape, dtype, layout: str | None = None) -> Writer:
    """Check that ``target`` can hold a dense output of logical ``shape`` and ``dtype``, and
    return a :class:`Writer` of its regions.

    Args:
        target: a ``zarr.Array``, ``numpy.memmap`` (written through short-lived mappings of its
            file, so written pages do not stay resident), writable ``numpy.ndarray`` or
            ``torch.Tensor``.
        shape: the logical shape ``(N, C, *spatial)`` of the output.
        dtype: its dtype (torch, numpy or a name); ``target`` must have exactly this dtype.
        layout: how ``target`` stores its axes, e.g. ``"HWC"`` or ``"CHW"`` (then N, and C when
            left out, must be 1); by default the logical order itself.

    Returns:
        A :class:`Writer`: ``writer[index] = tensor`` converts the tensor (values of the same
        kind: float into float, int into int or float) and writes its region; ``close()``
        flushes (it is also a context manager).

    Example:
        >>> import numpy as np, torch
        >>> out = np.zeros((64, 64, 2), np.float32)
        >>> w = output(out, (1, 2, 64, 64), torch.float32, layout="HWC")
        >>> w[:, :, 0:32, 0:32] = torch.ones(1, 2, 32, 32)
        >>> float(out.sum())
        2048.0
    """
    shape = tuple(int(s) for s in shape)
    dtype = as_torch_dtype(dtype)
    if len(shape) not in (3, 4, 5):
        raise ImageError(f"an output's logical shape is (N, C, *spatial) with 1-3 spatial axes; "
                         f"got {shape}")
    zarr = sys.modules.get("zarr")
    kinds = (torch.Tensor, np.ndarray) + ((zarr.Array,) if zarr is not None else ())
    if not isinstance(target, kinds):
        raise ImageError(f"cannot write an output into a {type(target).__name__}: pass a zarr "
                         f"array, numpy memmap or array, or torch tensor")
    what = f"the output {type(target).__name__}"
    actual_shape = tuple(target.shape)
    lay = (Layout("NC" + SPATIAL[len(shape) - 3]) if layout is None
           else parse_layout(layout, actual_shape, what))
    if len(lay.spatial) != len(shape) - 2:
        raise ImageError(f"layout {lay.stored!r} has {len(lay.spatial)} spatial axes but the "
                         f"output shape {shape} has {len(shape) - 2}")
    for a, n in zip("NC", shape):
        if a not in lay.stored and n != 1:
            raise ImageError(f"layout {lay.stored!r} has no {a} axis but the output shape "
                             f"{shape} has {a}={n}")
    expected = lay.stored_shape(shape)
    if actual_shape != expected:
        hint = (": pass layout= for a target stored otherwise, e.g. 'CHW' or 'HWC'"
                if layout is None and len(actual_shape) != len(expected) else "")
        raise ImageError(f"{what} has shape {actual_shape}, expected {expected} (logical shape "
                         f"{shape} stored as {lay.stored!r}){hint}")
    actual = (target.dtype if isinstance(target, torch.Tensor)
              else torch_dtype(np.dtype(target.dtype), what))
    if actual != dtype:
        raise ImageError(f"{what} has dtype {actual}, expected {dtype}")
    if ((isinstance(target, np.ndarray) and not target.flags.writeable)
            or getattr(target, "read_only", False)):
        raise ImageError(f"{what} is read-only: open it for writing (mode 'r+' or 'w')")
    return Writer(target, lay, shape, dtype)
