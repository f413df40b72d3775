"""Shape propagation on the meta device: concrete shapes at the analysed input size, no memory.

Each module runs through ``torch.func.functional_call`` with meta copies of its own parameters
and floating buffers, so no real tensor of the input's size is allocated (an 8192x8192 image
costs nothing) and the model is not copied. Integer buffers (BatchNorm's ``num_batches_tracked``,
which ``momentum=None`` reads as a number) are real copies. Graphs that the meta device cannot
run (ops that mix in CPU tensors made inside ``forward``) fall back to fake tensors.

The same run records, per node, what the memory model and the work estimate need:
``node.meta[WORK]`` holds the floating-point operations of its forward as
``torch.utils.flop_counter`` counts them (convolutions, matrix products; elementwise ops count
zero), and ``node.meta[SAVED]`` the bytes autograd saves for the backward that belong to it:
each saved storage once, to the node that produced it (a ReLU's output saved by the ReLU and by
the next convolution counts once, to the ReLU), else to the node that saved it (BatchNorm's
statistics, max-pooling's indices).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.flop_counter import FlopCounterMode

WORK = "fxstream.flops"
SAVED = "fxstream.saved_bytes"
# a node the meta run could not run: its error, or None when it only depends on such a node
SHAPE_ERROR = "fxstream.shape_error"


class ShapePropagationError(Exception):
    """The model failed on the fake input at ``node`` (its own error is the cause)."""

    def __init__(self, node: fx.Node, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.node = node
        self.cause = cause


def _meta(t):
    return t.to("meta") if isinstance(t, torch.Tensor) else t


def _meta_state(t):
    """A meta copy of a parameter or floating buffer; integer buffers stay real (copied)."""
    if t.is_floating_point() or t.is_complex():
        return t.to("meta")
    return t.detach().clone()


class _MetaRun(fx.Interpreter):
    """Runs a graph on meta inputs, each module with meta copies of its state."""

    def __init__(self, gm):
        super().__init__(gm)
        self._states = {}

    def run_node(self, n):
        try:
            return super().run_node(n)
        except Exception as e:
            raise ShapePropagationError(n, e) from e

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return _meta_state(value) if isinstance(value, torch.Tensor) else value

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        state = self._states.get(target)
        if state is None:
            state = {k: _meta_state(v) for k, v in module.state_dict(keep_vars=True).items()}
            self._states[target] = state
        return torch.func.functional_call(module, state, args, kwargs)


class _NonEmptyRun(_MetaRun):
    """A meta run that also fails where a node's tensor comes out empty although it is not at
    the analysed size: the meta kernels accept empty inputs and outputs (a convolution on a
    zero-width piece, a transposed convolution whose padding leaves nothing) that the real
    kernels refuse, and a later pad or join can hide the empty piece from the outputs."""

    def run_node(self, n):
        value = super().run_node(n)
        tm = n.meta.get("tensor_meta")
        if (isinstance(value, torch.Tensor) and 0 in value.shape and hasattr(tm, "shape")
                and 0 not in tuple(tm.shape)):
            raise ShapePropagationError(n, ValueError(f"{n.name} is empty ({tuple(value.shape)})"))
        return value


def run_meta(gm: fx.GraphModule, *args, nonempty: bool = False):
    """``gm(*args)`` on the meta device (tensor arguments should be meta tensors), recording
    nothing; raises :class:`ShapePropagationError` naming the node that fails. ``nonempty``:
    a node whose tensor is empty where its analysed value (``tensor_meta``) is not fails too."""
    return (_NonEmptyRun if nonempty else _MetaRun)(gm).run(*args)


class _Failed:
    """The value of a node the meta run could not run (tolerant mode)."""


class _MetaProp(_MetaRun):
    """Records shapes, work and saved bytes per node (see the module doc); parameters and
    buffers that autograd saves (a convolution's weight) are the model's, not a node's."""

    def __init__(self, gm, counter: FlopCounterMode | None = None, tolerant: bool = False):
        super().__init__(gm)
        self._counter = counter
        self._tolerant = tolerant
        self._current = None
        self._producer = {}  # storage -> the node whose output it is
        self._saved = set()  # storages counted as saved
        self._states_seen = 0
        self._keys = set()  # storages of the modules' meta states
        self._attrs = set()  # storages of tensors read by get_attr
        # every storage named by its address above, held weakly for the whole run: a weak
        # reference keeps the address from being reused by a later storage (which would then
        # pass for the first one and be counted for the wrong node, or not at all, varying from
        # run to run with the interpreter's allocations)
        self._refs = {}

    def _key(self, t) -> int:
        ref = StorageWeakRef(t.untyped_storage())
        return self._refs.setdefault(ref.cdata, ref).cdata

    def _state_keys(self) -> set:
        if self._states_seen != len(self._states):  # new module states since last time
            self._states_seen = len(self._states)
            self._keys = {self._key(v)
                          for state in self._states.values() for v in state.values()}
        return self._keys | self._attrs

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor):  # a parameter read by a function: not a node's
            self._attrs.add(self._key(value))
        return value

    def run(self, *args):
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(self._pack,
                                                                           lambda t: t):
            return super().run(*args)

    def _pack(self, t):
        key = self._key(t)
        if key not in self._saved and key not in self._state_keys():
            self._saved.add(key)
            owner = self._producer.get(key, self._current)
            if owner is not None:
                owner.meta[SAVED] = owner.meta.get(SAVED, 0) + t.untyped_storage().nbytes()
        return t

    def run_node(self, n):
        self._current = n
        n.meta[SAVED] = 0
        if self._tolerant:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if any(isinstance(v, _Failed) for v in torch.utils._pytree.tree_leaves((args,
                                                                                   kwargs))):
                n.meta[SHAPE_ERROR] = None
                return _Failed()
        before = self._counter.get_total_flops() if self._counter is not None else 0
        try:
            result = super().run_node(n)
        except ShapePropagationError as e:
            if not self._tolerant or n.op == "output":
                raise
            n.meta[SHAPE_ERROR] = e.cause
            return _Failed()
        n.meta["tensor_meta"] = fx.node.map_aggregate(
            result, lambda r: _extract_tensor_metadata(r) if isinstance(r, torch.Tensor) else r)
        for t in torch.utils._pytree.tree_leaves(result):
            if isinstance(t, torch.Tensor):
                self._producer.setdefault(self._key(t), n)
        if self._counter is not None:
            n.meta[WORK] = self._counter.get_total_flops() - before
        return result


