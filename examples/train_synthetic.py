"""Train a small CNN with fxstream on synthetic 4096x4096 images, on the CPU, in minutes.

Each image is noise; half of them hide a few small bright crosses somewhere. The label says
whether there is a cross. The network sees the whole 4096x4096 image every step: its stem is
streamed in 1024-pixel tiles and a global max pool finds the objects wherever they are.

    python examples/train_synthetic.py --steps 40
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

import fxstream


def make_image(label: int, size: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(1, 1, size, size, generator=gen) * 0.5
    if label:
        for _ in range(3):
            i, j = torch.randint(16, size - 16, (2,), generator=gen).tolist()
            x[0, 0, i - 6:i + 7, j - 1:j + 2] += 3.0
            x[0, 0, i - 1:i + 2, j - 6:j + 7] += 3.0
    return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(16, 1)

    def forward(self, x):
        return self.fc(self.pool(self.stem(x)).flatten(1)).squeeze(1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = Net()
    streamed = fxstream.compile(model, tile_size=args.tile)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    window, t0 = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        label = step % 2
        x = make_image(label, args.size, gen)
        loss = loss_fn(streamed(x), torch.tensor([float(label)]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        window.append(loss.item())
        if step % 10 == 0:
            print(f"step {step:4d}  mean loss of last 10 {sum(window) / len(window):.4f}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            window = []


if __name__ == "__main__":
    main()
