"""Random CNN stems for the fuzzer (:mod:`tests.test_fuzz`): specs as plain tuples, and the
float64 modules they describe.

A :class:`Spec` is a spatial rank, a channel count, a list of blocks and a head. Each block is a
``(kind, params)`` pair whose params are a sorted tuple of ``(name, value)`` items, so a shrunk
failure prints as a literal that :func:`build` turns back into the same model (weights from
``seed``). Every block maps ``C`` channels to ``C`` channels; the spatial size may change.

Vocabulary (the geometry rule table's): N-d convs (every padding mode, ``"same"``, dilation,
groups, stride, tuple kernels, the functional form), transposed convs, max/avg/LP pools (with
``ceil_mode``), nearest/bilinear/nearest-exact/area resizing at integer ratios, ``F.pad``
(constant, negative crops, reflect, replicate) and the pad modules, slicing and ``narrow``,
residual adds (plain and strided with a projection), concatenated branches, a U-Net block with
its pad-to-match (a crop at odd sizes), eval and train-mode BatchNorm, GroupNorm, InstanceNorm,
squeeze-excitation, activations; circular padding (non-local: the stem must end before it);
auxiliary outputs at any block; heads: the dense map, a spatial mean or ``amax`` with a linear
layer, adaptive pooling.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

# ---------------------------------------------------------------------------------------------
# specs


@dataclass(frozen=True)
class Spec:
    ndim: int
    channels: int
    blocks: tuple  # ((kind, ((name, value), ...)), ...)
    head: str = "dense"  # dense | mean_linear | amax_linear | adaptive | circular_mean
    aux: tuple = ()  # block indices after which an auxiliary output is taken
    aux_conv: bool = False  # the auxiliary outputs go through a 1x1 conv first
    batch: int = 1
    seed: int = 0

    def kinds(self) -> set[str]:
        out = set()

        def walk(blocks):
            for kind, params in blocks:
                out.add(kind)
                p = dict(params)
                for key in ("branch", "left", "right", "inner"):
                    if key in p:
                        walk(p[key])

        walk(self.blocks)
        return out

    @property
    def train(self) -> bool:
        """Whether the model runs in train mode (train-mode BatchNorm somewhere)."""
        return "bn_train" in self.kinds()


def block(kind: str, **params):
    return (kind, tuple(sorted(params.items())))


# ---------------------------------------------------------------------------------------------
# modules


def _nd(ndim, cls1, cls2, cls3):
    return (cls1, cls2, cls3)[ndim - 1]


class Fn(nn.Module):
    """``fn(x, *args, **kwargs)`` called in forward (traced as a function node)."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def forward(self, x):
        return self.fn(x, *self.args, **self.kwargs)


class ConvFn(nn.Module):
    """A conv called as ``F.convNd(x, weight, bias, ...)``."""

    def __init__(self, fn, layer, **kwargs):
        super().__init__()
        self.fn, self.kwargs = fn, kwargs
        self.weight, self.bias = layer.weight, layer.bias

    def forward(self, x):
        return self.fn(x, self.weight, self.bias, **self.kwargs)


class Crop(nn.Module):
    def __init__(self, nd, lo, hi, step, how):
        super().__init__()
        self.nd, self.lo, self.hi, self.step, self.how = nd, lo, hi, step, how

    def forward(self, x):
        nd = self.nd
        if self.how == "narrow":
            for j in range(nd):
                x = x.narrow(2 + j, self.lo, x.shape[2 + j] - self.lo - self.hi)
            return x
        index = [Ellipsis]
        for j in range(nd):
            if self.how == "shape":
                stop = x.shape[2 + j] - self.hi
            else:
                stop = -self.hi if self.hi else None
            index.append(slice(self.lo, stop, self.step))
        return x[tuple(index)]


class Pad(nn.Module):
    def __init__(self, nd, lo, hi, mode, value):
        super().__init__()
        self.nd, self.lo, self.hi, self.mode, self.value = nd, lo, hi, mode, value

    def forward(self, x):
        pads = [self.lo, self.hi] * self.nd
        if self.mode == "constant":
            return F.pad(x, pads, value=self.value)
        return F.pad(x, pads, mode=self.mode)


