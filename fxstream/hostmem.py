"""Host memory in the CPU tile loops: reuse pages across tiles instead of re-faulting them.

PyTorch's CPU tensors come from glibc ``malloc``. Allocations above glibc's mmap threshold are
mapped on every allocation and unmapped on every free, so each tile touches (and the kernel
zeroes) fresh pages for all its activations. Measured on ResNet-18 at 4096² (2 cores): 6.7
million page faults and 15 s of system time in a 44 s streamed training step.

Inside a tile loop, :func:`tile_pool` makes malloc serve every allocation up to 32 MiB (glibc's
largest mmap threshold) from its heap and keep what is freed, so the next tile, of the same or a
similar shape, reuses the same pages. Tensors that outlive the loop (stored cut maps, gradient
accumulators) are allocated under :func:`long_lived`, with the default threshold, so they are
mapped and do not pin the heap (unless a free heap chunk already fits them). When the loop
ends the heap is trimmed, which returns the pool's pages to the OS.

The price is fragmentation: the heap holds more than the live tensors at a tile's peak
(:data:`fxstream.memory.ALLOCATOR_FACTOR` plans with it, and the memory-budget search runs a
segment's tiles unpooled where memory is too tight for the pool).
Tile lists are sorted largest first (see :func:`fxstream.runtime.lower_plan`) so the heap grows
once.

Only glibc on Linux is affected; elsewhere (and for CUDA tiles) these are no-ops. Set
``FXSTREAM_HOST_POOL=0`` to turn the pool off (each tile then ends with ``malloc_trim``, the
behaviour before the pool; useful to measure what the pool buys).

The switch is process-wide while a loop runs. From the first tile loop on, glibc's mmap
threshold stays at its 128 KiB default outside the pool (:func:`fix_thresholds`: mallopt turns
glibc's automatic adjustment off).
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_THRESHOLD = 128 * 1024
_POOL_MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum on 64-bit
_KEEP_ALL = 2**31 - 1  # mallopt takes an int


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
_lock = threading.Lock()
_depth = 0


HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def huge_pages_supported() -> bool:
    """Whether the kernel hands out transparent huge pages to memory that asks for them (its
    mode is ``always`` or ``madvise``, not ``never``)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def huge_pages_on() -> bool:
    """Whether this process was started asking PyTorch for transparent huge pages for large
    CPU tensors (its environment; set after torch started, the variable has no effect).

    PyTorch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first CPU allocation (when torch is
    imported), and then aligns every allocation of 2 MiB or more to 2 MiB and marks it
    ``MADV_HUGEPAGE``: the kernel faults such tensors in 2 MiB at a time instead of 4 KiB. A
    step that allocates its large maps afresh (every one-tile pass, every unpooled tile loop,
    the full image) spends much of its time in those page faults on some machines: on this
    project's 2-core VM, EfficientNet-B0's streamed step at 2048² took 30 s of system time
    in 9.9 million faults without huge pages (see the README, "CPU: huge pages"). It can
    only be set before Python starts (``THP_MEM_ALLOC_ENABLE=1 python train.py``);
    ``fxstream bench --huge-pages`` sets it for its runs."""
    return os.environ.get(HUGE_PAGES_ENV, "0") == "1" and huge_pages_supported()


def pool_enabled() -> bool:
    """Whether the tile loops pool host memory (glibc present, not turned off by the env)."""
    return _LIBC is not None and os.environ.get("FXSTREAM_HOST_POOL", "1") != "0"


_fixed = False


def fix_thresholds() -> None:
    """Turn off glibc's dynamic mmap threshold, once, before the first tile loop: keep the
    default 128 KiB thresholds. Left dynamic, glibc raises the threshold to the size of each
    mapped chunk it frees (up to 32 MiB), after which tensors of that size come from the heap
    and stay there: measured on ResNet-18 at 2048² without the pool, the backward of a step
    held 0.10-0.17 GiB more than its live tensors. With fixed thresholds every large tensor is
    mapped and unmapped, so outside the pool the process holds what is live."""
    global _fixed
    if _fixed or _LIBC is None:
        return
    with _lock:
        if _depth == 0:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        _fixed = True


def release(device) -> None:
    """After a tile outside the pool (turned off, or not chosen for this loop): return freed heap
    pages to the OS, so fragmentation across tiles of different shapes does not accumulate."""
    if device.type == "cpu" and _LIBC is not None and _depth == 0:
        _LIBC.malloc_trim(0)


def rss() -> int:
    """This process's resident memory in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class Guard:
    """Bounds a pooled loop's heap: after each tile, if the process holds more than ``bound``
    bytes over what it held when the loop began, the heap's free pages are returned. The pooled
    heap drifts from tile to tile (the allocations of one tile's recompute and backward land in
    the holes the previous tile left, and what does not fit grows the heap: on ResNet-18 at
    2048² a pooled backward held 1.5x its live bytes after 9 tiles and 2.2-2.6x after 36, on
    MobileNet-V2 1.1x after 9). The plan sets the bound (``Pass.heap_bound``) from the pass's
    live bytes, so the memory model's factor holds whatever the drift; a pass that does not
    drift is never trimmed and keeps all of the pool's speed."""

    def __init__(self, device, bound: int):
        self.on = device.type == "cpu" and bound > 0 and _depth > 0
        self.limit = rss() + bound if self.on else 0

    def allow(self, nbytes: int) -> None:
        """Memory the loop fills as it goes (the maps its tiles write): not the heap's."""
        self.limit += nbytes

    def after_tile(self) -> None:
        if self.on and rss() > self.limit:
            _LIBC.malloc_trim(0)


def trim(device) -> None:
    """Inside a pooled loop, when the tile shape changes: return the heap's free pages (what
    the previous shape left that the next may not reuse), so fragments do not pile up."""
    if device.type == "cpu" and _LIBC is not None:
        _LIBC.malloc_trim(0)


def give_back() -> None:
    """After planning: collect the garbage cycles its tracing and measurements left and return
    the heap's free pages, so the step starts from the memory the plan counted as its
    baseline (MONAI's U-Net at 1024²: planning grew the process by 64 MiB, 54 MiB of it
    garbage or free heap)."""
    gc.collect()
    if _LIBC is not None and _depth == 0:
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def tile_pool(device, tiles: int = 2):
    """Run a loop over ``tiles`` tiles with malloc keeping freed memory for reuse (see module
    doc). One tile has nothing to reuse: no pool then."""
    global _depth
    if device.type == "cpu":
        fix_thresholds()
    if device.type != "cpu" or tiles < 2 or not pool_enabled():
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, _POOL_MMAP_THRESHOLD)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _LIBC.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
                _LIBC.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                _LIBC.malloc_trim(0)


@contextlib.contextmanager
def long_lived():
    """Allocate tensors that outlive the tile loop with the default mmap threshold, so they are
    mapped and don't pin the pooled heap. Best effort: glibc still serves them from a free heap
    chunk that fits, if one exists (the trim at the loop's end returns the free pages around
    them either way)."""
    with _lock:
        pooled = _depth > 0
        if pooled:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if pooled:
            with _lock:
                if _depth > 0:
                    _LIBC.mallopt(_M_MMAP_THRESHOLD, _POOL_MMAP_THRESHOLD)


__all__ = ["HUGE_PAGES_ENV", "Guard", "fix_thresholds", "give_back", "huge_pages_on",
           "huge_pages_supported", "long_lived", "pool_enabled", "release", "rss", "tile_pool",
           "trim"]
