"""Two-step gradient compression in a plain PyTorch DDP script: one added line.

    torchrun --nproc-per-node 2 examples/ddp_two_step.py

Each rank trains the same small network on its half of sklearn's digits; gradients go
through edgeddl's two-step compressor (significant values now, the rest accumulated on the
rank until they are), as encoded bytes all-gathered over gloo. The script prints the loss,
the accuracy and the bytes each rank sent against a dense all-reduce.
"""

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from edgeddl.ddp import CompressionState, compression_hook


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = DDP(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)))
    state = CompressionState("two_step", density=0.05)
    model.register_comm_hook(state, compression_hook)  # the one line
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[rank::world], dtype=torch.float32) / 16.0
    y = torch.tensor(y[rank::world])
    gen = torch.Generator().manual_seed(rank)
    for step in range(300):
        rows = torch.randint(0, len(x), (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step % 100 == 99:
            print(f"step {step + 1}: loss {loss.item():.3f}")
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    if rank == 0:
        share = state.bytes_sent / state.dense_bytes
        print(f"accuracy {accuracy:.3f}; sent {state.bytes_sent} bytes, {share:.1%} of dense")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
