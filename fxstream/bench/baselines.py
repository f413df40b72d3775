"""The checkpoint baseline: the stem's top-level children under ``torch.utils.checkpoint``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint

import passes

from ..errors import UnsupportedError


def checkpoint_stages(analysis, model) -> tuple[str, ...]:
    """The top-level children of ``model`` that make up its stem, in order.

    The stem must be a chain: every stem node inside a top-level child called as a module, each
    child's nodes contiguous, each child fed only by the previous child's output (the first by
    the image). A child that reaches past the boundary is left out, and so is one that writes
    into its input in place (``nn.ReLU(inplace=True)``): recomputing it under checkpoint would
    write into the saved input again; run as is, it stores what the next checkpoint stores
    anyway. Raises :class:`UnsupportedError` otherwise.
    """
    children = dict(model.named_children())
    gm = analysis.graph_module
    stem_roles = ("stem", "boundary")
    groups: list[tuple[str, list]] = []
    image = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            image = image or node
            continue
        if node.op == "get_attr" or node.meta.get(passes.ROLE) not in stem_roles:
            continue
        path = passes.module_path(node)
        top = path[0] if path else ""
        if top not in children:
            raise UnsupportedError(
                f"no per-child checkpoint: stem node '{node.name}' ({node.op}) runs outside any "
                f"top-level child module ({passes.source_line(node) or 'no source'}); the stem "
                "must be a chain of top-level children")
        if groups and groups[-1][0] == top:
            groups[-1][1].append(node)
        elif any(name == top for name, _ in groups):
            raise UnsupportedError(f"no per-child checkpoint: top-level child '{top}' runs "
                                   "twice or interleaved with others in the stem")
        else:
            groups.append((top, [node]))
    if not groups:
        raise UnsupportedError("no per-child checkpoint: the model has no top-level child "
                               "modules in its stem")
    head_tops = set()
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_function", "call_method") and \
                node.meta.get(passes.ROLE) not in stem_roles:
            path = passes.module_path(node)
            if path:
                head_tops.add(path[0])
    previous = image
    stages = []
    for i, (name, nodes) in enumerate(groups):
        inside = set(nodes)
        feeds = {a for n in nodes for a in n.all_input_nodes
                 if a not in inside and a.op != "get_attr"}
        if feeds != {previous}:
            got = ", ".join(sorted(a.name for a in feeds)) or "nothing"
            raise UnsupportedError(
                f"no per-child checkpoint: top-level child '{name}' reads {got}, not only the "
                f"output of {'the image' if i == 0 else repr(groups[i - 1][0])}")
        outs = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(outs) != 1:
            raise UnsupportedError(f"no per-child checkpoint: top-level child '{name}' hands "
                                   f"{len(outs)} values on, expected one")
        previous = outs[0]
        if name in head_tops:  # straddles the boundary: run as is
            if i != len(groups) - 1:
                raise UnsupportedError(f"no per-child checkpoint: top-level child '{name}' "
                                       "lies partly in the head")
            break
        if not any(passes.writes_in_place(n, gm) for n in nodes if any(a in feeds for a in n.args)):
            stages.append(name)
    if not stages:
        raise UnsupportedError("no per-child checkpoint: no top-level child lies wholly in the "
                               "stem")
    return tuple(stages)


def apply_checkpoint(model, stages):
    """Wrap each named top-level child of ``model`` in a non-reentrant checkpoint (in place)."""
    for name in stages:
        setattr(model, name, _Checkpointed(getattr(model, name)))
    return model


class _Checkpointed(nn.Module):
    """Runs ``module`` under ``torch.utils.checkpoint`` (activations recomputed in backward)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.module, *args, use_reentrant=False,
                                                 **kwargs)
