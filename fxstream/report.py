"""Rendering an :class:`~fxstream.analysis.Analysis`: a rich report and JSON.

Compute, then render: everything shown here is read from the ``Analysis`` fields (its rows'
strings, its plan summary); nothing is derived from the graph or from sympy. The only decisions
made here are presentational: which rows to show, how to join per-axis values, how to shorten
source paths, how to write byte counts.
"""
from __future__ import annotations

import json
import os
import re

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .analysis import Analysis, NodeRow
from .summary import PlanSummary

BOUNDARY_MARK = "▶"
_SOURCE = re.compile(r"^(?P<path>.*?):(?P<line>\d+): ?(?P<code>.*)$", re.S)
_PACKAGE_ROOTS = ("site-packages/", "dist-packages/")


def to_json(analysis: Analysis, plan: PlanSummary | None = None) -> str:
    """The analysis as indented JSON: ``analysis.to_dict()`` with ``"plan"``, the plan summary
    (or null).

    Example:
        >>> import json, torch.nn as nn, fxstream
        >>> a = fxstream.analyze(nn.Conv2d(3, 4, 3), (1, 3, 16, 16))
        >>> json.loads(to_json(a))["boundary"]
        ['conv2d']
    """
    d = analysis.to_dict()
    d["plan"] = plan.to_dict() if plan is not None else None
    return json.dumps(d, indent=2)


def render(analysis: Analysis, console: Console, all_nodes: bool = False,
           plan: PlanSummary | None = None) -> None:
    """Print the report: header, node table, global nodes, tile plan.

    Args:
        analysis: what :func:`fxstream.analyze` returned.
        console: where to print; for snapshots use
            ``Console(width=120, color_system=None, force_terminal=False)``.
        all_nodes: show every node, not only those selected by :func:`shown_rows`.
        plan: the summary (:func:`fxstream.summary.summarize`) of a plan to show.

    Example:
        >>> import io, torch.nn as nn, fxstream
        >>> a = fxstream.analyze(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (1, 3, 16, 16))
        >>> out = io.StringIO()
        >>> render(a, Console(file=out, width=100, color_system=None))
        >>> "boundary" in out.getvalue()
        True
    """
    console.print(_header(analysis))
    console.print()
    console.print(node_table(analysis, all_nodes))
    console.print()
    console.print(_globals(analysis))
    console.print()
    console.print(_plan(analysis, plan))


def shown_rows(analysis: Analysis, all_nodes: bool = False) -> list[NodeRow]:
    """The rows the table shows: all of them, or those where the geometry changes.

    Without ``all_nodes`` the rule is: the input and boundary rows, plus every local stem row
    whose ``(stride, interval)`` has not appeared on an earlier row (in graph order). Pointwise
    ops (activations, eval BatchNorm) copy their input's geometry and joins (add, cat) take the
    hull of their inputs', which is usually one of them, so both drop out; convolutions and
    pools that widen the receptive field or change the stride stay. The rule is deliberately
    simple: a layer that exactly repeats a geometry reached on a parallel branch is hidden too,
    and ``--all-nodes`` shows everything.
    """
    if all_nodes:
        return list(analysis.rows)
    seen, rows = set(), []
    for r in analysis.rows:
        if r.role in ("input", "boundary"):
            rows.append(r)
        elif r.role == "stem" and r.local and r.stride:
            key = (r.stride, r.interval)
            if key not in seen:
                rows.append(r)
        if r.stride:
            seen.add((r.stride, r.interval))
    return rows


