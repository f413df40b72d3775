"""Readers behind an :class:`~fxstream.images.Image`: each knows one stored array's shape, dtype
and (where the file declares them) axes, and reads one box of it: a tuple of step-1 slices in
stored axis order. Readers of files pickle by reference (path and position, never the pixels) and
open their file lazily in the process that reads.
"""
from __future__ import annotations

import contextlib
import math
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import INSTALL, ImageError, require
from .layout import ngff_layout, tiff_layout

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff", ".btf", ".tf8")
FORMATS = "TIFF/SVS/NDPI slides, .zarr directories and .npy files"


def torch_dtype(dtype, what: str) -> torch.dtype:
    """The torch dtype holding a numpy ``dtype`` (in native byte order)."""
    try:
        return torch.from_numpy(np.empty(0, np.dtype(dtype).newbyteorder("="))).dtype
    except (TypeError, ValueError) as e:
        raise ImageError(f"{what} has dtype {np.dtype(dtype)}, which torch cannot hold") from e


class Source:
    """One stored array: ``shape``, ``dtype`` (torch), ``known`` axes or None, and ``read``."""

    name = "array"
    level = 0                         # the pyramid level read
    known: str | None = None          # the layout the file itself declares
    torch_order = False               # a torch tensor: 4-d/5-d default to NCHW/NCDHW
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.uint8

    def read(self, box: tuple[slice, ...]):
        """The box as a numpy array or torch tensor in stored axis order (it may be a view)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files (a later read opens them again)."""


class ArraySource(Source):
    """A numpy array, zarr array or torch tensor, read by slicing it (and pickled as itself)."""

    def __init__(self, array, name: str, known: str | None = None):
        self.array, self.name, self.known = array, name, known
        self.torch_order = isinstance(array, torch.Tensor)
        self.shape = tuple(array.shape)
        self.dtype = array.dtype if self.torch_order else torch_dtype(array.dtype, name)

    def read(self, box):
        return self.array[box]


class RawFileSource(Source):
    """An array stored raw in a file (an ``.npy`` file, a ``numpy.memmap``) at a byte ``offset``
    with byte ``strides``. A read copies the box's contiguous runs (rows, or whole strips) with
    ``os.pread``, so no page of the file is mapped into the process (pages read through a
    long-lived memmap stay resident); odd strides (negative, or no axis of unit stride) fall back
    to mapping only the box's bytes while they are copied."""

    def __init__(self, path, offset: int, shape, strides, dtype, name: str):
        self.path, self.offset, self.name = os.fspath(path), int(offset), name
        self.shape, self.strides = tuple(shape), tuple(strides)
        self.np_dtype = np.dtype(dtype)
        self.dtype = torch_dtype(self.np_dtype, name)

    def read(self, box):
        lens = [s.stop - s.start for s in box]
        runs = self.runs(box)
        if runs is None or 0 in lens:
            return self.mapped(box, mmap.ACCESS_READ, np.array)
        order, offsets, nbytes = runs
        with self.opened(os.O_RDONLY) as fd:
            data = b"".join([os.pread(fd, nbytes, off) for off in offsets])
        if len(data) != nbytes * len(offsets):
            raise ImageError(f"{self.path!r} ends before the region read: was it truncated?")
        out = np.frombuffer(data, self.np_dtype).reshape([lens[a] for a in order])
        return out.transpose(np.argsort(order))

    def write(self, box, value) -> None:
        """Write ``value`` (stored axis order) into the box of the file."""
        runs = self.runs(box)
        if runs is None:
            self.mapped(box, mmap.ACCESS_WRITE, lambda view: np.copyto(view, value))
            return
        order, offsets, nbytes = runs
        data = np.ascontiguousarray(np.asarray(value, self.np_dtype).transpose(order))
        buf = memoryview(data.reshape(-1)).cast("B")
        with self.opened(os.O_WRONLY) as fd:
            for i, off in enumerate(offsets):
                os.pwrite(fd, buf[i * nbytes:(i + 1) * nbytes], off)

    def runs(self, box):
        """``(order, offsets, nbytes)``: the axes from largest to smallest stride, and the file
        offsets of the box's contiguous runs of ``nbytes`` each; None without ``os.pread`` or
        for strides that leave no contiguous run (then :meth:`mapped` copies the box)."""
        lens = [s.stop - s.start for s in box]
        st, item = self.strides, self.np_dtype.itemsize
        order = sorted(range(len(st)), key=lambda a: st[a], reverse=True)
        if (not hasattr(os, "pread") or not order or min(st) <= 0 or 0 in lens
                or st[order[-1]] != item):
            return None
        inner = 1                  # the innermost axes forming one run: all but its first full
        while inner < len(order):
            a, b = order[-inner], order[-inner - 1]
            if lens[a] != self.shape[a] or st[b] != self.shape[a] * st[a]:
                break
            inner += 1
        outer = order[:-inner]
        offsets = np.full([lens[a] for a in outer], self.offset, np.int64)
        offsets += sum(box[a].start * st[a] for a in range(len(st)))
        for k, a in enumerate(outer):
            offsets += (np.arange(lens[a]) * st[a]).reshape([-1] + [1] * (len(outer) - k - 1))
        return order, offsets.reshape(-1).tolist(), math.prod(lens[a] for a in order[-inner:]) * item

    @contextlib.contextmanager
    def opened(self, flags: int):
        """A file descriptor of the file, open for one read or write."""
        try:
            fd = os.open(self.path, flags)
        except OSError as e:
            raise ImageError(f"cannot open {self.path!r} ({e}): was it moved or made "
                             f"read-only?") from e
        try:
            yield fd
        finally:
            os.close(fd)

    def mapped(self, box, access, fn):
        """``fn(view)`` of the box's elements, mapped from the file only while ``fn`` runs."""
        starts = [s.start for s in box]
        lens = [s.stop - s.start for s in box]
        if 0 in lens:
            return fn(np.empty(lens, self.np_dtype))
        spans = [(a * st, (a + n - 1) * st) for a, n, st in zip(starts, lens, self.strides)]
        first = self.offset + sum(min(s) for s in spans)
        end = self.offset + sum(max(s) for s in spans) + self.np_dtype.itemsize
        start = first - first % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.path, "rb" if access == mmap.ACCESS_READ else "r+b") as f:
                mm = mmap.mmap(f.fileno(), end - start, access=access, offset=start)
        except (OSError, ValueError) as e:
            raise ImageError(f"cannot map bytes {first}-{end} of {self.path!r} ({e}): was the file "
                             f"moved, truncated or made read-only?") from e
        try:
            view = np.ndarray(lens, self.np_dtype, buffer=mm, strides=self.strides,
                              offset=self.offset + sum(a * st for a, st in zip(starts, self.strides))
                              - start)
            out = fn(view)
            del view
            return out
        finally:
            try:
                mm.close()
            except BufferError:       # a view still held by a traceback: unmapped when it dies
                pass


