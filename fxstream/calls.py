"""What a call of a streamed model tells its plan: the mode, the device, the other arguments, and
which stem modules carry hooks. A plan is cached per distinct answer."""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

import passes

from .analysis import Analysis
from .errors import UnsupportedError


def mode(model: nn.Module) -> tuple:
    """The training flags of every module: what torch.fx specialised the trace on."""
    return tuple(m.training for m in model.modules())


def model_device(model: nn.Module, image: torch.Tensor) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return getattr(image, "device", torch.device("cpu"))


def extra_inputs(model, image, rest, kwargs):
    """The values of the model's other arguments in ``forward``'s order (defaults filled in),
    or None when there are none."""
    if not rest and not kwargs:
        return None
    try:
        bound = inspect.signature(model.forward).bind(image, *rest, **kwargs)
    except TypeError as e:
        raise UnsupportedError(f"the streamed model was called with arguments its forward "
                               f"does not take: {e}") from e
    bound.apply_defaults()
    return list(bound.arguments.values())[1:]


def required_arguments(model: nn.Module) -> list[str]:
    """The names of ``forward``'s arguments after the image that have no default: a stem may
    read them, so its shapes (and plan) wait for their values."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]


def signature(extra) -> tuple:
    """What the plan depends on in the other arguments: tensor shapes, dtypes and whether they
    want a gradient (a stem that reads one back-propagates into it), else types."""
    if extra is None:
        return ()
    return tuple((tuple(v.shape), v.dtype, v.requires_grad) if isinstance(v, torch.Tensor) else
                 (type(v).__name__, v if isinstance(v, (int, float, bool, str, type(None)))
                  else None) for v in extra)


def hooked_stem_modules(analysis: Analysis) -> list[str]:
    from torch.nn.modules import module as registry

    gm = analysis.graph_module
    global_hooks = bool(registry._global_forward_hooks or registry._global_forward_pre_hooks
                        or registry._global_backward_hooks)
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.meta.get(passes.ROLE) not in ("stem", "boundary"):
            continue
        m = gm.get_submodule(node.target)
        if global_hooks or m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or \
                getattr(m, "_backward_pre_hooks", None):
            out.append(str(node.target))
    return out


__all__ = ["extra_inputs", "hooked_stem_modules", "mode", "model_device", "required_arguments",
           "signature"]
