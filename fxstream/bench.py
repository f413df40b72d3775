"""``fxstream bench``: time and peak memory of one training step, full image vs streamed.

    fxstream bench torchvision.models:resnet18 --input 1x3x4096x4096 --tile 1024 --repeat 3

Every run is one training step (forward, a sum loss over the floating outputs, backward) in a
fresh process (``python -m fxstream.bench --child CONFIG``), so each run's peak memory is its own;
the variants are interleaved within each repeat (full, streamed, checkpoint, full, ...) so slow
drifts of the machine's load hit them alike. The variants:

- ``full``: the model as is (BatchNorm frozen by :func:`fxstream.freeze_batchnorm`);
- ``streamed``: ``fxstream.compile(model, tile_size=...)``, or with ``--budget``
  ``fxstream.compile(model, memory_budget=...)`` (the cuts and tile size compile picks are
  reported, next to the plan :func:`fxstream.budget.choose_plan` estimates here);
- ``checkpoint``: each top-level child of the model that lies in the stem wrapped in
  ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (the usual way to trade time for
  memory without fxstream), where the stem is a chain of top-level children (in-place children
  such as ``nn.ReLU(inplace=True)`` run as is; see :func:`checkpoint_stages`).

Memory is the process's peak RSS on CPU (``ru_maxrss``) and ``torch.cuda.max_memory_allocated``
on CUDA; the baseline is the same measure after the model and the image are built (the image
after ``compile``, as a training loop loads it). A full-image step whose estimated memory
exceeds what is available is reported as such and not run.

Compute, then render: :func:`bench` returns a :class:`BenchResult`; :func:`render_bench`,
:func:`to_json` and :func:`plot_bench` only read it.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .analysis import _jsonable
from .errors import FxStreamError, SpecError, UnsupportedError

VARIANTS = ("full", "streamed", "checkpoint")
# full-image step memory ~ the stem's allocating activations (in-place ops left out) x this:
# measured steps (peak - baseline + image - 2 x parameters) were 0.87x (resnet34 at 4096^2),
# 0.92x (resnet18 at 4096^2) and 1.05x (resnet18 at 2048^2) of them
GRAD_FACTOR = 1.05
BACKWARD_COST = 2  # backward ~ this x forward, for the streamed compute estimate


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Run:
    """One training step in one fresh process (``error`` set when it failed)."""

    variant: str
    repeat: int
    seconds: float | None = None
    peak_bytes: int | None = None
    baseline_bytes: int | None = None
    loss: float | None = None
    num_tiles: int | None = None
    redundancy: float | None = None
    cuts: tuple[str, ...] = ()  # streamed: the cuts compile chose (under --budget)
    tile_size: int | tuple[int, ...] | None = None  # streamed: the tile size it used
    error: str = ""


@dataclass(frozen=True)
class VariantResult:
    """One variant at one input size: medians over its runs and ratios to the full image.

    ``status`` is ``ok`` (at least one run succeeded), ``failed``, ``would not fit`` (full image,
    not run) or ``unsupported`` (checkpoint on a model that is no chain of children); ``note``
    says why. ``peak_bytes`` is the largest peak over the runs, ``baseline_bytes`` the median.
    """

    variant: str
    status: str
    note: str = ""
    runs: tuple[Run, ...] = ()
    median_seconds: float | None = None
    peak_bytes: int | None = None
    baseline_bytes: int | None = None
    time_ratio: float | None = None
    memory_ratio: float | None = None  # peak / full's peak
    step_memory_ratio: float | None = None  # (peak - baseline) / full's (peak - baseline)


@dataclass(frozen=True)
class Floor:
    """The least time streaming can take, from the plan's redundancy alone."""

    redundancy: float  # with cuts: the segments' redundancies weighted by their MACs
    ratio: float  # streamed / full-image step time, at least
    seconds: float | None  # ratio applied to a measured step (see basis)
    basis: str  # "full", "checkpoint" or "" (nothing measured to scale)
    explanation: str


@dataclass(frozen=True)
class SizeResult:
    """Every variant at one input shape."""

    input_shape: tuple[int, ...]
    num_tiles: int | None
    redundancy: float | None
    full_activation_bytes: int
    estimated_full_bytes: int
    checkpoint_stages: tuple[str, ...]
    variants: tuple[VariantResult, ...]
    floor: Floor | None
    budget_plan: object | None = None  # fxstream.budget.PlanChoice under --budget

    def variant(self, name: str) -> VariantResult:
        for v in self.variants:
            if v.variant == name:
                return v
        raise KeyError(name)


