"""Model zoo: small models sized for edge devices, from an MLP up to the CIFAR ResNets.

Builders never seed; callers seed torch before building so that every replica in a simulated
fleet can start from identical (or deliberately different) weights.
"""

from __future__ import annotations

import itertools
import math
from typing import get_args

import torch
import torch.nn.functional as F
from torch import nn

from edgeddl.config.schema import ModelName

MODEL_NAMES: tuple[str, ...] = get_args(ModelName)  # one list: the config's

_DEFAULT_MLP_WIDTH = 128
_DEFAULT_CNN1D_WIDTH = 25
_DEFAULT_RESNET_WIDTH = 16
_DEFAULT_AUTOENCODER_WIDTH = 32
_RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet56": 56}


def build_model(
    name: str, *, input_shape: tuple[int, ...], num_classes: int, width: int = 0
) -> nn.Module:
    """Build model `name` for one-sample `input_shape` (channel-first) and `num_classes` outputs.

    `width` is the hidden size for mlp, the channel count for cnn1d, the first-stage channel
    count for the ResNets (stages use width, 2*width, 4*width) and for autoencoder1d (its
    code has `width` values); 0 picks 128, 25, 16 and 32. cnn1d_bn is cnn1d with BatchNorm.
    autoencoder1d reconstructs its input (output shape = input shape) and ignores
    `num_classes`.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    if width < 0:
        raise ValueError(f"width must be >= 0 (0 = model default), got {width}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    shape = tuple(input_shape)
    if not shape or any(dim < 1 for dim in shape):
        raise ValueError(f"input_shape must be non-empty with dims >= 1, got {input_shape}")
    if name == "mlp":
        return _build_mlp(shape, num_classes, width or _DEFAULT_MLP_WIDTH)
    if name in ("cnn1d", "cnn1d_bn"):
        width = width or _DEFAULT_CNN1D_WIDTH
        return _build_cnn1d(shape, num_classes, width, batchnorm=name == "cnn1d_bn")
    if name == "autoencoder1d":
        return _build_autoencoder1d(shape, width or _DEFAULT_AUTOENCODER_WIDTH)
    if len(shape) != 3:
        raise ValueError(f"{name} needs a 3-D (C, H, W) input_shape, got {input_shape}")
    return CifarResNet(_RESNET_DEPTHS[name], shape[0], num_classes, width or _DEFAULT_RESNET_WIDTH)


def _build_mlp(input_shape: tuple[int, ...], num_classes: int, width: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


def _conv1d_out_length(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


def _build_cnn1d(
    input_shape: tuple[int, ...], num_classes: int, width: int, *, batchnorm: bool
) -> nn.Module:
    """The ConvBase of the MNIST-1D paper (Greydanus 2020): ~5k parameters on (1, 40).

    `batchnorm` (cnn1d_bn) puts a BatchNorm after each convolution (which then has no bias):
    its running statistics are what data-free int8 calibration synthesises inputs from.
    """
    if len(input_shape) != 2:
        raise ValueError(f"cnn1d needs a 2-D (C, L) input_shape, got {input_shape}")
    num_channels, length = input_shape
    layer_specs = ((5, 2, 1), (3, 2, 1), (3, 2, 1))  # (kernel, stride, padding)
    out_length = length
    for kernel, stride, padding in layer_specs:
        out_length = _conv1d_out_length(out_length, kernel, stride, padding)
    if out_length < 1:
        raise ValueError(f"cnn1d input length {length} is too short; it needs at least 3")
    layers: list[nn.Module] = []
    in_channels = num_channels
    for kernel, stride, padding in layer_specs:
        conv = nn.Conv1d(in_channels, width, kernel, stride, padding, bias=not batchnorm)
        layers += [conv, nn.BatchNorm1d(width), nn.ReLU()] if batchnorm else [conv, nn.ReLU()]
        in_channels = width
    layers += [nn.Flatten(), nn.Linear(width * out_length, num_classes)]
    return nn.Sequential(*layers)


def _build_autoencoder1d(input_shape: tuple[int, ...], width: int) -> nn.Module:
    """Two strided convolutions down to a `width`-value code, and back up to the input.

    The narrow code is the point: the model can only reconstruct what it has learned is
    usual, so an unusual series comes back with a large error (the anomaly score).
    """
    if len(input_shape) != 2:
        raise ValueError(f"autoencoder1d needs a 2-D (C, L) input_shape, got {input_shape}")
    num_channels, length = input_shape
    kernel, stride, padding = 5, 2, 2
    lengths = [length]  # after each downsampling convolution
    for _ in range(2):
        lengths.append(_conv1d_out_length(lengths[-1], kernel, stride, padding))
    channels = (num_channels, width, 2 * width)
    hidden = channels[-1] * lengths[-1]
    layers: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(channels):
        layers += [nn.Conv1d(c_in, c_out, kernel, stride, padding), nn.ReLU()]
    layers += [
        nn.Flatten(),
        nn.Linear(hidden, width),
        nn.ReLU(),
        nn.Linear(width, hidden),
        nn.ReLU(),
        nn.Unflatten(1, (channels[-1], lengths[-1])),
    ]
    for k, (c_in, c_out) in enumerate(itertools.pairwise(channels[::-1])):
        # output_padding picks the one of the two lengths a stride-2 convolution maps alike
        target, source = lengths[-2 - k], lengths[-1 - k]
        extra = target - ((source - 1) * stride - 2 * padding + kernel)
        layers.append(nn.ConvTranspose1d(c_in, c_out, kernel, stride, padding, extra))
        if c_out != num_channels:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _ShortcutA(nn.Module):
    """Parameter-free shortcut (He et al. 2016, option A): subsample, then zero-pad channels."""

    def __init__(self, stride: int, num_extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.num_extra_channels = num_extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.num_extra_channels))


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or option-A) residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # ReLUs as modules (not F.relu) so hook-based activation accounting sees their outputs.
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut: nn.Module = (
            _ShortcutA(stride, out_channels - in_channels) if needs_projection else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2): a 3x3 stem, then 3 stages of n basic blocks, global pool, linear."""

    def __init__(self, depth: int, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        num_blocks = (depth - 2) // 6
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.stem_relu = nn.ReLU()
        blocks: list[nn.Module] = []
        channels = width
        for stage in range(3):
            stage_channels = width * 2**stage
            for block_index in range(num_blocks):
                stride = 2 if stage > 0 and block_index == 0 else 1
                blocks.append(_BasicBlock(channels, stage_channels, stride))
                channels = stage_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation, as in the paper: PyTorch's default gives conv weights 1/6 of the
        # variance He et al. derive for keeping ReLU activations at unit scale through depth.
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem_relu(self.stem_bn(self.stem(x)))
        out = self.blocks(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.head(out)

    def layers(self) -> list[tuple[str, nn.Module]]:
        """The same computation as consecutive named layers (where split learning may cut),
        sharing this model's modules."""
        stem = nn.Sequential(self.stem, self.stem_bn, self.stem_relu)
        blocks = [(f"block{i}", b) for i, b in enumerate(self.blocks)]
        pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return [("stem", stem), *blocks, ("pool", pool), ("head", self.head)]