def memmap_source(m: np.memmap, name: str) -> Source:
    """A :class:`RawFileSource` over the file of a ``numpy.memmap`` (or a view of one), reading
    around the memmap's own mapping; the array itself for copy-on-write or file-less memmaps."""
    root = m
    while root is not None and not isinstance(root, mmap.mmap):
        root = root.base
    if root is None or m.filename is None or getattr(m, "mode", None) == "c":
        return ArraySource(m, name)
    probe = np.frombuffer(root, np.uint8)          # the mapping's start address
    mapped_at = m.offset - m.offset % mmap.ALLOCATIONGRANULARITY   # numpy's alignment rule
    offset = mapped_at + m.ctypes.data - probe.ctypes.data
    del probe
    return RawFileSource(m.filename, offset, m.shape, m.strides, m.dtype, name)


class TiffSource(Source):
    """One level of the first series of a TIFF read with tifffile through its zarr store; the
    file handle is opened lazily and again in a forked or unpickling process."""

    def __init__(self, path: str, level: int, levels, axes: str, dtype):
        self.path, self.level, self.levels = path, level, levels
        self.name = repr(path)
        self.shape = tuple(levels[level])
        self.known = tiff_layout(axes)
        self.dtype = torch_dtype(dtype, self.name)
        self._open = None                          # (pid, TiffFile, zarr array)

    def array(self):
        """The level's zarr array, opened in this process."""
        if self._open is None or self._open[0] != os.getpid():
            tifffile, zarr = require("tifffile", "reading TIFF"), require("zarr", "reading TIFF")
            tif = tifffile.TiffFile(self.path)
            store = tif.series[0].aszarr(level=self.level)
            self._open = (os.getpid(), tif, zarr.open_array(store, mode="r"))
        return self._open[2]

    def read(self, box):
        try:
            return self.array()[box]
        except ImageError:
            raise
        except Exception as e:          # tifffile, zarr and the codecs raise many kinds
            raise ImageError(f"cannot read {self.name} level {self.level} "
                             f"({type(e).__name__}: {e}); a damaged file, or a missing codec: "
                             f"{INSTALL}") from e

    def close(self):
        if self._open is not None and self._open[0] == os.getpid():
            self._open[1].close()
        self._open = None

    def __getstate__(self):
        return {**self.__dict__, "_open": None}


class SlideSource(TiffSource):
    """One level of a slide read with tiffslide (formats OpenSlide reads that tifffile's series
    do not expose as a pyramid)."""

    def array(self):
        if self._open is None or self._open[0] != os.getpid():
            slide = require("tiffslide", "reading this slide").TiffSlide(self.path)
            self._open = (os.getpid(), slide, slide.zarr_group[str(self.level)])
        return self._open[2]


