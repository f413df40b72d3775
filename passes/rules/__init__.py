"""The rule table: one entry per op (module type, function, or method name) -> geometry rule.

A rule takes a :class:`~passes.context.RuleContext` and returns the node's new ``Local``
geometry, or raises ``NotLocal`` with the reason. Ops missing from :data:`RULES` are non-local
("no geometry rule for ..."): never guessed local. One module per rule family; importing this
package registers them all.
"""
from . import (joins, layout, optional, pointwise, reduce, sliding,  # noqa: F401  (registration)
               statistics)
from .reduce import SHAPE_ATTRS, SHAPE_METHODS
from .table import OPTIONAL_RULES, RULES, lookup, rule

__all__ = ["OPTIONAL_RULES", "RULES", "SHAPE_ATTRS", "SHAPE_METHODS", "lookup", "rule"]
