"""The `[split]` section: where the model is cut, where the labels live, SplitFed, and how
the tensors crossing the cut are compressed. (No torch here: configs load without it.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from edgeddl.config.checks import require as _require
from edgeddl.config.compression import CompressorConfig
from edgeddl.config.compressors import compressor_names


@dataclass(kw_only=True, slots=True)
class SplitConfig:
    """Split learning (`train.strategy = "split"`): each device runs the front of the model
    on its own data, the coordinator the rear (Gupta and Raskar 2018; Vepakomma et al. 2018);
    with `splitfed` the fronts are averaged every step (Thapa et al., SplitFed, AAAI 2022).

    Cuts name a layer of the model's layer list (`edgeddl infer plan` prints it) or give its
    index: the cut goes right after that layer.
    """

    cut: str | int = 1
    """The last layer on the device (name or index; negative counts from the end)."""
    labels: Literal["send", "u_shaped"] = "send"
    """send: labels travel with the activations; u_shaped: the head (the layers after
    `head_cut`) stays on the device too, so labels never leave it."""
    head_cut: str | int = -2
    """u_shaped: the last layer of the coordinator's part (default: all but the last layer)."""
    splitfed: bool = False
    """Average the devices' fronts (and heads), weighted by samples, after every step; each
    device uploads its front and downloads the average. Off: every device keeps its own front
    (parallel split learning), and the metric is the mean over devices' models."""
    compression: CompressorConfig = field(default_factory=CompressorConfig)
    """How every tensor crossing a cut is compressed, both ways (activations, gradients at
    the cut, U-shaped outputs): a compressor registered for cut tensors (`cut_tensors`: none,
    fp16, int8, qsgd, topk, randomk); no error feedback, each tensor is sent once."""

    def __post_init__(self) -> None:
        for key in ("cut", "head_cut"):
            value = getattr(self, key)
            _require(
                isinstance(value, int | str) and not isinstance(value, bool) and value != "",
                f"{key} must be a layer name or index (got {value!r})",
            )
        name = self.compression.compressor
        _require(
            self.compression.spec.cut_tensors,
            f"compression.compressor: {name!r} keeps a memory across steps or needs several "
            "rounds, which a cut tensor has not; allowed: "
            f"{', '.join(compressor_names(lambda s: s.cut_tensors))}",
        )
        _require(
            self.compression.error_feedback != "on",
            'compression.error_feedback: cut tensors are sent once; use "auto" or "off"',
        )
