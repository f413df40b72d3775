"""The boundary pass: stem, boundary tensors, head; ``split=`` by node name or module qualname."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxstream
from passes import ROLE
from tests.zoo import HANDWRITTEN_NAMES, ZOO


def analyze(name, split=None, shape=None):
    entry = ZOO[name]
    return fxstream.analyze(entry.build(), shape or entry.input_shape, split=split)


def assert_boundary_separates(a):
    """Every edge from the stem to the rest of the graph leaves from a boundary tensor."""
    roles = {n.name: n.meta[ROLE] for n in a.graph_module.graph.nodes if ROLE in n.meta}
    for node in a.graph_module.graph.nodes:
        if roles.get(node.name) != "stem":
            continue
        for user in node.users:
            assert roles[user.name] in ("stem", "boundary"), \
                f"stem node '{node.name}' feeds '{user.name}' ({roles[user.name]})"
    for name in a.boundary:
        assert roles[name] == "boundary"


@pytest.mark.parametrize("name", HANDWRITTEN_NAMES)
def test_boundary_separates_stem_from_head(name):
    assert_boundary_separates(analyze(name))


# ---------------------------------------------------------------------------------------------
# several boundary tensors


def test_two_local_outputs_are_two_boundary_tensors():
    a = analyze("pyramid")
    assert a.boundary == ("lat3", "add")
    assert not [r for r in a.rows if r.role == "head"]


class TwoLevelHead(nn.Module):
    """A global head reading two levels of the stem."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a))
        return torch.cat([self.pool(a), self.pool(b)], dim=1).flatten(1)


def test_a_head_reading_two_stem_levels_gets_both_as_boundary():
    a = fxstream.analyze(TwoLevelHead(), (1, 3, 32, 32))
    assert a.boundary == ("relu", "relu_1")
    assert [r.stride for r in a.boundary_rows] == [("1", "1"), ("2", "2")]
    assert [r.name for r in a.global_rows] == ["pool", "pool_1"]
    assert a.alignment == (2, 2)
    assert a.row("c2").role == "stem" and a.row("cat").role == "head"
    assert_boundary_separates(a)


def test_shape_values_used_only_in_the_stem_are_stem():
    a = analyze("unet", shape=(1, 3, 67, 70))
    sizes = [r for r in a.rows if r.op == "Tensor.size"]
    assert sizes and all(r.role == "stem" for r in sizes)


# ---------------------------------------------------------------------------------------------
# split


def test_split_by_module_qualname_ends_at_the_modules_last_node():
    a = analyze("unet", split="down2")
    # the skip connections of the U-Net's decoder read both earlier levels
    assert a.boundary == ("inc_1_2", "down1_1_2", "down2_1_2")
    assert a.split == "down2"
    assert a.row("up1").role == "head"
    assert a.alignment == (4, 4)
    assert_boundary_separates(a)


def test_split_by_node_name():
    a = analyze("unet", split="down1_0")
    assert a.boundary == ("inc_1_2", "down1_0")
    assert a.row("down1_1_0").role == "head"


def test_split_by_nested_module_qualname():
    a = analyze("se", split="conv1")
    assert a.boundary == ("conv1",)
    assert a.row("relu").role == "head"


def test_split_at_the_default_boundary_changes_nothing():
    default = analyze("se").boundary
    assert analyze("se", split=default[0]).boundary == default


def test_split_on_a_real_model_by_stage():
    import torchvision

    model = torchvision.models.resnet18(weights=None).eval()
    a = fxstream.analyze(model, (1, 3, 224, 224), split="layer2")
    assert a.boundary == ("layer2_1_relu_1",)
    assert a.boundary_rows[0].stride == ("8", "8")
    assert a.row("layer3_0_conv1").role == "head"


class PooledTo4(nn.Module):
    """conv -> adaptive pooling to 4x4 (each output averages a fraction of the image: not
    local, and not a whole-image statistic either) -> conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.pool(self.conv1(x)))


def test_split_past_a_non_local_node_names_the_origin_and_reason():
    with pytest.raises(fxstream.SplitError) as info:
        fxstream.analyze(PooledTo4(), (1, 3, 32, 32), split="conv2")
    message = str(info.value)
    assert message.startswith("split='conv2' ends at 'conv2', which is not local: 'pool' "
                              "adaptive pooling: each output averages a fraction of the whole "
                              "image (module 'pool', ")
    assert "Hint: choose an earlier module" in message


def test_split_at_the_non_local_node_itself():
    with pytest.raises(fxstream.SplitError,
                       match=re.escape("split='pool' ends at 'pool', which is not local: 'pool' "
                                       "adaptive pooling: each output averages a fraction of "
                                       "the whole image")):
        fxstream.analyze(PooledTo4(), (1, 3, 32, 32), split="pool")


def test_split_that_names_nothing():
    with pytest.raises(fxstream.SplitError,
                       match=re.escape("split='layer9' names no node and no module of the "
                                       "traced graph")):
        analyze("se", split="layer9")


def test_split_at_a_shape_value_is_not_an_image_tensor():
    with pytest.raises(fxstream.SplitError,
                       match=re.escape("split='size' ends at 'size', which is not an image "
                                       "tensor")):
        analyze("unet", split="size")


def test_split_error_is_an_fxstream_error():
    assert issubclass(fxstream.SplitError, fxstream.FxStreamError)
