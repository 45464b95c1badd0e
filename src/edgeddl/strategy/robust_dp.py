"""Data-parallel SGD whose server looks at each device's gradient: robust rules, attacks.

The fused pass of `DataParallel` only yields the sum of the devices' gradients, which is all
a trusting mean needs. A screen, a robust rule (median, trimmed mean, Krum) or a simulated
misbehaving device needs each device's own gradient, so this strategy computes them one
device at a time (`per_device.py`, BatchNorm kept exact), lets each device's behaviour
change what it sends, and hands the arrived gradients to the `RobustAggregator`. The dense
float32 payload, and so the bytes on the wire, are the same as the fused path's.

BatchNorm running statistics are folded in from the devices whose gradient passed the
screen, weighted by samples (the rule itself only sees gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgeddl.security.robust import aggregate
from edgeddl.strategy.data_parallel import DataParallel, Exchange, dense_body
from edgeddl.strategy.per_device import DeviceGradients, apply_batchnorm_stats


@dataclass(slots=True)
class _Work:
    grads: DeviceGradients
    sent: list[torch.Tensor]
    """What each device sent: its gradient, after its behaviour."""


class RobustDataParallel(DataParallel):
    """`DataParallel` with per-device gradients, misbehaviour and a robust rule."""

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], devices: np.ndarray, step: int
    ) -> Exchange:
        ids = devices.tolist()
        g = self.device_gradients(x, y, counts, ids)
        sent = self.behaviors.tamper(g.grads, ids, step) if self.behaviors else g.grads
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
