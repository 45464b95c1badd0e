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


def _segmented_forward(
    bn: nn.modules.batchnorm._BatchNorm, seg: torch.Tensor, counts: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """BatchNorm of x [N, C, ...] with statistics per device segment, in few passes.

    Per segment: the mean, then the variance of the centred values (not E[x^2] - mean^2,
    which loses everything in float32 when the mean is large next to the spread), then each
    sample is normalised by one multiply-add with its segment's scale and shift.
    """
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)
    num = (counts * flat.shape[2]).to(x.dtype).unsqueeze(1)  # values per segment and channel
    zeros = torch.zeros(len(counts), c, dtype=x.dtype, device=x.device)
    mean = zeros.index_add(0, seg, flat.sum(2)) / num
    centred = flat - mean[seg].unsqueeze(2)
    var = zeros.index_add(0, seg, (centred * centred).sum(2)) / num
    scale = torch.rsqrt(var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
        shift = bn.bias - mean * scale
    else:
        shift = -mean * scale
    view = (n, c) + (1,) * (x.dim() - 2)
    y = torch.addcmul(shift[seg].view(view), x, scale[seg].view(view))
    rm, rv, nbt = bn.running_mean, bn.running_var, bn.num_batches_tracked
    if bn.track_running_stats and rm is not None and rv is not None and nbt is not None:
        with torch.no_grad():
            nbt.add_(1)
            m = bn.momentum if bn.momentum is not None else 1.0 / float(nbt)
            w = num / num.sum()
            unbiased = var * num / (num - 1).clamp(min=1)
            rm.mul_(1 - m).add_((w * mean).sum(0), alpha=m)
            rv.mul_(1 - m).add_((w * unbiased).sum(0), alpha=m)
    return y


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def segmented_batchnorm(
    model: nn.Module, counts: list[int], layers: list[nn.modules.batchnorm._BatchNorm] | None = None
) -> Iterator[None]:
    """Within the block, BatchNorm layers in training mode normalise per device segment.

    `counts` are the consecutive segment sizes of the batch about to be fed to `model`;
    `layers` (default: found in `model`) saves walking the model on every step. With one
    segment (or no BatchNorm) nothing changes.
    """
    layers = [m for m in (batchnorm_layers(model) if layers is None else layers) if m.training]
    if len(counts) <= 1 or not layers:
        yield
        return
    device = next(model.parameters()).device
    # Built on the host and copied once: no device-to-host sync on a GPU.
    seg = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(device)
    cnt = torch.tensor(counts).to(device)
    for bn in layers:
        # An instance attribute shadows the class's forward until deleted below.
        bn.forward = functools.partial(_segmented_forward, bn, seg, cnt)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for bn in layers:
            del bn.forward
