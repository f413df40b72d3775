"""Peak memory and time of one training step: full image vs fxstream, each in a fresh process.

    python examples/bench_memory.py --model resnet18 --size 4096 --tile 1024

A thin wrapper over ``fxstream bench`` (see ``fxstream bench --help`` for every option: several
sizes, --repeat, --device cuda, --plot, --json); the step is forward, a sum loss on the logits,
and backward, on a float32 image of shape 1x3xSIZExSIZE.
"""
from __future__ import annotations

import argparse
import sys

from fxstream.cli import main as fxstream_main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18", help="a torchvision.models builder")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--variants", default="full,streamed")
    ap.add_argument("--repeat", type=int, default=1)
    args, rest = ap.parse_known_args(argv)
    return fxstream_main(["bench", f"torchvision.models:{args.model}",
                          "--input", f"1x3x{args.size}x{args.size}", "--tile", str(args.tile),
                          "--variants", args.variants, "--repeat", str(args.repeat), *rest])


if __name__ == "__main__":
    sys.exit(main())
