"""The shared model zoo of the test suite.

Two kinds of entries, each a :class:`ZooEntry` in :data:`ZOO`:

- **hand-written** models with tiny widths, cheap enough for float64 exactness tests of the
  streaming runtime on CPU at 64-200 px (``entry.build(dtype=torch.float64)``);
- **torchvision** factories (``weights=None``, eval mode), analysed on fake tensors only.

Every entry records the boundary it is expected to have (fx node names, in graph order), the
node(s) where the head's non-locality starts (``first_global``, empty for a model the stem
covers whole), with that node's reason, and the whole-image reductions the stem streams
(``statistics``: squeeze-excitation's means, a norm's moments; docs/design.md section 7).
``tests/test_models.py`` checks these expectations; other tests may rely on them.

    >>> from tests.zoo import ZOO
    >>> model = ZOO["unet"].build()                 # float32, eval mode, seeded
    >>> ZOO["unet"].boundary
    ('outc',)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------
# hand-written models (tiny widths)


def _conv_bn_relu(cin, cout, k=3, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class UNet(nn.Module):
    """A two-level U-Net, fully convolutional: the whole graph is local.

    Level 2 goes up with a transposed convolution, level 1 with bilinear upsampling
    (``align_corners=False``). Both use the classic pad-to-match of the skip connection, whose
    amounts come from ``x2.size()`` and ``x1.size()`` (non-zero when H or W is not a multiple
    of 4): shape-derived values that must be the same in every tile.
    """

    def __init__(self, cin=3, c=4, cout=2):
        super().__init__()
        self.inc = nn.Sequential(_conv_bn_relu(cin, c), _conv_bn_relu(c, c))
        self.down1 = nn.Sequential(nn.MaxPool2d(2), _conv_bn_relu(c, 2 * c))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), _conv_bn_relu(2 * c, 4 * c))
        self.up1 = nn.ConvTranspose2d(4 * c, 2 * c, kernel_size=2, stride=2)
        self.conv1 = _conv_bn_relu(4 * c, 2 * c)
        self.conv2 = _conv_bn_relu(3 * c, c)
        self.outc = nn.Conv2d(c, cout, 1)

    @staticmethod
    def pad_to(x1, x2):
        diffY = x2.size()[2] - x1.size()[2]
        diffX = x2.size()[3] - x1.size()[3]
        return F.pad(x1, [diffX // 2, diffX - diffX // 2, diffY // 2, diffY - diffY // 2])

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        u = self.pad_to(self.up1(x3), x2)
        u = self.conv1(torch.cat([x2, u], dim=1))
        u = F.interpolate(u, scale_factor=2, mode="bilinear", align_corners=False)
        u = self.pad_to(u, x1)
        u = self.conv2(torch.cat([x1, u], dim=1))
        return self.outc(u)


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=2):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))
        return x * s


class SENet(nn.Module):
    """conv -> relu -> squeeze-excitation -> conv: the SE's global average is a streamed
    whole-image reduction, so the stem covers the whole model (up to ``conv2``)."""

    def __init__(self, cin=3, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, padding=1)
        self.relu = nn.ReLU()
        self.se = SqueezeExcite(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.se(self.relu(self.conv1(x))))


class GroupNormNet(nn.Module):
    """conv -> GroupNorm -> relu -> conv: GroupNorm is taken apart into its moments over the
    image (a streamed reduction) and a pointwise normalisation; the stem covers the whole model."""

    def __init__(self, cin=3, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, padding=1)
        self.gn = nn.GroupNorm(2, c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.relu(self.gn(self.conv1(x))))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, permute to channel-last, LayerNorm, Linear-GELU-Linear, layer scale."""

    def __init__(self, c, expand=2):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pwconv1 = nn.Linear(c, expand * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(expand * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = (self.gamma * y).permute(0, 3, 1, 2)
        return x + y


class ConvNeXtLike(nn.Module):
    """A 2x2/2 patchify stem, two ConvNeXt blocks, then a mean over space and a Linear head
    (the mean is the head's first node: a whole-image reduction of the boundary)."""

    def __init__(self, cin=3, c=4, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(cin, c, 2, stride=2)
        self.block1 = ConvNeXtBlock(c)
        self.block2 = ConvNeXtBlock(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.head(x.mean((-2, -1)))


class ChannelShuffle(nn.Module):
    """ShuffleNet's shuffle: view / transpose / view with sizes read from ``x.size()``."""

    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        b, c, h, w = x.size()
        x = x.view(b, self.groups, c // self.groups, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        return x.view(b, -1, h, w)


class ShuffleNetLike(nn.Module):
    """Grouped 1x1, channel shuffle, depthwise 3x3/2, grouped 1x1: fully local."""

    def __init__(self, cin=3, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, padding=1)
        self.gconv1 = nn.Conv2d(c, c, 1, groups=2)
        self.shuffle = ChannelShuffle(2)
        self.dwconv = nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c)
        self.gconv2 = nn.Conv2d(c, c, 1, groups=2)

    def forward(self, x):
        x = F.relu(self.gconv1(F.relu(self.conv1(x))))
        return self.gconv2(self.dwconv(self.shuffle(x)))


class Pyramid(nn.Module):
    """A tiny FPN: two levels (stride 2 and 4) and two outputs, both local.

    The finer output adds the nearest-upsampled coarse level: a join of two paths with
    different receptive fields on the same grid.
    """

    def __init__(self, cin=3, c=4):
        super().__init__()
        self.stem = nn.Conv2d(cin, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.lat2 = nn.Conv2d(c, c, 1)
        self.lat3 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        c2 = F.relu(self.c2(x))
        c3 = F.relu(self.c3(c2))
        p3 = self.lat3(c3)
        p2 = self.lat2(c2) + F.interpolate(p3, scale_factor=2, mode="nearest")
        return p2, p3


# ---------------------------------------------------------------------------------------------
# entries


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model and what the analysis is expected to find on it.

    ``boundary``: expected boundary node names, in graph order. ``first_global``: the nodes
    where the head's non-locality starts (``Analysis.global_rows``), ``()`` when the stem
    covers the whole model; ``reason``: the first global node's reason. ``statistics``: the
    whole-image reductions inside the stem (non-local stem rows that are their own origin), in
    graph order. ``input_shape``: a shape the model runs at (small for hand-written models, so
    that it can run for real).
    """

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    boundary: tuple[str, ...]
    first_global: tuple[str, ...] = ()
    reason: str = ""
    statistics: tuple[str, ...] = ()
    handwritten: bool = True
    notes: str = ""

    def build(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
        """The model in eval mode, with seeded weights (and random BatchNorm statistics for
        hand-written models, so that eval BatchNorm is not the identity)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.factory()
            if self.handwritten:
                _randomize_norm_stats(model)
        return model.to(dtype).eval()


def _randomize_norm_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


_ADAPTIVE = "adaptive pooling: each output averages a fraction of the whole image"
_GLOBAL_POOL = "adaptive average pooling to 1: the mean of the whole image"

HANDWRITTEN = [
    ZooEntry("unet", UNet, (1, 3, 64, 64), boundary=("outc",),
             notes="whole graph local; pad-to-match amounts are non-zero when H % 4 != 0"),
    ZooEntry("se", SENet, (1, 3, 32, 32), boundary=("conv2",), statistics=("se_pool",),
             notes="the SE's pool is streamed: the whole model is stem"),
    ZooEntry("groupnorm", GroupNormNet, (1, 3, 32, 32), boundary=("conv2",),
             statistics=("moments",),
             notes="'gn' is rewritten into 'moments' and 'normalize': the whole model is stem"),
    ZooEntry("convnext_like", ConvNeXtLike, (1, 3, 32, 32), boundary=("add_1",),
             first_global=("mean",), reason="mean over the whole image"),
    ZooEntry("shufflenet_like", ShuffleNetLike, (1, 3, 32, 32), boundary=("gconv2",)),
    ZooEntry("pyramid", Pyramid, (1, 3, 32, 32), boundary=("lat3", "add"),
             notes="two local outputs: both are boundary tensors; H and W must be multiples "
                   "of 4 (the nearest-upsampled coarse level must match the fine one)"),
]


def _torchvision(name):
    def factory():
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    factory.__name__ = name
    return factory


TORCHVISION = [
    ZooEntry("resnet18", _torchvision("resnet18"), (1, 3, 224, 224),
             boundary=("layer4_1_relu_1",), first_global=("avgpool",), reason=_GLOBAL_POOL,
             handwritten=False),
    ZooEntry("resnet50", _torchvision("resnet50"), (1, 3, 224, 224),
             boundary=("layer4_2_relu_2",), first_global=("avgpool",), reason=_GLOBAL_POOL,
             handwritten=False),
    ZooEntry("densenet121", _torchvision("densenet121"), (1, 3, 224, 224),
             boundary=("relu",), first_global=("adaptive_avg_pool2d",), reason=_GLOBAL_POOL,
             handwritten=False, notes="DenseNet.forward applies F.relu and F.adaptive_avg_pool2d"),
    ZooEntry("vgg16", _torchvision("vgg16"), (1, 3, 224, 224),
             boundary=("features_30",), first_global=("avgpool",), reason=_ADAPTIVE,
             handwritten=False,
             notes="the last MaxPool2d of features; the pool to 7x7 is truly non-local"),
    ZooEntry("vgg11_bn", _torchvision("vgg11_bn"), (1, 3, 224, 224),
             boundary=("features_28",), first_global=("avgpool",), reason=_ADAPTIVE,
             handwritten=False),
    ZooEntry("mobilenet_v2", _torchvision("mobilenet_v2"), (1, 3, 224, 224),
             boundary=("features_18_2",), first_global=("adaptive_avg_pool2d",),
             reason=_GLOBAL_POOL, handwritten=False),
    ZooEntry("convnext_tiny", _torchvision("convnext_tiny"), (1, 3, 224, 224),
             boundary=("add_17",), first_global=("avgpool",), reason=_GLOBAL_POOL,
             handwritten=False,
             notes="needs the stochastic_depth rule; the last block's residual add"),
    ZooEntry("efficientnet_b0", _torchvision("efficientnet_b0"), (1, 3, 224, 224),
             boundary=("features_8_2",), first_global=("avgpool",), reason=_GLOBAL_POOL,
             statistics=("features_1_0_block_1_avgpool",) + tuple(
                 f"features_{stage}_{block}_block_2_avgpool"
                 for stage, blocks in ((2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 1))
                 for block in range(blocks)),
             handwritten=False,
             notes="its 16 squeeze-excitations are streamed: the stem runs up to the last "
                   "conv's SiLU before the classifier's pool"),
]

ZOO: dict[str, ZooEntry] = {e.name: e for e in HANDWRITTEN + TORCHVISION}
HANDWRITTEN_NAMES = tuple(e.name for e in HANDWRITTEN)
TORCHVISION_NAMES = tuple(e.name for e in TORCHVISION)
