"""The host memory pool of the CPU tile loops, tile order, and the one-tile last segment."""
import subprocess
import sys

import pytest
import torch
import torchvision

import fxstream
from fxstream import hostmem
from fxstream.check import check
from fxstream.runtime import StreamFunction

glibc = pytest.mark.skipif(not hostmem.pool_enabled(), reason="needs glibc malloc")
MiB = 2**20


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).eval()


POOL_PROBE = """
import torch
from fxstream import hostmem

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

before = rss()
with hostmem.tile_pool(torch.device("cpu"), tiles=2):
    chunks = [torch.ones(2 * 2**20) for _ in range(24)]  # 8 MiB each: heap, not mmap
    del chunks
    inside = rss()
print(inside - before, rss() - before)
"""


@glibc
def test_pool_keeps_freed_pages_inside_and_returns_them_after():
    """In a fresh process: free chunks left in this process's heap by earlier tests would serve
    the allocations without the resident size growing."""
    out = subprocess.run([sys.executable, "-c", POOL_PROBE], capture_output=True, text=True,
                         check=True).stdout.split()
    inside, after = map(int, out)
    assert inside > 120 * MiB, "freed pages should stay in the pool"
    assert after < 40 * MiB, "leaving the pool should return them"


LONG_LIVED_PROBE = """
import ctypes, torch
from fxstream import hostmem

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
mapped = lambda: libc.mallinfo2().hblkhd
with hostmem.tile_pool(torch.device("cpu"), tiles=2):
    before = mapped()
    pooled = torch.ones(2 * 2**20)  # 8 MiB: from the heap inside the pool
    in_heap = mapped() - before
    with hostmem.long_lived():
        kept = torch.ones(2 * 2**20)
    print(in_heap, mapped() - before - in_heap)
"""


@glibc
def test_long_lived_tensors_are_mapped_outside_the_pooled_heap():
    """In a fresh process (a heap without free chunks that would serve it first)."""
    out = subprocess.run([sys.executable, "-c", LONG_LIVED_PROBE], capture_output=True,
                         text=True, check=True).stdout.split()
    in_heap, mapped = map(int, out)
    assert in_heap < MiB and mapped >= 8 * MiB


GUARD_PROBE = """
import torch
from fxstream import hostmem

cpu = torch.device("cpu")
MiB = 2**20
out = []
for bound in (64 * MiB, 512 * MiB):
    with hostmem.tile_pool(cpu, tiles=2):
        guard = hostmem.Guard(cpu, bound)
        start = hostmem.rss()
        chunks = [torch.ones(4 * MiB // 4) for _ in range(40)]  # 160 MiB from the pooled heap
        del chunks  # freed: the pool keeps the pages
        kept = hostmem.rss() - start
        guard.after_tile()
        out += [kept, hostmem.rss() - start]
print(*out)
"""


@glibc
def test_the_guard_trims_a_pooled_heap_past_its_bound_only():
    """In a fresh process: after a tile, a heap holding more than the bound over the loop's
    start is trimmed; one under it keeps its pages for the next tile."""
    out = subprocess.run([sys.executable, "-c", GUARD_PROBE], capture_output=True, text=True,
                         check=True).stdout.split()
    kept_small, after_small, kept_large, after_large = map(int, out)
    assert kept_small > 120 * MiB and after_small < 40 * MiB, "over the bound: trimmed"
    assert kept_large > 120 * MiB and after_large > 120 * MiB, "under the bound: kept"


def _grads(sm, x):
    sm.zero_grad()
    xx = x.clone().requires_grad_(True)
    out = sm(xx)
    out.sum().backward()
    return [out.detach(), xx.grad] + [p.grad.clone() for p in sm.parameters()]


