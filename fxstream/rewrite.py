"""The rewrite: split an analysed graph into the stem graph and the head graph.

The stem graph takes the image and returns the boundary tensors. The head graph is the original
graph with every stem node removed and one call of the streaming op put in their place.
"""
from __future__ import annotations

import operator

import networkx as nx
import torch.fx as fx

import passes
from passes import GEOMETRY, ROLE

from .errors import UnsupportedError

ENGINE = "fxstream_stem"


def _image(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.op == "placeholder")


def _needed_constants(graph, stem_names, source) -> set[str]:
    """Constant nodes (parameters, literals' tensors) that stem nodes read, transitively."""
    needed: set[str] = set()
    stack = [n for n in graph.nodes if n.name in stem_names]
    while stack:
        node = stack.pop()
        for inp in node.all_input_nodes:
            if inp.name in stem_names or inp.name in needed or inp.name == source:
                continue
            if inp.meta.get(ROLE) != "constant":
                raise UnsupportedError(f"stem node '{node.name}' reads '{inp.name}', which is "
                                       "neither in the stem nor a constant")
            needed.add(inp.name)
            stack.append(inp)
    return needed


def build_segment_graph(graph: fx.Graph, source: str, names, outputs) -> fx.Graph:
    """A graph ``source -> tuple(outputs)`` over the nodes ``names`` and the constants they read.

    ``source`` is the image for a plain stem, or the cut tensor a multi-cut segment starts from.
    """
    by_name = {n.name: n for n in graph.nodes}
    keep = (set(names) | _needed_constants(graph, set(names), source)) - {source}
    g = fx.Graph()
    env = {by_name[source]: g.placeholder(source)}
    for node in graph.nodes:
        if node.name in keep:
            if node.op == "placeholder":
                raise UnsupportedError(f"the stem reads the extra input '{node.name}'; only the "
                                       "image (first argument) may feed the stem")
            env[node] = g.node_copy(node, lambda n: env[n])
    g.output(tuple(env[by_name[name]] for name in outputs))
    return g


def build_stem_graph(graph: fx.Graph, boundary: passes.Boundary) -> fx.Graph:
    """A graph ``image -> tuple(boundary tensors)`` holding the stem and the constants it reads."""
    return build_segment_graph(graph, _image(graph).name, boundary.stem, boundary.tensors)


def split_stem(graph: fx.Graph, boundary: passes.Boundary, cuts) -> list[tuple]:
    """Segments ``(source, node names, outputs)`` of the stem cut after each node of ``cuts``."""
    stem = [n.name for n in graph.nodes if n.name in set(boundary.stem)]
    dg = passes.data_graph(graph)
    segments, done, source = [], set(), _image(graph).name
    for cut in cuts:
        before = (nx.ancestors(dg, cut) | {cut}) & set(stem)
        names = [n for n in stem if n in before and n not in done and n != source]
        segments.append((source, names, (cut,)))
        done |= before
        source = cut
    names = [n for n in stem if n not in done and n != source]
    segments.append((source, names, tuple(boundary.tensors)))
    return segments


def build_head_graph(graph: fx.Graph, boundary: passes.Boundary) -> fx.Graph:
    """The original graph with the stem replaced by ``self.fxstream_stem(image)``."""
    stem = set(boundary.stem)
    image = _image(graph)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        env[node] = g.node_copy(node, lambda n: env[n])
    stream = g.create_node("call_module", ENGINE, (env[image],), name="fxstream_stream")
    by_name = {n.name: n for n in graph.nodes}
    for i, name in enumerate(boundary.tensors):
        item = g.create_node("call_function", operator.getitem, (stream, i), name=name)
        item.meta[GEOMETRY] = by_name[name].meta.get(GEOMETRY)
        env[by_name[name]] = item
    for node in graph.nodes:
        if node.op == "placeholder" or node.name in stem:
            continue
        if node.op == "output" or _used_by_head(node, stem):
            env[node] = g.node_copy(node, lambda n: env[n])
    for node in reversed(list(g.nodes)):  # constants only the stem read
        if node.meta.get(ROLE) == "constant" and not node.users:
            g.erase_node(node)
    return g


def _used_by_head(node, stem) -> bool:
    """Nodes outside the stem that something outside the stem still needs."""
    if node.op != "get_attr" and node.meta.get(ROLE) != "constant":
        return True
    return any(u.name not in stem for u in node.users)
