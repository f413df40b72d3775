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


def check_image_only(model: nn.Module, what: str) -> None:
    """Raise :class:`UnsupportedError` where ``what`` (a command that calls the model with an
    image alone) cannot call it: its ``forward`` needs other arguments."""
    needed = required_arguments(model)
    if needed:
        raise UnsupportedError(
            f"{what} calls the model with an image alone, but its forward also needs "
            f"{', '.join(repr(n) for n in needed)}: give them defaults, or wrap the model in a "
            f"module whose forward(x) passes them")


def check_stem_arguments(analysis: Analysis) -> None:
    """A stem may read the model's other arguments as tensors (or plain numbers), not as
    containers of tensors: a pass takes each side input whole, as one tensor."""
    gm = analysis.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][1:]
    for p in placeholders:
        kind = type(p.meta.get("tensor_meta")).__name__
        if kind in ("list", "tuple", "dict") and _read_by_stem(p):
            raise UnsupportedError(
                f"the stem reads the model's argument '{p.name}', a {kind} of tensors: a "
                f"streamed pass takes the model's other arguments as tensors. Pass its tensors "
                f"as separate arguments of forward")


def _read_by_stem(node) -> bool:
    """Whether a stem node reads ``node``, directly or through constants computed from it."""
    stack, seen = list(node.users), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        role = n.meta.get(passes.ROLE)
        if role in ("stem", "boundary"):
            return True
        if role == "constant":
            stack += list(n.users)
    return False


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


__all__ = ["check_image_only", "check_stem_arguments", "extra_inputs", "hooked_stem_modules",
           "mode", "model_device", "required_arguments", "signature"]
