"""The options of ``fxstream bench``, checked before anything runs."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import SpecError
from ..hostmem import huge_pages_supported
from .results import VARIANTS


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
    train_batchnorm: bool = False  # BatchNorm in train mode (batch statistics), not frozen
    huge_pages: bool = False  # CPU: THP_MEM_ALLOC_ENABLE=1 in every run (fxstream.hostmem)


def parse_budget(text: str) -> int:
    """``8GiB`` -> 8 * 2**30, ``16GB`` -> 16e9, as ``fxstream.compile(memory_budget=...)`` reads it.

    Example:
        >>> parse_budget("8GiB"), parse_budget("16GB")
        (8589934592, 16000000000)
    """
    from ..budget import parse_bytes
    from ..errors import PlanError

    try:
        return parse_bytes(text)
    except PlanError:
        raise SpecError(f"bad --budget {text!r}: expected a size such as 8GiB, 512MiB or "
                        "16GB") from None


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
    if cfg.huge_pages and cfg.device != "cpu":
        raise SpecError("--huge-pages backs CPU tensors with huge pages: it needs --device cpu")
    if cfg.huge_pages and not huge_pages_supported():
        raise SpecError("--huge-pages: this kernel hands out no transparent huge pages "
                        "(/sys/kernel/mm/transparent_hugepage/enabled is [never] or missing)")
    if cfg.offload and not cfg.device.startswith("cuda"):
        raise SpecError("--offload keeps the image and cut maps on the host while the model "
                        "runs on CUDA: it needs --device cuda")


def torch_dtype(name: str):
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SpecError(f"--dtype {name!r}: expected a floating dtype such as float32")
    return dtype
