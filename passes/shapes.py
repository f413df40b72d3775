"""Shape propagation on the meta device: concrete shapes at the analysed input size, no memory.

Each module runs through ``torch.func.functional_call`` with meta copies of its own parameters
and buffers, so no real tensor of the input's size is allocated (an 8192x8192 image costs
nothing) and the model is not copied. Graphs that the meta device cannot run (ops that mix in
CPU tensors made inside ``forward``) fall back to fake tensors.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata


class ShapePropagationError(Exception):
    """The model failed on the fake input at ``node`` (its own error is the cause)."""

    def __init__(self, node: fx.Node, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.node = node
        self.cause = cause


def _meta(t):
    return t.to("meta") if isinstance(t, torch.Tensor) else t


class _MetaProp(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self._states = {}

    def run_node(self, n):
        try:
            result = super().run_node(n)
        except Exception as e:
            raise ShapePropagationError(n, e) from e
        n.meta["tensor_meta"] = fx.node.map_aggregate(
            result, lambda r: _extract_tensor_metadata(r) if isinstance(r, torch.Tensor) else r)
        return result

    def get_attr(self, target, args, kwargs):
        return _meta(super().get_attr(target, args, kwargs))

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        state = self._states.get(target)
        if state is None:
            state = {k: v.to("meta") for k, v in module.state_dict(keep_vars=True).items()}
            self._states[target] = state
        return torch.func.functional_call(module, state, args, kwargs)


class _FakeProp(ShapeProp):
    def run_node(self, n):
        try:
            return super().run_node(n)
        except Exception as e:
            raise ShapePropagationError(n, e.__cause__ or e) from e


def propagate_shapes(gm: fx.GraphModule, input_shape, dtype=torch.float32) -> None:
    """Record ``node.meta['tensor_meta']`` for every node, running ``gm`` on a meta input.

    Raises :class:`ShapePropagationError` naming the node where the model fails.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    extra = [None] * (len(placeholders) - 1)
    image = torch.empty(tuple(input_shape), dtype=dtype, device="meta")
    try:
        _MetaProp(gm).run(image, *extra)
        return
    except ShapePropagationError as e:
        if not _is_device_mismatch(e.cause):
            raise
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake = torch.empty(tuple(input_shape), dtype=dtype)
    _FakeProp(gm, fake_mode=mode).propagate(fake, *extra)


def _is_device_mismatch(error) -> bool:
    text = str(error)
    return "meta" in text or "device" in text or isinstance(error, NotImplementedError)
