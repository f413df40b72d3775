"""Named geometry cases: hand-computed compositions, what hypothesis shrank to, known limits.

Each hand case composes ``J' = J*s, lo' = lo + a*J, hi' = hi + b*J`` (docs/design.md section 1) by
hand in its docstring, asserts the derived values, and runs the brute-force oracle on it too.
"""
from __future__ import annotations

from fractions import Fraction

import pytest

import fxstream
import fxstream.check
from fxstream.legal import smallest_tile_size

from passes import Local, NonLocal, input_symbols
from tests.oracle import (Conv, ConvT, Crop, Join, Pad, Pool, Up, as_fraction, build,
                          check_geometry, derive_geometry, exact_hull, measure_supports,
                          one_thread, positive_input, run, tile_mismatches)


def geometry(specs, sizes):
    """The derived output geometry of ``specs`` on ``(1, 2, *sizes)``."""
    with one_thread():
        g, _, _ = derive_geometry(build(specs, len(sizes)), (1, 2, *sizes))
    return g


def axis0(specs, n):
    """``(J, lo, hi)`` of the only axis, as Fractions."""
    g = geometry(specs, (n,))
    assert isinstance(g, Local), g
    a = g.axes[0]
    return tuple(as_fraction(v) for v in (a.stride, a.lo, a.hi))


def supports(specs, sizes):
    with one_thread():
        return measure_supports(build(specs, len(sizes)), positive_input((1, 2, *sizes)))


F = Fraction


# ---------------------------------------------------------------------------------------------
# hand-computed compositions


def test_conv_s2_then_conv_s1():
    """conv k3 s2 p1 (s=2, a=-1, b=1): J=2, lo=-1, hi=1; then conv k3 s1 p1 (a=-1, b=1):
    lo = -1 + (-1)*2 = -3, hi = 1 + 1*2 = 3. (Output i reads conv1 outputs i-1..i+1, which
    read inputs 2(i-1)-1 .. 2(i+1)+1 = 2i-3 .. 2i+3; receptive field 7.)"""
    specs = (Conv(3, 2, 1), Conv(3, 1, 1))
    assert axis0(specs, 17) == (2, -3, 3)
    assert supports(specs, (17,))[0][4] == frozenset(range(8 - 3, 8 + 3 + 1))
    check_geometry(specs, (17,))


def test_nearest_x2_then_conv():
    """nearest x2 (s=1/2, a=-1/2, b=0): J=1/2, lo=-1/2, hi=0; conv k3 p1: lo = -1/2 - 1/2 = -1,
    hi = 0 + 1/2 = 1/2. Even i=2q reads q-1..q (offsets -1..0), odd i reads q..q+1 (offsets
    -1/2..1/2): both ends of the hull are met."""
    specs = (Up(2), Conv(3, 1, 1))
    assert axis0(specs, 9) == (F(1, 2), -1, F(1, 2))
    s = supports(specs, (9,))[0]
    assert s[6] == {2, 3} and s[7] == {3, 4}
    check_geometry(specs, (9,))


def test_transposed_k4_s2_p1():
    """The usual 2x transposed conv: o reads ceil((o+1-3)/2) .. floor((o+1)/2), so
    a = (1-3)/2 = -1, b = 1/2: J=1/2, lo=-1, hi=1/2."""
    assert axis0((ConvT(4, 2, 1),), 9) == (F(1, 2), -1, F(1, 2))
    check_geometry((ConvT(4, 2, 1),), (9,))


def test_transposed_dilation_enters_the_window():
    """ConvT k2 s1 d2: o reads o - 2*t for t in 0, 1, so a = (0 - 2*1)/1 = -2, b = 0 (a rule that
    forgot the dilation would say a = -1 and miss input o-2)."""
    assert axis0((ConvT(2, 1, d=2),), 7) == (1, -2, 0)
    assert supports((ConvT(2, 1, d=2),), (7,))[0][4] == {2, 4}
    check_geometry((ConvT(2, 1, d=2),), (7,))


