"""The streaming op: run the stem tile by tile, forward and backward, exactly.

Forward: under ``no_grad`` each tile's stem output is cropped to the outputs it owns and written
into preallocated boundary tensors. Backward: each tile's stem is recomputed with grad and
back-propagated with its slice of the boundary gradient by ``torch.autograd.grad``; parameter
gradients are summed over tiles and returned once (so DDP's hooks fire once).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import UnsupportedError
from .plan import TilePlan

log = logging.getLogger(__name__)


def _load_malloc_trim():
    """glibc's ``malloc_trim``: gives freed heap pages back to the OS (None elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
        return trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_host_memory(device) -> None:
    """After a tile on the CPU: without this, glibc keeps the freed tile activations in its heap
    and fragmentation across tiles of different shapes raised peak RSS by ~50% in our
    measurements (resnet18, 2048x2048, tile 1024: 2.08 GiB vs 1.36 GiB)."""
    if device.type == "cpu" and _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


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
        tiles.append(TileSlices(tuple(image), tuple(s.start for s in spans), tuple(outputs)))
    sizes = []
    for b in range(len(boundary_dims)):
        sizes.append(tuple(max(s.outputs[b][1] for s in plan.axes[k].spans)
                           for k in range(n_axes)))
    return ExecPlan(plan, tuple(tiles), tuple(sizes))


def _allocate(like: torch.Tensor, dims, sizes, device) -> torch.Tensor:
    shape = list(like.shape)
    for d, s in zip(dims, sizes):
        shape[d] = s
    return torch.empty(shape, dtype=like.dtype, device=device)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


class StreamEngine(nn.Module):
    """The ``fxstream_stem`` submodule of a :class:`StreamingModule`: it owns no parameters.

    The stem GraphModule is held outside ``nn.Module`` registration so that the streaming module's
    ``state_dict`` keys stay those of the user's model.
    """

    def __init__(self, stem: fx.GraphModule, planner, boundary_dims, boundary_ranks,
                 boundary_names, batchnorms, channels: int, n_spatial: int, tile_size=None):
        super().__init__()
        self.tile_size = tile_size
        object.__setattr__(self, "stem", stem)
        object.__setattr__(self, "_batchnorms", tuple(batchnorms))
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
        for p in self.stem.parameters():
            return p.device
        for b in self.stem.buffers():
            return b.device
        return x.device

    def run_forward(self, x, plan: ExecPlan, rng_states=None):
        """Stream the stem over all tiles without grad; returns the boundary tensors."""
        device = self.stem_device(x)
        outs = [None] * len(self.boundary_dims)
        for t, tile in enumerate(plan.tiles):
            if rng_states is not None:
                rng_states.append(_rng_state(device))
            # a copy: the stem may start with an in-place op (ReLU(inplace=True) after a cut),
            # which must not write into the image or a stored cut map shared by other tiles
            xt = x[tile.image].to(device, non_blocking=True, copy=True)
            ys = _as_tuple(self.stem(xt))
            for b, y in enumerate(ys):
                where = tile.outputs[b]
                if where is None:
                    continue
                if outs[b] is None:
                    outs[b] = _allocate(y, self.boundary_dims[b], plan.sizes[b], device)
                outs[b][where[0]] = y[where[1]]
            del ys, xt
            release_host_memory(device)
        return tuple(outs)

    def forward(self, x):
        self._check_input(x)
        plan = self.exec_plan(x)
        params = tuple(p for p in self.stem.parameters() if p.requires_grad)
        if torch.is_grad_enabled() and (x.requires_grad or params):
            return StreamFunction.apply(self, plan, x, *params)
        with torch.no_grad():
            return self.run_forward(x, plan)


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
        engine, plan, device = ctx.engine, ctx.plan, ctx.device
        params = ctx.params
        param_grads = [None] * len(params)
        gx = torch.zeros_like(x) if ctx.x_requires_grad else None
        enabled, dtype = ctx.autocast
        for tile, state in zip(plan.tiles, ctx.rng):
            xt = x[tile.image].detach().to(device, non_blocking=True, copy=True)
            if gx is not None:
                xt.requires_grad_(True)
            with torch.enable_grad():
                with _replay(state, device), torch.autocast(device.type, dtype=dtype,
                                                            enabled=enabled):
                    # in-place ops may not touch a leaf that requires grad: feed a clone
                    ys = _as_tuple(engine.stem(xt.clone() if gx is not None else xt))
                outs, gouts = [], []
                for b, y in enumerate(ys):
                    where = tile.outputs[b]
                    if where is None or grads[b] is None:
                        continue
                    outs.append(y[where[1]])
                    gouts.append(grads[b][where[0]].to(y.dtype))
            if not outs:
                continue
            inputs = ([xt] if gx is not None else []) + list(params)
            got = torch.autograd.grad(outs, inputs, gouts, allow_unused=True)
            if gx is not None:
                gxt, got = got[0], got[1:]
                if gxt is not None:
                    gx[tile.image] += gxt.to(gx.device)
            for i, g in enumerate(got):
                if g is not None:
                    param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
            del ys, outs, gouts, got, xt
            release_host_memory(device)
        return (None, None, gx, *param_grads)


class ChainEngine(nn.Module):
    """A multi-cut stem: segment engines applied in turn, each on the stored map of the one
    before. Autograd chains their Functions, so the backward streams the segments in reverse."""

    def __init__(self, engines, cuts):
        super().__init__()
        self.segments = nn.ModuleList(engines)
        self.cuts = tuple(cuts)

    def forward(self, x):
        for engine in self.segments[:-1]:
            (x,) = engine(x)
        return self.segments[-1](x)

    def exec_plan(self, x):
        """The first segment's plan (the one that reads the image)."""
        return self.segments[0].exec_plan(x)
