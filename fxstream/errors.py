"""fxstream's exceptions: one hierarchy under :class:`FxStreamError`."""
from __future__ import annotations

import math


class FxStreamError(Exception):
    """Base class of every error fxstream raises on purpose."""


class TraceError(FxStreamError):
    """The model could not be traced by torch.fx."""


class GeometryError(FxStreamError):
    """Shape propagation or geometry inference failed at a node. ``missing_argument``: the
    model's other argument, not given, that the failing node reads (else None)."""

    missing_argument: str | None = None


class SplitError(FxStreamError):
    """``split=`` names no node, or a node past a non-local one."""


class UnsupportedError(FxStreamError):
    """The model or input is outside what fxstream can stream exactly."""


class PlanError(FxStreamError):
    """No tile plan exists for this input (tile too small, image too small)."""


class SpecError(FxStreamError):
    """A command-line model SPEC or --input could not be understood."""


class FxStreamWarning(UserWarning):
    """Something the user gets less of than they may think (said once): hooks that see tiles, a
    stem that holds little of the model, a plan that recomputes most of each tile."""


def size_text(n: float, up: bool = False) -> str:
    """Bytes for a message: GiB with two decimals from 64 MiB up, else MiB or KiB (a budget
    of a few KiB must not read "0.00 GiB"). ``up``: rounded up, for a minimum the user may
    pass back as it reads (a budget "at least 0.88 GiB" that 0.88 GiB does not meet)."""
    for unit, scale, digits in (("GiB", 2**30, 2), ("MiB", 2**20, 2), ("KiB", 2**10, 1)):
        if abs(n) >= scale / 16 or unit == "KiB":
            value = n / scale
            if up:
                value = math.ceil(value * 10**digits) / 10**digits
            return f"{value:.{digits}f} {unit}"
