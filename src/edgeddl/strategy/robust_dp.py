"""Data-parallel SGD whose server looks at each device's gradient: robust rules, attacks.

The fused pass of `DataParallel` only yields the sum of the devices' gradients, which is all
a trusting mean needs. A screen, a robust rule (median, trimmed mean, Krum) or a simulated
misbehaving device needs each device's own gradient, so this strategy computes them one
device at a time (`per_device.py`, BatchNorm kept exact), lets each device's behaviour
change what it sends, and hands the arrived gradients to the `RobustAggregator`. The dense
float32 payload, and so the bytes on the wire, are the same as the fused path's.

BatchNorm running statistics are folded in from the devices whose gradient passed the
screen, weighted by samples (the rule itself only sees gradients).

With `[robust] device_momentum`, each device keeps the momentum buffer the coordinator's SGD
would have kept (`DeviceMomentum`: heavy ball, weight decay added first, as torch's SGD does)
and sends it instead of its gradient; the coordinator's optimizer then has neither momentum
nor weight decay. With the mean and the same shares every step this is the same update as
the coordinator's momentum; a robust rule compares honest updates whose sampling noise is
averaged over past steps (Karimireddy, He & Jaggi, 2021), which narrows their spread only
where the gradient keeps its direction over those steps (on the robust benchmark, lr 0.1 and
momentum 0.9, it does not: nnm is what closes the gap there). The buffer is the device's
own: a crashed device restarts from zero, and what an attacker sends is its tampered
momentum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgeddl.aggregation.rules import aggregate
from edgeddl.config.schema import TrainConfig
from edgeddl.strategy.data_parallel import DataParallel, Exchange, LossFn, dense_body
from edgeddl.strategy.per_device import DeviceGradients, apply_batchnorm_stats


@dataclass(slots=True)
class _Work:
    grads: DeviceGradients
    sent: list[torch.Tensor]
    """What each device sent: its gradient (or momentum), after its behaviour."""


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

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], devices: np.ndarray, step: int
    ) -> Exchange:
        ids = devices.tolist()
        g = self.device_gradients(x, y, counts, ids)
        updates = g.grads
        if self.device_momentum is not None:
            flat = torch.cat([p.detach().reshape(-1) for p in self.params])
            updates = self.device_momentum.update(ids, g.grads, flat)
        sent = self.behaviors.tamper(updates, ids, step) if self.behaviors else updates
        up = np.full((1, len(devices)), self.dense_up_bytes, dtype=np.int64)
        return Exchange(devices=devices, counts=counts, step=step, up_bytes=up, work=_Work(g, sent))

    def payload_bodies(self, ex: Exchange) -> list[bytes]:
        """Each device's dense gradient as sent (after its behaviour)."""
        work: _Work = ex.work
        return [dense_body(t) for t in work.sent]

    def commit(self, ex: Exchange, contributed: np.ndarray) -> torch.Tensor | None:
        """Screen and combine the arrived gradients, then one optimizer step (none when
        nothing usable arrived)."""
        self._count(ex, contributed)
        arrived = np.flatnonzero(contributed).tolist()
        if not arrived:
            return None
        work: _Work = ex.work
        ids = ex.devices.tolist()
        counts = [ex.counts[i] for i in arrived]
        sent = [work.sent[i] for i in arrived]
        if self.robust is not None:
            agg, passed = self.robust.combine(ex.step, [ids[i] for i in arrived], sent, counts)
        else:  # a ring's all-reduce: the mean of whatever was sent, unscreened
            agg, passed = aggregate(torch.stack(sent), torch.tensor(counts)), list(range(len(sent)))
        if not passed:
            return None
        keep = [arrived[i] for i in passed]
        device = work.grads.losses.device
        w = torch.tensor([ex.counts[i] for i in keep], dtype=torch.float32, device=device)
        w = w / w.sum()
        if agg is not None:
            apply_batchnorm_stats(self.model, work.grads.bn_stats, keep, w, self.batchnorms)
            self.apply(agg)
        return (work.grads.losses[keep] * w).sum()
