"""The streaming op: run one planned pass tile by tile, forward and backward, exactly.

Forward: under ``no_grad`` each tile's outputs are cropped to the positions it owns and written
into full-size maps. Backward: each tile is recomputed with grad and back-propagated with its
slice of the maps' gradients by ``torch.autograd.grad``; the gradients of the parameters and of
the side inputs are summed over tiles and returned once (so DDP's hooks fire once). When the
gradient itself is differentiated (``create_graph=True``, gradient penalties) the per-tile
backward builds its graph too, so double backward is exact (it then holds every tile's graph).

Two things come from the caller rather than the plan: an *observer*, given at construction,
called after every tile (progress bars: :mod:`fxstream.progress`), and *sinks*, set for one call
with :func:`writing_into`, which receive a map's owned tile outputs instead of a full-size map
(dense outputs written tile by tile, never whole in memory).

Everything decided once per plan lives in the :class:`~fxstream.plans.Pass` value: its tiles,
whether a tile is a view of the source or a copy, whether the backward pools host memory,
whether a one-tile pass keeps its graph, whether random states are replayed.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import feeder, hostmem, reductions
from .errors import UnsupportedError
from .plans import Pass


# (pass index, phase "forward"/"backward", tiles done, tiles in the pass): called with 0 done
# before the first tile, then after each
Observer = Callable[[int, str, int, int], None]

_SINKS: contextvars.ContextVar[dict] = contextvars.ContextVar("fxstream_sinks", default={})


@contextlib.contextmanager
def writing_into(sinks: dict):
    """Within this block, a pass's map named in ``sinks`` (fx node name -> writable array-like,
    ``sink[index] = tensor`` with ``index`` a tuple of slices into the full map) is written
    there tile by tile, and the pass returns None in its place."""
    token = _SINKS.set(dict(sinks))
    try:
        yield
    finally:
        _SINKS.reset(token)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _allocate(like: torch.Tensor, dims, sizes, device) -> torch.Tensor:
    """A full-size map shaped like the tile output ``like`` (same layout); pinned when it is a
    host copy of a CUDA tensor."""
    shape = list(like.shape)
    for d, s in zip(dims, sizes):
        shape[d] = s
    pin = device.type == "cpu" and like.device.type == "cuda"
    return torch.empty(shape, dtype=like.dtype, device=device, pin_memory=pin,
                       memory_format=feeder.tile_format(like))


def autocast_state(device: torch.device):
    """``(enabled, dtype)`` of autocast on ``device``; off for devices without autocast
    (meta)."""
    try:
        return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
    except RuntimeError:
        return False, None


class PassEngine(nn.Module):
    """Runs one :class:`~fxstream.plans.Pass`. It owns no parameters: its graph's parameters are
    the user's (held outside ``nn.Module`` registration, so ``state_dict`` stays the model's)."""

    def __init__(self, spec: Pass, device: torch.device, cudnn_benchmark: bool = False,
                 observer: Optional[Observer] = None):
        super().__init__()
        object.__setattr__(self, "spec", spec)
        object.__setattr__(self, "graph", spec.graph)
        object.__setattr__(self, "observer", observer)
        self.device = device
        self.cudnn_benchmark = cudnn_benchmark

    def notify(self, phase: str, done: int) -> None:
        """Tell the observer (if any) that ``done`` tiles of ``phase`` have run."""
        if self.observer is not None:
            self.observer(self.spec.index, phase, done, self.spec.num_tiles)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"pass {s.index}: {s.source} -> {', '.join(o.name for o in s.outputs)}, "
                f"{s.num_tiles} tiles")

    def store_device(self) -> torch.device:
        """Where the pass's maps are kept: on the host when offloaded from a CUDA stem."""
        if self.spec.offload and self.device.type == "cuda":
            return torch.device("cpu")
        return self.device

    def forward(self, source, *side):
        if self.device.type == "cpu":
            hostmem.fix_thresholds()  # what the memory model assumes of malloc
        params = tuple(p for p in self.graph.parameters() if p.requires_grad)
        needs_grad = _requires_grad(source) or params or any(
            isinstance(s, torch.Tensor) and s.requires_grad for s in side)
        if torch.is_grad_enabled() and needs_grad:
            if self.spec.keep:
                return self._run_whole(source, side)
            return StreamFunction.apply(self, source, len(side), *side, *params)
        with torch.no_grad():
            return self.run_forward(source, side)

    def run_forward(self, source, side, rng_states=None):
        """Stream the pass over all tiles without grad; returns its maps."""
        tiles = self.spec.num_tiles if self.spec.pool else 1
        with hostmem.tile_pool(self.device, tiles), \
                feeder.device_settings(self.device, self.cudnn_benchmark):
            return self._forward_tiles(source, side, rng_states)

    def _forward_tiles(self, source, side, rng_states):
        spec, store = self.spec, self.store_device()
        side = _on(side, self.device)
        n_maps = len(spec.outputs)
        sinks = _SINKS.get()
        sinks = [sinks.get(o.name) for o in spec.outputs]
        outs = None
        partials = [[None] * spec.num_tiles for _ in spec.sums]
        tiles = feeder.iter_tiles(source, spec.tiles, self.device, feeder.tile_format(source),
                                  copy=not spec.view_input)
        shape = None
        hostmem.trim(self.device)
        guard = hostmem.Guard(self.device, spec.heap_bound)
        self.notify("forward", 0)
        for t, (tile, xt) in enumerate(tiles):
            if tile.lengths != shape:  # tiles of one shape reuse the pooled pages; a new
                shape = tile.lengths  # shape starts from a trimmed heap
                hostmem.trim(self.device)
            if rng_states is not None:
                rng_states.append(_rng_state(self.device))
            ys = _as_tuple(self.graph(xt, *side))
            if outs is None:  # shapes, dtype and layout from the first (largest) tile
                with hostmem.long_lived():
                    outs = [sink if sink is not None else _allocate(y, o.dims, o.sizes, store)
                            for y, o, sink in zip(ys[:n_maps], spec.outputs, sinks)]
                guard.allow(sum(o.untyped_storage().nbytes() for o, sink in zip(outs, sinks)
                                if sink is None))  # filled by the tiles, not the heap
            for out, y, where in zip(outs, ys[:n_maps], tile.outputs):
                if where is not None:
                    out[where[0]] = y[where[1]]
            for j, s in enumerate(spec.sums):
                where = tile.outputs[n_maps + j]
                if where is not None:
                    partials[j][t] = reductions.partial(s, ys[n_maps + j][where[1]])
            del ys, xt
            hostmem.release(self.device)
            guard.after_tile()
            self.notify("forward", t + 1)
        outs = [None if sink is not None else out for out, sink in zip(outs, sinks)]
        return tuple(outs) + tuple(_stack(p) for p in partials)

    def _run_whole(self, source, side):
        """A one-tile pass that keeps its graph: run with grad, no streaming. Its activations
        stay alive until the backward, which then needs no recompute (a memory budget counts
        them). A pass that may write its input gets a copy of it."""
        (tile,) = self.spec.tiles
        if self.spec.view_input and not feeder.is_lazy(source) and source.device == self.device:
            xt = source
        else:
            xt = feeder.copy_tile(source, tile, self.device, feeder.tile_format(source))
        ys = _as_tuple(self.graph(xt, *_on(side, self.device)))
        n_maps = len(self.spec.outputs)
        maps = tuple(y[where[1]] for y, where in zip(ys[:n_maps], tile.outputs))
        sums = tuple(reductions.partial(s, ys[n_maps + j][tile.outputs[n_maps + j][1]])[None]
                     for j, s in enumerate(self.spec.sums))
        return maps + sums