def check_level(level, shapes, name: str) -> int:
    """``level`` (None meaning 0) when it exists among ``shapes``, else an error naming them."""
    if level is None:
        return 0
    have = ", ".join(f"{i} {tuple(s)}" for i, s in enumerate(shapes))
    if (isinstance(level, bool) or not isinstance(level, (int, np.integer))
            or not 0 <= level < len(shapes)):
        raise ImageError(f"level {level!r} does not exist in {name}: its levels are {have}")
    return int(level)


def zarr_levels(group, name: str):
    """``[(path, array)]`` of a zarr pyramid group (multiscales metadata, else keys "0", "1", ...)
    and the layout its OME-NGFF axes declare."""
    attrs = dict(group.attrs)
    multiscales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    if multiscales:
        paths = [d["path"] for d in multiscales[0]["datasets"]]
        known = ngff_layout(multiscales[0].get("axes", []) or [])
    else:
        paths = sorted((k for k in group.array_keys() if k.isdigit()), key=int)
        known = None
    if not paths:
        raise ImageError(f"the zarr group {name} holds no pyramid levels (arrays '0', '1', ... or "
                         f"multiscales metadata): pass one of its arrays instead")
    return [(p, group[p]) for p in paths], known


def zarr_source(z, level, name: str) -> Source:
    """The chosen level of a zarr array (level 0 only) or pyramid group."""
    zarr = sys.modules["zarr"]
    if isinstance(z, zarr.Group):
        levels, known = zarr_levels(z, name)
        level = check_level(level, [a.shape for _, a in levels], name)
        array = levels[level][1]
        if known is not None and len(known) != array.ndim:
            known = None
        source = ArraySource(array, name, known)
        source.level = level
        return source
    check_level(level, [z.shape], name)
    names = getattr(getattr(z, "metadata", None), "dimension_names", None)
    return ArraySource(z, name, ngff_layout(names) if names and None not in names else None)


def open_path(path, level) -> Source:
    """A reader for a file or directory: TIFF-like slides, ``.zarr`` and ``.npy``."""
    path = os.fspath(path)
    name = repr(path)
    p = Path(path)
    if not p.exists():
        raise ImageError(f"image {name} does not exist")
    if p.is_dir():
        zarr = require("zarr", f"reading the directory {name}")
        try:
            z = zarr.open(path, mode="r")
        except Exception as e:
            raise ImageError(f"{name} is a directory but not a zarr array or group ({e}); "
                             f"fxstream reads {FORMATS}") from e
        return zarr_source(z, level, name)
    if p.suffix.lower() == ".npy":
        try:
            m = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ImageError(f"{name} is not a readable .npy array ({e})") from e
        check_level(level, [m.shape], name)
        source = memmap_source(m, name)
        del m
        return source
    return open_tiff(path, level, name)


def open_tiff(path: str, level, name: str) -> Source:
    """A reader for a TIFF-like slide: tifffile's first series and its pyramid levels, else
    tiffslide."""
    tifffile = require("tifffile", f"reading {name}")
    require("zarr", f"reading {name}")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shapes = [lv.shape for lv in series.levels]
            axes, dtype = series.axes, series.dtype
        cls = TiffSource
    except Exception as e:  # noqa: BLE001 - tifffile's errors have no common base: any = cannot
        try:
            tiffslide = require("tiffslide", f"reading {name}")
        except ImageError:
            raise ImageError(f"{name} is not an image fxstream can read (tifffile: {e}); it reads "
                             f"{FORMATS}") from e
        try:
            with tiffslide.TiffSlide(path) as slide:
                group = slide.zarr_group
                arrays = [group[str(i)] for i in range(slide.level_count)]
                shapes = [a.shape for a in arrays]
                axes, dtype = ("YXS" if arrays[0].ndim == 3 else "YX"), arrays[0].dtype
            cls = SlideSource
        except Exception as e2:
            raise ImageError(f"{name} is not an image fxstream can read (tifffile: {e}; "
                             f"tiffslide: {e2}); it reads {FORMATS}") from e2
    return cls(path, check_level(level, shapes, name), shapes, axes, dtype)


def open_source(source, level) -> Source:
    """A reader for any supported ``source`` at pyramid ``level``."""
    if isinstance(source, (str, os.PathLike)):
        return open_path(source, level)
    if isinstance(source, torch.Tensor):
        check_level(level, [source.shape], "a tensor")
        return ArraySource(source, "tensor")
    if isinstance(source, np.memmap):
        check_level(level, [source.shape], "a memmap")
        return memmap_source(source, f"memmap of {source.filename!r}")
    if isinstance(source, np.ndarray):
        check_level(level, [source.shape], "an array")
        return ArraySource(source, "array")
    zarr = sys.modules.get("zarr")
    if zarr is not None and isinstance(source, (zarr.Array, zarr.Group)):
        return zarr_source(source, level, f"zarr {source.store_path}")
    raise ImageError(f"cannot read an image from a {type(source).__name__}: pass a path, a numpy "
                     f"array or memmap, a zarr array or group, or a torch tensor")
