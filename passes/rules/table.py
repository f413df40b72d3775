"""The rule table itself: :data:`RULES`, the :func:`rule` decorator and :func:`lookup`."""
from __future__ import annotations

import sys

RULES: dict = {}
OPTIONAL_RULES: dict = {}  # package name -> function registering its rules once it is imported


def rule(*keys):
    """Register a rule under module types, functions, or method names (strings)."""

    def register(fn):
        for key in keys:
            RULES[key] = fn
        return fn

    return register


def lookup(node, module):
    """The rule for a node, or None. Module subclasses inherit a rule only if forward is kept."""
    for package in [p for p in OPTIONAL_RULES if p in sys.modules]:
        OPTIONAL_RULES.pop(package)()
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in RULES:
                return RULES[cls] if cls.forward is type(module).forward else None
        return None
    if node.op == "call_method":
        return RULES.get(node.target)
    if node.op == "call_function":
        return RULES.get(node.target)
    return None


