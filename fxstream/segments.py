"""The stem cut into segments: which nodes each one computes, from which map, with which geometry.

A segment streams the part of the stem between two stored maps: the image (or a cut map) in,
the next cut map (or the stem's boundary tensors) out. Its geometry comes from the whole-model
analysis, never from re-analysing the segment on its own: for an output ``o`` read through the
cut ``c`` (every path to ``o`` goes through ``c``), composition is additive, so ``o``'s stride
and interval relative to ``c``'s pixels are ``J_o / J_c`` and ``(lo_o - lo_c) / J_c``,
``(hi_o - hi_c) / J_c`` exactly. Tiles of a cut map start at multiples of ``align / J_c`` (the
image's alignment in the map's pixels) and have lengths congruent to the map's size modulo it:
each tile of the map is then the map's part of an aligned image tile, so every shape-derived
value inside the segment is what the whole-model analysis found it to be. A segment that reads
no shape-derived value needs less: its own strides' alignment (tile starts on every layer's
grid), which allows smaller tiles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import networkx as nx
import sympy
import torch.fx as fx

import passes
from passes import GEOMETRY, ROLE

from .analysis import Analysis
from .errors import SplitError, UnsupportedError
from .tiling import AxisGeometry


@dataclass(frozen=True)
class Step:
    """One streamed pass over a segment's map: the per-tile nodes it computes, the maps it
    writes and the reductions whose inputs it sums. A segment whose nodes read whole-image
    statistics that it computes itself takes several steps: the statistics of step k are
    known to steps k+1 onwards (their ``side_inputs``)."""

    maps: tuple[str, ...]  # maps it writes: the segment's cut, or boundary tensors
    sums: tuple[str, ...]  # reduction nodes whose inputs it sums, tile by tile
    summed: tuple[str, ...]  # the node each of them sums (same order)
    nodes: tuple[str, ...]  # nodes it computes per tile, in graph order
    side_inputs: tuple[str, ...]  # read whole: statistics, the model's other inputs
    align: tuple[int, ...]  # tile alignment per axis, in the source's pixels
    geometry: tuple[tuple[AxisGeometry, ...], ...]  # per axis, per output (maps, then summed)
    graph: fx.GraphModule = field(compare=False, repr=False, default=None)

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.maps + self.summed


@dataclass(frozen=True)
class Segment:
    """One part of the stem between stored maps (see the module doc)."""

    source: str  # the node whose map it reads: the image placeholder or a cut
    nodes: tuple[str, ...]  # the nodes it computes per tile, in graph order
    outputs: tuple[str, ...]  # the maps it writes (a cut, or the boundary tensors)
    sums: tuple[str, ...]  # the reductions of whole-image statistics it computes
    sizes: tuple[int, ...]  # the source map's spatial size
    steps: tuple[Step, ...]

    @property
    def align(self) -> tuple[int, ...]:
        return self.steps[-1].align

    @property
    def geometry(self):
        """Per axis, per map output, relative to the source (of the step that writes it)."""
        out = [[] for _ in self.sizes]
        for step in self.steps:
            for k in range(len(self.sizes)):
                out[k] += list(step.geometry[k][:len(step.maps)])
        order = [m for step in self.steps for m in step.maps]
        return tuple(tuple(out[k][order.index(o)] for o in self.outputs)
                     for k in range(len(self.sizes)))


def image_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "placeholder")


def stem_boundary(analysis: Analysis) -> passes.Boundary:
    """The analysis's :class:`passes.Boundary` (stem nodes in graph order)."""
    gm = analysis.graph_module
    stem = tuple(n.name for n in gm.graph.nodes
                 if n.meta.get(ROLE) in ("stem", "boundary"))
    return passes.Boundary(stem=stem, tensors=analysis.boundary, split=analysis.split)


