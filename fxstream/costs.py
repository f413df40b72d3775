"""What a segment costs, quickly: the search's estimate of one way to stream a segment.

The budget search (:mod:`fxstream.budget`) scores every segment between two cut points at every
tile size, hundreds of them per plan, so it cannot build and measure each: this module lays a
segment out as :func:`fxstream.segments.split_segments` would (its steps, one per level of
statistics it computes and reads), estimates its tiling per axis
(:func:`fxstream.tiling.estimate_axis`) and its memory from the per-node model
(:func:`fxstream.memory.segment_memory`). The planner then measures the chosen plan exactly.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import networkx as nx

import passes

from .memory import PassMemory, segment_memory
from .segments import image_node, reductions_of, step_layout, stem_boundary
from .tiling import AxisGeometry, estimate_axis, plan_one_axis


class Cost(NamedTuple):
    work: float
    redundancy: float
    tiles: int
    maps: float  # gradients of the segment's input and output maps (full size)
    memory: object  # fxstream.memory.PassMemory of one tile


class Stem:
    """What the search reads of the stem: node costs, data graph, reductions."""

    def __init__(self, analysis, costs, image_grad):
        gm = analysis.graph_module
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.boundary = stem_boundary(analysis)
        self.stem = list(self.boundary.stem)
        self.tile_nodes = [n for n in self.stem if not isinstance(
            self.nodes[n].meta.get(passes.GEOMETRY), passes.Reduced)]
        self.reductions = reductions_of(analysis)
        self.image = image_node(gm).name
        self.costs = costs
        self.image_grad = image_grad
        self.dg = passes.data_graph(gm.graph)
        self._before = {}

    def ancestors(self, c) -> set:
        if c not in self._before:
            self._before[c] = (nx.ancestors(self.dg, c) | {c}) & set(self.stem)
        return self._before[c]


class Layout(NamedTuple):
    src: str
    outs: tuple  # the maps it writes
    steps: tuple  # per step: (its outputs: maps and summed tensors, its per-tile nodes)
    last: bool
    geos: tuple  # per axis: the distinct geometries of every step's outputs, relative to src
    align: tuple  # per axis: the alignment of its nodes' grids


def segment_layout(st: Stem, src, dst) -> Layout:
    """The steps of the segment src -> dst (one per level of statistics it computes and reads),
    as :func:`fxstream.segments.split_segments` would make them."""
    image = st.image
    done = st.ancestors(src) if src != image else {image}
    names = st.ancestors(dst) - done if dst is not None else set(st.stem) - done
    tile_names = [n for n in st.tile_nodes if n in names and n != src]
    outs = (dst,) if dst is not None else tuple(b for b in st.boundary.tensors if b != image)
    inside = set(tile_names) | set(outs) | ({src} if src == image else set())
    sums = tuple(r for r, x in st.reductions.items() if x in inside)
    steps = tuple((tuple(maps) + tuple(st.reductions[r] for r in step_sums),
                   tuple(n for n in step_nodes if n in st.costs))
                  for maps, step_sums, step_nodes in step_layout(st.nodes, src, tile_names,
                                                                 outs, sums))
    costs, s = st.costs, st.costs[src]
    every = {o for step_outs, _ in steps for o in step_outs}
    geos, align = [], []
    for k in range(len(s.sizes)):
        geos.append(tuple(sorted({AxisGeometry(costs[o].stride[k] / s.stride[k],
                                               (costs[o].lo[k] - s.lo[k]) / s.stride[k],
                                               (costs[o].hi[k] - s.hi[k]) / s.stride[k],
                                               costs[o].sizes[k]) for o in every},
                                 key=lambda g: (g.stride, g.lo, g.hi, g.size))))
        a = 1  # the segment's own grids (fxstream.segments adds the image's lattice where a
        for _, nodes in steps:  # shape-derived value is computed: rare, ignored here)
            for n in nodes:
                a = math.lcm(a, (costs[n].stride[k] / s.stride[k]).numerator)
        align.append(a)
    return Layout(src, outs, steps, dst is None, tuple(geos), tuple(align))


def segment_cost(st: Stem, layout: Layout, tile, raise_errors=False):
    """What streaming a segment in tiles of ``tile`` costs, or None if no plan. Every step is
    tiled like the one that reaches furthest (a bound on its redundancy); in one tile the steps
    are one pass (:func:`fxstream.segments.whole_step`)."""
    costs, src = st.costs, layout.src
    s = costs[src]
    red, frac, n_tiles = 1.0, 1.0, 1
    for k, size in enumerate(s.sizes):
        if raise_errors:  # the exact plan, for its error message
            plan_one_axis(k, size, layout.align[k], layout.geos[k], tile[k])
        axis = estimate_axis(size, layout.align[k], layout.geos[k], tile[k])
        if axis is None:
            return None
        red *= axis[0]
        frac *= axis[1] / size
        n_tiles *= axis[2]
    source_grad = src != st.image or st.image_grad
    steps = [nodes for _, nodes in layout.steps]
    if n_tiles == 1 and len(steps) > 1:  # one pass, statistics inside the tile (whole_step)
        steps = [tuple(dict.fromkeys(n for nodes in steps for n in nodes))]
    mem = None
    for nodes in steps:
        m = segment_memory(costs, nodes, src, frac, view=s.read_only, source_grad=source_grad,
                           last=layout.last)
        mem = m if mem is None else PassMemory(max(mem.forward, m.forward),
                                               max(mem.backward, m.backward), mem.kept + m.kept)
    work = red * sum(costs[n].work for nodes in steps for n in nodes)
    maps_bytes = (s.map_bytes if source_grad else 0) + sum(
        costs[o].map_bytes for o in layout.outs if not layout.last)
    return Cost(work, red, n_tiles, maps_bytes, mem)


__all__ = ["Cost", "Layout", "Stem", "segment_cost", "segment_layout"]
