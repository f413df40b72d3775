"""fxstream: exact tiled streaming of CNN stems on images larger than memory.

    >>> import fxstream, torchvision
    >>> a = fxstream.analyze(torchvision.models.resnet18().eval(), (1, 3, 8192, 8192))
    >>> a.boundary
    ('layer4_1_relu_1',)
"""
from . import check
from .analysis import Analysis, NodeRow, analyze
from .errors import (FxStreamError, FxStreamWarning, GeometryError, PlanError, SpecError,
                     SplitError, TraceError, UnsupportedError)
from .images import Image, ImageError, image, output
from .planner import PlanOptions, make_plan
from .plans import Pass, Plan
from .progress import TileProgress
from .streaming import StreamingModule, compile, freeze_batchnorm
from .tracing import trace

__all__ = [
    "Analysis", "FxStreamError", "FxStreamWarning", "GeometryError", "Image", "ImageError",
    "NodeRow", "Pass", "Plan", "PlanError", "PlanOptions", "SpecError", "SplitError",
    "StreamingModule", "TileProgress", "TraceError", "UnsupportedError", "analyze", "check",
    "compile", "freeze_batchnorm", "image", "make_plan", "output", "trace",
]
__version__ = "0.1.0"