def cut_candidates(analysis: Analysis) -> tuple[str, ...]:
    """Valid cut points of the stem, in graph order: single tensors every later stem node
    reaches only through, on a pixel grid that tiles of the image map onto."""
    gm = analysis.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for name in passes.cut_candidates(gm.graph, stem_boundary(analysis)):
        g = nodes[name].meta[GEOMETRY]
        if all((Fraction(int(a)) / _frac(ax.stride)).denominator == 1
               for a, ax in zip(analysis.alignment, g.axes)):
            out.append(name)
    return tuple(out)


def resolve_cuts(analysis: Analysis, cuts) -> tuple[str, ...]:
    """Node names or module qualnames -> valid cut nodes in graph order."""
    gm = analysis.graph_module
    if isinstance(cuts, str):
        cuts = (cuts,)
    valid = cut_candidates(analysis)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    names = []
    for cut in cuts or ():
        try:
            node = passes.resolve_split(gm.graph, cut)
        except passes.SplitError as e:
            raise SplitError(f"cuts: {e}") from e
        if node.name not in valid:
            raise SplitError(
                f"cannot cut the stem at {cut!r} (node '{node.name}'): a cut must be a single "
                "stem tensor that every later stem node reaches only through it. Valid cuts: "
                f"{', '.join(valid[:12])}{' ...' if len(valid) > 12 else ''}")
        names.append(node.name)
    return tuple(sorted(set(names), key=order.__getitem__))


def split_segments(analysis: Analysis, cuts=()) -> tuple[Segment, ...]:
    """The stem cut after each node of ``cuts`` (valid cut names, graph order) into segments.

    Each segment computes per tile the local nodes between its source and its outputs, and the
    reductions of the nodes it computes (a reduction of a cut map belongs to the segment that
    writes the map: summed as it is written). Statistics derived from reductions are no
    segment's: they are computed once, between passes. The image, when the head reads it, is
    handed over as it is; a stem that is only the image has no segment.
    """
    gm = analysis.graph_module
    boundary = stem_boundary(analysis)
    image = image_node(gm).name
    nodes = {n.name: n for n in gm.graph.nodes}
    tile_nodes = [n for n in boundary.stem if not _reduced(nodes[n])]
    dg = passes.data_graph(gm.graph)
    pieces, done, source = [], set(), image
    for cut in cuts:
        before = (nx.ancestors(dg, cut) | {cut}) & set(tile_nodes)
        pieces.append([source, [n for n in tile_nodes if n in before and n not in done
                                and n != source], (cut,)])
        done |= before
        source = cut
    outputs = tuple(b for b in boundary.tensors if b != image)
    if outputs:
        pieces.append([source, [n for n in tile_nodes if n not in done and n != source],
                       outputs])
    sums = [[] for _ in pieces]
    for name in boundary.stem:
        g = nodes[name].meta[GEOMETRY]
        if _reduced(nodes[name]) and g.reduction is not None:
            x = nodes[name].args[0].name
            owner = next((i for i, (src, names, outs) in enumerate(pieces)
                          if x in names or x in outs or (x == src == image)), None)
            if owner is None:
                raise UnsupportedError(f"internal: no segment computes '{x}', which "
                                       f"'{name}' reduces")
            sums[owner].append(name)
    return tuple(_segment(analysis, src, names, outs, tuple(sm))
                 for (src, names, outs), sm in zip(pieces, sums))


def reductions_of(analysis: Analysis) -> dict[str, str]:
    """Every whole-image reduction of the stem and the node it sums, in graph order."""
    gm = analysis.graph_module
    stem = set(stem_boundary(analysis).stem)
    return {n.name: n.args[0].name for n in gm.graph.nodes
            if n.name in stem and _reduced(n) and n.meta[GEOMETRY].reduction is not None}


def _reduced(node) -> bool:
    return isinstance(node.meta.get(GEOMETRY), passes.Reduced)