def _requires_grad(source) -> bool:
    """A tensor source may want its gradient; a lazily read image never does."""
    return isinstance(source, torch.Tensor) and source.requires_grad


def _stack(partials) -> torch.Tensor:
    """The tiles' partials of one reduction, stacked in tile order (zeros for a tile that owns
    none of its positions: its count is 0)."""
    like = next(p for p in partials if p is not None)
    return torch.stack([torch.zeros_like(like) if p is None else p for p in partials])


def _on(side, device):
    return tuple(s.to(device) if isinstance(s, torch.Tensor) else s for s in side)


def _rng_state(device):
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return cpu, cuda


@contextlib.contextmanager
def _replay(state, device):
    if state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=True):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


class StreamFunction(torch.autograd.Function):
    """Inputs: the engine, the source map, the number of side inputs, the side inputs, and the
    pass's trainable parameters."""

    @staticmethod
    def forward(ctx, engine: PassEngine, source, n_side: int, *rest):
        side, params = rest[:n_side], rest[n_side:]
        ctx.engine, ctx.n_side = engine, n_side
        ctx.autocast = autocast_state(engine.device)
        ctx.rng = [] if engine.spec.random else None
        with torch.no_grad():
            outs = engine.run_forward(source, side, ctx.rng)
        tensors = [s for s in side if isinstance(s, torch.Tensor)]
        ctx.side = [None if isinstance(s, torch.Tensor) else s for s in side]
        # a lazy image is no tensor: kept as it is (its tiles are read again in the backward)
        ctx.lazy = source if feeder.is_lazy(source) else None
        ctx.save_for_backward(*([] if ctx.lazy is not None else [source]), *tensors, *params)
        # an output nothing differentiates (a sum no statistic read with grad reads) gets None,
        # not zeros: its tiles back-propagate nothing for it
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        engine, spec = ctx.engine, ctx.engine.spec
        saved = list(ctx.saved_tensors)
        source = ctx.lazy if ctx.lazy is not None else saved.pop(0)
        rest = saved
        side = [rest.pop(0) if s is None else s for s in ctx.side]
        params = rest
        create_graph = torch.is_grad_enabled()  # the gradient will be differentiated
        wanted = [ctx.needs_input_grad[1]] + list(ctx.needs_input_grad[3:3 + ctx.n_side])
        if all(g is None for g in grads):  # nothing to back-propagate: no recompute
            return (None, None, None, *[None] * (len(ctx.side) + len(params)))
        if create_graph and params and any(wanted[1:]):
            raise UnsupportedError(
                f"fxstream: pass {spec.index} reads tensors computed outside it that want a "
                f"gradient ({', '.join(spec.side_inputs)}: statistics streamed by an earlier "
                "pass, or the model's other arguments), and a backward with create_graph=True "
                "(a gradient penalty, double backward) would count their path to the "
                "parameters twice. Differentiate the plain model instead or detach those "
                "arguments; statistics are computed inside one tile under a larger "
                "memory_budget or tile_size, and not at all with fxstream.freeze_batchnorm.")
        tiles = spec.num_tiles if spec.pool and not create_graph else 1
        with hostmem.tile_pool(engine.device, tiles), \
                feeder.device_settings(engine.device, engine.cudnn_benchmark):
            gsource, gside, gparams = _backward_tiles(ctx, source, side, params, grads, wanted,
                                                      create_graph)
        return (None, gsource, None, *gside, *gparams)


