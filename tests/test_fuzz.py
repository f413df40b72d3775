"""Property-based fuzzer: random stems streamed tile by tile must equal the whole image.

Each example draws a random model from :mod:`tests.fuzz_stems` (1-D/2-D/3-D convs with every
padding mode, transposed convs, pools, resizing, pads, crops, joins, U-Net skips, several
outputs, norms and global statistics, squeeze-excitation, activations, then a head), an image
size, a plan kind and a tile size:

- ``tile``: ``fxstream.compile(model, tile_size=t, memory_budget=None)`` (one cut-free pass);
- ``cuts``: the same with ``cuts=`` one to three of the analysis's cut candidates;
- ``budget_tile``: ``tile_size=t, memory_budget="64GiB"`` (the budget search picks the cuts and
  which one-tile segments keep their graphs);
- ``budget``: ``memory_budget=`` alone, with the search's tile options scaled down to the
  fuzzer's small images and the process baseline pinned (so plans are reproducible and tiled);
- ``too_small``: a tile one pixel below the smallest legal one on some axis must be refused with
  a :class:`fxstream.PlanError` that names the smallest legal tile.

In float64 it compares the streamed model with the full model: every output, every parameter
gradient, the image gradient and (train-mode BatchNorm) every buffer, relative difference
<= 1e-10 (a gradient that is zero in exact arithmetic is compared against the largest gradient,
as :func:`fxstream.check.diff` does). A refusal at compile time by one of fxstream's errors is
counted (by reason) and accepted; any other exception, or any mismatch, fails the example.
Circular padding is non-local: it must never be in the stem. The fuzz test also fails if fewer
than half of the examples stream in several tiles (a fuzzer that mostly refuses tests nothing).

Profiles:

- quick (``make test``): ``QUICK_EXAMPLES`` examples, derandomized (the same cases every run);
- long: ``FXSTREAM_FUZZ_EXAMPLES=2000 python -m pytest -q -s tests/test_fuzz.py`` (``-s``
  prints the statistics; ``FXSTREAM_FUZZ_SEED=<int>`` draws another set of cases, without it
  the long profile is derandomized too). ``FXSTREAM_FUZZ_KEEP_GOING=1`` goes on past failing
  cases (without shrinking them) and prints them all at the end; on a 2-core machine a long
  run is split into processes with different seeds, e.g. ``FXSTREAM_FUZZ_EXAMPLES=1000
  FXSTREAM_FUZZ_SEED=1`` and ``...SEED=2``. ``FXSTREAM_FUZZ_LOG=<path>`` keeps the statistics
  so far, the failing cases, the slowest case and the case running now in a JSON file,
  rewritten before and after every case.

A failure: hypothesis shrinks it and prints the falsifying ``case`` (a :class:`Case` literal:
its ``spec`` rebuilds the same model with :func:`tests.fuzz_stems.build`). To keep it, add a
test to ``tests/test_plan_regressions.py`` that builds that model (written out as plain modules
when it is short, else ``fuzz_stems.build(Spec(...))``), runs ``exact(model, shape, tile,
cuts=...)`` with the case's plan, and asserts that it tiles (``num_tiles > 1``); name it after
the bug (``test_J_...``) and say in its docstring what went wrong.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import json
import os
import re
import time
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
import hypothesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import fxstream
import passes
from fxstream.check import diff, tensors_of
from fxstream.legal import smallest_tile_size
from fxstream.segments import cut_candidates

from .fuzz_stems import Spec, build, specs

TOL = 1e-10
QUICK_EXAMPLES = 20
EXAMPLES = int(os.environ.get("FXSTREAM_FUZZ_EXAMPLES", QUICK_EXAMPLES))
SEED = os.environ.get("FXSTREAM_FUZZ_SEED")
# a long run goes on past failures (no shrinking) and lists them all at the end
KEEP_GOING = os.environ.get("FXSTREAM_FUZZ_KEEP_GOING") == "1"
# a file that holds the statistics so far (rewritten after every case) and the failing cases
LOG = os.environ.get("FXSTREAM_FUZZ_LOG")
# the budget plans' tile options, for images of tens of pixels (the library's start at 256)
SMALL_TILE_OPTIONS = (4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
SIZES = {1: (24, 160), 2: (12, 44), 3: (6, 13)}
MAX_REDUNDANCY = 300  # plans computing more than this many times their map are not run


@dataclass(frozen=True)
class Case:
    spec: Spec
    sizes: tuple  # spatial sizes of the image
    plan: str  # tile | cuts | budget_tile | budget | too_small
    tile_frac: tuple  # per axis in [0, 1]: where the tile lies between smallest legal and size
    per_axis: bool  # the tile as one int per axis (else one int, the largest of them)
    cut_picks: tuple  # indices into the cut candidates (modulo their number)
    budget_frac: float  # budget plans: where the budget lies between the image and the peak

    @property
    def shape(self):
        return (self.spec.batch, self.spec.channels, *self.sizes)


@st.composite
def cases(draw):
    spec = draw(specs())
    lo, hi = SIZES[spec.ndim]
    if draw(st.booleans()):
        sizes = (draw(st.integers(lo, hi)),) * spec.ndim
    else:
        sizes = tuple(draw(st.integers(lo, hi)) for _ in range(spec.ndim))
    plan = draw(st.sampled_from(["tile"] * 4 + ["cuts"] * 3 + ["budget_tile"] * 2 +
                                ["budget"] * 2 + ["too_small"]))
    frac = tuple(draw(st.floats(0, 1)) for _ in sizes)
    return Case(spec=spec, sizes=sizes, plan=plan, tile_frac=frac, per_axis=draw(st.booleans()),
                cut_picks=tuple(draw(st.lists(st.integers(0, 99), min_size=1, max_size=3))),
                budget_frac=draw(st.floats(0, 1)))


# ---------------------------------------------------------------------------------------------
# one case


def note(text):
    """hypothesis's ``note`` inside a hypothesis test, else nothing (a case run by hand)."""
    try:
        hypothesis.note(text)
    except InvalidArgument:
        pass


