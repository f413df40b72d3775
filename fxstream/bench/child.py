"""One benchmark run in a fresh process: ``python -m fxstream.bench --child CONFIG``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from ..hostmem import HUGE_PAGES_ENV, huge_pages_on
from .baselines import apply_checkpoint
from .options import BenchConfig, torch_dtype
from .results import Run


def child_config(cfg: BenchConfig, variant, shape, stages) -> dict:
    return dict(spec=cfg.spec, variant=variant, shape=list(shape), dtype=cfg.dtype,
                device=cfg.device, tile_size=cfg.tile_size, budget_bytes=cfg.budget_bytes,
                split=cfg.split, leaf_modules=list(cfg.leaf_modules), stages=list(stages),
                warmup=cfg.warmup, channels_last=cfg.channels_last, autocast=cfg.autocast,
                offload=cfg.offload, cudnn_benchmark=cfg.cudnn_benchmark,
                train_batchnorm=cfg.train_batchnorm, huge_pages=cfg.huge_pages)


def run_child(config: dict, variant: str, repeat: int, timeout=None) -> Run:
    """Run one step in ``python -m fxstream.bench --child CONFIG``; its last stdout line is JSON."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    if config.get("huge_pages"):  # read by torch when it starts (fxstream.hostmem.huge_pages_on)
        env[HUGE_PAGES_ENV] = "1"
    cmd = [sys.executable, "-m", "fxstream.bench.child", "--child", json.dumps(config)]
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


def child_step(config: dict) -> dict:
    """Build the variant, run ``warmup`` + 1 training steps, return time and memory (JSON-ready)."""
    import resource

    from ..check import tensors_of
    from ..spec import load_model
    from ..streaming import compile as compile_model
    from ..streaming import freeze_batchnorm

    device = torch.device(config["device"])
    cuda = device.type == "cuda"
    dtype = torch_dtype(config["dtype"])
    shape = tuple(config["shape"])
    variant = config["variant"]
    fmt = torch.channels_last if config.get("channels_last") else torch.contiguous_format
    amp = torch_dtype(config["autocast"]) if config.get("autocast") else None
    if cuda and config.get("cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = load_model(config["spec"])
    if not config.get("train_batchnorm"):
        model = freeze_batchnorm(model)
    model = model.to(device=device, dtype=dtype, memory_format=fmt).train()
    extra = {}
    image_device = device
    if variant == "streamed":
        kwargs = {}
        if config.get("offload"):
            kwargs["offload"] = True
            image_device = torch.device("cpu")
        if config["budget_bytes"] is not None:
            kwargs["memory_budget"] = config["budget_bytes"]
        elif config["tile_size"] is not None:
            kwargs["memory_budget"] = None  # a plain plan of that tile
        if config["tile_size"] is not None:
            tile = config["tile_size"]
            kwargs["tile_size"] = tuple(tile) if isinstance(tile, list) else tile
        model = compile_model(model, split=config["split"],
                              leaf_modules=tuple(config["leaf_modules"]), input_shape=shape,
                              **kwargs)
        plan = model.plan(shape, dtype)
        first = plan.passes[0] if plan.passes else None
        extra = dict(cuts=plan.cuts, tile_size=first.tile_size if first else None,
                     num_tiles=first.num_tiles if first else 0,
                     redundancy=first.redundancy if first else 1.0)
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
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    loss = step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    return dict(seconds=seconds, peak_bytes=memory(peak=True), baseline_bytes=baseline,
                loss=loss, huge_pages=not cuda and huge_pages_on(),
                system_seconds=after.ru_stime - before.ru_stime,
                user_seconds=after.ru_utime - before.ru_utime,
                page_faults=after.ru_minflt - before.ru_minflt, **extra)


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


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