def test_pool_on_and_off_give_identical_results(monkeypatch):
    model = resnet18().double()
    x = torch.randn(1, 3, 160, 136, dtype=torch.float64)
    sm = fxstream.compile(model, tile_size=64, input_shape=x.shape, cuts=["layer1"])
    assert sm.plan(x.shape, x.dtype).passes[0].num_tiles > 1
    pooled = _grads(sm, x)
    monkeypatch.setenv("FXSTREAM_HOST_POOL", "0")
    assert not hostmem.pool_enabled()
    plain = _grads(sm, x)
    for a, b in zip(pooled, plain):
        assert torch.equal(a, b)


def test_tiles_run_largest_first_and_cover_the_plan():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 4, 3, stride=2, padding=1),
                              torch.nn.AdaptiveAvgPool2d(1))
    sm = fxstream.compile(net, tile_size=32, input_shape=(1, 3, 100, 70))
    (p,) = sm.plan((1, 3, 100, 70)).passes
    sizes = [(t.region[2].stop - t.region[2].start) * (t.region[3].stop - t.region[3].start)
             for t in p.tiles]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    rows = sorted({t.starts[0] for t in p.tiles})
    cols = sorted({t.starts[1] for t in p.tiles})
    assert sorted(t.starts for t in p.tiles) == [(r, c) for r in rows for c in cols]


def test_last_one_tile_segment_runs_without_recompute():
    """After the cut at layer4.0's add (followed by ReLU(inplace=True)) the last segment is one
    tile: it runs with grad directly, earlier segments stream, and all stays exact (the first
    segment in two tiles: the smallest image that still tiles it, for a fast float64 check)."""
    model = resnet18()
    shape = (1, 3, 352, 320)
    sm = fxstream.compile(model, tile_size=320, input_shape=shape, cuts=["add_6"])
    plan = sm.plan(shape)
    first, last = sm.engines
    x = torch.randn(shape)
    with torch.no_grad():
        stored = first(x)[0]
    assert plan.passes[0].num_tiles > 1 and plan.passes[1].num_tiles == 1
    assert not plan.passes[0].keep and plan.passes[1].keep
    y = last(stored.clone().requires_grad_(True))[0]
    assert "StreamFunction" not in type(y.grad_fn).__name__
    assert type(first(x.requires_grad_(True))[0].grad_fn).__name__ == \
        StreamFunction.__name__ + "Backward"
    kept = stored.clone()
    last(stored)
    assert torch.equal(stored, kept), "the in-place ReLU must not write into the stored map"
    result = check(resnet18(), shape, 320, cuts=["add_6"])
    assert result.num_tiles > 1
    assert not [d for d in result.diffs if not d.ok]


def test_tile_loops_pool_on_the_cpu_only(monkeypatch):
    """On the CPU a budget plan may pool the host memory of its multi-tile passes (faster; the
    search may also run them unpooled where memory is tight), never of a one-tile pass; a plan
    for a CUDA stem pools nothing (the pool does nothing there), and neither does one with the
    pool turned off."""
    from fxstream.planner import PlanOptions, Situation, make_plan

    model = resnet18()
    shape = (1, 3, 4096, 4096)
    a = fxstream.analyze(model, shape)
    opts = PlanOptions(memory_budget="3GiB")
    cpu = make_plan(a, opts, Situation(baseline=2**30))
    assert any(p.num_tiles > 1 for p in cpu.passes)
    assert any(p.pool for p in cpu.passes)  # with room, pooled loops are the cheaper choice
    assert all(p.num_tiles > 1 for p in cpu.passes if p.pool)
    monkeypatch.setattr("fxstream.budget.current_rss", lambda: 2**30)
    sm = fxstream.compile(model, input_shape=shape, memory_budget="3GiB")
    assert sm.plan(shape) == cpu
    cuda = make_plan(a, opts, Situation(device="cuda", baseline=2**30, available=2**36))
    assert any(p.num_tiles > 1 for p in cuda.passes) and not any(p.pool for p in cuda.passes)
    monkeypatch.setenv("FXSTREAM_HOST_POOL", "0")
    off = make_plan(a, opts, Situation(baseline=2**30))
    assert any(p.num_tiles > 1 for p in off.passes) and not any(p.pool for p in off.passes)