def event(text):
    try:
        hypothesis.event(text)
    except InvalidArgument:
        pass


class Invalid(Exception):
    """The drawn model does not run at the drawn size (torch refuses it): not a test case."""


def _sized(case: Case, model):
    """The case's image sizes, doubled until the full model runs on them (at most twice)."""
    sizes = case.sizes
    for _ in range(3):
        x = torch.randn(case.spec.batch, case.spec.channels, *sizes, dtype=torch.float64)
        try:
            with torch.no_grad():
                copy.deepcopy(model)(x)
            return sizes
        except (RuntimeError, ValueError, IndexError):
            sizes = tuple(2 * s for s in sizes)
    raise Invalid


def _refusal(e: Exception) -> str:
    msg = str(e)
    for pattern, reason in [
            (r"too small on axis", "tile below the smallest legal one"),
            (r"too small for the stem", "image too small for the stem"),
            (r"no plan fits a memory budget", "memory budget too small"),
            (r"cannot cut the stem", "invalid cut"),
            (r"train-mode BatchNorm", "train-mode BatchNorm"),
            (r"fails on the whole map", "stem fails on the whole map")]:
        if re.search(pattern, msg):
            return reason
    return f"{type(e).__name__}: {msg[:80]}"


def _circular_in_stem(analysis) -> list[str]:
    gm = analysis.graph_module
    bad = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.meta.get(passes.ROLE) in ("stem", "boundary"):
            m = gm.get_submodule(node.target)
            if getattr(m, "padding_mode", None) == "circular":
                bad.append(node.name)
    return bad


MAX_SIZES = {1: 400, 2: 96, 3: 28}


def _one_tile_only(analysis, sizes) -> bool:
    try:
        smallest = smallest_tile_size(analysis)
    except fxstream.FxStreamError:
        return False
    return all(t >= 0.8 * n for t, n in zip(smallest, sizes))


