"""Multi-cut plans: cut points, exactness of segments streamed on stored maps, budgets."""
import pytest
import torch
import torchvision

import fxstream
import passes
from fxstream.budget import parse_bytes
from fxstream.check import check
from fxstream.segments import stem_boundary
from fxstream.planner import PlanOptions, make_plan

from .zoo import ZOO


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).eval()


def test_cut_candidates_are_single_tensor_cuts():
    a = fxstream.analyze(resnet18(), (1, 3, 224, 224))
    cands = passes.cut_candidates(a.graph_module.graph, stem_boundary(a))
    assert {"maxpool", "layer1_1_relu_1", "layer2_1_relu_1", "layer3_1_relu_1"} <= set(cands)
    # inside a residual block the identity path crosses: not a cut
    assert "layer1_0_conv1" not in cands and "layer2_0_bn1" not in cands
    assert a.boundary[0] not in cands


def test_unet_skip_connections_leave_no_cut_between_them():
    """Cuts exist before the first skip source and after the last skip concatenation, but no
    node between them is a cut: the skip connections cross it."""
    entry = ZOO["unet"]
    a = fxstream.analyze(entry.build(), entry.input_shape)
    cands = passes.cut_candidates(a.graph_module.graph, stem_boundary(a))
    names = [n.name for n in a.graph_module.graph.nodes]
    first_skip, last_cat = names.index("inc_1_2"), names.index("cat_1")
    assert "inc_1_2" in cands and "cat_1" in cands
    assert not [c for c in cands if first_skip < names.index(c) < last_cat]


def test_invalid_cut_is_an_error_listing_valid_ones():
    with pytest.raises(fxstream.SplitError, match=r"cannot cut the stem at 'layer1.0.conv1'.*"
                                                  r"Valid cuts: conv1, bn1, relu, maxpool"):
        fxstream.compile(resnet18(), tile_size=64, input_shape=(1, 3, 128, 128),
                         cuts=["layer1.0.conv1"])


@pytest.mark.parametrize("cuts,tile", [(["maxpool"], 128), (["maxpool", "layer1", "layer2",
                                                                "layer3"], 64), (["layer2"], 120),
                                       (["add_2"], 120)])
def test_multicut_resnet18_exact(cuts, tile):
    """``add_2`` is followed by ReLU(inplace=True): the segment after it must neither write into
    the stored map nor into a leaf that requires grad."""
    result = check(resnet18(), (1, 3, 160, 136), tile, cuts=cuts)
    assert result.num_tiles > 1
    bad = [d for d in result.diffs if not d.ok]
    assert not bad, bad


def test_multicut_segments_tile_their_own_inputs():
    sm = fxstream.compile(resnet18(), tile_size=48, input_shape=(1, 3, 256, 256),
                          cuts=["maxpool", "layer1", "layer2", "layer3"])
    plan = sm.plan((1, 3, 256, 256))
    assert plan.cuts == ("maxpool", "layer1_1_relu_1", "layer2_1_relu_1", "layer3_1_relu_1")
    x = torch.randn(1, 3, 256, 256)
    assert [p.source for p in plan.passes] == ["x", *plan.cuts]
    assert plan.passes[0].num_tiles > 1 and plan.passes[1].num_tiles > 1
    with torch.no_grad():
        assert (sm(x) - sm.analysis.graph_module(x)).abs().max() < 1e-4


def test_segments_read_their_input_as_views_unless_they_write_it():
    """After ``layer1`` the next segment starts with convolutions (only reads: tiles are views of
    the stored map); after ``add_2`` it starts with ReLU(inplace=True) (tiles are copies)."""
    model = resnet18()
    sm = fxstream.compile(model, tile_size=64, input_shape=(1, 3, 256, 256),
                          cuts=["layer1", "add_2"])
    assert [not p.view_input for p in sm.plan((1, 3, 256, 256)).passes] == [False, False, True]
    views = {}

    def record(name):
        def hook(module, args):
            views.setdefault(name, set()).add(args[0]._base is not None)
        return hook

    model.layer2[0].conv1.register_forward_pre_hook(record("after layer1"))
    model.layer2[0].relu.register_forward_pre_hook(record("after add_2"))
    x = torch.randn(1, 3, 256, 256, requires_grad=True)
    sm(x).sum().backward()
    assert views["after layer1"] == {True}
    # layer2.0's relu runs twice per tile: after bn1 (inside the middle segment, a fresh
    # tensor) and after the add (the last segment's input, a copy)
    assert views["after add_2"] == {False}


