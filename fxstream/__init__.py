"""fxstream: exact tiled streaming of CNN stems on images larger than memory.

    >>> import fxstream, torchvision
    >>> a = fxstream.analyze(torchvision.models.resnet18().eval(), (1, 3, 8192, 8192))
    >>> a.boundary
    ('layer4_1_relu_1',)
"""
from .analysis import Analysis, NodeRow, PlanSummary, analyze
from .errors import (FxStreamError, GeometryError, PlanError, SpecError, SplitError, TraceError,
                     UnsupportedError)
from .streaming import StreamingModule, compile, freeze_batchnorm
from .tracing import trace

__all__ = [
    "Analysis", "FxStreamError", "GeometryError", "NodeRow", "PlanError", "PlanSummary",
    "SpecError", "SplitError", "StreamingModule", "TraceError", "UnsupportedError", "analyze",
    "compile", "freeze_batchnorm", "trace",
]
__version__ = "0.1.0"