def _tile(case: Case, smallest) -> tuple | int:
    """The case's tile: per axis between the smallest legal tile and 70% of the way to the
    image size (a larger one is mostly one tile)."""
    tile = []
    for s, lo, f in zip(case.sizes, smallest, case.tile_frac):
        lo = min(lo, s)
        tile.append(int(round(lo + 0.7 * f * (s - lo))))
    return tuple(tile) if case.per_axis or len(set(tile)) > 1 else tile[0]


def _compile(case: Case, model, shape, analysis, stats):
    """The streamed model for the case's plan (PlanError and friends propagate)."""
    smallest = smallest_tile_size(analysis)
    tile = _tile(case, smallest)
    if case.plan == "tile":
        return fxstream.compile(model, tile_size=tile, input_shape=shape, memory_budget=None)
    if case.plan == "cuts":
        cands = cut_candidates(analysis)
        if not cands:
            stats["cuts: no candidate (plain plan)"] += 1
            return fxstream.compile(model, tile_size=tile, input_shape=shape,
                                    memory_budget=None)
        cuts = sorted({cands[i % len(cands)] for i in case.cut_picks})
        note(f"cuts {cuts}")
        tile = _tile(case, smallest_tile_size(analysis, cuts))
        return fxstream.compile(model, tile_size=tile, input_shape=shape, cuts=cuts,
                                memory_budget=None)
    if case.plan == "budget_tile":
        return fxstream.compile(model, tile_size=tile, input_shape=shape, memory_budget="64GiB")
    if case.plan == "budget":  # under small_budgets() (run_case)
        image = torch.Size(shape).numel() * 8
        budget = int(image * (2 + 8 * case.budget_frac))
        note(f"budget {budget} bytes")
        return fxstream.compile(model, input_shape=shape, memory_budget=budget)
    assert case.plan == "too_small"
    axes = [k for k, s in enumerate(smallest) if 1 < s <= case.sizes[k]]
    if not axes:
        stats["too_small: smallest legal tile is 1 or the image (plain plan)"] += 1
        return fxstream.compile(model, tile_size=tile, input_shape=shape, memory_budget=None)
    k = axes[0]
    small = list(case.sizes)
    small[k] = smallest[k] - 1
    with pytest.raises(fxstream.PlanError, match=f"tile_size {small[k]} is too small on axis "
                                                 f"{k}: the smallest legal tile for this model "
                                                 f"is {smallest[k]}"):
        fxstream.compile(model, tile_size=tuple(small), input_shape=shape, memory_budget=None)
    stats["too_small: refused as expected"] += 1
    return fxstream.compile(model, tile_size=tuple(smallest), input_shape=shape,
                            memory_budget=None)


def _step(fn, model, x, weights=None, gen=None, buffers=False) -> tuple[dict, list]:
    """One training step's tensors: ``{name: tensor}`` for every output, the image gradient,
    every parameter gradient of ``model`` and (``buffers``) its floating buffers after the
    step; and the loss weights (drawn from ``gen`` when not given)."""
    xi = x.clone().requires_grad_(True)
    outs = tensors_of(fn(xi))
    if weights is None:
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    sum((o * w.to(o.dtype)).sum() for o, w in zip(outs, weights)).backward()
    got = {f"output[{i}]": o.detach() for i, o in enumerate(outs)}
    got["input gradient"] = xi.grad
    got.update((f"grad {n}", p.grad) for n, p in model.named_parameters())
    if buffers:
        got.update((f"buffer {n}", b.clone()) for n, b in model.named_buffers())
    return got, weights


