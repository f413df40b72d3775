"""Whether a graph value is only read by its users, never written in place nor aliased.

The runtime feeds a tile to a segment as a view of the image or stored map when the segment only
reads its input; otherwise as a copy, since an in-place first op (``ReLU(inplace=True)`` after a
cut at an ``add``) would write into the map that the neighbouring tiles read. A wrong "only read"
corrupts results silently, so this is a short list of torch's own ops known not to write or alias
their inputs; anything else (a subclass, ``F.relu(x, True)``, a view method, a module with forward
hooks or a replaced ``forward``) counts as a write. Hooks registered after this pass runs (after
``fxstream.compile``) are not seen.

:func:`writes_in_place` is the other direction, for memory estimates: which nodes write into
their input and so allocate nothing.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

# modules (exact types: a subclass may override forward) that never write their input
_READING_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Linear,
    nn.GELU, nn.Sigmoid, nn.Tanh,
)
# activations that write their input exactly when built with inplace=True
_INPLACE_FLAG_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
                         nn.ELU, nn.Mish)
# functions that return a new tensor when called without ``out=`` or ``inplace=``
_READING_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.cat, torch.relu, torch.sigmoid, torch.tanh,
    F.conv1d, F.conv2d, F.conv3d, F.gelu, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
}
_READING_METHODS = {"size", "dim"}  # return no tensor


def only_read(node: fx.Node, gm: fx.GraphModule) -> bool:
    """True when no user of ``node`` can write its value in place or hand out an alias of it."""
    return all(_reads(user, gm) for user in node.users)


def _reads(user: fx.Node, gm: fx.GraphModule) -> bool:
    if user.op == "output":  # stored or handed on: the runtime copies outputs
        return True
    if "out" in user.kwargs or "inplace" in user.kwargs:
        return False
    if user.op == "call_module":
        module = gm.get_submodule(user.target)
        if _hooked(module):
            return False
        if type(module) in _READING_MODULES:
            return True
        return type(module) in _INPLACE_FLAG_MODULES and getattr(module, "inplace", True) is False
    if user.op == "call_function":
        return user.target in _READING_FUNCTIONS
    if user.op == "call_method":
        return user.target in _READING_METHODS
    return False


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs code of the user's besides its type's forward: forward
    hooks or pre-hooks (its own or global ones), or a ``forward`` set on the instance."""
    from torch.nn.modules import module as registry

    return bool(getattr(module, "_forward_pre_hooks", None) or
                getattr(module, "_forward_hooks", None) or
                getattr(registry, "_global_forward_pre_hooks", None) or
                getattr(registry, "_global_forward_hooks", None) or
                "forward" in vars(module))


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.iand, operator.ior}


def writes_in_place(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` overwrites its input (``ReLU(inplace=True)``, ``x += y``, ``relu_``), so
    it allocates no output of its own. A best guess by name, for memory estimates: unlike
    :func:`only_read`, nothing exact depends on it."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or (name.endswith("_")
                                                      and not name.startswith("_"))
    return False


def writes_state(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` writes in place into what outlives one run of the graph: a parameter or
    buffer (``self.ema.mul_(0.9)``) or an input, directly or through earlier in-place writes.
    An in-place activation on a value the graph computed (``ReLU(inplace=True)``) does not."""
    if not writes_in_place(node, gm):
        return False
    target = node.args[0] if node.args else None
    while isinstance(target, fx.Node) and writes_in_place(target, gm) and target.args:
        target = target.args[0]
    return isinstance(target, fx.Node) and target.op in ("get_attr", "placeholder")


_RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                   nn.FeatureAlphaDropout, nn.RReLU)
_RANDOM_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                     F.feature_alpha_dropout, F.rrelu, torch.bernoulli, torch.rand,
                     torch.rand_like, torch.randn, torch.randn_like, torch.randint,
                     torch.randint_like, torch.randperm, torch.multinomial, torch.normal,
                     torch.poisson}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "exponential_",
                   "geometric_", "log_normal_", "cauchy_", "random_"}


def draws_random(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` may draw random numbers (dropout, stochastic depth, ``rand``): the
    runtime then replays each tile's random state in the backward's recompute. Modules that are
    not torch's own (kept as leaves when tracing) count as random: their code is not seen."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _RANDOM_MODULES):
            return True
        return not type(module).__module__.startswith("torch.nn")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _RANDOM_FUNCTIONS or name in ("stochastic_depth", "drop_block2d",
                                                            "drop_block3d")
    if node.op == "call_method":
        return node.target in _RANDOM_METHODS
    return False


__all__ = ["draws_random", "only_read", "writes_in_place", "writes_state"]
