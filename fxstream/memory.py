"""The memory model: what a plan holds at its peak, from what autograd saves.

Two ways to the same numbers, one fast and one exact:

- **Per node** (:func:`node_costs`, for the budget search, which scores hundreds of segments):
  the shape pass records for every node the bytes of its output, the bytes autograd saves for
  its backward (``passes.SAVED``, each saved storage once) and its forward FLOPs. A segment's
  tile then holds, in its backward, the saved bytes of its nodes and the gradients in flight
  (``GRADS_IN_FLIGHT`` maps of its largest one: a node's output and input gradients and a
  pending branch gradient), all scaled to the tile's share of the map, plus one set of its
  weights' gradients per tile and the runtime's copies of the input tile.
- **Per pass** (:func:`measure_pass`, for the plan that is chosen): the runtime's own code runs
  the pass's first two tiles, forward and backward, on the meta device while a dispatch mode
  tracks every storage it allocates and frees. Nothing is fitted: this is what the code allocates.

Kernels also allocate what no tensor shows: on the CPU oneDNN's convolutions reorder their
tensors to and from its blocked layout, so a convolution holds one more copy of the larger of
its input and output in the forward, and of its input and output gradient in the backward
(measured: 64->64 3x3 on 1024², 256 MiB maps, peaked 264 MiB over its output in the forward and
548 MiB over its gradients in the backward; ``WORKSPACE``). What the real process holds beyond
that is the allocator's doing (the host memory pool of :mod:`fxstream.hostmem` keeps freed
pages for the next tile): ``ALLOCATOR_FACTOR``, one number per backend, calibrated by
``examples/memory_check.py`` against measured peaks, scales the pooled tile loops' live bytes.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import sympy
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import passes
from passes import GEOMETRY, ROLE, Local

from .plans import Pass
from .runtime import PassEngine, StreamFunction

# what the allocator holds per live byte of a pooled tile loop, an upper bound. CPU: glibc's
# heap with the host memory pool (fxstream.hostmem) keeps freed chunks, and a tile's recompute
# and backward do not fit all their allocations into the holes earlier ones left. Measured
# (examples/memory_check.py, VmHWM per phase against the tracked live bytes): ResNet-18 at
# 2048², 1.9x within the first of 36 tiles of 300² and up to 2.6x after all of them, 1.5x over
# 9 tiles, 1.1x over 4; MobileNet-V2 1.1x over 9. A budget plan's pooled loops trim the heap
# after any tile that leaves it over HEAP_BOUND times their live bytes (hostmem.Guard), so the
# drift across tiles stays under the factor. Outside the pool every large tensor is mapped and
# unmapped (hostmem.fix_thresholds) and the process holds its live bytes: factor 1, measured
# within 0.04 GiB per phase. The search weighs a pooled loop at this factor against an
# unpooled one at budget.UNPOOLED_COST. CUDA has no pooled loops (its caching allocator reuses
# blocks by itself): there the live bytes are the estimate.
ALLOCATOR_FACTOR = {"cpu": 2.2}
HEAP_BOUND = 2.0
# gradient bytes alive at once in a segment's backward beyond what it saved, in units of its
# largest map (the saved tensors of the nodes already back-propagated are freed as gradients
# appear: resnet18's segments measured 0.75-1x on the meta device)
GRADS_IN_FLIGHT = 1


@dataclass(frozen=True)
class NodeCost:
    """What one stem node costs at the analysed input size."""

    name: str
    bytes: int  # its output, 0 when it writes its input in place
    saved: int  # what autograd saves for the backward that belongs to it
    work: float  # forward work in MAC units: FLOPs / 2, or one per element without FLOPs
    params: int  # bytes of the parameters it owns
    stride: tuple
    lo: tuple
    hi: tuple
    sizes: tuple
    numel: int
    map_bytes: int  # its output's bytes even when in place (a stored cut map)
    read_only: bool  # every user only reads it (a segment starting here gets views)
    conv_in: int = 0  # a convolution's input bytes (its kernels' workspace, see WORKSPACE)


@dataclass(frozen=True)
class PassMemory:
    """Live bytes of one pass beyond the maps the plan counts apart (its source and output
    maps and their gradients): the forward's tile, the backward's tile, and the graph a
    one-tile pass keeps from its forward to its backward."""

    forward: int
    backward: int
    kept: int = 0


def node_costs(analysis) -> dict[str, NodeCost]:
    """Per stem tensor (graph order), its :class:`NodeCost`."""
    gm = analysis.graph_module
    values = analysis.size_values
    out = {}
    for node in gm.graph.nodes:
        g = node.meta.get(GEOMETRY)
        shape = passes.concrete_shape(node)
        if node.meta.get(ROLE) not in ("stem", "boundary") or not isinstance(g, Local) or \
                shape is None:
            continue
        numel = math.prod(shape)
        size = numel * node.meta["tensor_meta"].dtype.itemsize
        flops = node.meta.get(passes.WORK, 0)
        params = 0
        if node.op == "call_module":
            params = sum(p.numel() * p.element_size()
                         for p in gm.get_submodule(node.target).parameters())
        inplace = passes.writes_in_place(node, gm)
        conv_in = 0
        if flops and node.args and isinstance(node.args[0], torch.fx.Node) and \
                _is_conv(node, gm):
            tm = node.args[0].meta.get("tensor_meta")
            conv_in = math.prod(tm.shape) * tm.dtype.itemsize if hasattr(tm, "shape") else 0
        out[node.name] = NodeCost(
            node.name, 0 if inplace else size, node.meta.get(passes.SAVED, size),
            flops / 2 if flops else numel, params,
            tuple(_f(a.stride) for a in g.axes),
            tuple(_f(sympy.sympify(a.lo).subs(values)) for a in g.axes),
            tuple(_f(sympy.sympify(a.hi).subs(values)) for a in g.axes),
            tuple(shape[d] for d in g.dims), numel, size, passes.only_read(node, gm), conv_in)
    return out


def _is_conv(node, gm) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), torch.nn.modules.conv._ConvNd)
    return "conv" in getattr(node.target, "__name__", "")


def _f(x):
    from fractions import Fraction

    n, d = sympy.fraction(sympy.Rational(x))
    return Fraction(int(n), int(d))


def segment_memory(costs, names, src: str, frac: float, view: bool, source_grad: bool,
                   last: bool) -> PassMemory:
    """The per-node model of a segment over tiles holding ``frac`` of its map (see the module
    doc). ``view``: tiles are views of the source (else copies, cloned for the recompute);
    ``source_grad``: the backward computes the source's gradient."""
    nodes = [costs[n] for n in names if n in costs]
    largest = max((n.bytes for n in nodes), default=0)
    weights = sum(n.params for n in nodes)
    tile_in = frac * costs[src].map_bytes
    copies = (0 if view else 1) * tile_in
    # the convolutions' workspace (WORKSPACE, on the CPU): the largest of them
    fwd_ws = max((max(n.conv_in, n.map_bytes) for n in nodes if n.conv_in), default=0)
    bwd_ws = max((n.conv_in + n.map_bytes for n in nodes if n.conv_in), default=0)
    forward = frac * (_forward_live(nodes) + fwd_ws) + copies
    backward = frac * (sum(n.saved for n in nodes) + GRADS_IN_FLIGHT * largest + bwd_ws) \
        + weights
    backward += copies + (tile_in if source_grad else 0) + (copies if source_grad else 0)
    kept = 0 if last else sum(n.saved for n in nodes) + copies
    return PassMemory(int(forward), int(backward), int(kept))


