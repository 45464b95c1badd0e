"""The `[compression]` section: one compressor and its parameters, per fleet or per group,
and the network-aware density policy. (No torch here: configs load without it.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from edgeddl.config.checks import require as _require

CompressorName = Literal[
    "none",
    "fp16",
    "int8",
    "qsgd",
    "topk",
    "randomk",
    "threshold",
    "two_step",
    "dgc",
    "signsgd",
    "powersgd",
]


@dataclass(kw_only=True, slots=True)
class CompressorConfig:
    """One compressor and its parameters (each compressor reads only the ones it needs)."""

    compressor: CompressorName = "none"
    density: float = 0.01
    """Fraction of gradient values sent per step: topk, randomk, two_step (its target), dgc
    (after warm-up)."""
    levels: int = 16
    """qsgd: quantization levels s (1..127)."""
    threshold: float = 0.0
    """threshold: send values with |x| >= this (required). two_step: the starting threshold
    (0: estimated from a sample at the first step)."""
    criterion: Literal["magnitude", "layer_normalized"] = "magnitude"
    """two_step: what makes a gradient significant: its magnitude, or its magnitude relative
    to its layer's root mean square (every layer gets a fair share)."""
    adapt_threshold: bool = True
    """two_step: move the threshold each step to hold `density`; false keeps it fixed, so a
    device sends only when enough has accumulated."""
    rank: int = 2
    """powersgd: rank of the low-rank approximation of each weight matrix."""
    clip_norm: float = 0.0
    """dgc: local gradient clipping at this L2 norm (scaled by num_devices**-0.5); 0 is off."""
    warmup_steps: int = 0
    """dgc: steps over which density falls 25 % -> 6.25 % -> 1.6 % -> 0.4 % -> `density`."""
    sample_fraction: float = 0.01
    """dgc, two_step: share of values sampled to estimate the threshold (no full sort)."""
    error_feedback: Literal["auto", "on", "off"] = "auto"
    """Keep what was not sent and add it to the next step's gradient. auto: on, except for
    qsgd (unbiased, and its variance can make the memory grow without bound); dgc always
    keeps its momentum-corrected memory."""
    values: Literal["fp32", "fp16"] = "fp32"
    """Wire codec: precision of float values on the wire."""
    zstd: bool = False
    """Wire codec: zstd-compress each encoded payload."""

    def __post_init__(self) -> None:
        _require(0 < self.density <= 1, f"density must be in (0, 1] (got {self.density})")
        _require(1 <= self.levels <= 127, f"levels must be in 1..127 (got {self.levels})")
        _require(self.threshold >= 0, f"threshold must be >= 0 (got {self.threshold})")
        _require(
            self.compressor != "threshold" or self.threshold > 0,
            'threshold must be > 0 for compressor = "threshold" (the value to send above)',
        )
        _require(1 <= self.rank <= 64, f"rank must be in 1..64 (got {self.rank})")
        _require(self.clip_norm >= 0, f"clip_norm must be >= 0 (got {self.clip_norm})")
        _require(self.warmup_steps >= 0, f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        _require(
            0 < self.sample_fraction <= 1,
            f"sample_fraction must be in (0, 1] (got {self.sample_fraction})",
        )


@dataclass(kw_only=True, slots=True)
class AdaptConfig:
    """Network-aware density: each round, each device's density is set from its link."""

    enabled: bool = False
    target_share: float = 0.2
    """Share of the step that communication should take at most."""
    min_density: float = 0.0001
    max_density: float = 0.1

    def __post_init__(self) -> None:
        _require(
            0 < self.target_share < 1,
            f"target_share must be in (0, 1) (got {self.target_share})",
        )
        _require(
            0 < self.min_density <= self.max_density <= 1,
            "min_density and max_density: need 0 < min_density <= max_density <= 1 "
            f"(got {self.min_density}, {self.max_density})",
        )


@dataclass(kw_only=True, slots=True)
class CompressionConfig(CompressorConfig):
    """The fleet's compressor; `groups` gives groups or single devices one of their own."""

    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    groups: dict[str, CompressorConfig] = field(default_factory=dict)
    """Group or device name -> its own compressor table (a whole setting: unset keys take the
    defaults above, not the fleet's)."""

    def for_device(self, name: str, group: str) -> CompressorConfig:
        """The setting a device uses: its own, else its group's, else the fleet's."""
        own = self.groups.get(name) or self.groups.get(group)
        if own is not None:
            return own
        fields = {f: getattr(self, f) for f in CompressorConfig.__dataclass_fields__}
        return CompressorConfig(**fields)

    @property
    def enabled(self) -> bool:
        """True unless every device sends plain fp32 (then the fused dense path runs)."""
        settings = [self, *self.groups.values()]
        plain = all(s.compressor == "none" and s.values == "fp32" and not s.zstd for s in settings)
        return not plain or self.adapt.enabled