def _compare(got: dict, want: dict, every: bool = False) -> list:
    """The differences over the tolerance (``every``: all of them), by ``fxstream.check.diff``
    (parameter and image gradients with the largest parameter gradient as the floor of those
    that are zero in exact arithmetic: the image gradient of train-mode norms followed by a
    spatial mean)."""
    largest = max([t.abs().max().item() for n, t in want.items()
                   if n.startswith("grad ") and t is not None and t.numel()] + [0.0])
    out = []
    for name, w in want.items():
        g = got[name]
        if w is not None and not w.is_floating_point():
            assert torch.equal(g, w), (name, g, w)
            continue
        d = diff(name, g, w, TOL, largest if name.startswith("grad ") or
                 name == "input gradient" else 0.0)
        if every or not d.ok:
            out.append(d)
    return out


# how a tensor's float64 rounding noise on the full image is estimated (see _ill_conditioned)
PERTURBATION = 2.0 ** -40  # relative change of the image's values: far below the tolerance
PERTURBED_RUNS = 2
# measured on the shrunk cases (a U-Net block with GroupNorm before a spatial-mean head): the
# streamed result was within 1.6-7.3 times the disagreement of the two whole-image computations
NOISE_FACTOR = 10


def _ill_conditioned(bad, want, pristine, x, weights, buffers, stats) -> list:
    """The differences in ``bad`` that are not explained by the full image's own rounding.

    Some gradients are ill-conditioned: the parameters of a norm whose output gradient is
    nearly uniform (a spatial mean after it) get sums of large terms that cancel. There two
    whole-image float64 computations that are equal in exact arithmetic disagree by more than
    1e-10 relative: torch's GroupNorm against the same formula written out, or against
    fxstream's rewrite of it (statistics computed apart, then normalised), run on the whole
    image without tiles. Such a tensor is compared against that disagreement: its noise is the
    largest of (1) the rewritten whole-image graph's difference from the model and (2) the
    model's change on images whose values moved by a relative PERTURBATION (which moves the
    exact result by about that much and re-draws rounding errors), and the streamed result must
    lie within NOISE_FACTOR times it. A tensor whose whole-image computations agree to 1e-10
    keeps the 1e-10 tolerance (10 times a noise far below it).
    """
    names = {d.name for d in bad}
    noise = dict.fromkeys(names, 0.0)

    def seen(other):
        for d in _compare(other, want, every=True):
            if d.name in names:
                noise[d.name] = max(noise[d.name], d.max_rel)

    model = copy.deepcopy(pristine)
    rewritten = fxstream.analyze(model, tuple(x.shape)).graph_module
    seen(_step(rewritten, model, x, weights, buffers=buffers)[0])
    gen = torch.Generator().manual_seed(12345)
    for _ in range(PERTURBED_RUNS):
        model = copy.deepcopy(pristine)
        u = torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1
        seen(_step(model, model, x + x * u * PERTURBATION, weights, buffers=buffers)[0])
    left = []
    for d in bad:
        if d.max_rel <= NOISE_FACTOR * noise[d.name]:
            stats["ill-conditioned tensors compared against their float64 noise"] += 1
            event("ill-conditioned tensor")
            note(f"ill-conditioned: {d.name} off by {d.max_rel:.1e}, whole-image computations "
                 f"by up to {noise[d.name]:.1e}")
        else:
            note(f"{d.name} off by {d.max_rel:.1e}, whole-image computations by up to "
                 f"{noise[d.name]:.1e}")
            left.append(d)
    return left


@contextlib.contextmanager
def small_budgets():
    """Budget plans for images of tens of pixels: the search's tile options scaled down, and
    the process's resident memory (the budget's baseline) counted as 0, so that a budget of a
    few image sizes gives a tiled plan, the same in every run. The plan for an image that
    requires grad is made at the first call, so this holds for the whole case."""
    with mock.patch("fxstream.budget.TILE_OPTIONS", SMALL_TILE_OPTIONS), \
            mock.patch("fxstream.budget.current_rss", lambda: 0):
        yield


def run_case(case: Case, stats: collections.Counter):
    if case.plan == "budget":
        with small_budgets():
            return _run_case(case, stats)
    return _run_case(case, stats)


