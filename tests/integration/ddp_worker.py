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


MATCHED = {"rank": 4, "error_feedback": "off", "dense_steps": 2}
"""PowerSGD as torch's hook is set below: error feedback off (torch's memory keeps the
input less the *mean* approximation, edgeddl's less the rank's own), compression from the
third step."""
LAYOUT: list[Any] = []
"""The bucket's layout in the edgeddl PowerSGD run, for torch's to start from its Q."""


def torch_powersgd(ddp: DDP) -> Any:
    """torch's own PowerSGD hook with the settings of MATCHED, starting from the Q that
    edgeddl's PowerSGD draws for the same bucket."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

    from edgeddl.compress.lowrank import PowerSGD

    state = ps.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=MATCHED["rank"],
        start_powerSGD_iter=MATCHED["dense_steps"],
        min_compression_rate=1,  # edgeddl compresses a matrix whenever its factors are smaller
        use_error_feedback=False,
        warm_start=True,
    )
    ddp.register_comm_hook(state, ps.powerSGD_hook)
    layout = LAYOUT[0]
    q = PowerSGD(layout, MATCHED["rank"], seed=0).state_dict()["q"]
    p_len = sum(s[0] * min(MATCHED["rank"], s[0], s[1]) for s in layout.shapes if len(s) == 2)
    return state, q, p_len


def train(mode: str, options: dict[str, Any]) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    ddp = DDP(model)
    state, torch_state = None, None
    if mode == "torch_powersgd":
        torch_state, q, p_len = torch_powersgd(ddp)
    elif mode != "plain":
        state = CompressionState(mode, **options)
        ddp.register_comm_hook(state, compression_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = data(rank, world)
    gen = torch.Generator().manual_seed(rank)
    trajectory, losses = [], []
    for step in range(STEPS):
        if torch_state is not None and step == MATCHED["dense_steps"]:  # its first Q: ours
            torch_state.p_memory_dict[0] = torch.empty(p_len)
            torch_state.q_memory_dict[0] = q.clone()
        rows = torch.randint(0, len(x), (BATCH,), generator=gen)
        loss = nn.functional.cross_entropy(ddp(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        trajectory.append(torch.cat([p.detach().flatten() for p in model.parameters()]).tolist())
    if mode == "powersgd" and options == MATCHED:
        LAYOUT.append(state.buckets[0].layout)  # type: ignore[union-attr]
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    flat = torch.tensor(trajectory[-1])
    same = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(same, flat)
    return {
        "trajectory": trajectory
        if mode in ("plain", "none", "torch_powersgd") or options == MATCHED
        else [],
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
        "powersgd_matched": ("powersgd", MATCHED),
        "torch_powersgd": ("torch_powersgd", {}),
    }
    result = {name: train(mode, opts) for name, (mode, opts) in runs.items()}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