def pool_after_cut_net():
    """Its last segment after a cut at the ReLU is a lone max-pool: no parameters, no buffers."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.MaxPool2d(2), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 2))


def test_segment_without_parameters_runs_on_the_plans_device():
    """Not on its input's: an offloaded cut map lies on the host while the model is on CUDA."""
    sm = fxstream.compile(pool_after_cut_net(), tile_size=16, input_shape=(1, 3, 40, 40),
                          cuts=["1"])
    last = sm.engines[-1]
    assert not list(last.graph.parameters()) and not list(last.graph.buffers())
    assert last.device == torch.device(sm.plan((1, 3, 40, 40)).device) == torch.device("cpu")
    result = check(pool_after_cut_net(), (1, 3, 40, 40), 16, cuts=["1"])
    assert not [d for d in result.diffs if not d.ok]


@pytest.mark.parametrize("text,expected", [("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20),
                                           ("1.5GB", 1_500_000_000), (2**20, 2**20)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "8 parsecs", "-1GiB", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(fxstream.PlanError, match="expected a size like 8GiB"):
        parse_bytes(text)


def test_budget_analysis_and_runtime_agree(monkeypatch):
    monkeypatch.setattr("fxstream.budget.current_rss", lambda: 2**30)  # one baseline for both
    model = resnet18()
    shape = (1, 3, 2048, 2048)
    choice = make_plan(fxstream.analyze(model, shape), PlanOptions(memory_budget="3GiB"))
    sm = fxstream.compile(model, input_shape=shape, memory_budget="3GiB")
    assert sm.plan(shape) == choice
    assert choice.estimate.peak <= choice.budget


def _plan(model, shape, budget, baseline=2**29, **kwargs):
    from fxstream.planner import Situation

    return make_plan(fxstream.analyze(model, shape),
                     PlanOptions(memory_budget=budget, **kwargs), Situation(baseline=baseline))


def test_budget_prefers_less_work_when_memory_allows():
    shape = (1, 3, 4096, 4096)
    tight, roomy = _plan(resnet18(), shape, "2GiB"), _plan(resnet18(), shape, "16GiB")
    assert roomy.estimate.work <= tight.estimate.work
    assert tight.estimate.peak <= 0.95 * 2 * 2**30
    assert sum(p.num_tiles for p in tight.passes) > sum(p.num_tiles for p in roomy.passes)


def test_budget_too_small():
    with pytest.raises(fxstream.PlanError, match=r"no plan fits a memory budget of 0.10 GiB.*"
                                                 r"smallest estimated peak"):
        _plan(resnet18(), (1, 3, 1024, 1024), "0.1GiB", baseline=2**26)
    # a tiny budget reads in the unit it is given in, not "0.00 GiB"
    with pytest.raises(fxstream.PlanError, match=r"no plan fits a memory budget of 12.0 KiB "
                                                 r".*process baseline 4.0 KiB"):
        _plan(torch.nn.Conv2d(3, 4, 3), (1, 3, 64, 64), 12 * 2**10, baseline=4 * 2**10)


def test_budget_keeps_one_tile_graphs_when_they_fit(monkeypatch):
    """With room, one-tile segments keep their graphs (no recompute) and the result is exact.
    The process counts as holding 1 GiB (what earlier tests left resident must not decide)."""
    monkeypatch.setattr("fxstream.budget.current_rss", lambda: 2**30)
    model = resnet18()
    shape = (1, 3, 512, 512)
    roomy = _plan(model, shape, "4GiB", baseline=2**26)
    assert roomy.cuts == () and [p.keep for p in roomy.passes] == [True]  # run whole
    kept_cuts = _plan(model, shape, "4GiB", baseline=2**26, cuts=("layer1", "layer3"))
    assert [p.keep for p in kept_cuts.passes] == [True, True, True]
    assert kept_cuts.estimate.work == pytest.approx(0.75)
    sm = fxstream.compile(model, input_shape=shape, memory_budget="4GiB",
                          cuts=["layer1", "layer3"])
    assert [p.keep for p in sm.plan(shape).passes[:-1]] == [True, True]
    x = torch.randn(shape, requires_grad=True)
    (first,) = sm.engines[0](x)
    assert "StreamFunction" not in type(first.grad_fn).__name__  # a plain autograd graph
    result = check(model, (1, 3, 256, 256), None, cuts=["layer1", "layer3"],
                   memory_budget="4GiB")
    assert not [d for d in result.diffs if not d.ok]


def test_offload_plans_keep_no_graph():
    plan = _plan(resnet18(), (1, 3, 512, 512), "4GiB", baseline=2**26,
                 cuts=("layer1", "layer3"), offload=True)
    assert [p.keep for p in plan.passes] == [False, False, True]


def _brute_force(points, nodes, fixed, limit, options):
    """Every subset of cut points and every option per segment: the least cost that fits."""
    import itertools

    from fxstream.budget import CUT_WORK

    best = None
    inner = points[1:]
    for r in range(len(inner) + 1):
        for subset in itertools.combinations(inner, r):
            chain = [points[0], *subset, None]
            segs = [options(a, b) for a, b in zip(chain, chain[1:])]
            for picks in itertools.product(*segs):
                held, cost, ok = 0.0, 0.0, True
                for o, dst in zip(picks, chain[1:]):
                    out = nodes[dst].map_bytes if dst is not None else 0
                    ok &= fixed + held + o.mem <= limit and fixed + held + out + o.held <= limit
                    held += out + o.held
                    cost += o.cost + (CUT_WORK * nodes[dst].numel if dst is not None else 0)
                if ok and (best is None or cost < best):
                    best = cost
    return best


@pytest.mark.parametrize("seed", range(60))
def test_cut_search_finds_the_least_cost_plan(seed):
    """The shortest-path search over cut points agrees with trying every subset of cuts and
    every option per segment (random costs, transient memory and kept graphs)."""
    import random

    from fxstream.budget import _Option, _search

    rng = random.Random(seed)
    n = rng.randint(2, 6)
    points = ["x"] + [f"c{i}" for i in range(n)]

    class Node:
        def __init__(self):
            self.map_bytes = rng.randint(1, 30)
            self.numel = rng.randint(0, 3)

    nodes = {p: Node() for p in points}
    table = {}
    for i, a in enumerate(points):
        for b in points[i + 1:] + [None]:
            opts = [_Option(rng.uniform(10, 50), -t, rng.randint(1, 50), 1.0, (t,), False, 0.0)
                    for t in range(rng.randint(0, 3))]
            if rng.random() < 0.6:  # one tile: it may keep its graph (cheaper, holds more)
                held = 0.0 if b is None else rng.randint(5, 50)
                opts.append(_Option(rng.uniform(1, 30), -9, rng.randint(1, 50), 1.0, (9,), False,
                                    0.0, True, held))
            table[a, b] = opts

    def options(a, b):
        return table[a, b]

    fixed, limit = rng.randint(0, 20), rng.randint(50, 110)
    want = _brute_force(points, nodes, fixed, limit, options)
    got = _search(points, nodes, fixed, limit, options, consecutive=False)
    if want is None:
        assert got is None
    else:
        assert got is not None and got.value[0] == pytest.approx(want)


def test_thin_keeps_stage_ends_and_spreads_the_rest():
    """Beyond MAX_CANDIDATES cut points the search keeps each stride level's first and last and
    evenly spaced ones between, in order; below it, all of them."""
    from types import SimpleNamespace

    from fxstream.budget import MAX_CANDIDATES, _thin

    levels = {1: 30, 2: 40, 4: 20}  # stride -> candidates at that stride
    cands, nodes = [], {}
    for stride, n in levels.items():
        for i in range(n):
            name = f"s{stride}_{i}"
            cands.append(name)
            nodes[name] = SimpleNamespace(stride=(stride,), map_bytes=10**6 // stride)
    kept = _thin(cands, nodes)
    assert len(kept) <= MAX_CANDIDATES and len(kept) >= MAX_CANDIDATES - len(levels)
    assert kept == sorted(kept, key=cands.index)
    for stride, n in levels.items():
        assert f"s{stride}_0" in kept and f"s{stride}_{n - 1}" in kept
        inner = [c for c in kept if c.startswith(f"s{stride}_")]
        assert len(inner) >= 3  # every level keeps some of its middle
    assert _thin(cands[:12], nodes) == cands[:12]