def _run_case(case: Case, stats: collections.Counter):
    spec = case.spec
    model = build(spec)
    try:
        sizes = _sized(case, model)
    except Invalid:
        stats["invalid: torch refuses the model at this size"] += 1
        event("invalid model")
        return
    shape = (spec.batch, spec.channels, *sizes)
    case = Case(**{**case.__dict__, "sizes": sizes})
    note(f"shape {shape}")
    pristine, streamed = copy.deepcopy(model), copy.deepcopy(model)
    try:
        analysis = fxstream.analyze(streamed, shape)
        assert not _circular_in_stem(analysis), "circular padding streamed"
        if _one_tile_only(analysis, sizes) and max(sizes) * 2 <= MAX_SIZES[spec.ndim]:
            # the smallest legal tile covers the image: a larger image has several tiles
            sizes = tuple(2 * n for n in sizes)
            shape = (spec.batch, spec.channels, *sizes)
            case = Case(**{**case.__dict__, "sizes": sizes})
            note(f"shape {shape} (doubled: the smallest legal tile covered the image)")
            analysis = fxstream.analyze(streamed, shape)
        sm = _compile(case, streamed, shape, analysis, stats)
    except fxstream.FxStreamError as e:
        reason = _refusal(e)
        if case.plan == "budget" and "too small on axis" in str(e):
            raise AssertionError(f"a budget plan took a tile the exact plan refuses: {e}")
        stats[f"refused: {reason}"] += 1
        event(f"refused: {reason}")
        return
    try:
        plan = sm.plan(shape, torch.float64)
    except fxstream.PlanError as e:  # sm.plan plans for its own situation (see _step below)
        if case.plan != "budget" or "no plan fits a memory budget" not in str(e):
            raise
        stats["refused: memory budget too small (planned again by sm.plan)"] += 1
        return
    tiles = [p.num_tiles for p in plan.passes]
    if tiles and max(tiles) == 1:
        small = smallest_tile_size(analysis)
        stats["one tile: " + ("the smallest legal tile covers the image"
                              if all(t >= n for t, n in zip(small, sizes)) else
                              f"plan {case.plan}")] += 1
    note(f"plan: cuts {plan.cuts}, tiles {tiles}, "
         f"tile sizes {[p.tile_size for p in plan.passes]}")
    if max((p.redundancy for p in plan.passes), default=1.0) > MAX_REDUNDANCY:
        # tiles widened far past what they own (a tile near the smallest legal one on a tiny
        # 3-D image: thousands of tiles each computing the whole receptive field) run for tens
        # of minutes in float64; counted, not run (the plan's notes warn the user)
        stats[f"not run: a pass computes over {MAX_REDUNDANCY}x its map"] += 1
        event("not run: redundancy")
        return

    gen = torch.Generator().manual_seed(spec.seed + 7)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    try:
        want, weights = _step(model, model, x, gen=gen, buffers=spec.train)
    except RuntimeError:  # the model itself fails (an in-place op on a view of the image)
        stats["invalid: the full model's own step fails"] += 1
        event("invalid model")
        return
    try:
        got, _ = _step(sm, streamed, x, weights, buffers=spec.train)
    except fxstream.PlanError as e:
        # a budget's plan for an image that requires grad counts the image's gradient too: it
        # is made at the first call, and may find that nothing fits
        if case.plan != "budget" or "no plan fits a memory budget" not in str(e):
            raise
        stats["refused: memory budget too small (at the first call, with the image's "
              "gradient)"] += 1
        return
    assert list(got) == list(want), (list(got), list(want))
    bad = _compare(got, want)
    if bad:  # is the full image's own float64 rounding above the tolerance there?
        bad = _ill_conditioned(bad, want, pristine, x, weights, spec.train, stats)
    assert not bad, bad

    multi = max(tiles, default=1) > 1
    if not tiles:
        stats["nothing to stream (the image is the boundary): head only"] += 1
        event("nothing to stream")
        return
    stats["streamed"] += 1
    stats[f"streamed, {'several tiles' if multi else 'one tile'}"] += 1
    stats[f"plan {case.plan}: streamed"] += 1
    if len(plan.passes) > 1:
        stats["streamed in several passes"] += 1
    event(f"streamed in {'several tiles' if multi else 'one tile'}")
    event(f"plan {case.plan}")
    for kind in spec.kinds():
        stats[f"kind streamed: {kind}"] += 1
    if analysis.global_rows:
        stats[f"head starts at: {analysis.global_rows[0].reason[:60]}"] += 1


