"""Lazy image inputs: :func:`image` opens an array or file as an :class:`Image`, whose slices read
only their own region, as fresh tensors in fxstream's ``(N, C, *spatial)`` order."""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import ImageError
from .layout import Layout, check_known, infer_layout, parse_layout
from .sources import Source, open_source


def box_of(index, shape) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` per axis of a logical ``index``: a slice or tuple of step-1 slices, padded
    with full slices and clamped to ``shape`` like Python slicing."""
    if index is None:
        index = ()
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) > len(shape) or not all(isinstance(s, slice) for s in index):
        raise ImageError(f"an image index is a tuple of at most {len(shape)} slices in (N, C, "
                         f"*spatial) order, e.g. img[:, :, 0:512, 0:512]; got {index!r}")
    index = index + (slice(None),) * (len(shape) - len(index))
    box = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ImageError(f"image slices have step 1; got {s!r}")
        box.append((start, max(start, stop)))
    return tuple(box)


class Image:
    """A lazily read image with the logical shape ``(N, C, *spatial)``; made by :func:`image`.

    ``img[index]`` (or ``img.read(index)``) reads only the region of a tuple of step-1 slices in
    logical order and returns it as a new contiguous tensor of the stored dtype.
    """

    def __init__(self, source: Source, layout: Layout, level: int,
                 region: tuple[tuple[int, int], ...]):
        self.source, self.layout, self.level = source, layout, level
        self._offsets = dict(zip(layout.spatial, (a for a, _ in region)))
        size = dict(zip(layout.spatial, (n for _, n in region)))
        full = layout.logical_shape(source.shape)
        self.shape = tuple(size.get(a, n) for a, n in zip(layout.logical, full))
        self.region = tuple(x for pair in zip(*region) for x in pair) if region else None
        self._full_region = all(a == 0 and n == full[2 + i]
                                for i, (a, n) in enumerate(region))

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of the stored data."""
        return self.source.dtype

    @property
    def ndim(self) -> int:
        """``2 + `` the number of spatial axes."""
        return len(self.shape)

    @property
    def numel(self) -> int:
        """Elements of the whole (region of the) image."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the whole (region of the) image once read, computed without reading."""
        return self.numel * self.dtype.itemsize

    def __getitem__(self, index) -> torch.Tensor:
        return self.read(index)

    def read(self, index=None) -> torch.Tensor:
        """The region of ``index`` (step-1 slices in ``(N, C, *spatial)`` order; None reads all)
        as a new contiguous tensor of shape ``(N, C, *spatial)`` and the stored dtype."""
        box = box_of(index, self.shape)
        lens = tuple(b - a for a, b in box)
        where = dict(zip(self.layout.logical, box))
        stored = tuple(slice(where[a][0] + self._offsets.get(a, 0),
                             where[a][1] + self._offsets.get(a, 0)) for a in self.layout.stored)
        if 0 in lens:
            device = self.source.array.device if self.source.torch_order else "cpu"
            return torch.empty(lens, dtype=self.dtype, device=device)
        part = self.source.read(stored)
        perm = self.layout.to_logical()
        if isinstance(part, torch.Tensor):
            out = torch.empty(lens, dtype=part.dtype, device=part.device)
            return out.copy_(part.permute(perm).reshape(lens))
        out = np.empty(lens, np.asarray(part).dtype.newbyteorder("="))
        np.copyto(out, np.asarray(part).transpose(perm).reshape(lens))
        return torch.from_numpy(out)

    def close(self) -> None:
        """Close the file behind the image (a later read opens it again)."""
        self.source.close()

    def __repr__(self) -> str:
        parts = [self.source.name, f"layout={self.layout.stored!r}"]
        if self.level:
            parts.append(f"level={self.level}")
        if self.region is not None and not self._full_region:
            parts.append(f"region={self.region}")
        parts += [f"shape={self.shape}", f"dtype={self.dtype}"]
        return f"Image({', '.join(parts)})"


def check_region(region, spatial: str, sizes, name: str, level: int):
    """``((start, length), ...)`` per spatial axis from a user's ``(starts..., lengths...)``."""
    k = len(spatial)
    whole = tuple((0, n) for n in sizes)
    if region is None:
        return whole
    example = ", ".join(f"{a.lower()}0" for a in spatial) + ", " + ", ".join(
        {"L": "length", "H": "h", "W": "w", "D": "d"}[a] for a in spatial)
    if (not isinstance(region, (tuple, list)) or len(region) != 2 * k
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                       for v in region)):
        raise ImageError(f"region= of a {k}-D image is {2 * k} integers ({example}); "
                         f"got {region!r}")
    pairs = tuple((int(a), int(n)) for a, n in zip(region[:k], region[k:]))
    if any(a < 0 or n < 1 or a + n > size for (a, n), size in zip(pairs, sizes)):
        dims = "x".join(str(s) for s in sizes)
        raise ImageError(f"region {tuple(region)} ({example}) is outside level {level} of {name}, "
                         f"which is {dims} ({' x '.join(spatial)})")
    return pairs


def image(source, layout: str | None = None, level: int | None = None, region=None) -> Image:
    """Open an array or file as a lazily read :class:`Image` of logical shape ``(N, C, *spatial)``.

    Args:
        source: a ``numpy.ndarray`` or ``numpy.memmap``, a ``zarr.Array`` or a zarr group holding
            a pyramid (arrays ``"0"``, ``"1"``, ... or OME-NGFF multiscales), a ``torch.Tensor``,
            or a path: a TIFF-like slide (``.tif``, ``.svs``, ``.ndpi``, ...; read with tifffile,
            else tiffslide), a ``.zarr`` directory or a ``.npy`` file.
        layout: the stored axes, e.g. ``"HWC"``, ``"CHW"``, ``"NCHW"``, ``"HW"``, ``"LC"``,
            ``"DHWC"``. By default the file's own axes (TIFF, OME-NGFF), or the shape when it
            leaves no doubt (2-d: ``HW``; 3-d with 1/3/4 channels first or last; a 4-d/5-d tensor:
            ``NCHW``/``NCDHW``); otherwise an error asks for it.
        level: the pyramid level, 0 (full resolution, the default) or a reduced one.
        region: ``(starts..., lengths...)`` of a box in that level's pixels, one start and one
            length per spatial axis in ``D, H, W`` order, e.g. ``(y, x, h, w)``.

    Returns:
        An :class:`Image`: ``shape``, ``dtype``, ``ndim``, ``numel``, ``nbytes``, and
        ``img[index]`` reading a region as a new tensor. It pickles by reference for files.

    Example:
        >>> import numpy as np
        >>> img = image(np.zeros((600, 800, 3), np.uint8), region=(100, 200, 256, 256))
        >>> img.shape, img[:, :, :64, :32].shape
        ((1, 3, 256, 256), torch.Size([1, 3, 64, 32]))
    """
    src = open_source(source, level)
    what = src.name
    if layout is None:
        lay = infer_layout(src.shape, src.known, src.torch_order, what)
    else:
        lay = parse_layout(layout, src.shape, what)
        check_known(lay, src.known, src.shape, what)
    level = src.level
    sizes = lay.logical_shape(src.shape)[2:]
    return Image(src, lay, level, check_region(region, lay.spatial, sizes, what, level))
