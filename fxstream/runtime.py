"""The streaming op: run the stem tile by tile, forward and backward, exactly.

Forward: under ``no_grad`` each tile's stem output is cropped to the outputs it owns and written
into preallocated boundary tensors. Backward: each tile's stem is recomputed with grad and
back-propagated with its slice of the boundary gradient by ``torch.autograd.grad``; parameter
gradients are summed over tiles and returned once (so DDP's hooks fire once).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from . import feeder, hostmem
from .errors import UnsupportedError
from .plan import TilePlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileSlices:
    """One tile as index tuples, built once per plan."""

    image: tuple  # index into the image (N, C, *spatial)
    starts: tuple[int, ...]  # region start per axis (for messages)
    outputs: tuple  # per boundary tensor: (global index, local index) or None when it owns none


@dataclass(frozen=True)
class ExecPlan:
    """A :class:`TilePlan` lowered to index tuples and boundary sizes."""

    plan: TilePlan
    tiles: tuple[TileSlices, ...]
    sizes: tuple[tuple[int, ...], ...]  # per boundary tensor: full size per spatial axis


def lower_plan(plan: TilePlan, image_rank: int, boundary_dims, boundary_ranks) -> ExecPlan:
    """Turn per-axis spans into ready-made index tuples (no per-tile Python work later)."""
    n_axes = len(plan.axes)
    tiles = []
    for spans in plan.tiles():
        image = [slice(None)] * image_rank
        for k, span in enumerate(spans):
            image[2 + k] = slice(span.start, span.stop)
        outputs = []
        for b, (dims, rank) in enumerate(zip(boundary_dims, boundary_ranks)):
            g_idx, l_idx = [slice(None)] * rank, [slice(None)] * rank
            empty = False
            for k, span in enumerate(spans):
                g0, g1 = span.outputs[b]
                l0, l1 = span.local[b]
                empty |= g1 <= g0
                g_idx[dims[k]] = slice(g0, g1)
                l_idx[dims[k]] = slice(l0, l1)
            outputs.append(None if empty else (tuple(g_idx), tuple(l_idx)))
        lengths = tuple(s.stop - s.start for s in spans)
        tiles.append((lengths, TileSlices(tuple(image), tuple(s.start for s in spans),
                                          tuple(outputs))))
    # largest tiles first, equal shapes together: the host memory pool (hostmem) then grows once
    # to the largest tile's working set and later tiles reuse it in the same pattern
    tiles.sort(key=lambda t: (-math.prod(t[0]), t[0]))
    tiles = [t for _, t in tiles]
    sizes = []
    for b in range(len(boundary_dims)):
        sizes.append(tuple(max(s.outputs[b][1] for s in plan.axes[k].spans)
                           for k in range(n_axes)))
    return ExecPlan(plan, tuple(tiles), tuple(sizes))


def _allocate(like: torch.Tensor, dims, sizes, device) -> torch.Tensor:
    """A full-size boundary tensor shaped like the tile output ``like`` (same layout); pinned
    when it is a host copy of a CUDA tensor."""
    shape = list(like.shape)
    for d, s in zip(dims, sizes):
        shape[d] = s
    pin = device.type == "cpu" and like.device.type == "cuda"
    return torch.empty(shape, dtype=like.dtype, device=device, pin_memory=pin,
                       memory_format=feeder.tile_format(like))


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


class StreamEngine(nn.Module):
    """The ``fxstream_stem`` submodule of a :class:`StreamingModule`: it owns no parameters.

    The stem GraphModule is held outside ``nn.Module`` registration so that the streaming module's
    ``state_dict`` keys stay those of the user's model.
    """

    def __init__(self, stem: fx.GraphModule, planner, boundary_dims, boundary_ranks,
                 boundary_names, batchnorms, channels: int, n_spatial: int, tile_size=None,
                 pool_backward: bool = True):
        super().__init__()
        self.tile_size = tile_size
        # whether the backward's tile loop pools host memory (fxstream.hostmem): faster, but the
        # heap holds more than the live tensors; a memory budget may turn it off
        self.pool_backward = pool_backward
        # in one tile, run with grad and keep the graph for the backward (no recompute): always
        # for the last segment of the stem; compile turns it off for the others unless a memory
        # budget found room for their graphs until the backward
        self.keep = True
        # with a CUDA stem: keep this segment's output map in pinned host memory (compile's
        # ``offload``; never the last segment, whose outputs go to the head)
        self.offload = False
        # with a CUDA stem: cuDNN autotuning inside the tile loops (compile's cudnn_benchmark)
        self.cudnn_benchmark = False
        # whether each tile's input is a copy (the stem may write its input in place) or a view
        # of the image or stored map (compile clears it where ``passes.only_read`` holds)
        self.copy_input = True
        object.__setattr__(self, "stem", stem)
        object.__setattr__(self, "_batchnorms", tuple(batchnorms))
        # the other segments' stems in a multi-cut chain (set by ChainEngine): where a segment
        # without parameters or buffers runs
        object.__setattr__(self, "_peers", ())
        self._planner = planner
        self.boundary_dims = tuple(tuple(d) for d in boundary_dims)
        self.boundary_ranks = tuple(boundary_ranks)
        self.boundary_names = tuple(boundary_names)
        self.channels = channels
        self.n_spatial = n_spatial
        self._plans: dict = {}

    cuts: tuple = ()  # a one-segment stem: no cuts (see ChainEngine)

    @property
    def segments(self) -> tuple:
        return (self,)

    # -- checks and plans -------------------------------------------------------------------
    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise UnsupportedError(f"the image must be a tensor, got {type(x).__name__}")
        want = 2 + self.n_spatial
        if x.dim() != want:
            raise UnsupportedError(f"expected an image with {want} dims (N, C, "
                                   f"{', '.join('spatial' for _ in range(self.n_spatial))}), "
                                   f"got shape {tuple(x.shape)}")
        if self.channels is not None and x.shape[1] != self.channels:
            raise UnsupportedError(f"expected {self.channels} channels, got {x.shape[1]} "
                                   f"(image shape {tuple(x.shape)})")
        training = [name for name, m in self._batchnorms if m.training]
        if training:
            raise UnsupportedError(
                f"train-mode BatchNorm in the streamed stem ({', '.join(training[:4])}"
                f"{', ...' if len(training) > 4 else ''}): its statistics span the whole image "
                "and batch, so tiles cannot reproduce them. Call fxstream.freeze_batchnorm(model) "
                "(eval-mode statistics, affine parameters still trained) or model.eval()")

    def exec_plan(self, x: torch.Tensor) -> ExecPlan:
        key = tuple(x.shape[2:])
        plan = self._plans.get(key)
        if plan is None:
            tile_plan = self._planner(tuple(x.shape))
            plan = lower_plan(tile_plan, x.dim(), self.boundary_dims, self.boundary_ranks)
            self._plans[key] = plan
            log.info("fxstream: %d tiles for input %s", len(plan.tiles), tuple(x.shape))
        return plan

    # -- running ----------------------------------------------------------------------------
    def stem_device(self, x):
        """The device of this segment's parameters (else buffers); a segment with neither (a
        lone pooling layer between cuts) runs where the rest of its chain does, not where its
        input is (an offloaded cut map is on the host); else the input's device."""
        for stem in (self.stem, *self._peers):
            for p in stem.parameters():
                return p.device
            for b in stem.buffers():
                return b.device
        return x.device

    def store_device(self, device: torch.device) -> torch.device:
        """Where this segment's outputs are kept: on the host when ``offload`` is set and the
        stem runs on CUDA (a cut map read by the next segment), else on the stem's device."""
        return torch.device("cpu") if self.offload and device.type == "cuda" else device

    def run_forward(self, x, plan: ExecPlan, rng_states=None):
        """Stream the stem over all tiles without grad; returns the boundary tensors."""
        device = self.stem_device(x)
        outs = [None] * len(self.boundary_dims)
        with hostmem.tile_pool(device, len(plan.tiles)), \
                feeder.device_settings(device, self.cudnn_benchmark):
            self._forward_tiles(x, plan, device, outs, rng_states)
        return tuple(outs)

    def _forward_tiles(self, x, plan, device, outs, rng_states):
        store = self.store_device(device)
        # a copy of each slice unless the stem only reads its input: an in-place first op
        # (ReLU(inplace=True) after a cut) must not write into a map that other tiles read
        for tile, xt in feeder.iter_tiles(x, plan.tiles, device, feeder.tile_format(x),
                                          self.copy_input):
            if rng_states is not None:
                rng_states.append(_rng_state(device))
            ys = _as_tuple(self.stem(xt))
            for b, y in enumerate(ys):
                where = tile.outputs[b]
                if where is None:
                    continue
                if outs[b] is None:
                    with hostmem.long_lived():
                        outs[b] = _allocate(y, self.boundary_dims[b], plan.sizes[b], store)
                outs[b][where[0]] = y[where[1]]
            del ys, xt
            hostmem.release(device)

    def forward(self, x):
        self._check_input(x)
        plan = self.exec_plan(x)
        params = tuple(p for p in self.stem.parameters() if p.requires_grad)
        if torch.is_grad_enabled() and (x.requires_grad or params):
            if self.keep and len(plan.tiles) == 1:
                return self._run_whole(x, plan)
            return StreamFunction.apply(self, plan, x, *params)
        with torch.no_grad():
            return self.run_forward(x, plan)

    def _run_whole(self, x, plan: ExecPlan):
        """A segment in one tile that ``keep``s its graph: run it with grad, no streaming. Its
        activations stay alive until the backward, which then needs no recompute. For the last
        segment the peak is the same as the streamed backward's, which recomputes them all
        anyway (only the head runs between); a kept earlier segment's activations are alive
        through the later segments (a memory budget counts them)."""
        (tile,) = plan.tiles
        # always a copy, even where the tile loops would take a view: an in-place first op must
        # not write into x
        xt = feeder.copy_tile(x, tile, self.stem_device(x), feeder.tile_format(x))
        ys = _as_tuple(self.stem(xt))
        outs = []
        for b, y in enumerate(ys):
            where = tile.outputs[b]
            out = None if where is None else y[where[1]]
            if out is None or tuple(out.shape[d] for d in self.boundary_dims[b]) != \
                    plan.sizes[b]:
                raise AssertionError(f"a one-tile plan does not cover boundary tensor {b}")
            outs.append(out)
        return tuple(outs)


