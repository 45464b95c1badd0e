"""One forward/backward pass for many devices' batches at once, with exact per-device maths.

Synchronous data-parallel SGD averages the devices' mean gradients weighted by their sample
counts, which equals the gradient of the mean loss over the concatenation of their batches.
So a simulator can train every device of a step in one pass (few large kernels instead of
many tiny ones), provided nothing couples samples of different devices. BatchNorm does: each
device normalises with the statistics of its own batch. `segmented_batchnorm` makes every
BatchNorm layer compute its statistics per device segment during the fused pass, so the
result equals what separate per-device passes would give. Running statistics are updated
with the sample-weighted mean of the devices' batch statistics (the parameter server's view;
real replicas would each keep their own).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn


def _segment_stats(
    x: torch.Tensor, seg: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-segment mean and biased variance over (batch, spatial) of x [N, C, ...]."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    per = flat.shape[2]
    num = (counts * per).to(x.dtype).unsqueeze(1)
    mean = torch.zeros(len(counts), c, dtype=x.dtype, device=x.device)
    mean = mean.index_add(0, seg, flat.sum(2)) / num
    centered = flat - mean[seg].unsqueeze(2)
    var = torch.zeros_like(mean).index_add(0, seg, (centered * centered).sum(2)) / num
    return mean, var, num.squeeze(1)


def _segmented_forward(
    bn: nn.modules.batchnorm._BatchNorm, seg: torch.Tensor, counts: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    mean, var, num = _segment_stats(x, seg, counts)
    view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    y = (x - mean[seg].view(view)) * torch.rsqrt(var[seg].view(view) + bn.eps)
    if bn.affine:
        wview = (1, -1) + (1,) * (x.dim() - 2)
        y = y * bn.weight.view(wview) + bn.bias.view(wview)
    rm, rv, nbt = bn.running_mean, bn.running_var, bn.num_batches_tracked
    if bn.track_running_stats and rm is not None and rv is not None and nbt is not None:
        with torch.no_grad():
            nbt.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(nbt)
            w = (num / num.sum()).unsqueeze(1)
            unbiased = var * (num / (num - 1).clamp(min=1)).unsqueeze(1)
            rm.mul_(1 - m).add_((w * mean).sum(0), alpha=m)
            rv.mul_(1 - m).add_((w * unbiased).sum(0), alpha=m)
    return y


@contextlib.contextmanager
def segmented_batchnorm(model: nn.Module, counts: list[int]) -> Iterator[None]:
    """Within the block, BatchNorm layers in training mode normalise per device segment.

    `counts` are the consecutive segment sizes of the batch about to be fed to `model`.
    With one segment (or no BatchNorm) nothing changes.
    """
    layers = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    if len(counts) <= 1 or not layers:
        yield
        return
    device = next(model.parameters()).device
    cnt = torch.tensor(counts, device=device)
    seg = torch.repeat_interleave(torch.arange(len(counts), device=device), cnt)
    for bn in layers:
        # An instance attribute shadows the class's forward until deleted below.
        bn.forward = functools.partial(_segmented_forward, bn, seg, cnt)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for bn in layers:
            del bn.forward