def _segment(analysis, source, names, outputs, sums) -> Segment:
    nodes = {n.name: n for n in analysis.graph_module.graph.nodes}
    values = analysis.size_values
    sizes = tuple(int(ax.size.subs(values)) for ax in nodes[source].meta[GEOMETRY].axes)
    steps = tuple(_step(analysis, source, maps, step_sums, step_nodes)
                  for maps, step_sums, step_nodes in step_layout(nodes, source, names, outputs,
                                                                 sums))
    return Segment(source, tuple(names), tuple(outputs), tuple(sums), sizes, steps)


def whole_step(analysis: Analysis, seg: Segment) -> Step | None:
    """The segment in one step, for a plan that runs it in one tile (its whole map): the
    statistics it computes are computed inside that tile, from the reductions' own ops on the
    whole map, instead of by one streamed pass per level of statistics, each recomputing what
    the one before computed. Its sums are still summed (the one tile's partial), for what reads
    them outside the segment (running statistics, the head, later segments), which the driver
    computes from them again. None when a statistic it would compute inside the tile draws
    random numbers or writes in place: computed twice (and again in a recompute), it would
    differ or write twice."""
    nodes = {n.name: n for n in analysis.graph_module.graph.nodes}
    mine, seen = set(seg.sums), {}

    def computed_here(name):  # a statistic derived from this segment's sums
        if name not in seen:
            node = nodes[name]
            seen[name] = name in mine or (_reduced(node) and any(
                computed_here(i.name) for i in node.all_input_nodes if _reduced(i)))
        return seen[name]

    inside, stack = set(), [i.name for n in seg.nodes for i in nodes[n].all_input_nodes]
    while stack:
        name = stack.pop()
        if name in inside or not _reduced(nodes[name]) or not computed_here(name):
            continue
        inside.add(name)
        stack += [i.name for i in nodes[name].all_input_nodes]
    gm = analysis.graph_module
    if any(passes.draws_random(nodes[n], gm) or passes.writes_state(nodes[n], gm)
           for n in inside):
        return None
    order = [n.name for n in gm.graph.nodes if n.name in inside or n.name in seg.nodes]
    return _step(analysis, seg.source, seg.outputs, seg.sums, order)


def _step(analysis, source, maps, step_sums, step_nodes) -> Step:
    gm = analysis.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    values = analysis.size_values
    src = nodes[source].meta[GEOMETRY]
    summed = tuple(nodes[r].args[0].name for r in step_sums)
    outs = tuple(maps) + summed
    graph, side = build_segment_graph(gm, source, step_nodes, outs)
    geometry, align = [], []
    for k, sax in enumerate(src.axes):
        j_src = _frac(sax.stride)
        lo_src, hi_src = _value(sax.lo, values), _value(sax.hi, values)
        per_out = []
        for o in outs:
            g = nodes[o].meta[GEOMETRY]
            if not isinstance(g, passes.Local):
                raise UnsupportedError(f"internal: pass output '{o}' has no local geometry")
            ax = g.axes[k]
            per_out.append(AxisGeometry(
                _frac(ax.stride) / j_src, (_value(ax.lo, values) - lo_src) / j_src,
                (_value(ax.hi, values) - hi_src) / j_src, int(ax.size.subs(values))))
        geometry.append(tuple(per_out))
        align.append(_alignment(analysis, nodes, step_nodes, k, j_src))
    return Step(tuple(maps), tuple(step_sums), summed, tuple(step_nodes), side, tuple(align),
                tuple(geometry), graph)


