"""The rewrite: the analysed graph with its stem replaced by the plan's streamed passes.

The generated graph keeps the model's signature. Each pass of the plan becomes one call of a
:class:`~fxstream.runtime.PassEngine` on the map it reads (the image or a stored cut map) and
what else it reads whole (statistics of earlier passes, the model's other inputs); its maps take
the place of the stem nodes they stand for (cut maps feed the next pass, boundary tensors the
head), and each reduction it sums becomes a :class:`~fxstream.reductions.Combine` of its
partials. Statistics derived from reductions (squeeze-excitation's layers, a norm's running
statistics) are computed once, as soon as what they read is known. Every node outside the stem
(the head) is copied as it is and calls the user's own modules. ``print(driver.code)`` shows the
result.
"""
from __future__ import annotations

import operator

import sympy
import torch.fx as fx
import torch.nn as nn

import passes
from passes import GEOMETRY, ROLE

from .plans import Plan
from .reductions import Combine
from .segments import stem_boundary


def build_driver(model: nn.Module, analysis, plan: Plan, engines) -> fx.GraphModule:
    """A GraphModule running ``plan`` with ``engines`` (one per pass) and then the head."""
    graph = analysis.graph_module.graph
    by_name = {n.name: n for n in graph.nodes}
    stem = set(stem_boundary(analysis).stem)
    g = fx.Graph()
    env: dict[fx.Node, object] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = g.node_copy(node, lambda n: env[n])
    root = {}
    statistics = [n for n in graph.nodes if n.name in stem and
                  isinstance(n.meta.get(GEOMETRY), passes.Reduced)]
    values = analysis.size_values
    for p, engine in zip(plan.passes, engines):
        target = f"fxstream_pass_{p.index}"
        root[target] = engine
        args = (env[by_name[p.source]], *(env[by_name[s]] for s in p.side_inputs))
        call = g.create_node("call_module", target, args, name=target)
        for i, out in enumerate(p.outputs):
            item = g.create_node("call_function", operator.getitem, (call, i), name=out.name)
            item.meta[GEOMETRY] = by_name[out.name].meta.get(GEOMETRY)
            env[by_name[out.name]] = item
        for j, s in enumerate(p.sums):
            item = g.create_node("call_function", operator.getitem,
                                 (call, len(p.outputs) + j), name=f"{s.name}_partials")
            root[f"fxstream_sum_{s.name}"] = Combine(s)
            env[by_name[s.name]] = g.create_node("call_module", f"fxstream_sum_{s.name}",
                                                 (item,), name=s.name)
        _emit_statistics(g, env, statistics, stem, values)
    for node in graph.nodes:
        if node.op == "placeholder" or node.name in stem:
            continue
        if node.op == "output" or _used_by_head(node, stem):
            env[node] = g.node_copy(node, lambda n: env[n])
    for node in reversed(list(g.nodes)):  # constants only the stem read
        if node.meta.get(ROLE) == "constant" and not node.users and node.op != "placeholder":
            g.erase_node(node)
    for node in g.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in root:
            root[node.target] = _resolve(model, node.target)
    return fx.GraphModule(root, g, class_name=f"Streaming{type(model).__name__}")


def _emit_statistics(g, env, statistics, stem, values):
    """Copy every statistic (a value derived from reductions) whose inputs are known, in graph
    order: constants are copied along, shape values of the stem become numbers."""

    def ready(node) -> bool:
        if node in env:
            return True
        if node.name in stem and isinstance(node.meta.get(GEOMETRY), passes.Symbolic):
            env[node] = _number(node.meta[GEOMETRY].value, values)
            return True
        if node.op == "get_attr" or (node.meta.get(ROLE) == "constant" and
                                     node.name not in stem):
            if all(ready(i) for i in node.all_input_nodes):
                env[node] = g.node_copy(node, lambda n: env[n])
                return True
        return False

    for node in statistics:
        if node not in env and all(ready(i) for i in node.all_input_nodes):
            env[node] = g.node_copy(node, lambda n: env[n])


def _number(value, values):
    """A shape-derived value at this input size (ints, or a tuple of them)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_number(v, values) for v in value)
    if isinstance(value, sympy.Basic):
        value = value.subs(values)
        return int(value) if value.is_integer else float(value)
    return value


def _used_by_head(node, stem) -> bool:
    """Nodes outside the stem that something outside the stem still needs."""
    if node.op != "get_attr" and node.meta.get(ROLE) != "constant":
        return True
    return any(u.name not in stem for u in node.users)


def _resolve(model, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


__all__ = ["build_driver"]