def node_table(analysis: Analysis, all_nodes: bool = False) -> Table:
    """The node table: one line per shown row, boundary rows bold and marked."""
    boundary = set(analysis.boundary)
    title = "all nodes" if all_nodes else "nodes that change the geometry"
    table = Table(title=f"{analysis.model}: {title}", box=box.SIMPLE_HEAD, title_justify="left",
                  caption=f"{BOUNDARY_MARK} boundary (handed to the head); stride, RF (receptive "
                          "field) and interval in input pixels",
                  caption_justify="left", pad_edge=False)
    # numbers never wrap; on a narrow console the module and op names are cut short first
    table.add_column("node", no_wrap=True)
    table.add_column("module", overflow="ellipsis")
    table.add_column("op", overflow="ellipsis")
    if all_nodes:  # otherwise every row is a stem row (or the input, or marked boundary)
        table.add_column("role", overflow="ellipsis")
    for name in ("stride", "RF", "interval", "output"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in shown_rows(analysis, all_nodes):
        marked = r.name in boundary
        role = [Text(r.role)] if all_nodes else []
        table.add_row(
            Text(f"{BOUNDARY_MARK} {r.name}" if marked else f"  {r.name}"),
            Text(r.qualname), Text(r.op), *role,
            Text(_axes(r.stride) if r.stride else "-"),
            Text(_axes(r.receptive_field) if r.receptive_field else "-"),
            Text(_axes([f"[{lo}, {hi}]" for lo, hi in r.interval]) if r.interval else "-"),
            Text("×".join(str(d) for d in r.shape[1:]) if r.shape else "-"),
            style="bold" if marked else None,
        )
    return table


def display_path(path: str) -> str:
    """A source path that does not depend on the machine: installed files are shown from their
    package (``torchvision/models/resnet.py``), files under the working directory relative to it.
    """
    path = path.replace("\\", "/")
    for root in _PACKAGE_ROOTS:
        if root in path:
            return path.rsplit(root, 1)[1]
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return path
    return path if rel.startswith("..") else rel.replace("\\", "/")


def display_source(source: str) -> str:
    """``path:line: code`` with the path shortened by :func:`display_path`."""
    m = _SOURCE.match(source)
    if not m:
        return source
    return f"{display_path(m['path'])}:{m['line']}: {m['code'].strip()}"


def human_bytes(n: int) -> str:
    """Bytes in binary units: ``human_bytes(3 * 2**30) == '3.0 GiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"


def _axes(values) -> str:
    values = [str(v) for v in values]
    return values[0] if len(set(values)) == 1 else " × ".join(values)


def _dtype(name: str) -> str:
    return name.replace("torch.", "")


def _header(a: Analysis) -> Text:
    text = Text()
    text.append("fxstream analyze ", style="bold")
    text.append(f"{a.model}  input {'×'.join(map(str, a.input_shape))} {_dtype(a.dtype)}")
    if a.split:
        text.append(f"  split {a.split!r}")
    text.append("\nboundary: ")
    for i, r in enumerate(a.boundary_rows):
        if i:
            text.append(", ")
        text.append(r.name, style="bold")
        text.append(f" (stride {_axes(r.stride)}, RF {_axes(r.receptive_field)})")
    if a.alignment:
        text.append(f"\ntile alignment: {_axes(a.alignment)} px")
    return text


def _globals(a: Analysis):
    rows = a.global_rows
    title = Text("Global nodes", style="bold")
    if not rows:
        return Group(title, Text("  none: every node is local, the whole model can be "
                                 "streamed"))
    lines = [Text.assemble(title, " (where the head starts; they need the whole image)")]
    for r in rows:
        lines.append(Text.assemble("  ", (r.name, "bold"), f" ({r.op}",
                                   f", module {r.qualname})" if r.qualname else ")",
                                   f": {r.reason}"))
        if r.source:
            lines.append(Text(f"      at {display_source(r.source)}"))
    return Group(*lines)


def _plan(a: Analysis, p: PlanSummary | None):
    title = Text("Tile plan", style="bold")
    if p is None:
        return Group(title, Text("  none: pass --tile SIZE (e.g. --tile 2048) or --budget BYTES "
                                 "(e.g. --budget 8GiB) to plan tiles"))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column()
    if len(p.passes) == 1:
        s = p.passes[0]
        grid.add_row("  tile size", f"{_axes(s.tile_size)} px (largest input tile "
                     f"{' × '.join(map(str, s.max_tile))})")
        grid.add_row("  tiles", f"{' × '.join(map(str, s.tiles_per_axis))} = {s.num_tiles}")
        grid.add_row("  margin", f"{_axes(s.margin)} px of context on each side of a tile's "
                     "outputs")
        grid.add_row("  overlap", f"{_axes(s.overlap)} px between neighbouring input tiles")
        grid.add_row("  redundancy", f"{s.redundancy:.2f}× (input pixels computed over all "
                     "tiles / image pixels)")
        grid.add_row("  recompute", "no (one tile run with grad, its graph kept for the "
                     "backward)" if s.keep else "yes (the backward recomputes each tile)")
    else:
        grid.add_row("  cuts", (", ".join(p.cuts) + f" (stored maps "
                                f"{human_bytes(p.stored_bytes)})") if p.cuts else "none")
        grid.add_row("  passes", f"{len(p.passes)}, above: each reads a map (the image or a "
                     "stored cut) tile by tile, and the statistics earlier passes summed")
    grid.add_row("  activations", f"{human_bytes(p.full_activation_bytes)} on the full image, "
                 f"{human_bytes(p.tile_activation_bytes)} on one tile (all stem outputs, "
                 f"{_dtype(a.dtype)}, estimated)")
    if a.stem_share is not None:
        rest = " (the rest runs on the whole image in the head)" if a.stem_share < 0.995 \
            else ""
        grid.add_row("  stem work", f"{a.stem_share:.0%} of the model's forward FLOPs{rest}")
    if p.budget is not None:
        grid.add_row("  budget", f"{human_bytes(p.budget)} (process baseline "
                     f"{human_bytes(p.baseline)} included)")
        grid.add_row("  peak memory", f"{human_bytes(p.estimated_peak)} estimated")
        grid.add_row("  work", f"{p.work:.2f}× the stem streamed once without overlap (forward "
                     "twice, backward once; the full image's own step is 0.75), from FLOPs")
    for note in p.notes:
        grid.add_row("  note", note)
    if len(p.passes) == 1:
        return Group(title, grid)
    return Group(title, _passes_table(p), grid)


def _passes_table(p: PlanSummary) -> Group:
    """One line per pass: what it reads, writes and sums, and its tiles."""
    lines = []
    for s in p.passes:
        reads = s.source + (f" (and {', '.join(s.reads)})" if s.reads else "")
        did = ([f"writes {', '.join(s.outputs)}"] if s.outputs else []) + \
            ([f"sums {', '.join(s.sums)}"] if s.sums else [])
        lines.append(Text(
            f"  pass {s.index}: reads {reads}; {'; '.join(did)}; tile {_axes(s.tile_size)}: "
            f"{s.num_tiles} tile{'s' if s.num_tiles > 1 else ''}, {s.redundancy:.2f}×, input "
            f"{'view' if s.view_input else 'copy'}, pool {'yes' if s.pool else 'no'}, "
            f"recompute {'no' if s.keep else 'yes'}"))
    return Group(*lines)


def render_check(result, console: Console, all_rows: bool = False, limit: int = 12) -> None:
    """Render a :class:`~fxstream.check.CheckResult`: a table of differences and the verdict.

    Without ``all_rows`` the output, the image gradient and the ``limit`` worst parameter
    gradients are listed (the verdict always covers every row).
    """
    diffs = list(result.diffs)
    fixed = [d for d in diffs if d.name.startswith(("output", "input gradient"))]
    params = sorted((d for d in diffs if d not in fixed), key=lambda d: -d.max_rel)
    failing = sum(1 for d in params if not d.ok)
    shown = fixed + (params if all_rows else params[:max(limit, failing)])
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for col, just in (("tensor", "left"), ("max abs diff", "right"), ("max rel diff", "right"),
                      ("", "left")):
        table.add_column(col, justify=just)
    for d in shown:
        table.add_row(d.name, f"{d.max_abs:.3e}", f"{d.max_rel:.3e}",
                      "ok" if d.ok else Text("FAIL", style="bold red"))
    shape = "×".join(str(s) for s in result.input_shape)
    console.print(Text(f"fxstream check  input {shape} {_dtype(result.dtype)}  tile "
                       f"{result.tile_size}  {result.num_tiles} tiles", style="bold"))
    console.print(table)
    if len(shown) < len(diffs):
        console.print(f"  ({len(diffs) - len(shown)} more parameter gradients within "
                      "tolerance; --all-rows lists them)")
    worst = result.worst
    verdict = "PASS" if result.passed else "FAIL"
    console.print(Text(f"{verdict}: worst relative difference {worst.max_rel:.3e} ({worst.name})"
                       f", tolerance {result.tol:g}",
                       style="bold green" if result.passed else "bold red"))
