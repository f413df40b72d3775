"""``fxstream bench``: every variant at every input shape, each run in a fresh process.

    fxstream bench torchvision.models:resnet18 --input 1x3x4096x4096 --tile 1024 --repeat 3

Every run is one training step (forward, a sum loss over the floating outputs, backward) in a
fresh process (:mod:`fxstream.bench.child`), so each run's peak memory is its own; the variants
are interleaved within each repeat (full, streamed, checkpoint, full, ...) so slow drifts of the
machine's load hit them alike. The variants:

- ``full``: the model as is (BatchNorm frozen by :func:`fxstream.freeze_batchnorm`);
- ``streamed``: ``fxstream.compile(model, ...)`` with ``--tile``, ``--budget`` or neither (the
  default plan); the plan it runs is the one :func:`fxstream.make_plan` makes here (reported);
- ``checkpoint``: the stem's top-level children under ``torch.utils.checkpoint``
  (:mod:`fxstream.bench.baselines`).

Memory is the process's peak RSS on CPU (``ru_maxrss``) and ``torch.cuda.max_memory_allocated``
on CUDA; the baseline is the same measure after the model and the image are built. A full-image
step whose estimated memory (the planner's memory model) exceeds what is available is reported as
such and not run.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
from dataclasses import replace


from ..analysis import analyze
from ..calls import check_image_only
from ..memory import full_step_live
from ..errors import FxStreamError, UnsupportedError
from ..hostmem import huge_pages_on
from ..planner import AUTO, PlanOptions, Situation, make_plan
from ..spec import load_model
from ..streaming import freeze_batchnorm
from ..summary import summarize
from .baselines import checkpoint_stages
from .child import child_config, run_child
from .options import BenchConfig, check_config, torch_dtype
from .results import BenchResult, Floor, SizeResult, VariantResult

BACKWARD_COST = 2  # backward ~ this x forward, for the streamed compute estimate


def available_memory(device: str = "cpu") -> int:
    """Bytes available to a new process: MemAvailable on CPU, free device memory on CUDA."""
    if device.startswith("cuda"):
        return _cuda_free(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cuda_free(device: str) -> int:
    """Asked in a throwaway process, so that this one never holds a CUDA context."""
    code = ("import torch, sys\n"
            "if not torch.cuda.is_available(): sys.exit(3)\n"
            f"print(torch.cuda.mem_get_info(torch.device({device!r}))[0])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode == 3:
        raise UnsupportedError(f"--device {device}: torch.cuda.is_available() is False here")
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UnsupportedError(f"--device {device}: cannot query free memory: {tail}")
    return int(proc.stdout.strip().splitlines()[-1])


def bench(cfg: BenchConfig, progress=None) -> BenchResult:
    """Run the benchmark: every variant at every input shape, ``cfg.repeat`` fresh processes each.

    Args:
        cfg: the options (checked by :func:`check_config` first).
        progress: called with a one-line message before each run (e.g. to print it).
    Returns:
        a :class:`BenchResult`.

    Example (three processes, each importing torch: half a minute or more):
        >>> cfg = BenchConfig("torchvision.models:resnet18", ((1, 3, 512, 512),), tile_size=512,
        ...                   repeat=1)
        >>> bench(cfg).sizes[0].variant("streamed").status  # doctest: +SKIP
        'ok'
    """
    check_config(cfg)
    progress = progress or (lambda msg: None)
    dtype = torch_dtype(cfg.dtype)
    available = available_memory(cfg.device)
    model = load_model(cfg.spec)
    check_image_only(model, "fxstream bench")
    model = (model if cfg.train_batchnorm else freeze_batchnorm(model)).to(dtype).train()
    # 1. per shape, before running anything: plans, full-image estimate, checkpoint stages
    prepared = []
    for shape in cfg.input_shapes:
        analysis = analyze(model, shape, split=cfg.split, leaf_modules=cfg.leaf_modules,
                           dtype=dtype)
        acts, estimate = full_image_step(analysis)
        try:
            stages, unsupported = checkpoint_stages(analysis, model), ""
        except FxStreamError as e:
            stages, unsupported = (), str(e)
        plan = None
        if "streamed" in cfg.variants:
            plan = summarize(analysis, make_plan(analysis, _plan_options(cfg), Situation(
                device=cfg.device, baseline=0 if cfg.device != "cpu" else None,
                available=available if cfg.device != "cpu" else None)))
        prepared.append((shape, analysis, acts, estimate, stages, unsupported, plan))
    # 2. the runs: fresh processes, variants interleaved within each repeat
    results = []
    for shape, analysis, acts, estimate, stages, unsupported, plan in prepared:
        skip = {}
        if "full" in cfg.variants and estimate > available and not cfg.force:
            skip["full"] = ("would not fit", f"would not fit (estimated {_gib(estimate)} > "
                                              f"{_gib(available)} available)")
        if "checkpoint" in cfg.variants and unsupported:
            skip["checkpoint"] = ("unsupported", unsupported)
        runs = {v: [] for v in cfg.variants}
        todo = [v for v in cfg.variants if v not in skip]
        for r in range(cfg.repeat):
            for v in todo:
                progress(f"{v} {'x'.join(map(str, shape))}  run {r + 1}/{cfg.repeat}")
                runs[v].append(run_child(child_config(cfg, v, shape, stages), v, r,
                                         cfg.timeout))
        results.append(_summarize(cfg, shape, analysis, acts, estimate, stages, runs, skip,
                                  plan))
    return BenchResult(
        spec=cfg.spec, device=cfg.device, dtype=cfg.dtype, tile_size=cfg.tile_size,
        budget_bytes=cfg.budget_bytes, repeat=cfg.repeat, warmup=cfg.warmup,
        memory_kind="CUDA max_memory_allocated" if cfg.device.startswith("cuda") else "peak RSS",
        available_bytes=available, sizes=tuple(results), options=_options(cfg))


def full_image_step(analysis) -> tuple[int, int]:
    """(the stem's activations on the image, the estimated memory of a full-image training
    step above the process baseline: the planner's memory model, :func:`full_step_live`)."""
    from ..summary import activation_bytes

    return activation_bytes(analysis)[0], full_step_live(analysis)


def _plan_options(cfg: BenchConfig) -> PlanOptions:
    """The plan ``fxstream.compile`` makes for the streamed variant's options."""
    budget = cfg.budget_bytes if cfg.budget_bytes is not None else \
        (None if cfg.tile_size is not None else AUTO)
    return PlanOptions(tile_size=cfg.tile_size, memory_budget=budget, offload=cfg.offload)


def _options(cfg: BenchConfig) -> tuple[str, ...]:
    return tuple(o for o in ("channels-last" if cfg.channels_last else None,
                             f"autocast {cfg.autocast}" if cfg.autocast else None,
                             "offload" if cfg.offload else None,
                             "cudnn benchmark" if cfg.cudnn_benchmark else None,
                             "train-mode BatchNorm" if cfg.train_batchnorm else None,
                             "huge pages" if cfg.device == "cpu" and (
                                 cfg.huge_pages or huge_pages_on()) else None) if o)


def _cpu_times(runs) -> dict:
    """Median CPU time of the runs' steps in and outside the kernel (where they report it)."""
    if any(r.system_seconds is None or r.user_seconds is None for r in runs):
        return {}
    return dict(median_system_seconds=statistics.median(r.system_seconds for r in runs),
                median_user_seconds=statistics.median(r.user_seconds for r in runs))


def _summarize(cfg, shape, analysis, acts, estimate, stages, runs, skip, plan) -> SizeResult:
    summaries = {}
    for v in cfg.variants:
        if v in skip:
            summaries[v] = VariantResult(v, skip[v][0], skip[v][1])
            continue
        ok = [r for r in runs[v] if not r.error]
        errors = sorted({r.error for r in runs[v] if r.error})
        note = "; ".join(errors)
        if not ok:
            summaries[v] = VariantResult(v, "failed", note, tuple(runs[v]))
            continue
        summaries[v] = VariantResult(
            v, "ok", note, tuple(runs[v]),
            median_seconds=statistics.median(r.seconds for r in ok),
            peak_bytes=max(r.peak_bytes for r in ok),
            baseline_bytes=int(statistics.median(r.baseline_bytes for r in ok)),
            **_cpu_times(ok))
    full = summaries.get("full")
    if full is not None and full.status == "ok":
        for v, s in summaries.items():
            if s.status == "ok":
                summaries[v] = _with_ratios(s, full)
    redundancy = num_tiles = work = None
    multi_cut = False
    if plan is not None:
        first = plan.passes[0] if plan.passes else None
        num_tiles = first.num_tiles if first else 0
        multi_cut = len(plan.passes) > 1
        redundancy = plan.work if plan.work is not None and multi_cut else \
            (first.redundancy if first else 1.0)
        # the compute estimate from the plan's work where one pass's overlap does not tell it:
        # several segments, or a pass that keeps its graph (forward once, as the full step)
        if plan.work is not None and (multi_cut or any(p.keep for p in plan.passes)):
            work = plan.work
        summaries["streamed"] = _check_plan(summaries["streamed"], plan)
    streamed = summaries.get("streamed")
    floor = None
    if streamed is not None and redundancy is not None:
        floor = streaming_floor(redundancy if work is None else work, full,
                                summaries.get("checkpoint"), work is not None)
    return SizeResult(tuple(shape), num_tiles, redundancy, acts, estimate, tuple(stages),
                      tuple(summaries[v] for v in cfg.variants), floor, plan)


def _check_plan(streamed: VariantResult, plan) -> VariantResult:
    """Note when a run chose another plan than the one made here (the baselines differ)."""
    if streamed.status != "ok" or not plan.passes:
        return streamed
    mine = (tuple(plan.cuts), list(plan.passes[0].tile_size))
    chosen = {(tuple(r.cuts), tuple(r.tile_size or ())) for r in streamed.runs if not r.error}
    other = chosen - {(mine[0], tuple(mine[1]))}
    if not other:
        return streamed
    text = "; ".join(f"cuts {', '.join(c) or 'none'}, tile {t}" for c, t in sorted(other))
    note = f"the run chose {text} (planned here: cuts {', '.join(mine[0]) or 'none'}, " \
           f"tile {tuple(mine[1])}; the process baselines differ)"
    return replace(streamed, note="; ".join(n for n in (streamed.note, note) if n))


def _with_ratios(s: VariantResult, full: VariantResult) -> VariantResult:
    full_step = full.peak_bytes - full.baseline_bytes
    return replace(s, time_ratio=s.median_seconds / full.median_seconds
                   if full.median_seconds else None,
                   memory_ratio=s.peak_bytes / full.peak_bytes if full.peak_bytes else None,
                   step_memory_ratio=(s.peak_bytes - s.baseline_bytes) / full_step
                   if full_step > 0 else None)


def streaming_floor(redundancy: float, full: VariantResult | None = None,
                    checkpoint: VariantResult | None = None, multi_cut: bool = False) -> Floor:
    """The time the plan implies if every FLOP cost the same: ``4r/3`` x the full-image step.

    Measured: ResNet-18 at 4096² under a quarter budget ran at 0.95x to 1.35x the full step
    (depending on how costly the machine's page faults were that hour) against an estimate of
    1.4x, because the full step's large working set faults and misses caches more per FLOP; so
    this is an estimate for comparing plans, not a lower bound.

    The streamed step runs the stem's forward twice (without grad to fill the boundary, then
    again with grad per tile) and its backward once, each over tiles that cover ``r`` times the
    image's pixels: ``r (F + F + B)``; the full step is ``F + B``. With ``B = 2F`` that is
    ``4r/3``. Per-child checkpointing also costs ``F + F + B``, so streamed >= ``r`` x checkpoint.
    With cuts each segment has its own redundancy, and a pass that keeps its graph runs its
    forward once (``multi_cut``): ``r`` is then the plan's work (its passes weighted by MACs).

    Example:
        >>> streaming_floor(1.5).ratio
        2.0
    """
    ratio = redundancy * (2 + BACKWARD_COST) / (1 + BACKWARD_COST)
    seconds, basis = None, ""
    if full is not None and full.status == "ok":
        seconds, basis = ratio * full.median_seconds, "full"
    elif checkpoint is not None and checkpoint.status == "ok":
        seconds, basis = redundancy * checkpoint.median_seconds, "checkpoint"
    if multi_cut:
        explanation = (f"the plan's work is {redundancy:.2f}x the stem streamed once without "
                       "overlap (forward twice, no-grad then recomputed per tile, and backward "
                       "once: r(F+F+B), MAC-weighted over its passes; a pass that keeps its "
                       f"graph runs F+B) vs F+B with B = {BACKWARD_COST}F, head ignored")
    else:
        explanation = (f"tiles cover {redundancy:.2f}x the image's pixels and the stem runs "
                       "forward twice (no-grad, then recomputed per tile) and backward once: "
                       f"r(F+F+B) vs F+B with B = {BACKWARD_COST}F, head ignored")
    return Floor(redundancy, ratio, seconds, basis, explanation)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


# ---------------------------------------------------------------------------------------------
# the child process
