"""The ``fxstream`` command line.

    fxstream analyze torchvision.models:resnet50 --input 1x3x8192x8192 --tile 2048
    fxstream infer models/unet.py:build --image slide.tif --out pred.zarr --budget 4GiB

Each subcommand is one ``add_<name>`` function that registers its parser and the function that
runs it; :data:`COMMANDS` lists them. A run function takes the parsed arguments and returns the
exit status. Errors fxstream raises on purpose (:class:`~fxstream.errors.FxStreamError`) end the
run with status 2 and one line on stderr, ``fxstream: error: ...``; anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import FxStreamError
from .infer_cli import add_infer

PROG = "fxstream"
SPEC_HELP = ("model SPEC: 'package.module:callable' (e.g. torchvision.models:resnet50), "
             "'path/to/model.py:callable' or 'timm:NAME'; no weights are downloaded")


def _console():
    """The console for stdout. Piped or redirected there is no terminal to measure and rich
    would wrap tables at 80 columns, cutting node names: 160 then (``COLUMNS`` still wins)."""
    from rich.console import Console

    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    return Console(highlight=False, width=width)


def add_model_arguments(p, example_input: str, several_inputs: bool = False,
                        train: bool = True) -> None:
    """The arguments the model commands share: SPEC, --input, --split, --leaf (and --train)."""
    p.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    more = "; repeat for several sizes (--plot)" if several_inputs else ""
    p.add_argument("--input", required=True, metavar="NxCxHxW",
                   action="append" if several_inputs else "store",
                   help=f"input shape, sizes joined by 'x', e.g. {example_input}{more}")
    p.add_argument("--split", metavar="NAME",
                   help="node name or module qualname whose output becomes the boundary")
    p.add_argument("--leaf", action="append", default=[], metavar="QUALNAME",
                   help="keep this submodule as one call when tracing (repeatable); for "
                        "submodules torch.fx cannot trace")
    if train:
        p.add_argument("--train", action="store_true",
                       help="keep the model in train mode (default: eval mode)")


def cmd_analyze(args: argparse.Namespace) -> int:
    """``fxstream analyze``: trace the model, report geometry, boundary and tile plan."""

    from .analysis import analyze
    from .planner import PlanOptions, make_plan
    from .report import render, to_json
    from .spec import load_model, parse_input, parse_tile
    from .summary import summarize

    input_shape = parse_input(args.input)
    tile = parse_tile(args.tile) if args.tile is not None else None
    model = load_model(args.spec)
    if not args.train:
        model.eval()
    analysis = analyze(model, input_shape, split=args.split, leaf_modules=tuple(args.leaf))
    summary = None
    if tile is not None or args.budget is not None:
        plan = make_plan(analysis, PlanOptions(tile_size=tile, memory_budget=args.budget))
        summary = summarize(analysis, plan)
    if args.json:
        sys.stdout.write(to_json(analysis, summary) + "\n")
    else:
        render(analysis, _console(), all_nodes=args.all_nodes, plan=summary)
    return 0


def add_analyze(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze", help="show where a model can be streamed and what a tile plan costs",
        description="Trace a model with torch.fx and report each node's stride and receptive "
                    "field, the stem/head boundary, the global nodes and, with --tile, the tile "
                    "plan. The model is put in eval mode first; pass --train to keep it in train "
                    "mode (train-mode BatchNorm then streams its batch statistics as "
                    "reductions).")
    add_model_arguments(p, "1x3x8192x8192")
    p.add_argument("--tile", metavar="SIZE",
                   help="largest input tile: one size (2048) or one per spatial axis (2048x1024)")
    p.add_argument("--budget", metavar="BYTES",
                   help="choose cuts and tile size under this peak memory, e.g. 8GiB, as "
                        "fxstream.compile(memory_budget=...) does, and show the plan")
    p.add_argument("--json", action="store_true", help="print the analysis as JSON")
    p.add_argument("--all-nodes", action="store_true",
                   help="list every node, not only those that change the geometry")
    p.set_defaults(run=cmd_analyze)


def cmd_check(args: argparse.Namespace) -> int:
    """``fxstream check``: streamed vs full image, forward and backward; exit 1 if they differ."""

    from .check import check
    from .report import render_check
    from .spec import load_model, parse_input, parse_tile

    input_shape = parse_input(args.input)
    tile = parse_tile(args.tile)
    dtype = _parse_dtype(args.dtype)
    model = load_model(args.spec)
    if not args.train:
        model.eval()
    cuts = [c for c in args.cuts.split(",") if c] if args.cuts else None
    result = check(model, input_shape, tile, dtype=dtype, tol=args.tol, split=args.split,
                   leaf_modules=tuple(args.leaf), seed=args.seed, device=args.device, cuts=cuts)
    render_check(result, _console(), all_rows=args.all_rows)
    return 0 if result.passed else 1


def _parse_dtype(name: str):
    import torch

    from .errors import SpecError

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SpecError(f"--dtype {name!r}: expected a floating dtype such as float64, float32 "
                        "or bfloat16")
    return dtype


def add_check(subparsers) -> None:
    p = subparsers.add_parser(
        "check", help="compare streamed and full-image outputs and gradients",
        description="Build the model, run a full-image and a streamed forward and backward with "
                    "the same weights, image and random linear loss, and print the largest "
                    "absolute and relative difference of the output, each parameter's gradient "
                    "and the image gradient. Exit 1 if any exceeds --tol. The model is put in "
                    "eval mode first unless --train is given.")
    add_model_arguments(p, "1x3x1024x1024")
    p.add_argument("--tile", required=True, metavar="SIZE",
                   help="largest input tile: one size (256) or one per spatial axis (256x128)")
    p.add_argument("--dtype", default="float64", help="dtype of model and image (float64)")
    p.add_argument("--tol", type=float, default=1e-10,
                   help="largest relative difference allowed (default 1e-10)")
    p.add_argument("--cuts", metavar="NAMES",
                   help="comma-separated cut points of a multi-cut plan, e.g. layer1,layer2")
    p.add_argument("--seed", type=int, default=0, help="seed of image, loss weights (0)")
    p.add_argument("--device", default="cpu", help="device to run on (cpu, cuda)")
    p.add_argument("--all-rows", action="store_true",
                   help="list every parameter, not only the worst ones")
    p.set_defaults(run=cmd_check)


def cmd_bench(args: argparse.Namespace) -> int:
    """``fxstream bench``: time and peak memory of a training step, full image vs streamed."""
    from rich.console import Console

    from .bench import (BenchConfig, bench, check_config, check_plot_available, parse_budget,
                        parse_variants, plot_bench, render_bench, to_json)
    from .spec import parse_input, parse_tile

    cfg = BenchConfig(
        spec=args.spec, input_shapes=tuple(parse_input(s) for s in args.input),
        variants=parse_variants(args.variants),
        tile_size=parse_tile(args.tile) if args.tile is not None else None,
        budget_bytes=parse_budget(args.budget) if args.budget is not None else None,
        device=args.device, dtype=args.dtype, repeat=args.repeat, warmup=args.warmup,
        split=args.split, leaf_modules=tuple(args.leaf), timeout=args.timeout, force=args.force,
        channels_last=args.channels_last, autocast=args.autocast, offload=args.offload,
        cudnn_benchmark=args.cudnn_benchmark, train_batchnorm=args.train_batchnorm,
        huge_pages=args.huge_pages)
    check_config(cfg)
    if args.plot:
        check_plot_available()
    err = Console(stderr=True, highlight=False)
    result = bench(cfg, progress=None if args.quiet else
                   (lambda msg: err.print(f"[dim]running {msg}[/dim]")))
    if args.json:
        sys.stdout.write(to_json(result) + "\n")
    else:
        render_bench(result, _console())
    if args.plot:
        plot_bench(result, args.plot)
        err.print(f"plot written to {args.plot}")
    return 0


def add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time and peak memory of a training step: full image, streamed, checkpoint",
        description="Run one training step (forward, sum loss, backward) of the model on a random "
                    "image, each variant in a fresh process, the variants interleaved over "
                    "--repeat rounds; report the median time, the peak memory (peak RSS on CPU, "
                    "torch.cuda.max_memory_allocated on CUDA) and its baseline after building "
                    "model and image, the ratios to the full image, and the compute estimate the "
                    "plan's redundancy implies. BatchNorm is frozen (eval statistics) unless "
                    "--train-batchnorm. A full-image step estimated not to fit in available "
                    "memory is not run.")
    add_model_arguments(p, "1x3x4096x4096", several_inputs=True, train=False)
    p.add_argument("--tile", metavar="SIZE",
                   help="largest input tile of the streamed variant: 2048 or 2048x1024")
    p.add_argument("--budget", metavar="BYTES",
                   help="memory budget of the streamed variant (8GiB), instead of --tile")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", help="dtype of model and image (float32)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per variant, each in a fresh process (default 3)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed steps before the timed one, in the same process (default 0); "
                        "1 leaves out first-call costs (oneDNN/cuDNN set-up per tile shape), "
                        "which dominate on small images")
    p.add_argument("--variants", default="full,streamed,checkpoint",
                   help="comma-separated subset of full,streamed,checkpoint (default all)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="give up on a run after this long (default: no limit)")
    p.add_argument("--force", action="store_true",
                   help="run the full image even when it is estimated not to fit")
    p.add_argument("--channels-last", action="store_true",
                   help="model and image in channels-last memory format (every variant)")
    p.add_argument("--autocast", metavar="DTYPE", choices=("bfloat16", "float16"),
                   help="run each step under torch.autocast with this dtype (every variant)")
    p.add_argument("--offload", action="store_true",
                   help="with --device cuda: the streamed variant keeps the image and its cut "
                        "maps in pinned host memory, fetching tiles ahead of the compute")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="with --device cuda: torch.backends.cudnn.benchmark on in every variant "
                        "(autotuned convolutions; their workspace counts in the peak)")
    p.add_argument("--train-batchnorm", action="store_true",
                   help="BatchNorm in train mode (batch statistics, running statistics updated; "
                        "streamed as reductions) instead of frozen (every variant)")
    p.add_argument("--huge-pages", action="store_true",
                   help="CPU: every run with THP_MEM_ALLOC_ENABLE=1, so PyTorch backs large "
                        "tensors with transparent huge pages (far fewer page faults; set it "
                        "before Python starts to get the same in training)")
    p.add_argument("--plot", metavar="PNG",
                   help="draw peak memory and time against image size (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=cmd_bench)


# name -> function that registers the subcommand's parser (and sets ``run``)
COMMANDS = {
    "analyze": add_analyze,
    "check": add_check,
    "bench": add_bench,
    "infer": add_infer,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Exact tiled streaming of CNN stems on huge images.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 success, 2 usage or model error).

    Example:
        >>> main(["analyze", "torch.nn:Identity", "--input", "0x3"])
        2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except FxStreamError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or \
        type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
