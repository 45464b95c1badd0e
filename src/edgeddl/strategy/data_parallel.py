"""Synchronous data-parallel SGD: the maths of one step, whatever carries the payloads.

Each device computes the mean gradient of the loss on its share of the global batch; the
aggregate is their average weighted by samples; one optimizer step follows (on the parameter
server, or identically on every replica after an all-reduce). Devices whose work was lost
(a crash) are simply left out of the weighted average.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from edgeddl.config.schema import TrainConfig
from edgeddl.strategy.fused import batchnorm_layers, segmented_batchnorm

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class DataParallel:
    """Owns the model and optimizer; `step` applies one synchronous data-parallel update."""

    name = "data_parallel"

    def __init__(
        self, model: nn.Module, cfg: TrainConfig, loss_fn: LossFn = nn.functional.cross_entropy
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.batchnorms = batchnorm_layers(model)
        self.optimizer = torch.optim.SGD(
            self.params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )

    def payload_bytes(self) -> tuple[int, int]:
        """(up, down) bytes per device per step: dense fp32 gradients up, the state down."""
        state = list(self.params) + [b for b in self.model.buffers() if b.is_floating_point()]
        return tensor_bytes(self.params), tensor_bytes(state)

    def aggregation_flops(self) -> float:
        """FLOPs for the aggregator to add one device's contribution (one multiply-add)."""
        return 2.0 * sum(p.numel() for p in self.params)

    def step(self, x: torch.Tensor, y: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """One update from the concatenated batches of the contributing devices.

        `counts[i]` samples of `x` belong to the i-th contributing device, in order. The mean
        loss over all samples has as gradient the sample-weighted mean of per-device mean
        gradients, so one fused pass gives exactly the aggregate. Returns the detached loss
        as a tensor: reading it out would make a GPU wait at every step.
        """
        self.model.train()
        with segmented_batchnorm(self.model, counts, self.batchnorms):
            loss = self.loss_fn(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> tuple[float, float]:
        """(mean loss, accuracy) on a held-out set."""
        self.model.eval()
        total_loss, correct = 0.0, 0
        for i in range(0, len(x), batch):
            out = self.model(x[i : i + batch])
            total_loss += float(self.loss_fn(out, y[i : i + batch])) * len(out)
            correct += int((out.argmax(1) == y[i : i + batch]).sum())
        return total_loss / max(len(x), 1), correct / max(len(x), 1)
