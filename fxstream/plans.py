"""Plans as values: what the runtime executes for one input shape.

A :class:`Plan` is built once per input shape (and mode, dtype, device) by
:func:`fxstream.planner.make_plan` and never changes afterwards. It lists the streamed passes in
the order they run; each :class:`Pass` carries its graph, its tiles lowered to index tuples, and
every decision the runtime would otherwise make per tile (view or copy the input, pool host
memory, keep the graph instead of recomputing, capture the random state). The memory-budget
search scores exactly these values, and the runtime (:mod:`fxstream.runtime`) executes them as
they are. Nothing here imports sympy or the planner.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx


@dataclass(frozen=True)
class Tile:
    """One tile of a pass: where it reads its source and where its outputs go."""

    region: tuple  # index into the source (N, C, *spatial), slices
    starts: tuple[int, ...]  # region start per spatial axis
    lengths: tuple[int, ...]  # region length per spatial axis
    # per map output: (index into the full output, index into the tile's output), or None
    # when the tile owns none of it
    outputs: tuple


@dataclass(frozen=True)
class MapOutput:
    """A map a pass writes tile by tile: a cut map or a boundary tensor of the stem."""

    name: str  # fx node name
    dims: tuple[int, ...]  # tensor dims of the spatial axes
    sizes: tuple[int, ...]  # full size per spatial axis


@dataclass(frozen=True)
class SumOutput:
    """A whole-image reduction a pass sums tile by tile (:mod:`fxstream.reductions`)."""

    name: str  # the reduction node
    summed: str  # the node whose values it sums
    kind: str  # sum, mean, var, std, norm2, moments
    dims: tuple[int, ...]  # tensor dims of the summed tensor it reduces
    counts: tuple[int, ...]  # per tile (in the pass's order), how many values its partial sums
    shape: tuple[int, ...]  # the reduction's output shape
    dtype: str  # the reduction's output dtype
    correction: int = 0  # var, std
    groups: int = 0  # moments: channel groups
    batch: bool = False  # moments: over the batch dim too


@dataclass(frozen=True)
class Pass:
    """One streamed pass over a map (the image or a stored cut map).

    ``graph`` computes the pass's outputs from one tile of ``source`` (its first placeholder)
    and the ``side_inputs`` (the model's other inputs it reads, passed whole to every tile).
    """

    index: int
    source: str  # the node whose map the pass reads
    side_inputs: tuple[str, ...]  # read whole: statistics of earlier passes, other inputs
    outputs: tuple[MapOutput, ...]
    tiles: tuple[Tile, ...]  # largest first, equal shapes together
    tile_size: tuple[int | None, ...]  # the largest tile edge asked for, per axis
    redundancy: float  # pixels computed over all tiles / pixels of the source map
    view_input: bool  # tiles are views of the source (the pass only reads it), else copies
    pool: bool  # the CPU tile loops reuse host pages across tiles (fxstream.hostmem)
    keep: bool  # one tile, run with grad, graph kept for the backward (no recompute)
    random: bool  # the graph draws random numbers: each tile's RNG state is replayed
    offload: bool  # with a CUDA stem: its outputs are kept in pinned host memory
    graph: fx.GraphModule = field(compare=False, repr=False, default=None)
    sums: tuple[SumOutput, ...] = ()  # whole-image reductions it sums (its partials follow
    # its maps among its outputs; each tile's outputs list the maps, then the summed tensors)
    segment: int = 0  # the segment (between stored maps) it belongs to
    step: int = 0  # its step in the segment: earlier steps' statistics are its side inputs
    # the segment in one tile and one pass, its statistics computed inside the tile
    # (fxstream.segments.whole_step) instead of one pass per step
    whole: bool = False
    # a pooled loop's heap may hold this many bytes over what the process held when the loop
    # began; past it the heap is trimmed after the tile (0: never; see fxstream.hostmem.Guard)
    heap_bound: int = 0

    @property
    def num_tiles(self) -> int:
        return len(self.tiles)


@dataclass(frozen=True)
class Estimate:
    """What the memory model says a plan costs (bytes; work relative to the full image)."""

    peak: int  # estimated peak memory of a training step, baseline included
    baseline: int  # memory in use when the plan was made (resident or device-allocated)
    stored: int  # bytes of the stored cut maps
    # estimated stem work, relative to streaming the whole stem once without overlap (forward
    # twice, backward once: 1.0); a pass that keeps its graph runs forward once (the full
    # image's own step is 0.75)
    work: float
    full_peak: int | None = None  # the same model's estimate for the full image
    phases: tuple = ()  # (name, bytes) of every phase of a step: each pass's forward, backward


@dataclass(frozen=True)
class Plan:
    """Everything the runtime runs for one input shape, in order."""

    input_shape: tuple[int, ...]
    dtype: str
    device: str
    passes: tuple[Pass, ...]
    cuts: tuple[str, ...]  # node names after which the stem is cut (stored maps)
    boundary: tuple[str, ...]  # the stem's outputs handed to the head
    budget: int | None = None  # the memory budget the plan was chosen under
    estimate: Estimate | None = None
    notes: tuple[str, ...] = ()  # what a user should know (said once, when it is built)

    @property
    def num_tiles(self) -> int:
        """Tiles of the first pass (the one that reads the image)."""
        return self.passes[0].num_tiles if self.passes else 0

    @property
    def tile_size(self):
        """The tile size of the first pass (an int when equal on every axis)."""
        if not self.passes:
            return None
        sizes = self.passes[0].tile_size
        return sizes[0] if len(set(sizes)) == 1 else sizes

    def __str__(self) -> str:
        """A few lines for people: the shape, the passes with their tiles, the estimate."""
        gib = 2**30
        head = (f"plan for {tuple(self.input_shape)} {self.dtype} on {self.device}: "
                f"{len(self.passes)} passes, {len(self.cuts)} cuts"
                + (f" ({', '.join(self.cuts)})" if self.cuts else ""))
        if self.estimate is not None:
            head += f", estimated peak {self.estimate.peak / gib:.2f} GiB"
        if self.budget is not None:
            head += f" under a budget of {self.budget / gib:.2f} GiB"
        if self.estimate is not None and self.estimate.full_peak:
            head += f" (the full image's step: {self.estimate.full_peak / gib:.2f} GiB)"
        lines = [head]
        for p in self.passes:
            how = ("graph kept" if p.keep else "recomputed") + (", pooled" if p.pool else "") \
                + (", statistics inside the tile" if p.whole else "")
            sums = f", sums {len(p.sums)}" if p.sums else ""
            lines.append(f"  pass {p.index}: {p.source} -> "
                         f"{', '.join(o.name for o in p.outputs) or '-'}{sums}; "
                         f"{p.num_tiles} tiles, redundancy {p.redundancy:.2f}x, {how}")
        return "\n".join(lines)


__all__ = ["Estimate", "MapOutput", "Pass", "Plan", "SumOutput", "Tile"]
