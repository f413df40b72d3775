"""The error of image inputs and outputs, and the lazy import of the optional slide libraries."""
from __future__ import annotations

import importlib

from ..errors import FxStreamError

INSTALL = 'pip install -e ".[slides]"'


class ImageError(FxStreamError):
    """An image input or output could not be opened, understood, read or written."""


def require(module: str, purpose: str):
    """Import an optional library, or raise :class:`ImageError` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImageError(f"{purpose} needs the optional library {module!r}, which is not "
                         f"installed: {INSTALL}") from e
