"""The boundary pass: which nodes form the local stem, and which stem tensors leave it."""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch.fx as fx

from .geometry import GEOMETRY, Local, NonLocal, Reduced, Symbolic
from .nodes import module_path

ROLE = "fxstream.role"  # "stem" | "boundary" | "head" | "constant" | "output"


class SplitError(Exception):
    """``split`` names no node, or a node that cannot be streamed. ``node`` is the culprit."""

    def __init__(self, message: str, node: str | None = None):
        super().__init__(message)
        self.node = node


@dataclass(frozen=True)
class Boundary:
    """The stem's nodes (topological order) and the boundary tensors it hands to the head."""

    stem: tuple[str, ...]
    tensors: tuple[str, ...]
    split: str | None = None


def data_graph(graph: fx.Graph) -> nx.DiGraph:
    """The fx graph as a networkx DiGraph over node names (edges follow data)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def resolve_split(graph: fx.Graph, split: str) -> fx.Node:
    """A node name, or a module qualname (its last node: the module's output)."""
    nodes = list(graph.nodes)
    for node in nodes:
        if node.name == split:
            return node
    inside = [n for n in nodes if split in module_path(n)]
    if not inside:
        raise SplitError(f"split={split!r} names no node and no module of the traced graph")
    return inside[-1]


def find_boundary(gm: fx.GraphModule, split: str | None = None) -> Boundary:
    """Annotate ``node.meta[ROLE]`` and return the :class:`Boundary`.

    Without ``split`` the stem is every local node (a local node's ancestors are all local by
    construction) and the reduced values (whole-image statistics) that local nodes read. With
    ``split`` it is the split node and its local ancestors; naming a non-local node raises
    :class:`SplitError` that names the origin of the non-locality. A reduction that no local
    node reads (a classifier's global pooling) is where the head starts.
    """
    graph = gm.graph
    nodes = list(graph.nodes)
    geometry = {n.name: n.meta[GEOMETRY] for n in nodes}
    local = {name for name, g in geometry.items() if isinstance(g, Local)}
    if split is not None:
        target = resolve_split(graph, split)
        g = geometry[target.name]
        if isinstance(g, NonLocal):
            origin = g.origin
            reason = g.reason if g.origin == target.name else \
                geometry[origin].reason
            raise SplitError(f"split={split!r} ends at '{target.name}', which is not local: "
                             f"'{origin}' {reason}", node=origin)
        if not isinstance(g, Local):
            raise SplitError(f"split={split!r} ends at '{target.name}', which is not an image "
                             "tensor", node=target.name)
        ancestors = nx.ancestors(data_graph(graph), target.name)
        local = {n for n in local if n in ancestors} | {target.name}
    stem = _with_shape_values(nodes, geometry, local | _statistics(nodes, geometry, local))
    boundary = []
    for node in nodes:
        if node.name in local and any(u.name not in stem for u in node.users):
            boundary.append(node.name)
    for node in nodes:
        if node.op == "output":
            role = "output"
        elif node.name in local:
            role = "boundary" if node.name in boundary else "stem"
        elif node.name in stem:
            role = "stem"
        elif node.op in ("get_attr",) or type(geometry[node.name]).__name__ == "Constant":
            role = "constant"
        else:
            role = "head"
        node.meta[ROLE] = role
    order = tuple(n.name for n in nodes if n.name in stem)
    return Boundary(stem=order, tensors=tuple(boundary), split=split)


def _statistics(nodes, geometry, local) -> set[str]:
    """Reduced values that local nodes read, and the reduced values those are computed from."""
    by_name = {n.name: n for n in nodes}
    needed, stack = set(), []
    for name in local:
        stack += [i.name for i in by_name[name].all_input_nodes
                  if isinstance(geometry[i.name], Reduced)]
    while stack:
        name = stack.pop()
        if name not in needed:
            needed.add(name)
            stack += [i.name for i in by_name[name].all_input_nodes
                      if isinstance(geometry[i.name], Reduced)]
    return needed


def _with_shape_values(nodes, geometry, local):
    """Add shape values (``x.size(2) // 2``) computed from the stem and used only inside it."""
    derivable = set()
    for node in nodes:
        if isinstance(geometry[node.name], Symbolic) and all(
                i.name in local or i.name in derivable or
                not isinstance(geometry[i.name], (Local, Symbolic))
                for i in node.all_input_nodes):
            derivable.add(node.name)
    stem = set(local)
    for node in reversed(nodes):
        # a shape value joins the stem if every user is in the stem or is a constant-valued
        # check on shapes (timm's ``_assert(x.ndim == 4, ...)``), which needs no tile at all
        if node.name in derivable and all(u.name in stem or _is_shape_check(u, geometry)
                                          for u in node.users):
            stem.add(node.name)
    return stem


def _is_shape_check(node, geometry) -> bool:
    return not node.users and type(geometry[node.name]).__name__ == "Constant"
