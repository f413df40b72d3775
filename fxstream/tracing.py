"""Tracing a user's model into an fx GraphModule, with stack traces and module qualnames."""
from __future__ import annotations

import traceback
from unittest import mock

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import TraceError


class StreamTracer(fx.Tracer):
    """A symbolic tracer that records stack traces and honours user leaf modules.

    ``leaf_modules`` holds module classes or qualnames that are kept as single calls.
    """

    def __init__(self, leaf_modules=()):
        super().__init__()
        self.record_stack_traces = True
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)


PROBE_SIZE = 1024  # the spatial size compile analyses a model at without an input_shape


def trace(model: nn.Module, leaf_modules=()) -> fx.GraphModule:
    """Trace ``model`` with :class:`StreamTracer`; untraceable code raises :class:`TraceError`.

    Example:
        >>> import torch.nn as nn
        >>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected an nn.Module, got {type(model).__name__}")
    tracer = StreamTracer(leaf_modules)
    try:
        # torch.jit.isinstance(proxy, torch.Tensor) is False, so code guarded by it would be
        # left out of the graph without a word (MONAI's UpCat drops its skip connection)
        with mock.patch.object(torch.jit, "isinstance", _isinstance):
            graph = tracer.trace(model)
    except Exception as e:  # torch.fx raises many types for untraceable code
        raise TraceError(_trace_message(model, e)) from e
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def _isinstance(obj, target_type) -> bool:
    """``torch.jit.isinstance`` that takes a traced value for the tensor it stands for."""
    if isinstance(obj, fx.Proxy):
        return target_type is torch.Tensor
    return _JIT_ISINSTANCE(obj, target_type)


_JIT_ISINSTANCE = torch.jit.isinstance


def _trace_message(model, error) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename.replace("\\", "/")]
    where = ""
    if user:
        f = user[-1]
        where = f" at {f.filename}:{f.lineno}: {(f.line or '').strip()}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"cannot trace {type(model).__name__}{where}: {first}. "
            "Hint: pass leaf_modules=(TheModuleClass,) to keep the untraceable module as one "
            "call, or split='<module>' to stream only the part before it")


def probe_shape(model, leaf_modules):
    """``(1, C, 1024, ...)`` with C and the spatial rank read from the first layer, or None
    when the first layer does not tell them (the first input then decides)."""
    gm = trace(model, leaf_modules)
    image = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    for node in gm.graph.nodes:
        if node.op == "call_module" and image in node.all_input_nodes:
            m = gm.get_submodule(node.target)
            if isinstance(m, nn.modules.conv._ConvNd):
                return (1, m.in_channels) + (PROBE_SIZE,) * len(m.kernel_size)
    return None