def _forward_live(nodes) -> int:
    """The most a forward without grad holds at once, at full size: a node's output and its
    input (a bound for chains; branches add the pending one)."""
    sizes = [n.bytes for n in nodes]
    pairs = [a + b for a, b in zip(sizes, sizes[1:])] or sizes or [0]
    return max(pairs) + (max(sizes) if len(sizes) > 2 else 0)


# ---------------------------------------------------------------------------------------------
# exact: the runtime's code on the meta device


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _conv_forward(args, out):
    return max(_nbytes(args[0]), _nbytes(out))


def _conv_backward(args, out):
    return _nbytes(args[0]) + _nbytes(args[1])  # grad_output, input


# per backend: op -> bytes it holds beyond its inputs and outputs while it runs
WORKSPACE = {
    "cpu": {torch.ops.aten.convolution.default: _conv_forward,
            torch.ops.aten.convolution_backward.default: _conv_backward},
}


class _Tracker(TorchDispatchMode):
    """Tracks the bytes of every storage allocated under it until it is freed (storages an op
    returns that are not among its inputs': views and in-place results are not allocations),
    and what kernels hold while they run on ``backend`` (``WORKSPACE``)."""

    def __init__(self, backend: str = "meta"):
        super().__init__()
        self.live = {}
        self.current = 0
        self.peak = 0
        self.workspace = WORKSPACE.get(backend, {})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        extra = self.workspace.get(func)
        if extra is not None:
            self.peak = max(self.peak, self.current + sum(
                _nbytes(t) for t in torch.utils._pytree.tree_leaves(out)) + extra(args, out))
        inputs = {StorageWeakRef(t.untyped_storage()).cdata
                  for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live and ref.cdata not in inputs:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        for key in [k for k, (r, _) in self.live.items() if r.expired()]:
            self.current -= self.live.pop(key)[1]
        self.peak = max(self.peak, self.current)
        return out


def _spatial(p: Pass, shape) -> dict:
    """Tensor dim -> spatial axis of the pass's source (from its first tile's region)."""
    dims = [d for d, idx in enumerate(p.tiles[0].region) if idx != slice(None)]
    if len(dims) != len(p.tiles[0].lengths):  # an axis the tile covers whole
        dims = list(range(len(shape) - len(p.tiles[0].lengths), len(shape)))
    return {d: k for k, d in enumerate(dims)}


def measure_pass(p: Pass, source_shape, source_dtype, side=(), source_grad=False,
                 backend: str = "cpu", read_sums=None, side_grad=None) -> PassMemory:
    """Run the pass's first two tiles (the largest first) on the meta device with the runtime's
    own code and track what it allocates: the peak of the forward (no grad) and of the backward
    (recompute with grad and back-propagation), less the full-size maps (outputs, the source's
    gradient) the plan counts apart; and for a pass that keeps its graph, what stays alive until
    its backward. ``side``: the side inputs as meta tensors; those that require grad (statistics
    computed in the step) get their gradient, as in the step. ``read_sums``: per sum of the
    pass, whether what it computes is read with grad (by a later pass or the head; default: all
    are). As in the step, only those get a gradient: a sum nobody reads adds no backward through
    its summed tensor (a kept graph is never differentiated there; a recomputed pass is handed
    None for it and skips it). ``side_grad``: whether a side input wants a gradient in the
    step (the planner reads it from the shape pass); default: any side tensor handed in that
    requires grad."""
    graph = copy.deepcopy(p.graph).to("meta")
    tile = p.tiles[0]
    # the loop's first two tiles (largest first): the second back-propagates while the first
    # one's parameter and statistics gradients are held, summed (a MONAI U-Net pass: 0.06 GiB
    # more than its first tile); every later tile is no larger than the second
    spec = replace(p, tiles=p.tiles[:2], graph=graph)
    engine = PassEngine(spec, torch.device("meta"))
    shape = list(source_shape)
    source = torch.empty(shape, dtype=source_dtype, device="meta", requires_grad=source_grad)
    side = tuple(side)
    # the forward: the tile's copy (unless a view) and the graph's own peak without grad
    region = torch.empty([n if d not in _spatial(p, shape) else tile.lengths[k] for d, n in
                          enumerate(shape) for k in [_spatial(p, shape).get(d)]],
                         dtype=source_dtype, device="meta")
    with torch.no_grad(), _Tracker(backend) as fwd:
        graph(region, *side)
    forward = fwd.peak + (0 if p.view_input else region.untyped_storage().nbytes())
    grads_in = None
    kept = 0
    if p.keep:
        with torch.enable_grad(), _Tracker(backend) as bwd:
            outs = engine._run_whole(source, side)
            kept = bwd.current - sum(o.untyped_storage().nbytes() for o in outs)
            # outputs that need no gradient (no parameter, a source without grad) have no
            # backward: autograd refuses them
            outs = [o for o in _read(outs, p, read_sums) if o.requires_grad]
            grads_in = [torch.ones_like(o) for o in outs]
            failed = False
            try:
                if outs:
                    torch.autograd.backward(outs, grads_in)
            except RuntimeError as e:
                failed = _own_inplace_error(e)
        backward = 0 if failed else \
            bwd.peak - sum(g.untyped_storage().nbytes() for g in grads_in)
        return PassMemory(max(forward, 0), max(backward, 0), kept if p.keep else 0)
    params = [q for q in graph.parameters() if q.requires_grad]
    if side_grad is None:
        side_grad = any(isinstance(s, torch.Tensor) and s.requires_grad for s in side)
    # nothing to differentiate (a frozen stem reading no argument that wants a gradient: its
    # statistics need none either, computed from the same frozen layers): no backward
    if not params and not source_grad and not side_grad:
        return PassMemory(max(forward, 0), 0, 0)
    with torch.enable_grad():
        outs = _read(StreamFunction.apply(engine, source, len(side), *side, *params), p,
                     read_sums)
        grads_in = [torch.ones_like(o) for o in outs]
        with _Tracker(backend) as bwd:
            try:
                got = torch.autograd.grad(
                    outs, ([source] if source_grad else []) + params +
                    [s for s in side if isinstance(s, torch.Tensor) and s.requires_grad],
                    grads_in, allow_unused=True)
            except RuntimeError as e:
                if _own_inplace_error(e):
                    return PassMemory(max(forward, 0), 0, 0)
            full = sum(g.untyped_storage().nbytes() for g in got[:1]) if source_grad else 0
    backward = bwd.peak - full
    return PassMemory(max(forward, 0), max(backward, 0), 0)


def _read(outs, p: Pass, read_sums) -> list:
    """The pass's outputs the step gives a gradient: its maps, and the sums read."""
    n_maps = len(p.outputs)
    if read_sums is None:
        return list(outs)
    return list(outs[:n_maps]) + [o for o, r in zip(outs[n_maps:], read_sums) if r]


def _own_inplace_error(e: RuntimeError) -> bool:
    """Whether a backward failed because the model writes in place a tensor its backward needs
    (the full model's own backward fails the same way, so the plan is still good for inference
    and a training step raises autograd's error as the model would); re-raises anything else."""
    if "modified by an inplace operation" not in str(e):
        raise e
    return True


__all__ = ["ALLOCATOR_FACTOR", "GRADS_IN_FLIGHT", "NodeCost", "PassMemory", "measure_pass",
           "node_costs", "segment_memory"]


# ---------------------------------------------------------------------------------------------
# a whole step: the full image, and a plan's phases


def full_step_live(analysis, backend: str = "cpu") -> int:
    """The most bytes a full-image training step holds at once beyond the model (its forward
    with grad and the backward of the sum of its outputs, on the meta device), image included;
    0 when the model cannot run on the meta device."""
    gm = copy.deepcopy(analysis.graph_module).to("meta")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    extra = []
    for node in placeholders[1:]:
        tm = node.meta.get("tensor_meta")
        extra.append(torch.empty(tuple(tm.shape), dtype=tm.dtype, device="meta")
                     if hasattr(tm, "shape") else tm)
    dtype = placeholders[0].meta["tensor_meta"].dtype
    try:
        with torch.enable_grad(), _Tracker(backend) as t:
            x = torch.empty(analysis.input_shape, dtype=dtype, device="meta")
            outs = [o for o in torch.utils._pytree.tree_leaves(gm(x, *extra))
                    if isinstance(o, torch.Tensor) and o.requires_grad]
            if outs:
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    except Exception:  # a model the meta device cannot run: no estimate
        return 0
    return t.peak


def head_bytes(analysis) -> int:
    """What the head holds during its backward: what autograd saves for it and the gradients
    of its two largest tensors."""
    saved, sizes = 0, []
    for node in analysis.graph_module.graph.nodes:
        if node.meta.get(ROLE) != "head":
            continue
        saved += node.meta.get(passes.SAVED, 0)
        tm = node.meta.get("tensor_meta")
        if hasattr(tm, "shape"):
            sizes.append(math.prod(tm.shape) * tm.dtype.itemsize)
    return saved + sum(sorted(sizes)[-2:])


@dataclass(frozen=True)
class Phase:
    """One moment of a step and what it holds."""

    name: str  # "forward of pass 1", "backward of pass 0"
    bytes: int


def plan_phases(passes_, measured, map_bytes, source_grads, fixed: int, factor: float
                ) -> list[Phase]:
    """The peak of every phase of a step: each pass's forward and backward, with what earlier
    passes hold (their cut maps and kept graphs), the maps' gradients in flight and the pass's
    own live bytes (``measured``, one :class:`PassMemory` per pass; the tile loops' scaled by
    the allocator ``factor``). ``map_bytes``: per pass, its cut maps (the boundary tensors are
    in ``fixed``); ``source_grads``: per pass, the gradient of the map it reads, when computed."""
    phases, held = [], 0
    last = len(passes_) - 1
    for p, m, out, source_grad in zip(passes_, measured, map_bytes, source_grads):
        f = factor if p.pool and p.num_tiles > 1 else 1.0
        phases.append(Phase(f"forward of pass {p.index}",
                            int(fixed + held + out + f * m.forward)))
        held_before = held
        held += out + (m.kept if p.keep and p.index < last else 0)
        phases.append(Phase(f"backward of pass {p.index}", int(
            fixed + held_before + out + source_grad + f * m.backward)))
    return phases


__all__ += ["Phase", "full_step_live", "head_bytes", "plan_phases"]
