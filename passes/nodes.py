"""Names users see: module qualnames and the user's source line of an fx node."""
from __future__ import annotations

import re

import torch.fx as fx


def qualname(node: fx.Node) -> str:
    """The module qualname a node belongs to (``layer4.1.relu``), or '' at the top level."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        return last[0] if isinstance(last, tuple) else str(last)
    return ""


def module_path(node: fx.Node) -> list[str]:
    """All module qualnames enclosing a node, outermost first."""
    if node.op == "call_module":
        stack = node.meta.get("nn_module_stack") or {}
        names = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
        return names if names and names[-1] == node.target else names + [str(node.target)]
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def source_line(node: fx.Node) -> str:
    """``file:line: code`` of the innermost recorded frame of the node's stack trace."""
    trace = node.stack_trace or ""
    frames = [f for f in _FRAME.findall(trace) if not _is_torch_internal(f[0])]
    if not frames:
        return ""
    path, line, _func, code = frames[-1]
    return f"{path}:{line}: {code.strip()}"


def _is_torch_internal(path: str) -> bool:
    path = path.replace("\\", "/")
    return ("/torch/fx/" in path or "/torch/nn/modules/module.py" in path
            or "/torch/overrides.py" in path or path.endswith("/torch/nn/functional.py"))


def target_name(node: fx.Node, module=None) -> str:
    """A readable op name: the module class, the function's qualified name, or ``.method``."""
    if node.op == "call_module":
        return type(module).__name__ if module is not None else str(node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        mod = getattr(node.target, "__module__", None) or ""
        name = getattr(node.target, "__qualname__", None) or getattr(node.target, "__name__",
                                                                     str(node.target))
        mod = {"torch.nn.functional": "F", "_operator": "operator",
               "torch._C._nn": "F", "torch._C._VariableFunctions": "torch"}.get(mod, mod)
        name = name.replace("_VariableFunctionsClass.", "")
        return f"{mod}.{name}" if mod else name
    return node.op
