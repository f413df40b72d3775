"""Real and zoo models: where the stem ends, why, the whole-image statistics it streams, and the
geometry at the boundary.

Models are analysed on fake tensors at 224 px (the size costs nothing); each model is built and
analysed once per session (``_analysis``).
"""
from __future__ import annotations

import functools

import pytest
import torch

import fxstream
import passes
from passes import GEOMETRY
from tests.zoo import HANDWRITTEN_NAMES, TORCHVISION_NAMES, ZOO


@functools.lru_cache(maxsize=None)
def _analysis(name: str) -> fxstream.Analysis:
    entry = ZOO[name]
    return fxstream.analyze(entry.build(), entry.input_shape)


# ---------------------------------------------------------------------------------------------
# every zoo entry: its recorded expectations


@pytest.mark.parametrize("name", HANDWRITTEN_NAMES + TORCHVISION_NAMES)
def test_zoo_boundary_and_first_global(name):
    entry, a = ZOO[name], _analysis(name)
    assert a.boundary == entry.boundary
    assert [r.name for r in a.global_rows] == list(entry.first_global)
    if entry.first_global:
        assert a.global_rows[0].reason == entry.reason
    for row in a.boundary_rows:
        assert row.role == "boundary" and row.local
    assert _statistics(a) == entry.statistics
    nodes = {n.name: n for n in a.graph_module.graph.nodes}
    for name in entry.statistics:
        assert isinstance(nodes[name].meta[GEOMETRY], passes.Reduced)


def _statistics(a: fxstream.Analysis) -> tuple[str, ...]:
    """The whole-image reductions the stem streams (docs/design.md section 7)."""
    return tuple(r.name for r in a.rows
                 if r.role == "stem" and not r.local and r.origin == r.name)


