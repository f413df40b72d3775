"""Train torchvision's ResNet-18 on whole synthetic slides, read tile by tile from tiled TIFFs.

Writes a few synthetic H&E-like pyramid TIFF slides (``make_slides.py``; half of them hide
lesions of large dark nuclei, the label), then trains ResNet-18 with frozen BatchNorm (its
statistics estimated on the slides' thumbnails first: no pretrained weights are downloaded) on
whole slides: a ``Dataset`` returns ``fxstream.image(path, level=...)`` views (which read nothing until
a tile needs its pixels, and pickle by reference, so DataLoader workers work), the streamed
model reads each tile's pixels in uint8 and normalises them in its stem, and every step is exact.
A rich progress bar shows the slides of each epoch and, below it, the tiles of each pass. With
matplotlib installed, the loss and accuracy per epoch go to a PNG.

    python examples/train_slides.py                                   # short: 6 slides of 1024²
    python examples/train_slides.py --size 8192 --count 8 --epochs 5 --budget 4GiB --plot train.png

The default run is a smoke test (a few minutes on two CPU cores), not a trained model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import fxstream  # noqa: E402
from make_slides import make_slide  # noqa: E402


class SlideDataset(torch.utils.data.Dataset):
    """``(fxstream.image(slide, level), label)`` for every slide of a ``slides.json``."""

    def __init__(self, folder: Path, level: int = 0):
        self.folder, self.level = Path(folder), level
        self.slides = json.loads((self.folder / "slides.json").read_text())

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, i):
        s = self.slides[i]
        return fxstream.image(self.folder / s["file"], level=self.level), s["label"]


def first(batch):
    """Batches of one slide: the image and its label as they are (slides differ in size)."""
    (img, label), = batch
    return img, torch.tensor([label])


class Normalized(nn.Module):
    """uint8 RGB in: ImageNet normalisation (part of the streamed stem), then the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x):
        return self.model((x.float() / 255 - self.mean) / self.std)


def calibrate_batchnorm(model: nn.Module, dataset: SlideDataset) -> None:
    """Estimate every BatchNorm's running statistics on the slides' smallest pyramid levels
    (read whole: they are thumbnails), before :func:`fxstream.freeze_batchnorm` fixes them. A
    freshly initialised ResNet with frozen statistics (mean 0, variance 1) does not normalise
    at all, and its logits reach the hundreds."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the thumbnails
    model.train()
    with torch.no_grad():
        for s in dataset.slides:
            thumb = fxstream.image(dataset.folder / s["file"], level=len(s["levels"]) - 1)
            model(thumb.read())
    for m in norms:
        m.momentum = 0.1


def write_slides(folder: Path, size: int, count: int, lesions: int, seed: int) -> None:
    """``count`` slides, every other one with ``lesions`` lesions, and their ``slides.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = []
    for i in range(count):
        d = make_slide(folder / f"slide_{i:03d}.tif", size, tile=256 if size <= 2048 else 512,
                       lesions=lesions if i % 2 else 0, seed=seed + i)
        manifest.append(d)
        print(f"wrote {folder / d['file']}: {size}², label {d['label']}", flush=True)
    (folder / "slides.json").write_text(json.dumps(manifest, indent=1))


def plot(history, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [h["loss"] for h in history], marker="o")
    a.set(xlabel="epoch", ylabel="mean loss", title="training loss")
    b.plot(epochs, [h["accuracy"] for h in history], marker="o", color="tab:green")
    b.set(xlabel="epoch", ylabel="accuracy", ylim=(-0.05, 1.05), title="training accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", default="slides_train", help="folder of slides (written if "
                                                            "it has no slides.json)")
    p.add_argument("--size", type=int, default=1024, help="slide size (default 1024)")
    p.add_argument("--count", type=int, default=6, help="slides to write (default 6)")
    p.add_argument("--lesions", type=int, default=3, help="lesions per positive slide")
    p.add_argument("--level", type=int, default=0, help="pyramid level to train on")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4,
                   help="Adam learning rate (default 1e-4: BatchNorm is frozen, so larger "
                        "first steps blow the logits up)")
    p.add_argument("--tile", type=int, help="tile size (instead of --budget)")
    p.add_argument("--budget", default="auto", help="memory budget, e.g. 4GiB (default auto)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--plot", default="train_slides.png", help="PNG of loss and accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    import torchvision
    from rich.progress import Progress

    folder = Path(args.slides)
    if not (folder / "slides.json").exists():
        write_slides(folder, args.size, args.count, args.lesions, args.seed)
    data = torch.utils.data.DataLoader(SlideDataset(folder, args.level), batch_size=1,
                                       shuffle=True, collate_fn=first,
                                       num_workers=args.workers,
                                       generator=torch.Generator().manual_seed(args.seed))
    torch.manual_seed(args.seed)
    model = Normalized(torchvision.models.resnet18(num_classes=2))
    calibrate_batchnorm(model, data.dataset)
    fxstream.freeze_batchnorm(model)
    history = []
    with Progress(disable=args.no_progress, transient=False) as bars:
        tiles = False if args.no_progress else fxstream.TileProgress(bars=bars)
        streamed = fxstream.compile(model, tile_size=args.tile,
                                    memory_budget=None if args.tile else args.budget,
                                    progress=tiles)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        model.train()
        for epoch in range(1, args.epochs + 1):
            task = bars.add_task(f"epoch {epoch}", total=len(data.dataset))
            losses, correct, start = [], 0, time.perf_counter()
            for img, label in data:
                opt.zero_grad()
                logits = streamed(img)
                loss = nn.functional.cross_entropy(logits, label)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                correct += int(logits.argmax(1).item() == label.item())
                bars.advance(task)
            bars.remove_task(task)
            row = {"epoch": epoch, "loss": sum(losses) / len(losses),
                   "accuracy": correct / len(losses), "seconds": time.perf_counter() - start}
            history.append(row)
            bars.console.print(f"epoch {epoch}: loss {row['loss']:.4f}, accuracy "
                               f"{row['accuracy']:.2f}, {row['seconds']:.0f} s")
    plan = streamed.engines[0].spec if streamed.engines else None
    if plan is not None:
        print(f"plan of the last slide: {[e.spec.num_tiles for e in streamed.engines]} tiles "
              f"of {[list(e.spec.tile_size) for e in streamed.engines]} per pass")
    if args.plot:
        plot(history, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
