"""The geometry pass against brute force, on stacks and small DAGs that hypothesis draws.

Every drawn model is local, so the checks of :func:`oracle.check_geometry` apply to each: the
output is ``Local``; its size expressions give the real sizes; every measured dependency lies in
the derived interval; the interval is the exact hull of the dependencies wherever composing
per-layer hulls is tight (see ``test_hull_composition_is_loose_after_upsampling`` in the
regressions for where it is not, and why); clean outputs read exactly what the reference says.
``test_inside_implies_exact_1d`` and its two targeted variants check what the intervals are for
(docs/design.md section 2) on every aligned region of the image (up to 60);
``test_border_padding_interval_is_the_measured_hull`` checks the reflect/replicate border reads,
which the unbounded reference cannot see, against autograd over many image sizes.
"""
from __future__ import annotations

import math

from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from passes import Local
from passes.geometry import MAX_RESIDUES
from tests.oracle import (AreaDown, Conv, ConvT, Crop, Join, Pad, Pool, Up, _layers,
                          aligned_regions, as_fraction, build, check_geometry, derive_geometry,
                          exact_stride, measured_hull, one_thread, positive_input,
                          region_mismatches, run)

MAX_OUT = 300  # output positions per axis (the reference walks each one)


def _axes(ndim, strategy):
    """One value per axis, collapsed to an int when all axes agree (for readable repros)."""
    return st.tuples(*[strategy] * ndim).map(lambda t: t[0] if len(set(t)) == 1 else t)


@st.composite
def conv(draw, ndim, modes=("zeros", "zeros", "reflect", "replicate")):
    mode = draw(st.sampled_from(modes))
    k = draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
    d = draw(st.lists(st.integers(1, 2), min_size=ndim, max_size=ndim))
    kind = draw(st.sampled_from(["int", "int", "same", "valid"]))
    if kind == "same":
        s = 1  # torch: padding='same' only with stride 1
        p = "same"
    else:
        s = draw(_axes(ndim, st.integers(1, 3)))
        if kind == "valid":
            p = "valid"
        else:  # reflect and replicate beyond the window too (torch: reflect pad < size)
            p = tuple(draw(st.integers(0, 3)) for _ in range(ndim))
            p = p[0] if len(set(p)) == 1 else p
    squash = lambda t: t[0] if len(set(t)) == 1 else tuple(t)  # noqa: E731
    fn = mode == "zeros" and draw(st.booleans())  # F.conv has zero padding only
    return Conv(k=squash(k), s=s, p=p, d=squash(d), mode=mode, fn=fn)


