"""Legal tiles: which tile lengths a segment's ops accept, checked on the meta device.

Geometry (:mod:`passes`) says which tiles align with every stride; it cannot say which ones an
op refuses at run time (a kernel wider than the tile, an adaptive pool with too small an input).
:func:`validator` runs a step's graph on a meta tensor of the tile's shape and reports the
output sizes or None; the tiler (:mod:`fxstream.tiling`) widens any tile it refuses, and
:func:`smallest_tile_size` searches the smallest size every step accepts.
"""
from __future__ import annotations

import torch

import passes
from passes import GEOMETRY, ROLE, Local

from .analysis import Analysis
from .errors import PlanError
from .segments import Segment, resolve_cuts, split_segments
from .tiling import TilePlan, plan_tiles, smallest_tile, too_small


def check_stem_sizes(analysis: Analysis):
    """Every stem tensor must be non-empty on this image (else the image is too small)."""
    gm = analysis.graph_module
    values = analysis.size_values
    for node in gm.graph.nodes:
        g = node.meta.get(GEOMETRY)
        if node.meta.get(ROLE) not in ("stem", "boundary") or not isinstance(g, Local):
            continue
        for k, ax in enumerate(g.axes):
            size = int(ax.size.subs(values))
            if size < 1:
                raise PlanError(
                    f"the image {tuple(analysis.input_shape)} is too small for the stem: "
                    f"'{node.name}' ({passes.qualname(node) or node.op}) would have size "
                    f"{size} on axis {k} (size = {ax.size}); use a larger image")


def plan_segment(analysis: Analysis, seg: Segment, tile_size, step=None) -> TilePlan:
    """The tiles of one step of a segment (default: its last), every distinct tile length
    checked on the meta device."""
    step = step or seg.steps[-1]
    try:
        return plan_tiles(seg.sizes, step.align, step.geometry, tile_size,
                          valid=validator(analysis, seg, step))
    except PlanError as e:
        if getattr(e, "axis", None) is None or len(seg.steps) == 1:
            raise
        # one of several steps (passes over the segment) refused the tile: name the tile that
        # every step accepts, not this step's smallest (the next step may want more)
        k = e.axis
        need = max(smallest_tile(seg.sizes, s.align, s.geometry, validator(analysis, seg, s))[k]
                   for s in seg.steps)
        raise too_small(k, e.tile, need, max(s.align[k] for s in seg.steps)) from None


def smallest_tiles(analysis: Analysis, cuts) -> dict:
    """Per ``(source, destination)`` segment between ``cuts``: its smallest legal tile per axis
    (every step of it), in its own input's pixels."""
    out = {}
    for seg, dst in zip(split_segments(analysis, cuts), (*cuts, None)):
        sizes = [smallest_tile(seg.sizes, step.align, step.geometry,
                               validator(analysis, seg, step)) for step in seg.steps]
        out[(seg.source, dst)] = tuple(max(s[k] for s in sizes) for k in range(len(seg.sizes)))
    return out


def smallest_tile_size(analysis: Analysis, cuts=()) -> tuple[int, ...]:
    """Per spatial axis, the smallest ``tile_size`` that has a legal plan for the first segment
    (the one that reads the image), every step of it. Raises :class:`PlanError` for an image
    too small for the stem."""
    check_stem_sizes(analysis)
    segs = split_segments(analysis, resolve_cuts(analysis, cuts))
    if not segs:  # nothing is streamed (the image is the boundary): any tile will do
        return (1,) * (len(analysis.input_shape) - 2)
    seg = segs[0]
    sizes = [smallest_tile(seg.sizes, step.align, step.geometry, validator(analysis, seg, step))
             for step in seg.steps]
    return tuple(max(s[k] for s in sizes) for k in range(len(seg.sizes)))


def validator(analysis: Analysis, seg: Segment, step=None):
    """``valid(axis, length)``: the step's output sizes along ``axis`` when it runs on a tile
    of that length (the other axes whole) on the meta device, or None when an op fails."""
    step = step or seg.steps[-1]
    gm = analysis.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    source_meta = nodes[seg.source].meta["tensor_meta"]
    side = [meta_value(nodes[s].meta.get("tensor_meta")) for s in step.side_inputs]
    src_dims = nodes[seg.source].meta[GEOMETRY].dims
    out_dims = [nodes[o].meta[GEOMETRY].dims for o in step.outputs]

    def valid(k: int, length: int):
        shape = list(source_meta.shape)
        shape[src_dims[k]] = length
        x = torch.empty(shape, dtype=source_meta.dtype, device="meta")
        try:
            outs = passes.run_meta(step.graph, x, *side, nonempty=True)
        except passes.ShapePropagationError:
            return None
        sizes = []
        for out, dims in zip(outs, out_dims):
            if not isinstance(out, torch.Tensor) or any(s < 1 for s in out.shape):
                return None
            sizes.append(out.shape[dims[k]])
        return tuple(sizes)

    return valid


def meta_value(tm):
    """A meta tensor of a recorded ``tensor_meta`` (other values as they are)."""
    if hasattr(tm, "shape") and hasattr(tm, "dtype"):
        return torch.empty(tuple(tm.shape), dtype=tm.dtype, device="meta")
    return tm


__all__ = ["check_stem_sizes", "meta_value", "plan_segment", "smallest_tile_size",
           "smallest_tiles", "validator"]