class AreaDown(nn.Module):
    """Pad the end to a multiple of ``f`` (shape-derived), then area-resize by ``1/f``."""

    def __init__(self, nd, f, by_size):
        super().__init__()
        self.nd, self.f, self.by_size = nd, f, by_size

    def forward(self, x):
        nd = self.nd
        pads = []
        for j in reversed(range(nd)):
            pads += [0, (-x.shape[2 + j]) % self.f]
        x = F.pad(x, pads)
        if self.by_size:
            return F.interpolate(x, size=[x.shape[2 + j] // self.f for j in range(nd)],
                                 mode="area")
        return F.interpolate(x, scale_factor=1 / self.f, mode="area")


class Interp(nn.Module):
    def __init__(self, nd, f, mode):
        super().__init__()
        self.nd, self.f, self.mode = nd, f, mode

    def forward(self, x):
        mode = self.mode
        align = None
        if mode == "linear":
            mode = ("linear", "bilinear", "trilinear")[self.nd - 1]
            align = False
        return F.interpolate(x, scale_factor=float(self.f), mode=mode, align_corners=align)


class SE(nn.Module):
    """Squeeze-excitation: spatial mean -> 1x1 conv -> ReLU -> 1x1 conv -> sigmoid gate."""

    def __init__(self, ndim, c, hidden):
        super().__init__()
        conv = _nd(ndim, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        self.fc1, self.fc2 = conv(c, hidden, 1), conv(hidden, c, 1)
        self.dims = tuple(range(2, 2 + ndim))

    def forward(self, x):
        dims = self.dims
        s = self.fc2(torch.relu(self.fc1(x.mean(dims, keepdim=True))))
        return x * torch.sigmoid(s)


class Seq(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Residual(nn.Module):
    """``x + branch(x)``, or ``proj(x) + branch(x)`` for a strided branch."""

    def __init__(self, branch, proj=None):
        super().__init__()
        self.branch, self.proj = branch, proj

    def forward(self, x):
        skip = self.proj(x) if self.proj is not None else x
        return skip + self.branch(x)


class CatJoin(nn.Module):
    """``fuse(cat([left(x), right(x)], 1))``: two branches concatenated, back to C channels."""

    def __init__(self, left, right, fuse):
        super().__init__()
        self.left, self.right, self.fuse = left, right, fuse

    def forward(self, x):
        return self.fuse(torch.cat([self.left(x), self.right(x)], 1))


class UNet(nn.Module):
    """down -> inner -> up -> pad to the skip's size (a crop where the upsampled map is larger)
    -> cat with the skip -> fuse back to C channels."""

    def __init__(self, nd, down, inner, up, fuse):
        super().__init__()
        self.nd, self.down, self.inner, self.up, self.fuse = nd, down, inner, up, fuse

    def forward(self, x):
        u = self.up(self.inner(self.down(x)))
        pads = []
        for j in reversed(range(self.nd)):
            d = x.shape[2 + j] - u.shape[2 + j]
            pads += [d // 2, d - d // 2]
        u = F.pad(u, pads)
        return self.fuse(torch.cat([x, u], 1))


def _conv(ndim, cin, cout, k=1, **kw):
    return _nd(ndim, nn.Conv1d, nn.Conv2d, nn.Conv3d)(cin, cout, k, **kw)


def _kernel(k, ndim):
    """An int, or a tuple for the first axes (the other axes repeat its last value)."""
    if isinstance(k, tuple):
        return tuple(k[j] if j < len(k) else k[-1] for j in range(ndim))
    return k


def make(b, ndim: int, c: int) -> nn.Module:
    kind, params = b
    p = dict(params)
    if kind == "conv":
        kw = dict(stride=p["s"], padding=p["p"], dilation=p["d"], groups=p["g"],
                  bias=p.get("bias", True))
        k = _kernel(p["k"], ndim)
        if p.get("fn"):
            layer = _conv(ndim, c, c, k, **kw)
            fn = _nd(ndim, F.conv1d, F.conv2d, F.conv3d)
            kw.pop("bias")
            return ConvFn(fn, layer, **kw)
        return _conv(ndim, c, c, k, padding_mode=p["mode"], **kw)
    if kind == "convT":
        cls = _nd(ndim, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        return cls(c, c, p["k"], stride=p["s"], padding=p["p"], output_padding=p["op"],
                   dilation=p["d"], groups=p["g"])
    if kind == "maxpool":
        cls = _nd(ndim, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
        return cls(p["k"], p["s"], p["p"], dilation=p["d"], ceil_mode=p["ceil"])
    if kind == "avgpool":
        cls = _nd(ndim, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
        return cls(p["k"], p["s"], p["p"], ceil_mode=p["ceil"], count_include_pad=p["incl"])
    if kind == "lppool":
        cls = _nd(ndim, nn.LPPool1d, nn.LPPool2d, nn.LPPool3d)
        return cls(p["norm"], p["k"], p["s"], ceil_mode=p["ceil"])
    if kind == "up":
        if p.get("module"):
            mode = p["mode"]
            if mode == "linear":
                mode = ("linear", "bilinear", "trilinear")[ndim - 1]
            return nn.Upsample(scale_factor=float(p["f"]), mode=mode,
                               align_corners=False if p["mode"] == "linear" else None)
        return Interp(ndim, p["f"], p["mode"])
    if kind == "area_down":
        return AreaDown(ndim, p["f"], p["by_size"])
    if kind == "pad":
        if p.get("module") and p["lo"] >= 0 and p["hi"] >= 0:
            pads = (p["lo"], p["hi"]) * ndim
            if p["mode"] == "constant":
                return _nd(ndim, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)(
                    pads, p["value"])
            if p["mode"] == "reflect":
                return _nd(ndim, nn.ReflectionPad1d, nn.ReflectionPad2d,
                           nn.ReflectionPad3d)(pads)
            return _nd(ndim, nn.ReplicationPad1d, nn.ReplicationPad2d,
                       nn.ReplicationPad3d)(pads)
        return Pad(ndim, p["lo"], p["hi"], p["mode"], p["value"])
    if kind == "crop":
        return Crop(ndim, p["lo"], p["hi"], p["step"], p["how"])
    if kind == "act":
        return {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU(), "tanh": nn.Tanh(),
                "leaky": nn.LeakyReLU(0.1), "hardswish": nn.Hardswish(), "elu": nn.ELU(),
                "sigmoid": nn.Sigmoid(), "relu_inplace": nn.ReLU(inplace=True),
                "prelu": nn.PReLU(c)}[p["fn"]]
    if kind in ("bn", "bn_train"):
        return _nd(ndim, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)(
            c, momentum=p.get("momentum", 0.1))
    if kind == "gn":
        return nn.GroupNorm(p["groups"], c, affine=p["affine"])
    if kind == "in":
        return _nd(ndim, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)(
            c, affine=p["affine"])
    if kind == "se":
        return SE(ndim, c, p["hidden"])
    if kind == "residual":
        branch = Seq([make(x, ndim, c) for x in p["branch"]])
        proj = None
        if p["proj"] == "conv1x1_s2":
            proj = _conv(ndim, c, c, 1, stride=2)
        elif p["proj"] == "maxpool2":
            proj = _nd(ndim, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)(2)
        return Residual(branch, proj)
    if kind == "cat":
        left = Seq([make(x, ndim, c) for x in p["left"]])
        right = Seq([make(x, ndim, c) for x in p["right"]])
        return CatJoin(left, right, _conv(ndim, 2 * c, c, p["fuse_k"], padding=p["fuse_k"] // 2))
    if kind == "unet":
        if p["down"] == "maxpool2":
            down = _nd(ndim, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)(2)
        elif p["down"] == "conv_s2_p1":
            down = _conv(ndim, c, c, 3, stride=2, padding=1)
        else:
            down = _conv(ndim, c, c, 2, stride=2)
        inner = Seq([make(x, ndim, c) for x in p["inner"]])
        if p["up"] == "convT":
            up = _nd(ndim, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)(
                c, c, 2, stride=2)
        else:
            up = Interp(ndim, 2, p["up"])
        return UNet(ndim, down, inner, up, _conv(ndim, 2 * c, c, 3, padding=1))
    if kind == "circular":
        return _conv(ndim, c, c, 3, padding=1, padding_mode="circular")
    raise ValueError(f"unknown block kind {kind!r}")


class Stem(nn.Module):
    """The blocks in order, auxiliary outputs after some of them, then the head."""

    def __init__(self, spec: Spec):
        super().__init__()
        nd, c = spec.ndim, spec.channels
        self.ndim, self.head_kind, self.aux_at = nd, spec.head, tuple(spec.aux)
        self.blocks = nn.ModuleList([make(b, nd, c) for b in spec.blocks])
        self.aux = nn.ModuleList([_conv(nd, c, 2, 1) if spec.aux_conv else nn.Identity()
                                  for _ in spec.aux])
        if spec.head == "circular_mean":
            self.head = _conv(nd, c, c, 3, padding=1, padding_mode="circular")
        elif spec.head == "adaptive":
            self.head = nn.Sequential(
                _nd(nd, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)(1),
                nn.Flatten(), nn.Linear(c, 3))
        elif spec.head != "dense":
            self.head = nn.Linear(c, 3)

    def forward(self, x):
        extra = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            for j, at in enumerate(self.aux_at):
                if at == i:
                    extra.append(self.aux[j](x))
        dims = tuple(range(2, 2 + self.ndim))
        if self.head_kind == "mean_linear":
            x = self.head(x.mean(dims))
        elif self.head_kind == "amax_linear":
            x = self.head(x.amax(dims))
        elif self.head_kind == "circular_mean":
            x = self.head(x).mean(dims)
        elif self.head_kind == "adaptive":
            x = self.head(x)
        if extra:
            return (x, *extra)
        return x


def build(spec: Spec) -> Stem:
    """The float64 model of ``spec``: weights from ``spec.seed``, BatchNorm with random running
    statistics, train mode where the spec has train-mode BatchNorm (else eval)."""
    torch.manual_seed(spec.seed)
    model = Stem(spec).double()
    gen = torch.Generator().manual_seed(spec.seed + 1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen,
                                             dtype=torch.float64) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen,
                                           dtype=torch.float64) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen,
                                          dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=torch.float64))
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m in _train_bns(model, spec):
            m.train()
    return model


def _train_bns(model, spec):
    """The BatchNorm modules that the spec puts in train mode (kind ``bn_train``)."""
    flags = []

    def walk(blocks):
        for kind, params in blocks:
            p = dict(params)
            if kind in ("bn", "bn_train"):
                flags.append(kind == "bn_train")
            for key in ("branch", "left", "right", "inner"):  # make()'s construction order
                if key in p:
                    walk(p[key])

    walk(spec.blocks)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return [m for m, f in zip(bns, flags) if f]


# ---------------------------------------------------------------------------------------------
# strategies


@dataclass
class _State:
    """What the drawn blocks so far imply: the downsampling factor (at most MAX_DOWN), and
    whether the map may hold exact zeros (after a ReLU: an LP pool's root is not
    differentiable there)."""

    down: int = 1
    zeros: bool = False
    kinds: list = field(default_factory=list)


MAX_DOWN = 4


def _conv_block(draw, ndim, c, state, preserve=False):
    if preserve:  # same size: odd kernel, stride 1, half the dilated reach on both sides
        k = draw(st.sampled_from([1, 3, 5]))
        d = draw(st.sampled_from([1, 1, 2])) if k > 1 else 1
        s, p = 1, d * (k - 1) // 2
        if draw(st.booleans()) and k > 1:
            p = "same"
    else:
        k = draw(st.integers(1, 5))
        d = draw(st.sampled_from([1, 1, 1, 2])) if k > 1 else 1
        s = draw(st.sampled_from([1, 1, 1, 2, 2, 3]))
        if state.down * s > MAX_DOWN:
            s = 1
        reach = d * (k - 1)
        p = draw(st.integers(0, reach + 1))
        if s == 1 and k > 1 and draw(st.integers(0, 5)) == 0:
            p = "same"
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate"]))
    if p == 0:
        mode = "zeros"
    g = draw(st.sampled_from([1, 1, c] + ([2] if c % 2 == 0 else [])))
    fn = mode == "zeros" and p != "same" and draw(st.integers(0, 4)) == 0
    if ndim == 2 and not fn and not preserve and k > 1 and draw(st.integers(0, 4)) == 0:
        k = (k, draw(st.integers(1, 3)))  # a non-square kernel (tuple form)
        if p == "same":
            p = 0
    bias = draw(st.integers(0, 5)) > 0
    if s != 1:
        state.down *= s
    state.zeros = False
    return block("conv", k=k, s=s, p=p, d=d, g=g, mode=mode, fn=fn, bias=bias)


def _leaf_block(draw, ndim, c, state, preserve=False, inplace_ok=False):
    """One block that is not a join. ``preserve``: keeps the spatial size (join branches);
    ``inplace_ok``: an in-place ReLU may come (not on the image, nor on a join's input)."""
    options = ["conv"] * 5 + ["act"] * 4 + ["bn", "gn", "in", "se", "bn_train"]
    if not preserve:
        options += ["convT", "convT", "maxpool", "maxpool", "avgpool", "lppool", "up", "up",
                    "area_down", "pad", "pad", "crop", "crop", "circular"]
    kind = draw(st.sampled_from(options))
    state.kinds.append(kind)
    if kind == "conv":
        return _conv_block(draw, ndim, c, state, preserve)
    if kind == "act":
        fn = draw(st.sampled_from(["relu", "gelu", "silu", "tanh", "leaky", "hardswish",
                                   "elu", "sigmoid", "relu_inplace", "prelu"]))
        if fn == "relu_inplace" and not inplace_ok:
            fn = "relu"
        state.zeros = state.zeros or fn in ("relu", "relu_inplace")
        return block("act", fn=fn)
    if kind in ("bn", "bn_train"):
        state.zeros = False
        return block(kind, momentum=draw(st.sampled_from([0.1, None])) if kind == "bn_train"
                     else 0.1)
    if kind == "gn":
        state.zeros = False
        return block("gn", groups=draw(st.sampled_from([1] + [g for g in (2, c) if c % g == 0])),
                     affine=draw(st.booleans()))
    if kind == "in":
        state.zeros = False
        return block("in", affine=draw(st.booleans()))
    if kind == "se":
        return block("se", hidden=draw(st.integers(1, 3)))
    if kind == "circular":
        return block("circular")
    if kind == "convT":
        s = draw(st.integers(1, 3))
        k = draw(st.integers(1, 4))
        d = draw(st.sampled_from([1, 1, 2]))
        p = draw(st.integers(0, max(0, d * (k - 1))))
        op = draw(st.integers(0, max(0, max(s, d) - 1)))
        g = draw(st.sampled_from([1, 1, c]))
        state.down = max(1, state.down // s) if state.down % s == 0 else state.down
        state.zeros = False
        return block("convT", k=k, s=s, p=p, op=op, d=d, g=g)
    if kind in ("maxpool", "avgpool", "lppool"):
        k = draw(st.integers(1 if kind != "lppool" else 2, 3))
        s = draw(st.integers(1, k))
        if state.down * s > MAX_DOWN:
            s = 1
        state.down *= s
        ceil = draw(st.booleans())
        if kind == "lppool":
            if state.zeros:  # the root of an all-zero window has no derivative
                kind = "avgpool"
            else:
                return block("lppool", k=k, s=s, ceil=ceil, norm=draw(st.sampled_from([1, 2])))
        p = draw(st.integers(0, k // 2))
        if kind == "maxpool":
            d = draw(st.sampled_from([1, 1, 2]))
            return block("maxpool", k=k, s=s, p=p, d=d, ceil=ceil)
        return block("avgpool", k=k, s=s, p=p, ceil=ceil, incl=draw(st.booleans()))
    if kind == "up":
        mode = draw(st.sampled_from(["nearest", "linear", "nearest-exact", "area"]))
        f = draw(st.sampled_from([2, 2, 3])) if mode != "linear" else 2
        return block("up", f=f, mode=mode, module=mode != "area" and draw(st.booleans()))
    if kind == "area_down":
        f = 2 if state.down * 2 <= MAX_DOWN else 1
        if f == 1:
            return block("act", fn="tanh")
        state.down *= f
        return block("area_down", f=f, by_size=draw(st.booleans()))
    if kind == "pad":
        mode = draw(st.sampled_from(["constant", "constant", "reflect", "replicate"]))
        lo = draw(st.integers(-2 if mode == "constant" else 0, 3))
        hi = draw(st.integers(-2 if mode == "constant" else 0, 3))
        return block("pad", lo=lo, hi=hi, mode=mode,
                     value=draw(st.sampled_from([0.0, 0.5])) if mode == "constant" else 0.0,
                     module=draw(st.booleans()))
    if kind == "crop":
        how = draw(st.sampled_from(["slice", "slice", "shape", "narrow"]))
        step = draw(st.sampled_from([1, 1, 2])) if how == "slice" else 1
        if state.down * step > MAX_DOWN:
            step = 1
        state.down *= step
        return block("crop", lo=draw(st.integers(0, 2)), hi=draw(st.integers(0, 2)), step=step,
                     how=how)
    raise AssertionError(kind)


def _block(draw, ndim, c, state, first=False):
    kind = draw(st.sampled_from(["leaf"] * 6 + ["residual", "cat", "unet"]))
    if kind == "leaf":
        return _leaf_block(draw, ndim, c, state, inplace_ok=not first)
    if kind == "residual":
        strided = state.down * 2 <= MAX_DOWN and draw(st.integers(0, 2)) == 0
        branch = [_leaf_block(draw, ndim, c, state, preserve=True)
                  for _ in range(draw(st.integers(1, 3)))]
        proj = "none"
        if strided:
            proj = draw(st.sampled_from(["conv1x1_s2", "maxpool2"]))
            # a first layer that halves like the projection: floor((n - 1) / 2) + 1 for the
            # 1x1 stride-2 conv (and the 3x3 stride-2 conv with padding 1), floor(n / 2) for
            # a 2-window pool (and the 2x2 stride-2 conv)
            first = block("conv", k=3, s=2, p=1, d=1, g=1, mode="zeros", fn=False, bias=True) \
                if proj == "conv1x1_s2" else \
                block("conv", k=2, s=2, p=0, d=1, g=1, mode="zeros", fn=False, bias=True)
            branch = [first] + branch
            state.down *= 2
        state.kinds.append("residual")
        return block("residual", branch=tuple(branch), proj=proj)
    if kind == "cat":
        left = [_leaf_block(draw, ndim, c, state, preserve=True)
                for _ in range(draw(st.integers(0, 2)))]
        right = [_leaf_block(draw, ndim, c, state, preserve=True)
                 for _ in range(draw(st.integers(1, 2)))]
        state.kinds.append("cat")
        return block("cat", left=tuple(left), right=tuple(right),
                     fuse_k=draw(st.sampled_from([1, 3])))
    # unet: the inner blocks run at twice the downsampling, the output at the block's input's
    inner_state = _State(state.down * 2)
    inner = [_leaf_block(draw, ndim, c, inner_state, preserve=True)
             for _ in range(draw(st.integers(0, 2)))]
    state.kinds += ["unet"] + inner_state.kinds
    state.zeros = False
    return block("unet", down=draw(st.sampled_from(["maxpool2", "conv_s2_p1", "conv_k2_s2"])),
                 inner=tuple(inner),
                 up=draw(st.sampled_from(["nearest", "linear", "nearest-exact", "convT"])))


@st.composite
def specs(draw, max_blocks: int = 6):
    ndim = draw(st.sampled_from([1, 2, 2, 2, 2, 3]))
    c = draw(st.integers(2, 4))
    state = _State()
    n = draw(st.integers(1, max_blocks))
    blocks = tuple(_block(draw, ndim, c, state, first=i == 0) for i in range(n))
    head = draw(st.sampled_from(["dense", "dense", "mean_linear", "amax_linear", "adaptive",
                                 "circular_mean"]))
    aux = tuple(sorted(set(draw(st.lists(st.integers(0, n - 1), max_size=2)))))
    if head == "dense" and aux and draw(st.booleans()):
        aux = ()
    return Spec(ndim=ndim, channels=c, blocks=blocks, head=head, aux=aux,
                aux_conv=draw(st.booleans()), batch=draw(st.sampled_from([1, 1, 1, 2])),
                seed=draw(st.integers(0, 2**16)))
