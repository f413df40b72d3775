"""``fxstream bench``: time and peak memory of one training step, full image vs streamed.

A package of small modules: :mod:`~fxstream.bench.options` (what the command takes, checked
up front), :mod:`~fxstream.bench.baselines` (the checkpoint baseline),
:mod:`~fxstream.bench.child` (one run in a fresh process), :mod:`~fxstream.bench.runner` (the
runs and their summary) and :mod:`~fxstream.bench.render` (tables, JSON, plot). Compute, then
render: :func:`bench` returns a :class:`BenchResult` that the renderers only read.
"""
from .baselines import apply_checkpoint, checkpoint_stages
from .child import child_step, run_child
from .options import BenchConfig, check_config, parse_budget, parse_variants
from .render import check_plot_available, plot_bench, render_bench, to_json
from .results import VARIANTS, BenchResult, Floor, Run, SizeResult, VariantResult
from .runner import available_memory, bench, full_image_step, streaming_floor

__all__ = [
    "VARIANTS", "BenchConfig", "BenchResult", "Floor", "Run", "SizeResult", "VariantResult",
    "apply_checkpoint", "available_memory", "bench", "check_config", "check_plot_available",
    "checkpoint_stages", "child_step", "full_image_step", "parse_budget", "parse_variants",
    "plot_bench", "render_bench", "run_child", "streaming_floor", "to_json",
]
