"""Shape propagation with fake tensors: concrete shapes at the analysed input size, no memory."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp


class ShapePropagationError(Exception):
    """The model failed on the fake input at ``node`` (its own error is the cause)."""

    def __init__(self, node: fx.Node, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.node = node
        self.cause = cause


class _Prop(ShapeProp):
    def run_node(self, n):
        try:
            return super().run_node(n)
        except ShapePropagationError:
            raise
        except Exception as e:
            cause = e.__cause__ or e
            raise ShapePropagationError(n, cause) from e


def propagate_shapes(gm: fx.GraphModule, input_shape, dtype=torch.float32) -> None:
    """Record ``node.meta['tensor_meta']`` for every node, running ``gm`` on a fake input.

    No real tensor of the input's size is allocated, so an 8192x8192 image costs nothing.
    Raises :class:`ShapePropagationError` naming the node where the model fails.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake = torch.empty(tuple(input_shape), dtype=dtype)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    extra = [None] * (len(placeholders) - 1)
    _Prop(gm, fake_mode=mode).propagate(fake, *extra)