class _FakeProp(ShapeProp):
    def run_node(self, n):
        try:
            return super().run_node(n)
        except Exception as e:
            raise ShapePropagationError(n, e.__cause__ or e) from e


def propagate_shapes(gm: fx.GraphModule, input_shape, dtype=torch.float32, extra=None) -> None:
    """Record ``node.meta['tensor_meta']`` and ``node.meta[WORK]`` for every node, running
    ``gm`` on a meta input of ``input_shape``. A node that fails (and every node that depends
    on it) gets ``node.meta[SHAPE_ERROR]`` instead: the error, or None for the dependents.

    ``extra`` gives the values of the other placeholders (tensors are used as meta tensors of
    the same shape); by default each takes its default value in ``forward``, else None.
    Raises :class:`ShapePropagationError` naming the node where the model fails.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if extra is None:
        extra = [p.args[0] if p.args else None for p in placeholders[1:]]
    extra = [_meta(v) for v in extra]
    image = torch.empty(tuple(input_shape), dtype=dtype, device="meta")
    try:
        with FlopCounterMode(display=False) as counter:
            _MetaProp(gm, counter).run(image, *extra)
        return
    except ShapePropagationError as e:
        if _is_device_mismatch(e.cause) and _fake_run(gm, input_shape, dtype, extra):
            return
    # go on past the failing node: a head that cannot run on the meta device (a data-dependent
    # ``.item()``) does not matter if the stem ends before it; the analysis decides from
    # node.meta[SHAPE_ERROR]
    with FlopCounterMode(display=False) as counter:
        _MetaProp(gm, counter, tolerant=True).run(image, *extra)


def _fake_run(gm, input_shape, dtype, extra) -> bool:
    """Shapes from fake tensors, for graphs that mix in CPU tensors made inside ``forward``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake = torch.empty(tuple(input_shape), dtype=dtype)
        extra = [torch.empty(v.shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else v
                 for v in extra]
    try:
        _FakeProp(gm, fake_mode=mode).propagate(fake, *extra)
    except ShapePropagationError:
        return False
    return True


def _is_device_mismatch(error) -> bool:
    text = str(error)
    return "meta" in text or "device" in text or isinstance(error, NotImplementedError)
