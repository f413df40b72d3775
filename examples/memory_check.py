"""The memory model checked against measurement: estimated vs measured peak of a training step.

    python examples/memory_check.py                       # every size x budget (hours)
    python examples/memory_check.py --models resnet18 --sizes 2048 --budgets 0.35
    python examples/memory_check.py --pairs 1024:0.5,1536:0.35,2048:0.25   # the README's table

Each run is one training step (forward, sum of the outputs, backward) of a torchvision model
with frozen BatchNorm, float32 on the CPU, compiled with a memory budget; every run is a fresh
process. The budget is given as a share of the full image's estimated step above the baseline
of the run's own process, with the model built (``--budgets 0.25`` = baseline + a quarter of
it). A run reports the plan's estimated
peak, its measured peak (``ru_maxrss``) and, per pass, the peak resident memory of its forward
and backward (VmHWM, reset through ``/proc/self/clear_refs`` when each begins) next to the
estimate of that phase. Estimate and measurement are compared above the memory the process
held when the plan was made: the estimate above the plan's baseline (that memory rounded up to
64 MiB, a margin the budget keeps), the measured peak above the resident memory at the moment
the plan read it (both include the image, allocated after compile). ``--factor`` replaces the
CPU allocator factor of ``fxstream.memory.ALLOCATOR_FACTOR`` (1.0 shows the live bytes alone,
for calibrating it).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "densenet121", "convnext_tiny", "unet")
GiB = 2**30


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1)) * 1024


def hwm() -> int:
    return _status("VmHWM")


def rss() -> int:
    return _status("VmRSS")


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(name):
    import torch
    import torchvision

    torch.manual_seed(0)
    if name == "unet":  # MONAI's U-Net: InstanceNorm in every block (streamed statistics)
        from monai.networks.nets import UNet

        return UNet(spatial_dims=2, in_channels=3, out_channels=2,
                    channels=(32, 64, 128, 256, 512), strides=(2, 2, 2, 2), num_res_units=2)
    return getattr(torchvision.models, name)()


def child(config: dict) -> dict:
    import torch

    import fxstream
    from fxstream import memory, runtime

    if config.get("factor") is not None:
        memory.ALLOCATOR_FACTOR["cpu"] = config["factor"]
    torch.set_num_threads(config.get("threads", 2))
    model = fxstream.freeze_batchnorm(build(config["model"])).train()
    shape = tuple(config["shape"])
    # the baseline plus a share of the full image's step, the baseline this fresh process's own
    # (the parent's resident memory grows with every model it analysed)
    budget = int(fxstream.budget.current_rss() + config["share"] * config["full"])
    at_plan = []  # what the process holds when the plan reads its baseline (image not yet)
    rounded = fxstream.budget.current_rss

    def current_rss():
        at_plan.append(rss())
        return rounded()

    fxstream.budget.current_rss = current_rss
    try:
        sm = fxstream.compile(model, input_shape=shape, memory_budget=budget)
    finally:
        fxstream.budget.current_rss = rounded
    plan = sm.plan(shape)
    phases = []
    real_forward, real_backward = runtime.PassEngine.run_forward, runtime.StreamFunction.backward

    def start():
        """Before a phase resets the peak: what ran since the last phase ended (kept passes
        run inside autograd, the head), so that no interval of the step goes unmeasured."""
        phases.append(("between phases", hwm()))
        reset_hwm()

    def run_forward(self, *args, **kwargs):
        start()
        out = real_forward(self, *args, **kwargs)
        phases.append((f"forward of pass {self.spec.index}", hwm()))
        reset_hwm()
        return out

    def backward(ctx, *grads):
        start()
        out = real_backward(ctx, *grads)
        phases.append((f"backward of pass {ctx.engine.spec.index}", hwm()))
        reset_hwm()
        return out

    runtime.PassEngine.run_forward = run_forward
    runtime.StreamFunction.backward = staticmethod(backward)
    x = torch.randn(shape)
    baseline = hwm()
    reset_hwm()
    t0 = time.perf_counter()
    sum(o.float().sum() for o in fxstream.check.tensors_of(sm(x))).backward()
    seconds = time.perf_counter() - t0
    # each phase reset the peak (clear_refs resets ru_maxrss too): the step's peak is the
    # largest of the phases' and of the intervals between them
    phases.append(("between phases", hwm()))
    peak = max([baseline] + [v for _, v in phases])
    return dict(model=config["model"], shape=list(shape), budget=plan.budget,
                estimated=plan.estimate.peak, baseline=plan.estimate.baseline,
                rss_before=baseline, rss_at_plan=at_plan[-1], measured=peak, seconds=seconds,
                cuts=list(plan.cuts),
                tiles=[p.num_tiles for p in plan.passes], keep=[p.keep for p in plan.passes],
                estimated_phases=[list(p) for p in plan.estimate.phases],
                measured_phases=[list(p) for p in phases])


def run(config: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)],
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(config, error=tail)
    return json.loads(lines[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sizes", default="1024,2048,3072")
    ap.add_argument("--budgets", default="0.25,0.5",
                    help="shares of the full image's estimated step above the baseline")
    ap.add_argument("--pairs", help="size:share pairs instead of --sizes x --budgets, e.g. "
                    "1024:0.5,1536:0.35,2048:0.25")
    ap.add_argument("--factor", type=float, help="CPU allocator factor to plan with")
    ap.add_argument("--json", help="write every run's record here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    import fxstream
    from fxstream.memory import full_step_live

    if args.pairs:
        runs = [(int(a), (float(b),)) for a, b in (p.split(":") for p in args.pairs.split(","))]
    else:
        shares = tuple(map(float, args.budgets.split(",")))
        runs = [(size, shares) for size in map(int, args.sizes.split(","))]
    records = []
    for name in args.models.split(","):
        for size, shares in runs:
            shape = (1, 3, size, size)
            full = full_step_live(fxstream.analyze(fxstream.freeze_batchnorm(build(name)),
                                                   shape))
            for share in shares:
                rec = run(dict(model=name, shape=shape, share=share, full=full,
                               factor=args.factor))
                records.append(rec)
                if "error" in rec:
                    print(f"{name:14s} {size:5d} {share:4.2f}  error: {rec['error']}",
                          flush=True)
                    continue
                # each above its own baseline: the plan counts from the memory in use when it
                # was made, rounded up to 64 MiB (fxstream.budget.current_rss: a margin of the
                # budget, not part of the step's estimate), the measurement from the same moment
                est = rec["estimated"] - rec["baseline"]
                got = rec["measured"] - rec["rss_at_plan"]
                print(f"{name:14s} {size:5d} {share:4.2f}  budget {rec['budget'] / GiB:6.2f}  "
                      f"estimated {rec['estimated'] / GiB:6.2f}  measured "
                      f"{rec['measured'] / GiB:6.2f}  above baseline {est / GiB:5.2f} vs "
                      f"{got / GiB:5.2f} ({(est - got) / max(got, 1):+.0%})  "
                      f"{'OVER' if rec['measured'] > rec['budget'] else 'ok'}  "
                      f"{rec['seconds']:.1f}s  tiles {rec['tiles']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
