"""Calibration inputs synthesised from a trained model itself, without its training data.

A trained network's BatchNorm layers remember the mean and variance of the activations that
entered them during training (`running_mean`, `running_var`). Starting from Gaussian noise,
we optimise a batch of inputs so that the batch statistics of the activations entering every
BatchNorm layer match those running statistics (ZeroQ, Cai et al. 2020; DeepInversion, Yin et
al. 2020). The result is a batch whose activations, layer by layer, have the ranges the
training data gave them: what post-training quantization needs to choose its int8 scales.

An optional term (`label_weight`) also asks for confident outputs spread evenly over the
classes (sample i aims at class i mod num_classes), so that the batch does not collapse onto
one class's region of the activations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BatchNorm = nn.modules.batchnorm._BatchNorm

NO_BATCHNORM = (
    "data-free calibration needs BatchNorm statistics, and this model has no BatchNorm layer "
    "with running statistics; calibrate on real samples instead (--calibration real), or "
    "train a model with BatchNorm (cnn1d_bn, resnet20/32/56)"
)


@dataclass(kw_only=True, slots=True)
class SynthesisConfig:
    """How calibration inputs are synthesised from a model's BatchNorm statistics."""

    num_samples: int = 256
    """Inputs synthesised (one batch)."""
    num_steps: int = 200
    """Adam steps on the inputs."""
    lr: float = 0.1
    """Adam learning rate on the inputs (they start as unit Gaussian noise)."""
    label_weight: float = 0.0
    """Weight of the cross-entropy term asking sample i to be classified as i mod classes
    (0: BatchNorm statistics only)."""
    seed: int = 0
    """Seeds the starting noise: the same model and config give the same inputs."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_samples <= 100_000:
            raise ValueError(f"num_samples must be in 1..100000 (got {self.num_samples})")
        if not 0 <= self.num_steps <= 100_000:
            raise ValueError(f"num_steps must be in 0..100000 (got {self.num_steps})")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0 (got {self.lr})")
        if not self.label_weight >= 0:
            raise ValueError(f"label_weight must be >= 0 (got {self.label_weight})")


@dataclass(frozen=True, slots=True)
class Synthesis:
    """Synthesised inputs and the BatchNorm-statistics loss before and after optimising."""

    inputs: torch.Tensor
    noise: torch.Tensor
    """The Gaussian noise the optimisation started from (the foil)."""
    start_loss: float
    final_loss: float


def batchnorm_layers(model: nn.Module) -> list[BatchNorm]:
    """The model's BatchNorm layers that hold running statistics, in module order."""
    return [
        m
        for m in model.modules()
        if isinstance(m, BatchNorm) and m.running_mean is not None and m.running_var is not None
    ]


def bn_statistics_loss(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, output) of `model` on `inputs`: summed over its BatchNorm layers, the mean
    squared gap between the batch mean and variance of each layer's input and its running
    mean and variance. `model` should be in eval mode, so that its statistics stay put."""
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(NO_BATCHNORM)
    seen: list[tuple[BatchNorm, torch.Tensor]] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append((module, args[0]))  # type: ignore[arg-type]

    handles = [m.register_forward_pre_hook(record) for m in layers]
    try:
        output = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    loss = inputs.new_zeros(())
    for module, x in seen:
        dims = [0, *range(2, x.dim())]  # all but the channel
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        loss = loss + F.mse_loss(mean, module.running_mean) + F.mse_loss(var, module.running_var)  # type: ignore[arg-type]
    return loss, output


def synthesize_calibration(
    model: nn.Module, input_shape: tuple[int, ...], config: SynthesisConfig | None = None
) -> Synthesis:
    """Inputs of one-sample `input_shape` whose activations match `model`'s BatchNorm
    statistics. Works on a copy: `model`'s weights, statistics and gradients are untouched."""
    config = config or SynthesisConfig()
    probe = copy.deepcopy(model).eval().requires_grad_(False)
    if not batchnorm_layers(probe):
        raise ValueError(NO_BATCHNORM)
    device = next((p.device for p in probe.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(config.seed)
    noise = torch.randn(config.num_samples, *input_shape, generator=generator).to(device)
    inputs = noise.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([inputs], lr=config.lr)
    with torch.no_grad():
        start_loss = float(bn_statistics_loss(probe, noise)[0])
    for _ in range(config.num_steps):
        with torch.enable_grad():
            loss, output = bn_statistics_loss(probe, inputs)
            if config.label_weight > 0:
                targets = torch.arange(config.num_samples, device=device) % output.shape[1]
                loss = loss + config.label_weight * F.cross_entropy(output, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
    inputs = inputs.detach()
    with torch.no_grad():
        final_loss = float(bn_statistics_loss(probe, inputs)[0])
    return Synthesis(inputs=inputs, noise=noise, start_loss=start_loss, final_loss=final_loss)
