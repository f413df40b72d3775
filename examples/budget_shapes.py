"""One compiled module, several input shapes, one memory budget: each step's measured peak.

    python examples/budget_shapes.py                          # the README's figures
    python examples/budget_shapes.py --budget 3GiB --sizes 2048,4096 --model resnet34

``fxstream.compile(model, memory_budget=...)`` plans each new input shape when it first sees it.
This runs one training step (forward, sum of the logits, backward; BatchNorm frozen, float32,
CPU) per size through the same compiled module, in one process, largest size last, and prints
per step the plan's estimated peak and the measured peak resident memory of that step (VmHWM,
reset through ``/proc/self/clear_refs`` before each step).
"""
from __future__ import annotations

import argparse
import time

from memory_check import hwm, reset_hwm  # this directory is on sys.path when run


def main(argv=None) -> int:
    import torch
    import torchvision

    import fxstream
    from fxstream.budget import parse_bytes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--budget", default="2GiB")
    ap.add_argument("--sizes", default="2048,3072,4096")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    budget = parse_bytes(args.budget)
    model = fxstream.freeze_batchnorm(getattr(torchvision.models, args.model)()).train()
    streamed = fxstream.compile(model, memory_budget=budget)
    worst = 0.0
    for size in map(int, args.sizes.split(",")):
        x = torch.randn(1, 3, size, size)
        reset_hwm()
        t0 = time.perf_counter()
        for p in model.parameters():
            p.grad = None
        streamed(x).sum().backward()
        seconds = time.perf_counter() - t0
        peak = hwm()
        plan = streamed.plan(x.shape)
        worst = max(worst, peak / budget)
        print(f"{args.model} {size}²: budget {budget / 2**30:.2f} GiB, estimated "
              f"{plan.estimate.peak / 2**30:.2f} GiB, measured {peak / 2**30:.2f} GiB "
              f"({'ok' if peak <= budget else 'OVER'}), {seconds:.1f} s (planning included), "
              f"cuts {len(plan.cuts)}, tiles {[p.num_tiles for p in plan.passes]}", flush=True)
        del x
    print(f"largest peak / budget: {worst:.3f}")
    return 0 if worst <= 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
