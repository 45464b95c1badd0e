"""Each device's own gradient, one pass per device, with BatchNorm kept exact.

Compression is not linear, so a compressed step needs every device's gradient on its own
(the fused pass in `fused.py` only gives their sum). Each device runs its own forward and
backward pass on its share; its BatchNorm layers normalise with its own batch, as on the real
device. Running statistics are not updated during these passes: each device's batch
statistics are captured instead (each device's means and variances end to end, the `stats`
of its `Update`), and `apply_batchnorm_mean` later folds in the sample-weighted mean of
those whose work arrived, exactly as the fused path does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgeddl.strategy.base import Update
from edgeddl.strategy.fused import batchnorm_layers

BatchNorm = nn.modules.batchnorm._BatchNorm


@dataclass(slots=True)
class DeviceGradients:
    grads: list[torch.Tensor]
    """Each device's mean gradient, flattened (all parameters end to end, float32)."""
    losses: torch.Tensor
    """Each device's mean loss (detached)."""
    stats: list[torch.Tensor]
    """Each device's BatchNorm batch statistics, flat: per tracking layer its batch mean,
    then its unbiased batch variance (empty tensors without BatchNorm)."""


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
    grads, losses, stats = [], [], []
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
            own = [t for m in bns for t in (m.running_mean, m.running_var)]
            stats.append(torch.cat(own) if own else torch.zeros(0))  # type: ignore[arg-type]
    finally:
        for m, (momentum, mean, var, nbt) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(nbt)  # type: ignore[union-attr]
            m.running_mean.copy_(mean)  # type: ignore[union-attr]
            m.running_var.copy_(var)  # type: ignore[union-attr]
    return DeviceGradients(grads=grads, losses=torch.stack(losses), stats=stats)


def batch_stats(updates: list[Update]) -> list[torch.Tensor]:
    """The updates' BatchNorm batch statistics (every data-parallel update has them)."""
    return [u.batch_stats for u in updates if u.batch_stats is not None]


def batchnorm_stats_size(layers: list[BatchNorm]) -> int:
    """Values one device's BatchNorm statistics take (a mean and a variance per channel)."""
    return 2 * sum(int(m.num_features) for m in tracking_batchnorms(layers))


def weighted_mean(parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i weights[i] * parts[i], in order (the weights already sum to 1)."""
    out = weights[0] * parts[0]
    for w, p in zip(weights[1:], parts[1:], strict=True):
        out = out + w * p
    return out


@torch.no_grad()
def apply_batchnorm_mean(model: nn.Module, flat: torch.Tensor, layers: list[BatchNorm]) -> None:
    """Update running statistics with a step's mean batch statistics (`flat`, laid out as
    `DeviceGradients.stats`): one update per step, momentum applied once, as the fused pass
    does."""
    at = 0
    for m in tracking_batchnorms(layers):
        nbt = m.num_batches_tracked
        assert nbt is not None and m.running_mean is not None and m.running_var is not None
        n = int(m.num_features)
        mean, var = flat[at : at + n], flat[at + n : at + 2 * n]
        at += 2 * n
        nbt.add_(1)
        momentum = m.momentum if m.momentum is not None else 1.0 / float(nbt)
        m.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        m.running_var.mul_(1 - momentum).add_(var, alpha=momentum)
