"""Activations on the wire between two pipeline stages: fp32, fp16, or 8-bit with scales.

* `fp32`: the tensor as computed; the receiver gets exactly what the sender held.
* `fp16`: rounded to half precision (2 bytes a value).
* `int8`: 8-bit affine codes, ``q = round((x - low) / scale)`` in 0..255, with ``low`` and
  ``scale`` in fp32 per channel (dim 1) of a micro-batch of 3-D or larger tensors (conv
  feature maps, whose channels differ in range), or once per micro-batch for a 2-D tensor
  (features of a linear layer: per-feature scales would outweigh the codes at batch 1).
  Affine rather than symmetric since most cuts follow a ReLU: all 256 codes cover [0, max].

A payload is a list of tensors (what `dist.send` moves, one after the other); its bytes are
the sum of theirs, the scales included. The simulator charges the link for exactly these.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

import numpy as np
import torch

from edgeddl.inference.plan import LayerCosts

ActivationFormat = Literal["fp32", "fp16", "int8"]
ACTIVATION_FORMATS: tuple[str, ...] = get_args(ActivationFormat)
_LEVELS = 255


def _scale_groups(shape: tuple[int, ...]) -> int:
    """How many (low, scale) pairs a tensor of `shape` (batch first) carries in int8."""
    return shape[1] if len(shape) >= 3 else 1


class ActivationCodec:
    """Encodes a micro-batch's activations for one hop and decodes them on the other side."""

    def __init__(self, fmt: str) -> None:
        if fmt not in ACTIVATION_FORMATS:
            raise ValueError(
                f"unknown activation format {fmt!r}; allowed: {', '.join(ACTIVATION_FORMATS)}"
            )
        self.format = fmt

    @property
    def exact(self) -> bool:
        """Whether the receiver gets the sender's values bit for bit."""
        return self.format == "fp32"

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.format == "fp32":
            return [x.float()]
        if self.format == "fp16":
            return [x.half()]
        groups = _scale_groups(tuple(x.shape))
        flat = x.float().transpose(0, 1).reshape(groups, -1) if groups > 1 else x.reshape(1, -1)
        low = flat.amin(dim=1)
        scale = (flat.amax(dim=1) - low) / _LEVELS
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant channel
        shape = (1, groups) + (1,) * (x.dim() - 2) if groups > 1 else (1,)
        q = torch.round((x.float() - low.view(shape)) / scale.view(shape)).clamp_(0, _LEVELS)
        return [q.to(torch.uint8), low, scale]

    def decode(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if self.format != "int8":
            return parts[0].float()
        q, low, scale = parts
        groups = low.numel()
        shape = (1, groups) + (1,) * (q.dim() - 2) if groups > 1 else (1,)
        return q.float() * scale.view(shape) + low.view(shape)

    def buffers(self, shape: tuple[int, ...]) -> list[torch.Tensor]:
        """Empty tensors to receive a payload of a tensor of `shape` into."""
        if self.format == "fp32":
            return [torch.empty(shape, dtype=torch.float32)]
        if self.format == "fp16":
            return [torch.empty(shape, dtype=torch.float16)]
        groups = _scale_groups(shape)
        return [torch.empty(shape, dtype=torch.uint8), torch.empty(groups), torch.empty(groups)]

    def payload_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of the payload of a tensor of `shape` (batch first), scales included."""
        numel = math.prod(shape)
        if self.format == "fp32":
            return 4 * numel
        if self.format == "fp16":
            return 2 * numel
        return numel + 8 * _scale_groups(shape)


def nbytes(parts: list[torch.Tensor]) -> int:
    """What a payload weighs on the wire."""
    return sum(t.numel() * t.element_size() for t in parts)


def largest_payload_bytes(layers: LayerCosts, codec: ActivationCodec, batch: int) -> int:
    """The most bytes any cut of the model (or its input) sends for a micro-batch of
    `batch`: what a stage of a pipeline may receive at most."""
    _require_shapes(layers)
    shapes = [layers.input_shape, *layers.out_shapes]
    return max(codec.payload_bytes((batch, *s)) for s in shapes)


def _require_shapes(layers: LayerCosts) -> None:
    if not layers.out_shapes or not layers.input_shape:
        raise ValueError("these layer costs carry no shapes; measure them with layer_costs")


def wire_costs(layers: LayerCosts, codec: ActivationCodec, batch: int) -> LayerCosts:
    """`layers` with each cut's bytes per sample as `codec` sends a micro-batch of `batch`
    (the planner then weighs compressed activations, the int8 scales spread over the batch)."""
    _require_shapes(layers)

    def per_sample(shape: tuple[int, ...]) -> float:
        return codec.payload_bytes((batch, *shape)) / batch

    return dataclasses.replace(
        layers,
        out_bytes=np.array([per_sample(s) for s in layers.out_shapes], dtype=np.float64),
        input_bytes=per_sample(layers.input_shape),
    )
