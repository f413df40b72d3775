"""A segment's tiles lowered to what the runtime reads: index tuples and per-tile counts.

:func:`lower` turns a :class:`~fxstream.tiling.TilePlan`'s per-axis spans into ready-made index
tuples (no per-tile Python work at run time), largest tiles first; :func:`sum_output` describes
a whole-image reduction a pass sums, with the number of positions each tile owns.
"""
from __future__ import annotations

import math

from passes import GEOMETRY

from .plans import SumOutput, Tile
from .tiling import TilePlan


def sum_output(nodes, name: str, tiles, position: int):
    """The :class:`SumOutput` of reduction ``name`` whose summed tensor is the pass's output
    ``position``: its counts per tile from the positions each tile owns."""
    node = nodes[name]
    red = node.meta[GEOMETRY].reduction
    x = node.args[0]
    shape = x.meta["tensor_meta"].shape
    spatial = set(x.meta[GEOMETRY].dims)
    if red.kind == "moments":
        other = (shape[1] // red.groups) * (shape[0] if red.batch else 1)
    else:
        other = math.prod(shape[d] for d in red.dims if d not in spatial)
    counts = []
    for tile in tiles:
        where = tile.outputs[position]
        if where is None:
            counts.append(0)
            continue
        owned = math.prod(idx.stop - idx.start for d, idx in enumerate(where[0])
                          if d in spatial)
        counts.append(owned * other)
    out = node.meta["tensor_meta"]
    return SumOutput(name=name, summed=x.name, kind=red.kind, dims=red.dims, counts=tuple(counts),
                     shape=tuple(out.shape), dtype=str(out.dtype), correction=red.correction,
                     groups=red.groups, batch=red.batch)


def lower(plan: TilePlan, rank: int, src_dims, outputs) -> tuple[Tile, ...]:
    """Turn per-axis spans into ready-made index tuples (no per-tile Python work later);
    largest tiles first, equal shapes together (the host memory pool then grows once)."""
    tiles = []
    for spans in plan.tiles():
        region = [slice(None)] * rank
        for k, span in enumerate(spans):
            region[src_dims[k]] = slice(span.start, span.stop)
        where = []
        for b, out in enumerate(outputs):
            out_rank = max(out.dims) + 1
            g_idx, l_idx = [slice(None)] * out_rank, [slice(None)] * out_rank
            empty = False
            for k, span in enumerate(spans):
                g0, g1 = span.outputs[b]
                l0, l1 = span.local[b]
                empty |= g1 <= g0
                g_idx[out.dims[k]] = slice(g0, g1)
                l_idx[out.dims[k]] = slice(l0, l1)
            where.append(None if empty else (tuple(g_idx), tuple(l_idx)))
        lengths = tuple(s.length for s in spans)
        tiles.append(Tile(tuple(region), tuple(s.start for s in spans), lengths, tuple(where)))
    tiles.sort(key=lambda t: (-math.prod(t.lengths), t.lengths))
    return tuple(tiles)


__all__ = ["lower", "sum_output"]
