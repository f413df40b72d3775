"""The geometry pass against brute force, on stacks and small DAGs that hypothesis draws.

Every drawn model is local, so the checks of :func:`oracle.check_geometry` apply to each: the
output is ``Local``; its size expressions give the real sizes; every measured dependency lies in
the derived interval; the interval is the exact hull of the dependencies wherever composing
per-layer hulls is tight (see ``test_hull_composition_is_loose_after_upsampling`` in the
regressions for where it is not, and why); clean outputs read exactly what the reference says.
``test_inside_implies_exact_1d`` checks what the intervals are for (DESIGN.md section 2).
"""
from __future__ import annotations

from hypothesis import assume, event, given
from hypothesis import strategies as st

from passes import Local
from tests.oracle import (Conv, ConvT, Join, Pad, Pool, Up, build, check_geometry, has_holes,
                          derive_geometry, exact_stride, one_thread, positive_input, run,
                          tile_mismatches)

MAX_OUT = 300  # output positions per axis (the reference walks each one)


def _axes(ndim, strategy):
    """One value per axis, collapsed to an int when all axes agree (for readable repros)."""
    return st.tuples(*[strategy] * ndim).map(lambda t: t[0] if len(set(t)) == 1 else t)


@st.composite
def conv(draw, ndim):
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate"]))
    k = draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
    d = draw(st.lists(st.integers(1, 2), min_size=ndim, max_size=ndim))
    reach = [dj * (kj - 1) for kj, dj in zip(k, d)]
    kind = draw(st.sampled_from(["int", "int", "same", "valid"]))
    if kind == "same":
        if mode == "reflect":  # 'same' pads reach//2 before and the rest after
            assume(all(r % 2 == 0 for r in reach))
        s = 1  # torch: padding='same' only with stride 1
        p = "same"
    else:
        s = draw(_axes(ndim, st.integers(1, 3)))
        if kind == "valid":
            p = "valid"
        else:  # the most each padding mode keeps local
            limit = {"zeros": [3] * ndim, "reflect": [r // 2 for r in reach],
                     "replicate": reach}[mode]
            p = tuple(draw(st.integers(0, lim)) for lim in limit)
            p = p[0] if len(set(p)) == 1 else p
    squash = lambda t: t[0] if len(set(t)) == 1 else tuple(t)  # noqa: E731
    fn = mode == "zeros" and draw(st.booleans())  # F.conv has zero padding only
    return Conv(k=squash(k), s=s, p=p, d=squash(d), mode=mode, fn=fn)


@st.composite
def pool(draw, ndim):
    kind = draw(st.sampled_from(["max", "avg"]))
    k = draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
    p = tuple(draw(st.integers(0, kj // 2)) for kj in k)  # torch: padding <= kernel // 2
    s = draw(st.none() | _axes(ndim, st.integers(1, 3)))
    d = draw(_axes(ndim, st.integers(1, 2))) if kind == "max" else 1
    squash = lambda t: t[0] if len(set(t)) == 1 else tuple(t)  # noqa: E731
    return Pool(kind=kind, k=squash(k), s=s, p=squash(p), d=d, ceil=draw(st.booleans()),
                include_pad=draw(st.booleans()) if kind == "avg" else True,
                fn=draw(st.booleans()))


@st.composite
def conv_transpose(draw, ndim):
    k = draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
    s = draw(st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim))
    d = draw(st.lists(st.integers(1, 2), min_size=ndim, max_size=ndim))
    p = [draw(st.integers(0, 2)) for _ in range(ndim)]
    op = [draw(st.integers(0, max(sj, dj) - 1)) for sj, dj in zip(s, d)]  # torch's limit
    squash = lambda t: t[0] if len(set(t)) == 1 else tuple(t)  # noqa: E731
    return ConvT(k=squash(k), s=squash(s), p=squash(p), op=squash(op), d=squash(d),
                 fn=draw(st.booleans()))


def upsample(ndim):
    return st.builds(Up, f=_axes(ndim, st.integers(2, 4)),
                     mode=st.sampled_from(["nearest", "linear"]), fn=st.booleans())


def pad(ndim):
    return st.builds(Pad, lo=_axes(ndim, st.integers(-2, 3)), hi=_axes(ndim, st.integers(-2, 3)),
                     value=st.sampled_from([0.0, 0.75]))


def layer(ndim):
    return st.one_of(conv(ndim), conv(ndim), pool(ndim), conv_transpose(ndim), upsample(ndim),
                     pad(ndim))


@st.composite
def join(draw, ndim):
    """Two branches of up to two layers; their strides must agree for the shapes to."""
    left = tuple(draw(st.lists(layer(ndim), max_size=2)))
    right = tuple(draw(st.lists(layer(ndim), max_size=2)))
    for k in range(ndim):
        assume(exact_stride(left, k) == exact_stride(right, k))
    return Join(how=draw(st.sampled_from(["add", "cat"])), left=left, right=right)


@st.composite
def stack(draw, ndim):
    before = draw(st.lists(layer(ndim), min_size=1, max_size=3))
    middle = [draw(join(ndim))] if draw(st.booleans()) else []
    after = draw(st.lists(layer(ndim), max_size=2))
    return tuple(before + middle + after)


def odd(lo, hi):
    return st.integers(lo // 2, hi // 2).map(lambda n: 2 * n + 1)


def _runs(specs, sizes) -> bool:
    """torch accepts the stack at this size, joins add equal shapes, outputs are small."""
    with one_thread():
        out = run(build(specs, len(sizes)), positive_input((1, 2, *sizes)))
    return out is not None and all(0 < n <= MAX_OUT for n in out.shape[2:])


def _check(specs, sizes):
    # transposed convs that leave outputs reading nothing are NonLocal by rule (regressions)
    assume(not any(has_holes(specs, k) for k in range(len(sizes))))
    assume(_runs(specs, sizes))
    report = check_geometry(specs, sizes)
    event("some clean outputs" if report.clean else "no clean outputs")
    event("hull tight by construction" if report.tight_checked else "hull not tight by "
          "construction")
    if report.loose:
        event("hull loose (inherent)")


@given(specs=stack(1), n=odd(5, 41))
def test_geometry_1d(specs, n):
    _check(specs, (n,))


@given(specs=st.lists(layer(1), min_size=1, max_size=2).map(tuple), n=odd(3, 25))
def test_geometry_1d_short_stacks(specs, n):
    _check(specs, (n,))


@given(specs=stack(2), h=odd(5, 15), w=odd(5, 15))
def test_geometry_2d(specs, h, w):
    _check(specs, (h, w))


@given(specs=stack(1), n=st.integers(8, 40), data=st.data())
def test_inside_implies_exact_1d(specs, n, data):
    """DESIGN.md section 2: on an aligned region, every output whose interval lies inside (or
    crosses a border the region touches) is in the tile and equals the full image's."""
    assume(not has_holes(specs))  # known limitation: xfail test in the regressions
    assume(_runs(specs, (n,)))
    with one_thread():
        geometry, _, _ = derive_geometry(build(specs, 1), (1, 2, n))
    assert isinstance(geometry, Local), geometry
    align = geometry.align
    start = data.draw(st.integers(0, (n - 1) // align)) * align
    lengths = [m for m in range(1, n - start + 1) if (m - n) % align == 0]  # as plans cut
    assume(lengths)
    stop = start + data.draw(st.sampled_from(lengths))
    assume(_runs(specs, (stop - start,)))
    assert not tile_mismatches(specs, n, start, stop)