def test_linear_x3_skips_the_zero_weight_tap():
    """Linear x3, align_corners=False: i = 3q + r reads floor(src), floor(src)+1 with
    src = q + (2r+1)/6 - 1/2. Offsets from i/3: r=0: -1, 0; r=1: src = q exactly, one tap, -1/3;
    r=2: -2/3, 1/3. Hull [-1, 1/3]; counting the weight-0 tap of r=1 would give hi = 2/3."""
    assert axis0((Up(3, "linear"),), 7) == (F(1, 3), -1, F(1, 3))
    assert supports((Up(3, "linear"),), (7,))[0][7] == {2}  # 7 = 3*2 + 1: only input 2
    check_geometry((Up(3, "linear"),), (7,))


def test_dilated_stack_support_has_holes_but_meets_both_ends():
    """conv k3 s2 d2 p2 (a=-2, b=2): J=2, lo=-2, hi=2; conv k2 (a=0, b=1): lo=-2, hi=2+2=4.
    Output i reads conv1 outputs i, i+1, which read 2m-2, 2m, 2m+2: the support is the even
    offsets -2, 0, 2, 4 only. So the oracle asserts the exact hull, not the full interval."""
    specs = (Conv(3, 2, 2, 2), Conv(2, 1, 0))
    assert axis0(specs, 21) == (2, -2, 4)
    assert supports(specs, (21,))[0][5] == {8, 10, 12, 14}
    check_geometry(specs, (21,))


def test_max_pool_ceil_mode_drops_a_window_starting_in_the_right_padding():
    """MaxPool k2 s2 p1 ceil_mode on 5: ceil((5+2-1-1)/2)+1 = 4 windows, but the 4th would start
    at 3*2-1 = 5, past the image, so torch keeps 3: the size needs its second term
    floor((L+p-1)/s)+1 = 3 (a rule without it is caught as a size mismatch)."""
    g = geometry((Pool("max", 2, 2, 1, ceil=True),), (5,))
    assert isinstance(g, Local), g
    (L,) = input_symbols(1)
    assert g.axes[0].size.subs(L, 5) == 3
    check_geometry((Pool("max", 2, 2, 1, ceil=True),), (5,))
    check_geometry((Pool("avg", 2, 2, 1, ceil=True, include_pad=False),), (5,))


def test_two_axes_keep_their_own_parameters():
    """2-D: H gets conv k3 s2 p1 (J=2, [-1, 1]), W gets conv k1 (J=1, [0, 0]); then bilinear
    (2, 3). Linear x2: i=2q reads q-1, q (offsets -1, 0), i=2q+1 reads q, q+1 (offsets -1/2,
    1/2): hull [-1, 1/2]. H: J=1, lo = -1 + (-1)*2 = -3, hi = 1 + (1/2)*2 = 2. W: J=1/3,
    lo = -1, hi = 1/3 (the linear x3 hull above)."""
    specs = (Conv((3, 1), (2, 1), (1, 0)), Up((2, 3), "linear"))
    g = geometry(specs, (9, 7))
    got = [tuple(as_fraction(v) for v in (a.stride, a.lo, a.hi)) for a in g.axes]
    assert got == [(1, -3, 2), (F(1, 3), -1, F(1, 3))]
    check_geometry(specs, (9, 7))


# ---------------------------------------------------------------------------------------------
# padding modes at the rule's limits: the limits are exact, not conservative


def test_reflect_and_replicate_padding_at_their_limits_are_local():
    """reflect may pad reach//2 (k5: 2), replicate the whole reach (k3: 2)."""
    check_geometry((Conv(5, 1, 2, mode="reflect"),), (9,))
    check_geometry((Conv(3, 1, 2, mode="replicate"),), (9,))
    check_geometry((Conv(5, 1, "same", mode="reflect"),), (9,))