@pytest.mark.parametrize("name", HANDWRITTEN_NAMES)
def test_handwritten_models_run_at_their_input_shape(name):
    entry = ZOO[name]
    model = entry.build(torch.float64)
    with torch.no_grad():
        model(torch.randn(entry.input_shape, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# torchvision: the boundary is the last local tensor before the global pooling

MEAN = "adaptive average pooling to 1: the mean of the whole image"
FRACTION = "adaptive pooling: each output averages a fraction of the whole image"


@pytest.mark.parametrize("name, qualname, op, reason", [
    ("resnet18", "layer4.1.relu", "ReLU", MEAN),
    ("resnet50", "layer4.2.relu", "ReLU", MEAN),
    ("densenet121", "", "F.relu", MEAN),  # DenseNet.forward: F.relu(features) at the top level
    ("vgg16", "features.30", "MaxPool2d", FRACTION),  # AdaptiveAvgPool2d((7, 7))
    ("vgg11_bn", "features.28", "MaxPool2d", FRACTION),
    ("mobilenet_v2", "features.18.2", "ReLU6", MEAN),
    ("convnext_tiny", "features.7.2", "operator.add", MEAN),  # the last CNBlock's residual add
    ("efficientnet_b0", "features.8.2", "SiLU", MEAN),  # past its 16 squeeze-excitations
])
def test_boundary_is_the_last_tensor_before_the_global_pool(name, qualname, op, reason):
    """A pool to 1 is a whole-image mean (``Reduced``) and a pool to 7x7 is non-local; either
    way the classifier's pool is the head's first node and reads the boundary directly."""
    a = _analysis(name)
    (row,) = a.boundary_rows
    assert (row.qualname, row.op) == (qualname, op)
    assert row.stride == ("32", "32")
    (pool,) = a.global_rows
    assert pool.op in ("AdaptiveAvgPool2d", "F.adaptive_avg_pool2d")
    assert pool.reason == reason
    gm = a.graph_module
    node = next(n for n in gm.graph.nodes if n.name == pool.name)
    kind = passes.Reduced if reason == MEAN else passes.NonLocal
    assert isinstance(node.meta[GEOMETRY], kind)
    # the pool reads the boundary directly
    assert [i.name for i in node.all_input_nodes] == [row.name]


def test_efficientnet_b0_streams_its_squeeze_excitations():
    a = _analysis("efficientnet_b0")
    # features.0 (3x3/2 conv) and the first MBConv's depthwise 3x3 + BN + SiLU: the first SE's
    # input, now inside the stem
    first = a.row("features_1_0_block_0_2")
    assert (first.qualname, first.op, first.role) == ("features.1.0.block.0.2", "SiLU", "stem")
    assert first.stride == ("2", "2") and first.receptive_field == ("7", "7")
    se = a.row("features_1_0_block_1_avgpool")
    assert (se.role, se.local, se.origin) == ("stem", False, se.name)
    assert se.reason == MEAN
    # the SE's excitation is computed once from the statistics and multiplies the map by
    # channel weights inside the stem: the product is local again, on the same grid
    scale = a.row("features_1_0_block_1_scale_activation")
    assert scale.role == "stem" and scale.origin == se.name
    mul = a.row("mul")
    assert (mul.qualname, mul.role, mul.local) == ("features.1.0.block.1", "stem", True)
    assert mul.stride == ("2", "2") and mul.receptive_field == ("7", "7")
    # the classifier's pool is the only global node of the head
    assert [r.name for r in a.global_rows] == ["avgpool"]


def test_convnext_tiny_needs_the_stochastic_depth_rule():
    a = _analysis("convnext_tiny")
    rows = [r for r in a.rows if r.op.endswith("stochastic_depth")]
    assert len(rows) == 18 and all(r.local for r in rows)
    (row,) = a.boundary_rows
    # stem 4x4/4; stages of 3, 3, 9, 3 blocks with 7x7 depthwise convs at strides 4..32,
    # joined by 2x2/2 downsampling convs
    rf = 4 + 3 * 6 * 4 + 4 + 3 * 6 * 8 + 8 + 9 * 6 * 16 + 16 + 3 * 6 * 32
    assert row.receptive_field == (str(rf),) * 2


# ---------------------------------------------------------------------------------------------
# ResNet-50: stride and receptive field by hand


def _compose(geometry, layers):
    """(J, lo, hi) through layers (kernel, stride, padding), as in docs/design.md section 1:
    J' = J*s, lo' = lo - p*J, hi' = hi + (k - 1 - p)*J."""
    J, lo, hi = geometry
    for k, s, p in layers:
        J, lo, hi = J * s, lo - p * J, hi + (k - 1 - p) * J
    return J, lo, hi


def _hull(*paths):
    (J,) = {p[0] for p in paths}
    return J, min(p[1] for p in paths), max(p[2] for p in paths)


def resnet50_geometry():
    g = _compose((1, 0, 0), [(7, 2, 3), (3, 2, 1)])  # conv1, maxpool
    for blocks, stride in [(3, 1), (4, 2), (6, 2), (3, 2)]:
        for b in range(blocks):
            s = stride if b == 0 else 1
            main = _compose(g, [(1, 1, 0), (3, s, 1), (1, 1, 0)])  # conv1, conv2, conv3
            shortcut = _compose(g, [(1, s, 0)]) if b == 0 else g  # downsample or identity
            g = _hull(main, shortcut)
    return g


def test_resnet50_boundary_stride_and_receptive_field_by_hand():
    J, lo, hi = resnet50_geometry()
    a = _analysis("resnet50")
    (row,) = a.boundary_rows
    assert row.stride == (str(J),) * 2 == ("32", "32")
    assert row.interval == ((str(lo), str(hi)),) * 2
    assert row.receptive_field == (str(hi - lo + 1),) * 2 == ("427", "427")
    assert a.alignment == (32, 32)


def test_resnet50_with_frozen_batchnorm_is_local():
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    model = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d).eval()
    a = fxstream.analyze(model, (1, 3, 224, 224))
    assert a.boundary == ("layer4_2_relu_2",)
    assert a.row("layer4_2_relu_2").receptive_field == ("427", "427")


def test_train_mode_resnet_streams_its_batchnorms():
    """Each train-mode BatchNorm becomes its moments over the batch and the image (in the stem),
    a pointwise normalisation (in the stem) and the update of its running statistics (read by
    nothing in the stem): the stem ends at the same tensor as in eval mode."""
    import torchvision

    a = fxstream.analyze(torchvision.models.resnet18(weights=None).train(), (1, 3, 224, 224))
    assert a.boundary == ("layer4_1_relu_1",)
    assert [r.name for r in a.global_rows] == ["avgpool"]
    moments = [r for r in a.rows if r.op == "passes.statistics.moments"]
    assert len(moments) == 20 and all(r.role == "stem" and r.origin == r.name for r in moments)
    assert moments[0].qualname == "bn1"
    assert moments[0].reason == ("mean and variance over the batch and the whole image (a "
                                 "norm's statistics)")
    assert a.row("normalize").qualname == "bn1" and a.row("normalize").local
    updates = [r for r in a.rows if r.op == "passes.statistics.update_running_stats"]
    assert len(updates) == 20 and updates[0].origin == "moments"


# ---------------------------------------------------------------------------------------------
# hand-written zoo models


@pytest.mark.parametrize("size", [(64, 64), (67, 70), (97, 101)])
def test_unet_is_local_end_to_end(size):
    """At every size, including those where the pad-to-match amounts are non-zero."""
    a = fxstream.analyze(ZOO["unet"].build(), (1, 3) + size)
    assert a.boundary == ("outc",)
    assert a.global_rows == []
    assert all(r.local for r in a.rows if r.role in ("stem", "boundary"))
    (out,) = a.boundary_rows
    assert out.stride == ("1", "1") and out.size == ("H", "W")
    assert a.alignment == (4, 4)
    pads = [r for r in a.rows if r.op == "F.pad"]
    assert len(pads) == 2 and all(r.local for r in pads)


def test_unet_upsampling_strides():
    a = _analysis("unet")
    assert a.row("down2_1_2").stride == ("4", "4")
    assert a.row("up1").stride == ("2", "2")  # 4 * 1/2: the transposed conv halves the stride
    assert a.row("interpolate").stride == ("1", "1")


def test_pyramid_has_two_boundary_tensors_on_two_grids():
    a = _analysis("pyramid")
    p3, p2 = a.boundary_rows
    assert (p3.name, p3.stride) == ("lat3", ("4", "4"))
    assert (p2.name, p2.stride) == ("add", ("2", "2"))
    # p2 joins the lateral path and the upsampled coarse path: the hull of both
    assert p2.interval == (("-6", "4"),) * 2


def test_shufflenet_like_channel_shuffle_is_local():
    a = _analysis("shufflenet_like")
    for name in ("view", "transpose", "view_1"):
        assert a.row(name).local and a.row(name).role == "stem"


# ---------------------------------------------------------------------------------------------
# timm


try:
    import timm
except ImportError:  # an optional dev dependency
    timm = None

needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed")


@functools.lru_cache(maxsize=None)
def _timm(name: str) -> fxstream.Analysis:
    return fxstream.analyze(timm.create_model(name, pretrained=False).eval(), (1, 3, 224, 224))


@needs_timm
def test_timm_resnet18_matches_torchvision():
    a = _timm("resnet18")
    (row,) = a.boundary_rows
    assert (row.qualname, row.op) == ("layer4.1.act2", "ReLU")
    assert row.stride == ("32", "32")
    assert row.receptive_field == _analysis("resnet18").boundary_rows[0].receptive_field
    assert a.global_rows[0].qualname == "global_pool.pool"


@needs_timm
def test_timm_seresnet18_streams_its_squeeze_excitations():
    a = _timm("seresnet18")
    # every block's SE (a mean over the image) is streamed: the stem ends where resnet18's does
    assert a.boundary == ("layer4_1_act2",)
    assert [r.qualname for r in a.global_rows] == ["global_pool.pool"]
    se = [r for r in a.rows if r.qualname.endswith(".se") and r.origin == r.name]
    assert [r.qualname for r in se] == [f"layer{i}.{j}.se" for i in range(1, 5) for j in (0, 1)]
    assert all(r.role == "stem" and r.reason == "mean over the whole image" for r in se)
    assert _statistics(a) == tuple(r.name for r in se)


@needs_timm
def test_timm_efficientnet_b0_streams_past_its_first_squeeze_excitation():
    a = _timm("efficientnet_b0")
    assert a.boundary[-1] == "bn2_act"
    assert a.global_rows[0].qualname == "global_pool.pool"
    se = next(r for r in a.rows if r.qualname == "blocks.0.0.se" and r.origin == r.name)
    assert se.role == "stem" and se.reason == "mean over the whole image"
    assert a.row("blocks_0_0_aa").role == "stem"
    assert len(_statistics(a)) == 16


@needs_timm
def test_timm_efficientnet_b0_has_one_boundary_tensor():
    """BatchNormAct2d's ``_assert(x.ndim == 4)`` reads the conv's shape; that must not make the
    conv a boundary tensor."""
    assert _timm("efficientnet_b0").boundary == ("bn2_act",)
