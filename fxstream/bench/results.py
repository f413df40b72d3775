"""What a benchmark measured: runs, per-variant summaries, per-size results (plain values)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..analysis import jsonable

VARIANTS = ("full", "streamed", "checkpoint")


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
    huge_pages: bool = False  # its torch backed large CPU tensors with huge pages
    system_seconds: float | None = None  # CPU time the timed step spent in the kernel
    user_seconds: float | None = None  # and outside it (both summed over threads)
    page_faults: int | None = None  # page faults during the timed step
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
    median_system_seconds: float | None = None  # CPU time in the kernel (page faults, mostly)
    median_user_seconds: float | None = None  # CPU time outside the kernel


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
    plan: object | None = None  # fxstream.summary.PlanSummary of the streamed variant's plan

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
        return jsonable(asdict(self))