@pytest.mark.parametrize("spec, outside, window", [
    (Conv(2, 1, 1, mode="reflect"), 1, (1, -2, 1)),  # output 0 reads padded -1 = input 1
    (Conv(2, 1, 2, mode="replicate"), 0, (1, -3, 0)),  # output 0 reads -2, -1 = input 0
])
def test_padding_beyond_the_limit_reads_its_mirror_inside_the_interval(spec, outside, window):
    """One past the limit, output 0 really reads an input outside its conv window ``[-p, -p +
    k - 1]``; the interval is the hull over the border outputs too, so it holds that input
    (reflect k2 p1: the last output n reads padded n-1, n = n-1, n-2: offset -2; replicate k2
    p2: the last output n+2 reads padded n, n+1 = n-1: offset -3)."""
    k, p = spec.k, spec.p
    assert not -p <= outside <= -p + k - 1
    assert outside in supports((spec,), (7,))[0][0]
    assert axis0((spec,), 7) == window
    check_geometry((spec,), (7,))


# ---------------------------------------------------------------------------------------------
# what hypothesis shrank to


def test_output_that_reads_no_input():
    """Shrunk from test_geometry_1d (the oracle failed on an empty hull): ConvT k1 s2 writes only
    even positions, the pad shifts them to odd ones, and conv k1 s2 samples the even ones, so
    every output is the bias alone. It used to be refused ("leaves outputs that read no
    input"); an output that reads nothing is still exact in every tile that holds it, and the
    interval (from the outputs' grid positions) says which tiles do."""
    specs = (ConvT(1, 2), Pad(1, 0), Conv(1, 2))
    assert all(not s for s in supports(specs, (5,))[0])
    with one_thread():
        assert exact_hull(build(specs, 1), 0)[1:] == (None, None)
    assert axis0(specs, 5) == (1, F(-1, 2), F(-1, 2))
    assert check_geometry(specs, (5,)).independent
    for start, stop in [(0, 3), (2, 5), (1, 4), (3, 5)]:
        assert not tile_mismatches(specs, 5, start, stop)


def test_2d_axis_reading_nothing_empties_the_other_axis():
    """Shrunk from test_geometry_2d: as above along H only. The oracle probes W summed over H, so
    it sees nothing on W either; the clean-output comparison must skip W then."""
    specs = (ConvT(1, (2, 1), (1, 0)), Pad((1, 0), 0), Conv(1, (2, 1), (1, 0)))
    s = supports(specs, (5, 5))
    assert all(not x for x in s[0]) and all(not x for x in s[1])
    assert isinstance(geometry(specs, (5, 5)), Local)
    check_geometry(specs, (5, 5))


def test_join_that_broadcasts_is_not_local():
    """Shrunk from test_geometry_1d: ConvT k1 p1 crops 5 -> 3, the second crops 3 -> 1, and the
    add broadcasts the size-1 branch over the other: not local, and the rule says why."""
    specs = (ConvT(1, 1, 1), Join("add", (), (ConvT(1, 1, 1),)))
    g = geometry(specs, (5,))
    assert isinstance(g, NonLocal) and "broadcast along spatial axis 0" in g.reason
    with one_thread():
        assert run(build(specs, 1), positive_input((1, 2, 5))) is None  # the generator skips it


# ---------------------------------------------------------------------------------------------
# limits of the hull composition (inherent, documented)


def test_hull_composition_is_loose_after_upsampling():
    """Nearest x2 has offsets {0} at even i and {-1/2} at odd i; conv k1 s2 then reads only even
    positions, so the exact hull is [0, 0], but composing hulls gives
    lo = -1/2 + 0*(1/2) = -1/2. The interval is a hull over residues and does not track which
    residues a later stride keeps: safe (it contains every dependency) but one half-pixel wide.
    The oracle asserts equality only where composition is tight by construction (a layer of
    integer stride s on a node of period q reaches every residue when gcd(s, q) = 1).
    If the rule ever tracks residues, update this test."""
    specs = (Up(2), Conv(1, 2))
    assert axis0(specs, 9) == (1, F(-1, 2), 0)
    with one_thread():
        assert exact_hull(build(specs, 1), 0) == (1, 0, 0)
    report = check_geometry(specs, (9,))
    assert report.loose and not report.tight_checked


