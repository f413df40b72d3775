"""passes.only_read: which values a segment may receive as views (never written in place)."""
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import passes


class Conv(nn.Conv2d):  # a subclass may override forward: not trusted
    pass


def _first_user_reads(body) -> bool:
    """Trace ``body(x)`` as a module and ask whether its input is only read."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.conv_sub = Conv(2, 2, 3, padding=1)
            self.relu = nn.ReLU()
            self.relu_inplace = nn.ReLU(inplace=True)

        def forward(self, x):
            return body(self, x)

    gm = fx.symbolic_trace(Net())
    (x,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return passes.only_read(x, gm)


@pytest.mark.parametrize("body, reads", [
    (lambda m, x: m.conv(x), True),
    (lambda m, x: m.conv(x) + x, True),
    (lambda m, x: m.relu(x), True),
    (lambda m, x: torch.cat([x, F.conv2d(x, m.conv.weight, padding=1)], 1), True),
    (lambda m, x: x, True),
    (lambda m, x: m.relu_inplace(x), False),
    (lambda m, x: F.relu(x, True), False),
    (lambda m, x: F.relu(x, inplace=True), False),
    (lambda m, x: torch.relu_(x), False),
    (lambda m, x: x.add_(1), False),
    (lambda m, x: m.conv(x.view(x.shape)), False),  # an alias could be written later
    (lambda m, x: m.conv(x) + m.relu_inplace(x), False),  # one writing user is enough
])
def test_only_read(body, reads):
    assert _first_user_reads(body) is reads


class _KeepConv(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, Conv) or super().is_leaf_module(m, qualname)


def test_subclass_of_a_reading_module_is_not_trusted():
    """A subclass kept as one call may override forward (and write its input)."""
    net = nn.Sequential(Conv(2, 2, 3))
    gm = fx.GraphModule(net, _KeepConv().trace(net))
    (x,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [n.op for n in x.users] == ["call_module"]
    assert passes.only_read(x, gm) is False


def test_augmented_assignment_node_writes():
    """Some traces record ``x += y`` as ``operator.iadd``."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(operator.iadd, (x, 1)))
    assert passes.only_read(x, fx.GraphModule(nn.Module(), graph)) is False


@pytest.mark.parametrize("hook", ["pre", "post", "global", "forward"])
def test_hooked_reading_module_is_not_trusted(hook):
    """A hook may write the module's input (``a[0].mul_(0.5)``): with views it would scale the
    image once per overlapping tile."""
    net = nn.Sequential(nn.Conv2d(2, 2, 3))
    gm = fx.symbolic_trace(net)
    (x,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    conv = gm.get_submodule("0")
    assert passes.only_read(x, gm) is True
    if hook == "pre":
        handle = conv.register_forward_pre_hook(lambda m, a: a[0].mul_(0.5))
    elif hook == "post":
        handle = conv.register_forward_hook(lambda m, a, out: None)
    elif hook == "global":
        handle = nn.modules.module.register_module_forward_pre_hook(lambda m, a: None)
    else:
        conv.forward = lambda t: nn.Conv2d.forward(conv, t)
        handle = None
    try:
        assert passes.only_read(x, gm) is False
    finally:
        if handle is not None:
            handle.remove()