def _rng_state(device):
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return cpu, cuda


@contextlib.contextmanager
def _replay(state, device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=True):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


class StreamFunction(torch.autograd.Function):
    """Inputs: the engine, the plan, the image and the stem's trainable parameters."""

    @staticmethod
    def forward(ctx, engine: StreamEngine, plan: ExecPlan, x, *params):
        device = engine.stem_device(x)
        ctx.engine, ctx.plan, ctx.device = engine, plan, device
        ctx.autocast = (torch.is_autocast_enabled(device.type),
                        torch.get_autocast_dtype(device.type))
        ctx.rng = []
        with torch.no_grad():
            outs = engine.run_forward(x, plan, ctx.rng)
        ctx.save_for_backward(x)
        ctx.x_requires_grad = x.requires_grad
        ctx.params = params
        return outs

    @staticmethod
    def backward(ctx, *grads):
        (x,) = ctx.saved_tensors
        param_grads = [None] * len(ctx.params)
        gx = torch.zeros_like(x) if ctx.x_requires_grad else None
        tiles = len(ctx.plan.tiles) if ctx.engine.pool_backward else 1
        with hostmem.tile_pool(ctx.device, tiles), \
                feeder.device_settings(ctx.device, ctx.engine.cudnn_benchmark):
            _backward_tiles(ctx, x, grads, gx, param_grads)
        return (None, None, gx, *param_grads)


