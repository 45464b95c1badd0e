"""One rank of `torchrun --nproc-per-node 2 ddp_worker.py OUT.json`, for test_ddp_hooks.py:
the same model trained with plain DDP and with edgeddl's comm hooks, on sklearn's digits
(each rank its own half). Rank 0 writes what each run did."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from edgeddl.ddp import CompressionState, compression_hook

STEPS, BATCH = 60, 32


def data(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    return x[rank::world], y[rank::world]


def train(mode: str, options: dict[str, Any]) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    ddp = DDP(model)
    state = None
    if mode != "plain":
        state = CompressionState(mode, **options)
        ddp.register_comm_hook(state, compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = data(rank, world)
    gen = torch.Generator().manual_seed(rank)
    trajectory, losses = [], []
    for _ in range(STEPS):
        rows = torch.randint(0, len(x), (BATCH,), generator=gen)
        loss = nn.functional.cross_entropy(ddp(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        trajectory.append(torch.cat([p.detach().flatten() for p in model.parameters()]).tolist())
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    flat = torch.tensor(trajectory[-1])
    same = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(same, flat)
    return {
        "trajectory": trajectory if mode in ("plain", "none") else [],
        "first_loss": sum(losses[:5]) / 5,
        "last_loss": sum(losses[-5:]) / 5,
        "accuracy": acc,
        "replicas_equal": all(torch.equal(same[0], s) for s in same),
        "bytes_sent": state.bytes_sent if state else 0,
        "dense_bytes": state.dense_bytes if state else 0,
    }


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    runs = {
        "plain": ("plain", {}),
        "none": ("none", {}),
        "two_step": ("two_step", {"density": 0.05}),
        "topk": ("topk", {"density": 0.05}),
        "randomk": ("randomk", {"density": 0.25}),
        "qsgd": ("qsgd", {"levels": 8}),
        "powersgd": ("powersgd", {"rank": 4}),
        "dgc": ("dgc", {"density": 0.05}),
        "fp16": ("fp16", {}),
    }
    result = {name: train(mode, opts) for name, (mode, opts) in runs.items()}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
