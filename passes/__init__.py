"""Pure graph passes of fxstream: shape propagation, geometry, boundary.

Passes read and write ``node.meta`` of a ``torch.fx`` graph and never import ``fxstream``.
"""
from .boundary import ROLE, Boundary, SplitError, data_graph, find_boundary, resolve_split
from .context import concrete_shape
from .cuts import cut_candidates
from .geometry import (GEOMETRY, Axis, Constant, Local, NonLocal, Reduced, Reduction, Symbolic,
                       input_symbols, is_tile_invariant)
from .infer import infer_geometry, symbolic_shape
from .mutation import draws_random, only_read, writes_in_place, writes_state
from .nodes import module_path, qualname, source_line, target_name
from .rules import RULES, lookup
from .statistics import decompose_statistics
from .shapes import SAVED, SHAPE_ERROR, WORK, ShapePropagationError, propagate_shapes, run_meta

__all__ = [
    "GEOMETRY", "ROLE", "RULES", "SAVED", "SHAPE_ERROR", "WORK", "Axis", "Boundary", "Constant", "Local", "NonLocal",
    "Reduced", "Reduction", "ShapePropagationError", "SplitError", "Symbolic", "concrete_shape", "cut_candidates",
    "data_graph", "decompose_statistics", "draws_random", "find_boundary", "infer_geometry", "input_symbols",
    "is_tile_invariant", "lookup", "module_path", "only_read", "propagate_shapes", "qualname",
    "resolve_split", "run_meta", "source_line", "symbolic_shape", "target_name", "writes_in_place", "writes_state",
]