def _backward_tiles(ctx, x, grads, gx, param_grads):
    """Recompute each tile with grad and back-propagate its slice of ``grads``; accumulates into
    ``gx`` and ``param_grads`` in place."""
    engine, plan, device, params = ctx.engine, ctx.plan, ctx.device, ctx.params
    enabled, dtype = ctx.autocast
    tiles = feeder.iter_tiles(x.detach(), plan.tiles, device, feeder.tile_format(x),
                              engine.copy_input)
    for (tile, xt), state in zip(tiles, ctx.rng):
        if gx is not None:
            xt.requires_grad_(True)  # a leaf: a copy, or a view of the detached input
        with torch.enable_grad():
            with _replay(state, device), torch.autocast(device.type, dtype=dtype,
                                                        enabled=enabled):
                # in-place ops may not touch a leaf that requires grad: feed a clone where the
                # stem may write its input
                clone = gx is not None and engine.copy_input
                ys = _as_tuple(engine.stem(xt.clone() if clone else xt))
            outs, gouts = [], []
            for b, y in enumerate(ys):
                where = tile.outputs[b]
                if where is None or grads[b] is None:
                    continue
                outs.append(y[where[1]])
                gouts.append(grads[b][where[0]].to(device=y.device, dtype=y.dtype))
        if not outs:
            continue
        inputs = ([xt] if gx is not None else []) + list(params)
        got = torch.autograd.grad(outs, inputs, gouts, allow_unused=True)
        if gx is not None:
            gxt, got = got[0], got[1:]
            if gxt is not None:
                gx[tile.image] += gxt.to(gx.device)
        for i, g in enumerate(got):
            if g is None:
                continue
            if param_grads[i] is None:
                with hostmem.long_lived():
                    param_grads[i] = g.clone()
            else:
                param_grads[i] += g
        del ys, outs, gouts, got, xt
        hostmem.release(device)


class ChainEngine(nn.Module):
    """A multi-cut stem: segment engines applied in turn, each on the stored map of the one
    before. Autograd chains their Functions, so the backward streams the segments in reverse."""

    def __init__(self, engines, cuts):
        super().__init__()
        self.segments = nn.ModuleList(engines)
        self.cuts = tuple(cuts)
        for e in engines:
            object.__setattr__(e, "_peers", tuple(o.stem for o in engines if o is not e))

    def forward(self, x):
        for engine in self.segments[:-1]:
            (x,) = engine(x)
        return self.segments[-1](x)

    def exec_plan(self, x):
        """The first segment's plan (the one that reads the image)."""
        return self.segments[0].exec_plan(x)