def _backward_tiles(ctx, source, side, params, grads, wanted, create_graph):
    """Recompute each tile with grad and back-propagate its slice of ``grads``. Returns the
    gradients of the source map, the side inputs and the parameters (summed over tiles)."""
    engine, spec, device = ctx.engine, ctx.engine.spec, ctx.engine.device
    enabled, dtype = ctx.autocast
    want_source, want_side = wanted[0], wanted[1:]
    # leaves the tiles' graphs end at (with create_graph: the inputs themselves)
    side_in = [s if create_graph or not isinstance(s, torch.Tensor) else
               s.detach().requires_grad_(w) for s, w in zip(_on(side, device), want_side)]
    side_grad = [s for s, w in zip(side_in, want_side) if w and isinstance(s, torch.Tensor)]
    with hostmem.long_lived():  # outlives the loop: not from the pooled heap
        gsource = torch.zeros_like(source) if want_source else None
    gside = [None] * len(side_grad)
    gparams = [None] * len(params)
    src = source if create_graph or feeder.is_lazy(source) else source.detach()
    copy = not spec.view_input and not create_graph
    tiles = feeder.iter_tiles(src, spec.tiles, device, feeder.tile_format(source), copy)
    states = ctx.rng if ctx.rng is not None else [None] * spec.num_tiles
    shape = None
    hostmem.trim(device)
    guard = hostmem.Guard(device, spec.heap_bound if not create_graph else 0)
    engine.notify("backward", 0)
    for t, ((tile, xt), state) in enumerate(zip(tiles, states)):
        if tile.lengths != shape:  # tiles of one shape reuse the pooled pages; a new shape
            shape = tile.lengths  # starts from a trimmed heap
            hostmem.trim(device)
        if want_source and not create_graph:
            xt.requires_grad_(True)  # a leaf: a copy, or a view of the detached source
        with torch.enable_grad():
            amp = torch.autocast(device.type, dtype=dtype) if enabled else \
                contextlib.nullcontext()
            with _replay(state, device), amp:
                # in-place ops may not touch a leaf that requires grad: run on a clone where
                # the pass may write its input
                run_on = xt.clone() if want_source and not spec.view_input else xt
                ys = _as_tuple(engine.graph(run_on, *side_in))
            outs, gouts = [], []
            n_maps = len(spec.outputs)
            for y, where, g in zip(ys[:n_maps], tile.outputs, grads):
                if where is None or g is None:
                    continue
                outs.append(y[where[1]])
                gouts.append(g[where[0]].to(device=y.device, dtype=y.dtype))
            for j, s in enumerate(spec.sums):
                where, g = tile.outputs[n_maps + j], grads[n_maps + j]
                if where is None or g is None:
                    continue
                part = reductions.partial(s, ys[n_maps + j][where[1]])
                outs.append(part)
                gouts.append(g[t].to(device=part.device, dtype=part.dtype))
        # outputs that depend on nothing differentiable (a statistic of an image that wants
        # no gradient, in a pass whose other outputs read the parameters) add nothing
        pairs = [(o, g) for o, g in zip(outs, gouts) if o.requires_grad]
        outs, gouts = [o for o, _ in pairs], [g for _, g in pairs]
        if not outs:
            engine.notify("backward", t + 1)
            continue
        inputs = ([xt] if want_source else []) + side_grad + list(params)
        got = list(torch.autograd.grad(outs, inputs, gouts, allow_unused=True,
                                       create_graph=create_graph))
        if want_source:
            gxt = got.pop(0)
            if gxt is not None:
                # in place also with create_graph: autograd records it (CopySlices)
                gsource[tile.region] += gxt.to(gsource.device)
        for acc, new in ((gside, got[:len(side_grad)]), (gparams, got[len(side_grad):])):
            for i, g in enumerate(new):
                if g is None:
                    continue
                if acc[i] is None:
                    with hostmem.long_lived():
                        acc[i] = g if create_graph else g.clone()
                else:
                    acc[i] = acc[i] + g if create_graph else acc[i].add_(g)
        del ys, outs, gouts, got, xt
        hostmem.release(device)
        guard.after_tile()
        engine.notify("backward", t + 1)
    # gradients for every side input slot (None where not wanted or not a tensor)
    it = iter(gside)
    gside_all = [next(it) if w and isinstance(s, torch.Tensor) else None
                 for s, w in zip(side_in, want_side)]
    return gsource, gside_all, gparams


__all__ = ["Observer", "PassEngine", "StreamFunction", "autocast_state", "writing_into"]
