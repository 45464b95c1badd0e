"""Data-parallel SGD whose server looks at each device's gradient: robust rules, attacks.

The fused pass only yields the sum of the devices' gradients. A screen, a robust rule or a
misbehaving device needs each one's own, so this strategy computes them one device at a time
and hands them to the `RobustAggregator`; the bytes on the wire are the fused path's. With
`[robust] device_momentum`, devices send their momentum instead of their gradient.
Details: docs/trust.md#robust-data-parallel
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeddl.aggregation.rules import aggregate
from edgeddl.config.schema import TrainConfig
from edgeddl.strategy.base import StepPayloads
from edgeddl.strategy.data_parallel import DataParallel, LossFn
from edgeddl.strategy.per_device import apply_batchnorm_mean, batch_stats, weighted_mean


class DeviceMomentum:
    """Each device's momentum buffer: m <- momentum * m + (gradient + weight_decay * w)."""

    def __init__(self, momentum: float, weight_decay: float) -> None:
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.buffers: dict[int, torch.Tensor] = {}

    def update(
        self, devices: list[int], grads: list[torch.Tensor], weights: torch.Tensor
    ) -> list[torch.Tensor]:
        """Each device's new momentum from its gradient at the flat model `weights`."""
        out = []
        for d, g in zip(devices, grads, strict=True):
            if self.weight_decay:
                g = g + self.weight_decay * weights
            m = self.buffers.get(d)
            self.buffers[d] = g.clone() if m is None else self.momentum * m + g
            out.append(self.buffers[d])
        return out

    def forget(self, device: int) -> None:
        self.buffers.pop(device, None)


class RobustDataParallel(DataParallel):
    """`DataParallel` with per-device gradients, misbehaviour and a robust rule."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        loss_fn: LossFn = nn.functional.cross_entropy,
        device_momentum: bool = False,
    ) -> None:
        # The devices' momentum replaces the coordinator's, weight decay included.
        off = 0.0 if device_momentum else None
        super().__init__(model, cfg, loss_fn, momentum=off, weight_decay=off)
        self.device_momentum = (
            DeviceMomentum(cfg.momentum, cfg.weight_decay) if device_momentum else None
        )

    def forget(self, device: int) -> None:
        """The device crashed: its momentum buffer is gone."""
        if self.device_momentum is not None:
            self.device_momentum.forget(device)

    def _device_side(self, ids: list[int], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """With device momentum, each device sends its momentum buffer, not its gradient."""
        if self.device_momentum is None:
            return grads
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        return self.device_momentum.update(ids, grads, flat)

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], devices: np.ndarray, step: int
    ) -> StepPayloads:
        up = np.full((1, len(devices)), self.dense_up_bytes, dtype=np.int64)
        updates = self.device_updates(x, y, counts, devices.tolist(), step)
        return StepPayloads(devices=devices, counts=counts, step=step, up_bytes=up, updates=updates)

    def commit(self, ex: StepPayloads, contributed: np.ndarray) -> torch.Tensor | None:
        """Screen and combine the arrived gradients, then one optimizer step (none when
        nothing usable arrived)."""
        self._count(ex, contributed)
        arrived = [ex.updates[i] for i in np.flatnonzero(contributed)]
        if not arrived:
            return None
        counts = [round(u.weight) for u in arrived]
        sent = [u.values for u in arrived if u.values is not None]
        if self.robust is not None:
            agg, passed = self.robust.combine(ex.step, [u.device for u in arrived], sent, counts)
        else:  # a ring's all-reduce: the mean of whatever was sent, unscreened
            agg, passed = aggregate(torch.stack(sent), torch.tensor(counts)), list(range(len(sent)))
        if not passed:
            return None
        keep = [arrived[i] for i in passed]
        losses = torch.stack([u.loss for u in keep])
        w = torch.tensor([u.weight for u in keep], dtype=torch.float32, device=losses.device)
        w = w / w.sum()
        if agg is not None:
            mean = weighted_mean(batch_stats(keep), w.tolist())
            apply_batchnorm_mean(self.model, mean, self.batchnorms)
            self.apply(agg)
        return (losses * w).sum()