@st.composite
def pool(draw, ndim, kinds=("max", "avg", "lp")):
    kind = draw(st.sampled_from(kinds))
    k = draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
    p = tuple(draw(st.integers(0, kj // 2)) if kind != "lp" else 0 for kj in k)  # torch's limit
    s = draw(st.none() | _axes(ndim, st.integers(1, 3)))
    d = draw(_axes(ndim, st.integers(1, 2))) if kind == "max" else 1
    squash = lambda t: t[0] if len(set(t)) == 1 else tuple(t)  # noqa: E731
    return Pool(kind=kind, k=squash(k), s=s, p=squash(p), d=d, ceil=draw(st.booleans()),
                include_pad=draw(st.booleans()) if kind == "avg" else True,
                fn=draw(st.booleans()), norm=draw(st.sampled_from([1, 2, 3])))


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
                     mode=st.sampled_from(["nearest", "linear", "nearest-exact", "area"]),
                     fn=st.booleans())


def area_down(ndim):
    return st.builds(AreaDown, f=_axes(ndim, st.integers(2, 3)), size=st.booleans())


@st.composite
def pad(draw, ndim):
    mode = draw(st.sampled_from(["constant", "constant", "reflect", "replicate"]))
    lo, hi = _axes(ndim, st.integers(-2, 3)), _axes(ndim, st.integers(-2, 3))
    if draw(st.booleans()):  # the nn modules, with the pads they take
        return Pad(lo=draw(_axes(ndim, st.integers(0, 3))),
                   hi=draw(_axes(ndim, st.integers(0, 3))), mode=mode, module_form=True)
    return Pad(lo=draw(lo), hi=draw(hi), value=draw(st.sampled_from([0.0, 0.75])), mode=mode)


@st.composite
def crop(draw, ndim):
    how = draw(st.sampled_from(["slice", "shape", "narrow"]))
    step = draw(_axes(ndim, st.integers(1, 3))) if how != "narrow" else 1
    return Crop(lo=draw(_axes(ndim, st.integers(0, 2))), hi=draw(_axes(ndim, st.integers(0, 2))),
                step=step, how=how)


def layer(ndim):
    return st.one_of(conv(ndim), conv(ndim), pool(ndim), conv_transpose(ndim), upsample(ndim),
                     pad(ndim), crop(ndim), area_down(ndim))


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


def _decidable(specs, ndim) -> bool:
    """A pad to a multiple of ``f`` (:class:`AreaDown`) takes one value per residue modulo the
    alignment times ``f``; the rules enumerate at most ``MAX_RESIDUES`` residues (and refuse
    beyond), so the generator keeps the product of the downsampling factors below that."""
    if not any(isinstance(layer, AreaDown) for layer in _layers(specs)):
        return True
    return all(math.prod(layer.ratio(j).numerator for layer in _layers(specs)) <= MAX_RESIDUES
               for j in range(ndim))


def _runs(specs, sizes) -> bool:
    """torch accepts the stack at this size, joins add equal shapes, outputs are small."""
    if not _decidable(specs, len(sizes)):
        return False
    with one_thread():
        out = run(build(specs, len(sizes)), positive_input((1, 2, *sizes)))
    return out is not None and all(0 < n <= MAX_OUT for n in out.shape[2:])


def _layer_events(specs):
    for layer in _layers(specs):
        kind = getattr(layer, "mode", getattr(layer, "kind", ""))
        event(f"layer {type(layer).__name__} {kind}".rstrip())


def _check(specs, sizes):
    assume(_runs(specs, sizes))
    _layer_events(specs)
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


@given(specs=stack(1), n=st.integers(8, 40))
def test_inside_implies_exact_1d(specs, n):
    """docs/design.md section 2: on an aligned region, every output whose interval lies inside (or
    crosses a border the region touches) is in the tile and equals the full image's. Regions
    as plans cut them (:func:`oracle.aligned_regions`), up to 60 per image."""
    assume(_runs(specs, (n,)))
    _layer_events(specs)
    with one_thread():
        geometry, _, _ = derive_geometry(build(specs, 1), (1, 2, n))
    assert isinstance(geometry, Local), geometry
    assert not region_mismatches(specs, n, aligned_regions(n, geometry.align))


@st.composite
def border_layer(draw):
    """One 1-D layer that pads with reflect or replicate, within or beyond its window."""
    mode = draw(st.sampled_from(["reflect", "replicate"]))
    if draw(st.booleans()):  # no crops: their windows are widened beyond the reads, by design
        return Pad(lo=draw(st.integers(0, 3)), hi=draw(st.integers(0, 3)), mode=mode,
                   module_form=draw(st.booleans()))
    k, d = draw(st.integers(1, 4)), draw(st.integers(1, 2))
    if draw(st.booleans()):
        return Conv(k=k, s=1, p="same", d=d, mode=mode)
    return Conv(k=k, s=draw(st.integers(1, 3)), p=draw(st.integers(0, 4)), d=d, mode=mode)


@given(spec=border_layer())
def test_border_padding_interval_is_the_measured_hull(spec):
    """The border reads of reflect and replicate padding, measured by autograd over a range of
    image sizes (every residue of the last output's position), span exactly the derived
    interval: it holds every mirrored read and is no wider."""
    n0 = 6  # above every pad: torch wants reflect pads smaller than the size
    with one_thread():
        g, _, _ = derive_geometry(build((spec,), 1), (1, 2, 2 * n0))
    assert isinstance(g, Local), g
    a = g.axes[0]
    assert measured_hull((spec,), range(n0, n0 + 12)) == (as_fraction(a.lo), as_fraction(a.hi))


def new_layer():
    """The layers whose rules came with the fuzzing findings (issue 14), and the strided layers
    that put them on fractional grids."""
    return st.one_of(crop(1), pad(1), conv(1, ("reflect", "replicate")),
                     conv_transpose(1), area_down(1),
                     st.builds(Up, f=st.integers(2, 3),
                               mode=st.sampled_from(["nearest-exact", "area"])),
                     pool(1, ("lp",)),
                     st.builds(Conv, k=st.integers(1, 3), s=st.integers(2, 3)))


@settings(max_examples=30)
@given(specs=st.lists(new_layer(), min_size=2, max_size=4).map(tuple), n=st.integers(8, 40))
def test_inside_implies_exact_new_ops_1d(specs, n):
    """As above, on stacks of crops, reflect/replicate padding, transposed convs (with holes,
    after strided layers), area resizing, nearest-exact and LP pooling."""
    test_inside_implies_exact_1d.hypothesis.inner_test(specs, n)


@settings(max_examples=30)
@given(before=st.one_of(st.builds(Conv, k=st.integers(1, 3), s=st.integers(2, 3)),
                        st.builds(Crop, lo=st.integers(0, 2), hi=st.integers(0, 2),
                                  step=st.integers(2, 3)),
                        st.builds(Up, f=st.integers(2, 3))),
       convt=conv_transpose(1), after=st.lists(layer(1), max_size=1), n=st.integers(8, 40))
def test_inside_implies_exact_transposed_after_stride_1d(before, convt, after, n):
    """Crash class H (issue 14): a transposed conv on a node whose stride is not 1 (the last
    index inside a tile is then fractional), with kernels shorter than the stride, padding
    that crops, and output padding."""
    test_inside_implies_exact_1d.hypothesis.inner_test((before, convt, *after), n)
