"""Cut points of a stem: single tensors that every stem path goes through.

A multi-cut plan stores the full map of each cut and streams the segment between two cuts on
the stored map of the first (docs/design.md section 5). A node ``c`` is a valid cut when nothing before
it is read after it: no edge leaves ``ancestors(c)`` except through ``c`` (or into or out of a
reduced value: whole-image statistics are known to every later segment), no boundary tensor
lies strictly before it, and its spatial axes sit in the standard dims ``(2, 3, ...)`` so that
the next segment can treat it as an image.
"""
from __future__ import annotations

import networkx as nx
import torch.fx as fx

from .boundary import Boundary
from .context import concrete_shape
from .geometry import GEOMETRY, Local, Reduced


def cut_candidates(graph: fx.Graph, boundary: Boundary) -> tuple[str, ...]:
    """Valid cut nodes of the stem, in topological order (the boundary itself excluded)."""
    stem = set(boundary.stem)
    nodes = [n for n in graph.nodes if n.name in stem]
    g = nx.DiGraph()
    for n in nodes:
        g.add_node(n.name)
        for i in n.all_input_nodes:
            if i.name in stem:
                g.add_edge(i.name, n.name)
    image = next(n for n in graph.nodes if n.op == "placeholder").name
    geometry = {n.name: n.meta.get(GEOMETRY) for n in nodes}

    def reduced(name):
        return isinstance(geometry.get(name), Reduced)

    boundary_set = set(boundary.tensors)
    out = []
    for n in nodes:
        geo = n.meta.get(GEOMETRY)
        if n.op == "placeholder" or n.name in boundary_set or not isinstance(geo, Local):
            continue
        if concrete_shape(n) is None:  # a tuple (chunk, split): not one map to store
            continue
        if tuple(geo.dims) != tuple(range(2, 2 + len(geo.axes))):
            continue
        before = nx.ancestors(g, n.name) | {n.name}
        if image not in before:
            continue
        if any(b in before for b in boundary_set):
            continue
        # statistics (reduced values) are small and known to every later segment: edges into
        # or out of them cross no cut
        crossing = any(v not in before and not reduced(u) and not reduced(v)
                       for u in before - {n.name} for v in g.successors(u))
        if not crossing:
            out.append(n.name)
    return tuple(out)