def test_hull_composition_is_tight_when_the_stride_is_coprime():
    """Nearest x2 then conv k1 s3: outputs read positions 3i, both residues mod 2 occur, so the
    composed hull [-1/2, 0] (J=3/2) is exact and the oracle asserts so."""
    specs = (Up(2), Conv(1, 3))
    assert axis0(specs, 9) == (F(3, 2), F(-1, 2), 0)
    report = check_geometry(specs, (9,))
    assert report.tight_checked and not report.loose


# ---------------------------------------------------------------------------------------------
# crops and holes: the interval is a correct dependency hull, but "inside implies exact"
# (docs/design.md section 2) needs more than that; these were found by the oracle


@pytest.mark.parametrize("specs", [
    (Pad(-1, -1), Conv(3, 1, 1)),  # F.pad by -1: lo = +1 > 0
    (ConvT(1, 1, 1), Conv(3, 1, 1)),  # ConvT padding 1 > reach 0 crops the same way
    (ConvT(2, 2, 2), Conv(3, 1, 1)),  # padding 2 > reach 1
    (Crop(1, 1), Conv(3, 1, 1)),  # x[..., 1:-1] is F.pad by -1
    (Crop(1, 1, how="shape"), Conv(3, 1, 1)),  # x[..., 1:x.shape[-1] - 1]
    (Pad(-1, -1, mode="reflect"), Conv(3, 1, 1)),  # torch crops first, then reflects
], ids=["pad-1", "convT-k1-p1", "convT-k2-s2-p2", "slice", "slice-shape", "reflect-1"])
def test_crop_then_padding_is_exact_inside(specs):
    """Pad(-1, -1) + conv k3 p1 has J=1, lo=0, hi=2. On the region [4, 12), output 4 ([4, 6])
    is inside, but it reads pad(x)[3] = x[4], which the tile cropped away and pads with a zero;
    output 9 ([9, 11]) likewise reads pad(x)[10] = x[11] at the other end."""
    align = geometry(specs, (16,)).align
    assert not tile_mismatches(specs, 16, 4 * align, 12)


def test_output_reading_nothing_streams_exactly():
    """conv k1 s2 then ConvT k1 s2: output 1 reads no input (the ConvT writes even positions
    only). It was refused: a tile [0, 2) holds conv output 0 only and so ConvT output 0 only,
    while output 1's interval [1, 1] lay inside. The fractional last index is the cause (conv
    outputs up to (B - 1)/2 are inside, but a tile holds up to its floor): the ConvT's window
    is widened to [0, 1/2], so output 1 needs [1, 2] and a tile [0, 4)."""
    import torch.nn as nn

    net = nn.Sequential(nn.Conv1d(2, 2, 1, stride=2), nn.ConvTranspose1d(2, 2, 1, stride=2))
    a = fxstream.analyze(net, (1, 2, 16))
    assert a.boundary == ("_1",) and a.row("_1").interval == (("0", "1"),)
    specs = (Conv(1, 2), ConvT(1, 2))
    for start in (0, 2, 4):
        for stop in range(start + 1, 17, 2):
            assert not tile_mismatches(specs, 16, start, stop), (start, stop)
    with pytest.raises(fxstream.PlanError, match="the smallest legal tile for this model is 4"):
        fxstream.compile(net, tile_size=3, input_shape=(1, 2, 16))
    for tile in (None, 4, 5, 7):
        result = fxstream.check.check(net, (1, 2, 16), tile)
        assert result.passed, (tile, result.worst)


# ---------------------------------------------------------------------------------------------
# the fuzzer's repros (issue 14)


def _stream_vs_full(net, shape, tile):
    """Relative max differences of the output and the image gradient, streamed vs full."""
    import torch

    net = net.double().eval()
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sm = fxstream.compile(net, tile_size=tile, input_shape=shape)
    xr = x.clone().requires_grad_(True)
    ref = net(xr)
    ref.backward(torch.ones_like(ref))
    xs = x.clone().requires_grad_(True)
    out = sm(xs)
    out.backward(torch.ones_like(out))
    rel = (out - ref).abs().max().item() / ref.abs().max().item()
    grad = (xs.grad - xr.grad).abs().max().item() / xr.grad.abs().max().item()
    return rel, grad, sm.plan(shape, torch.float64).num_tiles