@dataclass(frozen=True)
class BenchResult:
    """What :func:`bench` measured; ``to_dict()`` is JSON-ready."""

    spec: str
    device: str
    dtype: str
    tile_size: int | tuple[int, ...] | None
    budget_bytes: int | None
    repeat: int
    warmup: int
    memory_kind: str  # "peak RSS" | "CUDA max_memory_allocated"
    available_bytes: int
    sizes: tuple[SizeResult, ...]
    options: tuple[str, ...] = ()  # channels-last, autocast, offload as given

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class BenchConfig:
    """The options of one benchmark, checked by :func:`check_config` before anything runs."""

    spec: str
    input_shapes: tuple[tuple[int, ...], ...]
    variants: tuple[str, ...] = VARIANTS
    tile_size: int | tuple[int, ...] | None = None
    budget_bytes: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    repeat: int = 3
    warmup: int = 0
    split: str | None = None
    leaf_modules: tuple[str, ...] = ()
    timeout: float | None = None
    force: bool = False
    channels_last: bool = False  # model and image channels-last (every variant)
    autocast: str | None = None  # "bfloat16" / "float16": the step under torch.autocast
    offload: bool = False  # CUDA streamed variant: image and cut maps in host memory
    cudnn_benchmark: bool = False  # torch.backends.cudnn.benchmark on (every variant)


# ---------------------------------------------------------------------------------------------
# checking the options


def parse_budget(text: str) -> int:
    """``8GiB`` -> 8 * 2**30, ``16GB`` -> 16e9, as ``fxstream.compile(memory_budget=...)`` reads it.

    Example:
        >>> parse_budget("8GiB"), parse_budget("16GB")
        (8589934592, 16000000000)
    """
    from .budget import parse_bytes
    from .errors import PlanError

    try:
        return parse_bytes(text)
    except PlanError:
        raise SpecError(f"bad --budget {text!r}: expected a size such as 8GiB, 512MiB or "
                        "16GB") from None


def budget_supported() -> bool:
    """Whether this fxstream's ``compile`` takes ``memory_budget=``."""
    from .streaming import compile as compile_model

    return "memory_budget" in inspect.signature(compile_model).parameters


