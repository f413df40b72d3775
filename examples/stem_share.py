"""How much of each model's forward work streams: ``Analysis.stem_share`` for the models whose
global statistics (squeeze-excitation, GroupNorm, InstanceNorm, GRN) used to end the stem.

    python examples/stem_share.py            # 1024², the table in the README
    python examples/stem_share.py --size 512 --models efficientnet_b0,monai_unet

Needs torchvision and timm (the dev extra) and MONAI (also in the dev extra).
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn as nn


def _tv(name, **kw):
    def build():
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kw)
    return build


def _timm(name):
    def build():
        import timm

        return timm.create_model(name, pretrained=False)
    return build


def _monai(name):
    def build():
        from monai.networks import nets

        kw = dict(spatial_dims=2, in_channels=3, out_channels=2)
        if name == "UNet":
            return nets.UNet(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), **kw)
        if name == "DynUNet":
            return nets.DynUNet(kernel_size=[3] * 5, strides=[1, 2, 2, 2, 2],
                                upsample_kernel_size=[2] * 4, **kw)
        return nets.SegResNet(spatial_dims=2, in_channels=3, out_channels=2)
    return build


def _in_unet():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.test_statistics import InstanceNormUNet

    return InstanceNormUNet()


MODELS = {
    "efficientnet_b0": _tv("efficientnet_b0"),
    "efficientnet_v2_s": _tv("efficientnet_v2_s"),
    "mobilenet_v3_large": _tv("mobilenet_v3_large"),
    "regnet_y_400mf": _tv("regnet_y_400mf"),
    "seresnet50": _timm("seresnet50"),
    "convnextv2_atto": _timm("convnextv2_atto"),
    "groupnorm_resnet50": _tv("resnet50", norm_layer=lambda c: nn.GroupNorm(32, c)),
    "monai_unet": _monai("UNet"),
    "monai_dynunet": _monai("DynUNet"),
    "monai_segresnet": _monai("SegResNet"),
    "instancenorm_unet": _in_unet,
}


def main(argv=None) -> int:
    import fxstream

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = MODELS[name]().eval()
        t0 = time.perf_counter()
        a = fxstream.analyze(model, (1, 3, args.size, args.size))
        head = a.global_rows[0] if a.global_rows else None
        print(f"{name:20s} stem share {a.stem_share:7.2%}  boundary {', '.join(a.boundary)[:40]:40s}"
              f"  first global: {head.name if head else '-'}  ({time.perf_counter() - t0:.1f} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
