"""Axis layouts: how a stored array's axes map to fxstream's logical ``(N, C, *spatial)`` order.

A layout is a string of axis letters, one per stored axis: ``N`` (batch), ``C`` (channels) and
the spatial letters ``L`` (1-D), ``H W`` (2-D) or ``D H W`` (3-D), e.g. ``"HWC"`` for what slide
readers give, ``"CHW"``, ``"NCHW"``, ``"DHWC"``, ``"LC"``. ``N`` and ``C`` may be left out: the
logical image then has one batch item or one channel.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ImageError

LETTERS = "NCDHWL"
SPATIAL = ("L", "HW", "DHW")          # the spatial letters of 1-, 2- and 3-D images, in order
MAX_CHANNELS = 4                      # a guessed channel axis holds 1, 3 or 4 samples (grey, RGB, RGBA)
GUESSED_CHANNELS = (1, 3, 4)
TIFF_AXES = {"Y": "H", "X": "W", "S": "C", "C": "C", "Z": "D"}   # tifffile's axis codes
NGFF_AXES = {"y": "H", "x": "W", "c": "C", "z": "D"}             # OME-NGFF axis names


@dataclass(frozen=True)
class Layout:
    """The axis letters of a stored array (``stored``) and what follows from them."""

    stored: str

    @property
    def spatial(self) -> str:
        """The spatial letters in logical order (``"HW"`` for ``"HWC"``)."""
        return next(s for s in SPATIAL if set(s) == set(self.stored) - {"N", "C"})

    @property
    def logical(self) -> str:
        """All logical axis letters: ``"NC"`` then the spatial ones."""
        return "NC" + self.spatial

    def logical_shape(self, stored_shape) -> tuple[int, ...]:
        """The ``(N, C, *spatial)`` shape of an array of ``stored_shape`` (1 for a missing N or C)."""
        size = dict(zip(self.stored, stored_shape))
        return tuple(size.get(a, 1) for a in self.logical)

    def stored_shape(self, logical_shape) -> tuple[int, ...]:
        """The stored shape holding a logical ``(N, C, *spatial)`` shape."""
        size = dict(zip(self.logical, logical_shape))
        return tuple(size[a] for a in self.stored)

    def to_logical(self) -> tuple[int, ...]:
        """The permutation taking a stored-order array to logical order (missing N/C left out)."""
        return tuple(self.stored.index(a) for a in self.logical if a in self.stored)

    def to_stored(self) -> tuple[int, ...]:
        """The permutation taking a logical-order array (missing N/C squeezed) to stored order."""
        present = [a for a in self.logical if a in self.stored]
        return tuple(present.index(a) for a in self.stored)


def parse_layout(text, shape, what: str) -> Layout:
    """Check a user's ``layout=`` string against a stored ``shape`` (``what`` names the array)."""
    if not isinstance(text, str):
        raise ImageError(f"layout= must be a string of axis letters such as 'HWC' or 'NCHW', "
                         f"not {text!r}")
    letters = text.upper()
    bad = sorted(set(letters) - set(LETTERS))
    if bad:
        raise ImageError(f"layout {text!r} has unknown axis letters {''.join(bad)!r}: use N "
                         f"(batch), C (channels) and L, HW or DHW (spatial), e.g. 'HWC' or 'NCHW'")
    if len(set(letters)) != len(letters):
        raise ImageError(f"layout {text!r} names an axis twice")
    if set(letters) - {"N", "C"} not in [set(s) for s in SPATIAL]:
        raise ImageError(f"layout {text!r} needs the spatial axes L (1-D), HW (2-D) or DHW (3-D)")
    if len(letters) != len(shape):
        raise ImageError(f"layout {text!r} has {len(letters)} axes but {what} has {len(shape)} "
                         f"(shape {tuple(shape)})")
    return Layout(letters)


def check_known(layout: Layout, known: str | None, shape, what: str) -> None:
    """Raise when a user's layout disagrees with the axes the file itself declares (``known``)."""
    if known is None or known == layout.stored:
        return
    c_user = layout.stored.find("C")
    c_file = known.find("C")
    if c_user != c_file and c_file >= 0:
        where = f"axis {c_user} (size {shape[c_user]})" if c_user >= 0 else "no axis"
        raise ImageError(f"layout {layout.stored!r} puts channels on {where}, but {what} stores "
                         f"{shape[c_file]} channels on axis {c_file} (its axes are "
                         f"{known!r}): pass layout={known!r} or leave layout= out")
    raise ImageError(f"layout {layout.stored!r} does not match the axes {known!r} that {what} "
                     f"declares: pass layout={known!r} or leave layout= out")


def infer_layout(shape, known: str | None, torch_order: bool, what: str) -> Layout:
    """The layout of an array when the file declares it (``known``) or its shape leaves no doubt.

    A 2-d array is ``HW``; a 3-d one is ``HWC`` when only its last axis looks like channels (1, 3 or 4
    samples, the other axes larger than 4) and ``CHW`` when only its first does; a 4-d or 5-d
    torch tensor (``torch_order``) is ``NCHW`` or ``NCDHW``. Anything else asks for ``layout=``.
    """
    if known is not None:
        return Layout(known)
    shape = tuple(shape)
    if len(shape) == 2:
        return Layout("HW")
    if torch_order and len(shape) in (4, 5):
        return Layout("NC" + SPATIAL[len(shape) - 3])
    if len(shape) == 3:
        last = shape[2] in GUESSED_CHANNELS and min(shape[:2]) > MAX_CHANNELS
        first = shape[0] in GUESSED_CHANNELS and min(shape[1:]) > MAX_CHANNELS
        if last != first:
            return Layout("HWC" if last else "CHW")
    examples = {1: "'L'", 3: "'HWC', 'CHW' or 'DHW'", 4: "'NCHW', 'NHWC', 'CDHW' or 'DHWC'",
                5: "'NCDHW' or 'NDHWC'"}.get(len(shape), "'HWC' or 'NCHW'")
    raise ImageError(f"cannot tell the axes of {what} (shape {shape}): pass layout=, "
                     f"e.g. {examples}")


def tiff_layout(axes: str) -> str | None:
    """The layout of a TIFF series from tifffile's axis codes (``"YXS"`` -> ``"HWC"``), or None when
    it has axes fxstream cannot place (time, sequence, unknown)."""
    letters = "".join(TIFF_AXES.get(a, "?") for a in axes)
    return letters if "?" not in letters and letters.count("C") <= 1 else None


def ngff_layout(axes) -> str | None:
    """The layout from OME-NGFF ``axes`` metadata (names or ``{"name": ...}`` dicts), or None."""
    names = [a.get("name") if isinstance(a, dict) else a for a in axes]
    letters = "".join(NGFF_AXES.get(str(n).lower(), "?") for n in names)
    return letters if "?" not in letters else None
