"""BatchNorm in train mode normalises over the whole image and batch, which tiles cannot
reproduce: :func:`check_streamable` says so with the fix, and :func:`freeze_batchnorm` is it."""
from __future__ import annotations

import types

import torch.nn as nn

import passes
from passes import GEOMETRY, Local, NonLocal

from .analysis import Analysis
from .errors import UnsupportedError

_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)


def check_streamable(analysis: Analysis):
    """Train-mode BatchNorm where the stem would go on is an error with the fix."""
    gm = analysis.graph_module
    blocked = []
    for node in gm.graph.nodes:
        g = node.meta.get(GEOMETRY)
        if isinstance(g, NonLocal) and g.kind == "train_batchnorm" and g.origin == node.name:
            if any(isinstance(i.meta.get(GEOMETRY), Local) for i in node.all_input_nodes):
                blocked.append(passes.qualname(node) or node.name)
    if blocked:
        raise UnsupportedError(
            f"train-mode BatchNorm where the stem would continue ({', '.join(blocked[:4])}"
            f"{', ...' if len(blocked) > 4 else ''}): batch statistics span the whole image. "
            "Call fxstream.freeze_batchnorm(model) before compiling (eval-mode statistics, "
            "affine parameters still trained), or model.eval()")


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Put every BatchNorm of ``model`` in eval mode for good; their affine parameters still train.

    ``model.train()`` afterwards leaves them in eval mode. Returns ``model``.

    Example:
        >>> import torch.nn as nn, fxstream
        >>> net = fxstream.freeze_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
        >>> net.train()[1].training
        False
    """
    for m in model.modules():
        if isinstance(m, _BATCHNORM):
            m.eval()
            m.train = types.MethodType(_stay_eval, m)
    return model


def _stay_eval(self, mode: bool = True):
    return nn.Module.train(self, False)


__all__ = ["check_streamable", "freeze_batchnorm"]
