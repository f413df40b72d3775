"""DistributedDataParallel over a streamed model: two CPU processes (gloo, loopback) give the
same parameter gradients as one process on the whole batch."""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import fxstream


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2),
    ).double()


def make_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 40, 36, generator=g, dtype=torch.float64)
    w = torch.randn(4, 2, generator=g, dtype=torch.float64)
    return x, w


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = fxstream.freeze_batchnorm(make_model())
        sm = fxstream.compile(model, tile_size=16, input_shape=(2, 3, 40, 36))
        ddp = nn.parallel.DistributedDataParallel(sm)
        x, w = make_batch()
        part = slice(rank * 2, rank * 2 + 2)
        loss = (ddp(x[part]) * w[part]).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32",
                    reason="torch.distributed with gloo is not available")
def test_ddp_gradients_equal_single_process(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    model = fxstream.freeze_batchnorm(make_model())
    x, w = make_batch()
    (model(x) * w).sum().backward()
    for rank in range(2):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        for name, p in model.named_parameters():
            # DDP averages over 2 ranks; the single process summed the two halves' losses
            got, want = grads[name] * 2, p.grad
            rel = (got - want).abs().max() / want.abs().max()
            assert rel <= 1e-10, (rank, name, rel.item())
