"""Lazy array-like image inputs and writable outputs for images larger than memory.

:func:`image` opens a numpy array or memmap, a zarr array or pyramid, a torch tensor, or a file
(TIFF-like slides, ``.zarr``, ``.npy``) as an :class:`Image` of logical shape ``(N, C, *spatial)``
whose slices read only their region. :func:`output` checks a zarr array, memmap, array or tensor
against the logical shape and dtype of a dense prediction and writes it tile by tile.

The slide libraries (tifffile, zarr, tiffslide, imagecodecs) are optional and imported only when
used: ``pip install -e ".[slides]"``.
"""
from .errors import ImageError
from .inputs import Image, image
from .layout import Layout
from .outputs import Writer, output

__all__ = ["Image", "ImageError", "Layout", "Writer", "image", "output"]