def test_repro_H_min_convT_crop_after_strided_conv():
    """repro_H_min.py: conv k3 s2 (J=2, [0, 2]) then ConvT k3 s3 p2. The tile planned its output
    slice one longer than the tile produced ("expanded size (3) must match the existing size
    (2)"). A tile ending at B holds conv outputs up to floor((B - 3)/2), hence ConvT outputs up
    to 3*floor((B - 3)/2) - 2; the window [0, 2/3] counted them inside up to (3B - 13)/2, one
    more at even B. Widened to b = 1 (end_slack 1/2): hi = 2 + 2 = 4, and tile 7 is no longer
    legal (the error names 8)."""
    import torch.nn as nn

    net = nn.Sequential(nn.Conv1d(1, 1, 3, stride=2), nn.ConvTranspose1d(1, 1, 3, stride=3,
                                                                          padding=2))
    a = fxstream.analyze(net, (1, 1, 20))
    assert a.row("_1").interval == (("0", "4"),)
    with pytest.raises(fxstream.PlanError, match="the smallest legal tile for this model is 8"):
        fxstream.compile(net, tile_size=7, input_shape=(1, 1, 20))
    for shape, tile in [((1, 1, 20), 8), ((1, 1, 20), 9), ((1, 1, 41), 8), ((1, 1, 41), 13)]:
        rel, grad, tiles = _stream_vs_full(net, shape, tile)
        assert tiles > 1 and rel <= 1e-10 and grad <= 1e-10, (shape, tile, rel, grad)


@pytest.mark.parametrize("k1, s1", [(3, 2), (1, 1), (2, 2)])
@pytest.mark.parametrize("kT, sT, pT", [(3, 3, 2), (3, 3, 1), (4, 3, 2), (3, 2, 2)])
def test_repro_H_convT_crop_sweep(k1, s1, kT, sT, pT):
    """repro_H_convT_crop.py's nets: inside implies present and exact on aligned regions of a
    20-pixel image (starting at the first four aligned positions, lengths up to 12 congruent to
    20 modulo the alignment), and the streamed model equals the full one at its smallest legal
    tile."""
    import torch.nn as nn

    specs = (Conv(k1, s1), ConvT(kT, sT, pT))
    n = 20
    align = geometry(specs, (n,)).align
    with one_thread():
        model = build(specs, 1)
        regions = [(start, start + m) for start in range(0, 4 * align, align)
                   for m in range(1, min(12, n - start) + 1) if (m - n) % align == 0
                   and run(model, positive_input((1, 2, m))) is not None]
    assert regions
    for start, stop in regions:
        assert not tile_mismatches(specs, n, start, stop), (start, stop)
    net = nn.Sequential(nn.Conv1d(1, 1, k1, stride=s1),
                        nn.ConvTranspose1d(1, 1, kT, stride=sT, padding=pT))
    tile = smallest_tile_size(fxstream.analyze(net, (1, 1, n)))
    result = fxstream.check.check(net, (1, 1, n), tile)
    assert result.passed and result.num_tiles > 1, result


def test_unet_pad_to_match_crop_reaches_the_cat():
    """note_unet_cat_truncation.py: conv stride 2 padding 1 down, nearest x2 up, so the up map
    is ceil(H/2)*2 = H + (H mod 2) and the pad-to-match is floor(-(H mod 2)/2) = -1 (a crop) at
    odd H, 0 at even H. The pad's window was a sympy Min/Max of that, and the cat's hull asked
    Python to compare it with the skip's lo ("cannot determine truth value of Relational"). The
    pad's window is now the hull over the residues mod 2 (rationals), and the stem reaches the
    final conv."""
    from tests.test_local_ops import UNetBlock

    a = fxstream.analyze(UNetBlock().double().eval(), (1, 2, 33, 33))
    assert not a.global_rows and a.boundary == ("out",)
    pad = a.row("pad")
    assert pad.interval == (("-3", "3"), ("-3", "3")) and pad.align == 2