def parse_variants(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        raise SpecError(f"bad --variants {text!r}: expected a comma-separated subset of "
                        f"{','.join(VARIANTS)}")
    return tuple(dict.fromkeys(names))


def check_config(cfg: BenchConfig) -> None:
    """Raise :class:`SpecError` / :class:`UnsupportedError` for options that cannot work."""
    if cfg.tile_size is not None and cfg.budget_bytes is not None:
        raise SpecError("--tile and --budget exclude each other: pass one of them")
    if "streamed" in cfg.variants and cfg.tile_size is None and cfg.budget_bytes is None:
        raise SpecError("the streamed variant needs --tile SIZE (e.g. --tile 2048) or --budget; "
                        "or leave it out with --variants full,checkpoint")
    if cfg.budget_bytes is not None and not budget_supported():
        raise UnsupportedError("--budget: memory budgets are not supported yet (fxstream.compile "
                               "takes no memory_budget=); pass --tile SIZE instead")
    if cfg.repeat < 1 or cfg.warmup < 0:
        raise SpecError(f"--repeat must be >= 1 and --warmup >= 0, got {cfg.repeat} and "
                        f"{cfg.warmup}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        raise SpecError(f"bad --device {cfg.device!r}: expected cpu, cuda or cuda:N")
    if not cfg.input_shapes:
        raise SpecError("--input is required, e.g. --input 1x3x4096x4096")
    if cfg.channels_last and any(len(s) != 4 for s in cfg.input_shapes):
        raise SpecError("--channels-last needs 4-d inputs (N, C, H, W)")
    if cfg.autocast is not None and cfg.autocast not in ("bfloat16", "float16"):
        raise SpecError(f"--autocast {cfg.autocast!r}: expected bfloat16 or float16")
    if cfg.cudnn_benchmark and not cfg.device.startswith("cuda"):
        raise SpecError("--cudnn-benchmark tunes cuDNN's convolutions: it needs --device cuda")
    if cfg.offload and not cfg.device.startswith("cuda"):
        raise SpecError("--offload keeps the image and cut maps on the host while the model "
                        "runs on CUDA: it needs --device cuda")


# ---------------------------------------------------------------------------------------------
# measuring


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


def estimate_full_bytes(analysis, model, input_shape, itemsize: int) -> tuple[int, int]:
    """(stem activations on the image, estimated full-image step): the activations that
    allocate x GRAD_FACTOR plus parameters and their gradients plus the image."""
    from .analysis import activation_bytes
    from .budget import allocated_activation_bytes

    if analysis.plan is not None:
        acts = analysis.plan.full_activation_bytes
    else:
        acts = activation_bytes(analysis, input_shape, input_shape[2:], itemsize)[0]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    image = math.prod(input_shape) * itemsize
    return acts, int(GRAD_FACTOR * allocated_activation_bytes(analysis)) + 2 * params + image


def checkpoint_stages(analysis, model) -> tuple[str, ...]:
    """The top-level children of ``model`` that make up its stem, in order.

    The stem must be a chain: every stem node inside a top-level child called as a module, each
    child's nodes contiguous, each child fed only by the previous child's output (the first by
    the image). A child that reaches past the boundary is left out, and so is one that writes
    into its input in place (``nn.ReLU(inplace=True)``): recomputing it under checkpoint would
    write into the saved input again; run as is, it stores what the next checkpoint stores
    anyway. Raises :class:`UnsupportedError` otherwise.
    """
    import passes

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
        if not any(_in_place(gm, n) for n in nodes if any(a in feeds for a in n.args)):
            stages.append(name)
    if not stages:
        raise UnsupportedError("no per-child checkpoint: no top-level child lies wholly in the "
                               "stem")
    return tuple(stages)


def _in_place(gm, node) -> bool:
    """Whether ``node`` writes into its first argument (``inplace=True``, ``x.add_``, ``+=``)."""
    import operator

    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    name = getattr(node.target, "__name__", str(node.target))
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_function" and node.target in (operator.iadd, operator.isub,
                                                       operator.imul, operator.itruediv):
        return True
    return node.op in ("call_function", "call_method") and name.endswith("_") and \
        not name.startswith("__")


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
    from .analysis import analyze
    from .spec import load_model
    from .streaming import freeze_batchnorm

    check_config(cfg)
    progress = progress or (lambda msg: None)
    dtype = _torch_dtype(cfg.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    available = available_memory(cfg.device)
    model = freeze_batchnorm(load_model(cfg.spec)).to(dtype)
    # 1. per shape, before running anything: plans, full-image estimate, checkpoint stages
    prepared = []
    for shape in cfg.input_shapes:
        analysis = analyze(model, shape, tile_size=cfg.tile_size, split=cfg.split,
                           leaf_modules=cfg.leaf_modules, dtype=dtype)
        acts, estimate = estimate_full_bytes(analysis, model, shape, itemsize)
        try:
            stages, unsupported = checkpoint_stages(analysis, model), ""
        except FxStreamError as e:
            stages, unsupported = (), str(e)
        choice = None
        if cfg.budget_bytes is not None and "streamed" in cfg.variants:
            from .budget import choose_plan

            choice = choose_plan(analysis, shape, cfg.budget_bytes,
                                 host_pool=cfg.device == "cpu")
        prepared.append((shape, analysis, acts, estimate, stages, unsupported, choice))
    # 2. the runs: fresh processes, variants interleaved within each repeat
    results = []
    for shape, analysis, acts, estimate, stages, unsupported, choice in prepared:
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
                runs[v].append(run_child(_child_config(cfg, v, shape, stages), v, r,
                                         cfg.timeout))
        results.append(_summarize(cfg, shape, analysis, acts, estimate, stages, runs, skip,
                                  choice))
    return BenchResult(
        spec=cfg.spec, device=cfg.device, dtype=cfg.dtype, tile_size=cfg.tile_size,
        budget_bytes=cfg.budget_bytes, repeat=cfg.repeat, warmup=cfg.warmup,
        memory_kind="CUDA max_memory_allocated" if cfg.device.startswith("cuda") else "peak RSS",
        available_bytes=available, sizes=tuple(results), options=_options(cfg))


def _options(cfg: BenchConfig) -> tuple[str, ...]:
    return tuple(o for o in ("channels-last" if cfg.channels_last else None,
                             f"autocast {cfg.autocast}" if cfg.autocast else None,
                             "offload" if cfg.offload else None,
                             "cudnn benchmark" if cfg.cudnn_benchmark else None) if o)


def _torch_dtype(name: str):
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SpecError(f"--dtype {name!r}: expected a floating dtype such as float32")
    return dtype


def _child_config(cfg: BenchConfig, variant, shape, stages) -> dict:
    return dict(spec=cfg.spec, variant=variant, shape=list(shape), dtype=cfg.dtype,
                device=cfg.device, tile_size=cfg.tile_size, budget_bytes=cfg.budget_bytes,
                split=cfg.split, leaf_modules=list(cfg.leaf_modules), stages=list(stages),
                warmup=cfg.warmup, channels_last=cfg.channels_last, autocast=cfg.autocast,
                offload=cfg.offload, cudnn_benchmark=cfg.cudnn_benchmark)


def run_child(config: dict, variant: str, repeat: int, timeout=None) -> Run:
    """Run one step in ``python -m fxstream.bench --child CONFIG``; its last stdout line is JSON."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "fxstream.bench", "--child", json.dumps(config)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Run(variant, repeat, error=f"timed out after {timeout:g} s")
    lines = proc.stdout.strip().splitlines()
    if lines:
        try:
            data = json.loads(lines[-1])
        except ValueError:
            data = None
        if isinstance(data, dict):
            return Run(variant, repeat, **data)
    if proc.returncode < 0:
        sig = -proc.returncode
        return Run(variant, repeat, error=f"killed by signal {sig}"
                   + (" (out of memory?)" if sig == 9 else ""))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return Run(variant, repeat, error=f"exit {proc.returncode}: {tail}")


def _summarize(cfg, shape, analysis, acts, estimate, stages, runs, skip, choice) -> SizeResult:
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
            baseline_bytes=int(statistics.median(r.baseline_bytes for r in ok)))
    full = summaries.get("full")
    if full is not None and full.status == "ok":
        for v, s in summaries.items():
            if s.status == "ok":
                summaries[v] = _with_ratios(s, full)
    redundancy = analysis.plan.redundancy if analysis.plan is not None else None
    num_tiles = analysis.plan.num_tiles if analysis.plan is not None else None
    multi_cut = False
    if choice is not None:
        redundancy, multi_cut = choice.work_ratio, bool(choice.cuts)
        if not choice.cuts:
            from .analysis import make_plan

            plan = make_plan(analysis, shape, choice.tile_size)
            redundancy, num_tiles = round(plan.redundancy, 4), plan.num_tiles
        summaries["streamed"] = _check_choice(summaries["streamed"], choice)
    streamed = summaries.get("streamed")
    floor = None
    if streamed is not None and redundancy is not None:
        floor = streaming_floor(redundancy, full, summaries.get("checkpoint"), multi_cut)
    return SizeResult(tuple(shape), num_tiles, redundancy, acts, estimate, tuple(stages),
                      tuple(summaries[v] for v in cfg.variants), floor, choice)


def _check_choice(streamed: VariantResult, choice) -> VariantResult:
    """Note when a run's compile chose another plan than the one estimated here."""
    chosen = {(tuple(r.cuts), r.tile_size) for r in streamed.runs if not r.error}
    other = chosen - {(tuple(choice.cuts), choice.tile_size)}
    if not other:
        return streamed
    text = "; ".join(f"cuts {', '.join(c) or 'none'}, tile {t}" for c, t in sorted(other))
    note = f"compile chose {text} (estimated here: cuts {', '.join(choice.cuts) or 'none'}, " \
           f"tile {choice.tile_size}; the process baselines differ)"
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
    With cuts each segment has its own redundancy; ``r`` is their average weighted by MACs.

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
    cover = (f"the segments' tiles cover {redundancy:.2f}x their input maps (MAC-weighted)"
             if multi_cut else f"tiles cover {redundancy:.2f}x the image's pixels")
    explanation = (f"{cover} and the stem runs forward twice (no-grad, then recomputed per "
                   f"tile) and backward once: r(F+F+B) vs F+B with B = {BACKWARD_COST}F, head "
                   "ignored")
    return Floor(redundancy, ratio, seconds, basis, explanation)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


# ---------------------------------------------------------------------------------------------
# the child process


def child_step(config: dict) -> dict:
    """Build the variant, run ``warmup`` + 1 training steps, return time and memory (JSON-ready)."""
    import resource

    from .check import tensors_of
    from .spec import load_model
    from .streaming import compile as compile_model
    from .streaming import freeze_batchnorm

    device = torch.device(config["device"])
    cuda = device.type == "cuda"
    dtype = _torch_dtype(config["dtype"])
    shape = tuple(config["shape"])
    variant = config["variant"]
    fmt = torch.channels_last if config.get("channels_last") else torch.contiguous_format
    amp = _torch_dtype(config["autocast"]) if config.get("autocast") else None
    if cuda and config.get("cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = freeze_batchnorm(load_model(config["spec"])).to(device=device, dtype=dtype,
                                                            memory_format=fmt)
    model.train()
    extra = {}
    image_device = device
    if variant == "streamed":
        kwargs = {}
        if config.get("offload"):
            kwargs["offload"] = True
            image_device = torch.device("cpu")
        if config["budget_bytes"] is not None:
            kwargs["memory_budget"] = config["budget_bytes"]
        if config["tile_size"] is not None:
            tile = config["tile_size"]
            kwargs["tile_size"] = tuple(tile) if isinstance(tile, list) else tile
        model = compile_model(model, split=config["split"],
                              leaf_modules=tuple(config["leaf_modules"]), input_shape=shape,
                              **kwargs)
        engine = model.engine
        cuts = tuple(getattr(engine, "cuts", ()))
        first = engine.segments[0] if cuts else engine
        extra = dict(cuts=cuts, tile_size=getattr(first, "tile_size", config["tile_size"]))
        if not cuts:  # one segment: its plan reads the image
            plan = model.plan(shape).plan
            extra.update(num_tiles=plan.num_tiles, redundancy=round(plan.redundancy, 4))
    elif variant == "checkpoint":
        apply_checkpoint(model, config["stages"])
    # the image comes after compile, as in a training loop that loads one per step: compile's
    # budget counts one image on top of the memory in use when it runs
    x = torch.randn(shape, dtype=dtype, device=image_device).contiguous(memory_format=fmt)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = sum(o.float().sum() for o in tensors_of(model(x)))
        loss.backward()
        return float(loss.detach())

    def memory(peak: bool) -> int:
        if cuda:
            return torch.cuda.max_memory_allocated(device) if peak else \
                torch.cuda.memory_allocated(device)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    baseline = memory(peak=False)
    for _ in range(config["warmup"]):
        step()
    t0 = time.perf_counter()
    loss = step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, peak_bytes=memory(peak=True), baseline_bytes=baseline,
                loss=loss, **extra)


def _child_main(argv) -> int:
    if len(argv) != 2 or argv[0] != "--child":
        print("usage: python -m fxstream.bench --child CONFIG_JSON (run by `fxstream bench`)",
              file=sys.stderr)
        return 2
    try:
        result = child_step(json.loads(argv[1]))
    except Exception as e:  # reported as this run's error; the benchmark goes on
        text = " ".join(str(e).split())[:300]
        print(json.dumps({"error": f"{type(e).__name__}: {text}" if text else
                          type(e).__name__}))
        return 1
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# rendering


def to_json(result: BenchResult) -> str:
    """The result as indented JSON: exactly ``result.to_dict()``."""
    return json.dumps(result.to_dict(), indent=2)


def render_bench(result: BenchResult, console) -> None:
    """Print one table per input shape, then notes (skips, failures, the streaming floor)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from .report import human_bytes

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
        if size.checkpoint_stages and "checkpoint" in [v.variant for v in size.variants]:
            console.print(f"  checkpoint: each of {', '.join(size.checkpoint_stages)} "
                          "recomputed in backward")
        if size.budget_plan is not None:
            c = size.budget_plan
            console.print(f"  streamed under the budget: cuts {', '.join(c.cuts) or 'none'}, "
                          f"tile {c.tile_size}, estimated peak {human_bytes(c.estimated_peak)},"
                          f" work {c.work_ratio:.2f}× the full stem's")
        if size.floor is not None:
            f = size.floor
            at = f" = {f.seconds:.3g} s (from {f.basis})" if f.seconds is not None else ""
            console.print(f"  streamed compute estimate: {f.ratio:.2f}× full{at}; {f.explanation}."
                          " A streamed step can beat it: the full-image step's working set is "
                          "far larger and runs slower per FLOP")


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


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