# ---------------------------------------------------------------------------------------------
# the fuzz test


def _settings():
    kw = dict(max_examples=EXAMPLES, deadline=None, print_blob=True,
              suppress_health_check=list(HealthCheck))
    if SEED is None:
        kw["derandomize"] = True
    return settings(**kw)


def _log(stats, failures, start, **extra):
    """The statistics so far, the failing cases and ``extra`` (the case running, the slowest
    case) in the ``FXSTREAM_FUZZ_LOG`` file."""
    if LOG:
        stats["wall seconds"] = round(time.perf_counter() - start)
        with open(LOG, "w") as f:
            json.dump({"stats": dict(stats), "failures": failures, **extra}, f, indent=1)


def test_streamed_random_stems_equal_the_full_image():
    stats = collections.Counter()
    failures = []
    slowest = [0.0, None]  # seconds, case
    start = time.perf_counter()

    @_settings()
    @given(case=cases())
    def fuzz(case):
        stats["cases"] += 1
        _log(stats, failures, start, running=repr(case))  # a case that hangs is named
        t0 = time.perf_counter()
        try:
            run_case(case, stats)
        except Exception as e:
            if not KEEP_GOING:
                raise
            stats[f"FAILED: {type(e).__name__}"] += 1
            failures.append(f"{case!r}\n  {type(e).__name__}: {str(e)[:2000]}")
        if time.perf_counter() - t0 > slowest[0]:
            slowest[:] = [round(time.perf_counter() - t0, 1), repr(case)]
        _log(stats, failures, start, slowest=slowest)

    if SEED is not None:
        fuzz = hypothesis.seed(int(SEED))(fuzz)
    fuzz()
    stats["wall seconds"] = round(time.perf_counter() - start)
    print("\nfxstream fuzz statistics:")
    for key, value in sorted(stats.items()):
        print(f"  {key}: {value}")
    for f in failures:
        print("\nFAILED CASE:", f)
    assert not failures, f"{len(failures)} failing cases (printed above)"
    # not a fuzzer that mostly refuses: at least half of the cases stream in several tiles
    assert stats["streamed, several tiles"] >= 0.5 * stats["cases"], dict(stats)


# ---------------------------------------------------------------------------------------------
# the harness itself can fail


def test_the_harness_catches_an_injected_planner_bug():
    """With the tiles' input regions cut one alignment step short on their inner side (the
    planner bug the fuzzer exists to find), the same case that passes must fail the
    comparison."""
    import fxstream.tiling as tiling

    from .fuzz_stems import block

    conv = block("conv", k=3, s=1, p=1, d=1, g=1, mode="zeros", fn=False, bias=True)
    spec = Spec(ndim=1, channels=2, blocks=(conv, block("act", fn="tanh"), conv))
    case = Case(spec=spec, sizes=(40,), plan="tile", tile_frac=(0.2,), per_axis=False,
                cut_picks=(0,), budget_frac=0.5)
    stats = collections.Counter()
    run_case(case, stats)
    assert stats["streamed, several tiles"] == 1, dict(stats)

    real = tiling._region

    def short(size, align, geos, outputs):
        start, stop = real(size, align, geos, outputs)
        return start, stop - align if start + align < stop < size else stop

    with mock.patch.object(tiling, "_region", short), \
            pytest.raises(AssertionError, match="output"):
        run_case(case, collections.Counter())
