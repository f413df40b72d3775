"""Peak memory and time of one training step: full image vs fxstream, each in a fresh process.

    python examples/bench_memory.py --model resnet18 --size 4096 --tile 1024

Each variant runs in its own subprocess (so peak RSS is its own); the step is forward, a sum loss
on the logits, and backward, on a float32 CPU image of shape 1x3xSIZExSIZE.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def step(variant: str, model_name: str, size: int, tile: int) -> dict:
    import torch
    import torchvision

    import fxstream

    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(weights=None)
    model = fxstream.freeze_batchnorm(model)
    x = torch.randn(1, 3, size, size)
    if variant == "streamed":
        model = fxstream.compile(model, tile_size=tile, input_shape=tuple(x.shape))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    model(x).sum().backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "seconds": seconds, "peak_rss_gib": peak / 2**20,
            "baseline_rss_gib": base / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--variants", default="full,streamed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(step(args.child, args.model, args.size, args.tile)))
        return 0
    rows = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--model", args.model, "--size", str(args.size),
               "--tile", str(args.tile), "--child", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
            rows.append({"variant": variant, "error": f"exit {proc.returncode}: {tail}"})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.model}, 1x3x{args.size}x{args.size} float32, one training step, tile {args.tile}")
    print(f"{'variant':<10} {'time (s)':>9} {'peak RSS (GiB)':>15}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<10} {r['error']}")
        else:
            print(f"{r['variant']:<10} {r['seconds']:>9.1f} {r['peak_rss_gib']:>15.2f}")
    ok = [r for r in rows if "error" not in r]
    if len(ok) == 2:
        print(f"streamed/full: time {ok[1]['seconds'] / ok[0]['seconds']:.2f}x, "
              f"peak memory {ok[1]['peak_rss_gib'] / ok[0]['peak_rss_gib']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
