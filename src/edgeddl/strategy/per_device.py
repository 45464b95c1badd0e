"""Each device's own gradient, one pass per device, with BatchNorm kept exact.

Compression is not linear, so a compressed step needs every device's gradient on its own
(the fused pass in `fused.py` only gives their sum). Each device runs its own forward and
backward pass on its share; its BatchNorm layers normalise with its own batch, as on the real
device. Running statistics are not updated during these passes: each device's batch
statistics are captured instead, and `apply_batchnorm_stats` later folds in those of the
devices whose work arrived, weighted by samples, exactly as the fused path does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgeddl.strategy.fused import batchnorm_layers

BatchNorm = nn.modules.batchnorm._BatchNorm


@dataclass(slots=True)
class DeviceGradients:
    grads: list[torch.Tensor]
    """Each device's mean gradient, flattened (all parameters end to end, float32)."""
    losses: torch.Tensor
    """Each device's mean loss (detached)."""
    bn_stats: list[list[tuple[torch.Tensor, torch.Tensor]]]
    """Per tracking BatchNorm layer, each device's (batch mean, unbiased batch variance)."""


def tracking_batchnorms(layers: list[BatchNorm]) -> list[BatchNorm]:
    return [
        m
        for m in layers
        if m.training
        and m.track_running_stats
        and m.running_mean is not None
        and m.running_var is not None
    ]


def per_device_gradients(
    model: nn.Module,
    params: list[nn.Parameter],
    loss_fn: nn.Module | object,
    x: torch.Tensor,
    y: torch.Tensor,
    counts: list[int],
    layers: list[BatchNorm] | None = None,
) -> DeviceGradients:
    """One forward/backward pass per device segment of (x, y); running stats untouched."""
    model.train()
    bns = tracking_batchnorms(batchnorm_layers(model) if layers is None else layers)
    saved = [
        (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())  # type: ignore[union-attr]
        for m in bns
    ]
    grads, losses = [], []
    stats: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in bns]
    try:
        for m in bns:
            m.momentum = 1.0  # the running stats become this batch's: read, then restored
        for xs, ys in zip(x.split(counts), y.split(counts), strict=True):
            loss = loss_fn(model(xs), ys)  # type: ignore[operator]
            g = torch.autograd.grad(loss, params, allow_unused=True)
            grads.append(
                torch.cat(
                    [
                        (gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                        for gi, p in zip(g, params, strict=True)
                    ]
                )
            )
            losses.append(loss.detach())
            for k, m in enumerate(bns):
                stats[k].append((m.running_mean.clone(), m.running_var.clone()))  # type: ignore[union-attr]
    finally:
        for m, (momentum, mean, var, nbt) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(nbt)  # type: ignore[union-attr]
            m.running_mean.copy_(mean)  # type: ignore[union-attr]
            m.running_var.copy_(var)  # type: ignore[union-attr]
    return DeviceGradients(grads=grads, losses=torch.stack(losses), bn_stats=stats)


@torch.no_grad()
def apply_batchnorm_stats(
    model: nn.Module,
    stats: list[list[tuple[torch.Tensor, torch.Tensor]]],
    keep: list[int],
    weights: torch.Tensor,
    layers: list[BatchNorm] | None = None,
) -> None:
    """Update running statistics with the weighted mean of the kept devices' batch stats.

    The same rule as the fused pass: one update per step, momentum applied once.
    """
    bns = tracking_batchnorms(batchnorm_layers(model) if layers is None else layers)
    w = weights.tolist()
    for m, per_device in zip(bns, stats, strict=True):
        nbt = m.num_batches_tracked
        assert nbt is not None and m.running_mean is not None and m.running_var is not None
        nbt.add_(1)
        momentum = m.momentum if m.momentum is not None else 1.0 / float(nbt)
        mean = sum(wi * per_device[i][0] for i, wi in zip(keep, w, strict=True))
        var = sum(wi * per_device[i][1] for i, wi in zip(keep, w, strict=True))
        m.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        m.running_var.mul_(1 - momentum).add_(var, alpha=momentum)
