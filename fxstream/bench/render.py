"""Rendering a :class:`~fxstream.bench.results.BenchResult`: tables, JSON and a plot."""
from __future__ import annotations

import json
import math
import statistics

from ..errors import SpecError
from ..hostmem import huge_pages_supported
from .results import BenchResult, VariantResult

# a step with more than this share of its CPU time in the kernel gets a note (see kernel_bound)
KERNEL_SHARE = 0.25


def to_json(result: BenchResult) -> str:
    """The result as indented JSON: exactly ``result.to_dict()``."""
    return json.dumps(result.to_dict(), indent=2)


def render_bench(result: BenchResult, console) -> None:
    """Print one table per input shape, then notes (skips, failures, the streaming floor)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from ..report import human_bytes

    tile = (f"tile {_axes(result.tile_size)}" if result.tile_size is not None
            else f"budget {human_bytes(result.budget_bytes)}" if result.budget_bytes else "")
    options = "".join(f", {o}" for o in result.options)
    console.print(Text(f"fxstream bench {result.spec}  {result.dtype}{options} on {result.device}"
                       f"  {tile}  {result.repeat} run(s) per variant, each a fresh process",
                       style="bold"))
    console.print(f"memory: {result.memory_kind}; baseline = after building model and image; "
                  f"{human_bytes(result.available_bytes)} available")
    for size in result.sizes:
        table = Table(title=f"input {'×'.join(map(str, size.input_shape))}"
                      + (f"  ({size.num_tiles} tiles, redundancy {size.redundancy:.2f}×)"
                         if size.num_tiles else ""),
                      title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                      collapse_padding=True,
                      caption="time: median step; peak: largest over runs; step: peak − "
                              "baseline; ×full: ratio to the full image", caption_justify="left")
        for name in ("variant", "time", "×full", "peak", "×full", "baseline", "step", "×full"):
            table.add_column(name, justify="left" if name == "variant" else "right",
                             no_wrap=True)
        for v in size.variants:
            if v.status != "ok":
                table.add_row(v.variant, Text(v.status, style="yellow"), *[""] * 6)
                continue
            table.add_row(v.variant, f"{v.median_seconds:.3g}s", _ratio(v.time_ratio),
                          human_bytes(v.peak_bytes), _ratio(v.memory_ratio),
                          human_bytes(v.baseline_bytes),
                          human_bytes(v.peak_bytes - v.baseline_bytes),
                          _ratio(v.step_memory_ratio))
        console.print(table)
        for v in size.variants:
            if v.note:
                console.print(Text(f"  {v.variant}: {v.note}"))
        for v in size.variants:
            if result.device == "cpu" and kernel_bound(v):
                faults = statistics.median(r.page_faults for r in v.runs if not r.error)
                cpu = v.median_system_seconds + v.median_user_seconds
                hint = "; --huge-pages backs large tensors with huge pages (README: CPU: huge " \
                    "pages)" if huge_pages_supported() and not any(
                        r.huge_pages for r in v.runs) else ""
                console.print(Text(f"  {v.variant}: {v.median_system_seconds:.3g} s of its "
                                   f"{cpu:.3g} s of CPU time in the kernel ({faults / 1e6:.2g} "
                                   f"million page faults){hint}"))
        if size.checkpoint_stages and "checkpoint" in [v.variant for v in size.variants]:
            console.print(f"  checkpoint: each of {', '.join(size.checkpoint_stages)} "
                          "recomputed in backward")
        if size.plan is not None and size.plan.budget is not None:
            p = size.plan
            tile = _axes(p.passes[0].tile_size) if p.passes else "-"
            console.print(f"  streamed plan: cuts {', '.join(p.cuts) or 'none'}, first tile "
                          f"{tile}, budget {human_bytes(p.budget)}, estimated peak "
                          f"{human_bytes(p.estimated_peak)}, work {p.work:.2f}× the stem "
                          "streamed once without overlap")
        if size.floor is not None:
            f = size.floor
            at = f" = {f.seconds:.3g} s (from {f.basis})" if f.seconds is not None else ""
            console.print(f"  streamed compute estimate: {f.ratio:.2f}× full{at}; {f.explanation}."
                          " A streamed step can beat it: the full-image step's working set is "
                          "far larger and runs slower per FLOP")


def kernel_bound(v: VariantResult) -> bool:
    """Whether a variant's step spent over a quarter of its CPU time (all threads) in the
    kernel: faulting in fresh pages, mostly."""
    return v.status == "ok" and v.median_system_seconds is not None and \
        v.median_user_seconds is not None and \
        v.median_system_seconds > KERNEL_SHARE * (v.median_system_seconds + v.median_user_seconds)


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}×"


def _axes(tile) -> str:
    return "×".join(map(str, tile)) if isinstance(tile, (list, tuple)) else str(tile)


def check_plot_available() -> None:
    """Raise :class:`SpecError` when matplotlib is missing (before any benchmark runs)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SpecError("--plot needs matplotlib: pip install matplotlib "
                        "(or pip install 'fxstream[plot]')") from None


def plot_bench(result: BenchResult, path: str) -> None:
    """Peak memory and median time against image size (megapixels), one line per variant.

    A full-image step that would not fit is drawn at its estimate with an open marker.
    """
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    names = list(dict.fromkeys(v.variant for s in result.sizes for v in s.variants))
    for name in names:
        pts = [(_megapixels(s.input_shape), s.variant(name)) for s in result.sizes]
        ok = [(mp, v) for mp, v in pts if v.status == "ok"]
        if ok:
            mem_ax.plot([mp for mp, _ in ok], [v.peak_bytes / 2**30 for _, v in ok], "o-",
                        label=name)
            time_ax.plot([mp for mp, _ in ok], [v.median_seconds for _, v in ok], "o-",
                         label=name)
        est = [(_megapixels(s.input_shape), s.estimated_full_bytes) for s, (_, v)
               in zip(result.sizes, pts) if v.status == "would not fit"]
        if est:
            mem_ax.plot([mp for mp, _ in est], [b / 2**30 for _, b in est], "o",
                        mfc="none", label=f"{name} (estimate, not run)")
    top = max([v.peak_bytes or 0 for s in result.sizes for v in s.variants]
              + [s.estimated_full_bytes for s in result.sizes
                 if any(v.status == "would not fit" for v in s.variants)])
    if top > result.available_bytes / 2:  # else the line only squashes the curves
        mem_ax.axhline(result.available_bytes / 2**30, color="grey", ls=":", lw=1,
                       label="available")
    mem_ax.set(xlabel="image size (megapixels)", ylabel=f"{result.memory_kind} (GiB)",
               title="peak memory")
    time_ax.set(xlabel="image size (megapixels)", ylabel="seconds (median)",
                title="one training step")
    for ax in (mem_ax, time_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result.spec}, {result.dtype} on {result.device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _megapixels(shape) -> float:
    return math.prod(shape[2:]) / 1e6
