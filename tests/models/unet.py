"""The zoo's U-Net as a model file for the command line.

    fxstream check tests/models/unet.py:unet --input 1x3x62x75 --tile 48

``unet()`` builds ``tests.zoo.ZOO["unet"]``: tiny widths, seeded weights, random BatchNorm
statistics (so that eval BatchNorm is not the identity), eval mode.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # loaded by path from any directory: `tests.zoo` is under ROOT
    sys.path.insert(0, str(ROOT))

from tests.zoo import ZOO  # noqa: E402


def unet():
    """The zoo U-Net (float32, eval mode, seed 0)."""
    return ZOO["unet"].build()