def step_layout(nodes, source, names, outputs, sums):
    """The steps of a segment, as (maps, sums, nodes): node n can be computed in step
    ``level(n)``, the number of statistics computed in this segment that it waits for."""
    level = {source: 0}
    avail = {}  # reduced value -> the first step that knows it

    def known(r):
        if r not in avail:
            node = nodes[r]
            if r in sums:
                avail[r] = level[node.args[0].name] + 1
            else:  # derived from statistics (or computed in an earlier segment)
                avail[r] = max([known(i.name) for i in node.all_input_nodes
                                if _reduced(i)] + [0])
        return avail[r]

    for name in names:
        ins = nodes[name].all_input_nodes
        level[name] = max([level[i.name] for i in ins if i.name in level] +
                          [known(i.name) for i in ins if _reduced(i)] + [0])
    top = max([level[o] for o in outputs] + [level[nodes[r].args[0].name] for r in sums])
    order = {n: i for i, n in enumerate(names)}
    steps = []
    for k in range(top + 1):
        maps = tuple(o for o in outputs if level[o] == k)
        step_sums = tuple(r for r in sums if level[nodes[r].args[0].name] == k)
        want = set(maps) | {nodes[r].args[0].name for r in step_sums}
        need, stack = set(), [w for w in want if w != source]
        while stack:
            n = stack.pop()
            if n in need or n == source or n not in order:
                continue
            need.add(n)
            stack += [i.name for i in nodes[n].all_input_nodes]
        steps.append((maps, step_sums, sorted(need, key=order.__getitem__)))
    return steps


def _alignment(analysis, nodes, names, k, j_src) -> int:
    """Tile alignment along axis ``k`` in the source's pixels: every layer's grid, and the
    image's lattice when a shape-derived value is computed inside the segment."""
    align = 1
    shaped = False
    for name in names:
        g = nodes[name].meta[GEOMETRY]
        if isinstance(g, passes.Local):
            align = math.lcm(align, (_frac(g.axes[k].stride) / j_src).numerator)
        elif isinstance(g, passes.Symbolic):
            shaped = True
    if shaped:
        lattice = Fraction(int(analysis.alignment[k])) / j_src
        if lattice.denominator != 1:
            raise UnsupportedError(f"internal: the image's alignment {analysis.alignment[k]} is "
                                   f"off the grid of a map of stride {j_src}")
        align = math.lcm(align, int(lattice))
    return align


def build_segment_graph(gm: fx.GraphModule, source: str, names, outputs):
    """A GraphModule ``(source, *side inputs) -> tuple(outputs)`` over the nodes ``names`` and
    the constants they read; returns it and the names of its side inputs: the statistics
    (reduced values) and the model's other arguments that the nodes read, in graph order."""
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    inside = set(names) | {source}
    keep, side = set(), set()
    stack = [by_name[n] for n in names]
    while stack:
        node = stack.pop()
        for inp in node.all_input_nodes:
            if inp.name in inside or inp.name in keep or inp.name in side:
                continue
            if inp.op == "placeholder" or _reduced(inp):
                side.add(inp.name)
            elif inp.meta.get(ROLE) == "constant":
                keep.add(inp.name)
                stack.append(inp)
            else:
                raise UnsupportedError(f"stem node '{node.name}' reads '{inp.name}', which is "
                                       "neither in the stem nor a constant")
    g = fx.Graph()
    env = {by_name[source]: g.placeholder(source)}
    order = [n for n in graph.nodes if n.name in side]
    for node in order:
        env[node] = g.placeholder(node.name)
    for node in graph.nodes:
        if (node.name in keep or node.name in names) and node.name != source:
            env[node] = g.node_copy(node, lambda n: env[n])
    g.output(tuple(env[by_name[name]] for name in outputs))
    return fx.GraphModule(gm, g, "Pass"), tuple(n.name for n in order)


def _frac(x) -> Fraction:
    n, d = sympy.fraction(sympy.Rational(x))
    return Fraction(int(n), int(d))


def _value(expr, values) -> Fraction:
    """An interval bound at this input size (it may depend on the size's residue)."""
    return _frac(sympy.sympify(expr).subs(values))


__all__ = ["Segment", "Step", "build_segment_graph", "cut_candidates", "image_node",
           "reductions_of", "resolve_cuts", "split_segments", "stem_boundary", "step_layout",
           "whole_step"]
