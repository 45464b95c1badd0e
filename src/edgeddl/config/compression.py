"""The `[compression]` section: one compressor and its parameters, per fleet or per group,
the network-aware density policy, and the combinations no transport can carry. The names and
capabilities come from the registry (config/compressors.py). (No torch here: configs load
without it.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from edgeddl.config.checks import require as _require
from edgeddl.config.compressors import COMPRESSORS, BuildContext, CompressorSpec, compressor_names
from edgeddl.config.suggest import suggest_key


@dataclass(kw_only=True, slots=True)
class CompressorConfig:
    """One compressor and its parameters (each compressor reads only the ones it needs)."""

    compressor: str = "none"
    """A registered compressor (config/compressors.py; `edgeddl compressors` lists them)."""
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
        _require_registered(self.compressor)
        _require(0 < self.density <= 1, f"density must be in (0, 1] (got {self.density})")
        _require(1 <= self.levels <= 127, f"levels must be in 1..127 (got {self.levels})")
        _require(self.threshold >= 0, f"threshold must be >= 0 (got {self.threshold})")
        _require(1 <= self.rank <= 64, f"rank must be in 1..64 (got {self.rank})")
        _require(self.clip_norm >= 0, f"clip_norm must be >= 0 (got {self.clip_norm})")
        _require(self.warmup_steps >= 0, f"warmup_steps must be >= 0 (got {self.warmup_steps})")
        _require(
            0 < self.sample_fraction <= 1,
            f"sample_fraction must be in (0, 1] (got {self.sample_fraction})",
        )
        if self.spec.check is not None:
            self.spec.check(self)

    @property
    def spec(self) -> CompressorSpec:
        """The registered compressor this setting names: its capabilities and builder."""
        return COMPRESSORS[self.compressor]

    def build(self, layout: Any, seed: int, device_index: int = 0) -> object:
        """The compressor this setting describes (`edgeddl.compress`), for one device of a
        run with `seed`; `layout`: the flat tensor's `Layout`."""
        at = BuildContext(layout=layout, seed=seed, device_index=device_index)
        return self.spec.make(self, at)


def _require_registered(name: str) -> None:
    """One line for an unknown compressor, with the registered name it most likely means."""
    if isinstance(name, str) and name in COMPRESSORS:
        return
    close = suggest_key(name, COMPRESSORS) if isinstance(name, str) else None
    hint = f"did you mean {close!r}? " if close else ""
    known = ", ".join(repr(n) for n in COMPRESSORS)
    raise ValueError(f"compressor: unknown compressor {name!r}; {hint}expected one of {known}")


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


def check_compression(comp: CompressionConfig, topology: str) -> None:
    """Refuse combinations no transport can carry; the message names the key to change.

    Everything here reads the compressors' registered capabilities, so the scenario is refused
    when it is built, not at step 300."""
    settings = [("compression", comp)] + [
        (f"compression.groups.{k}", g) for k, g in comp.groups.items()
    ]
    for key, cfg in settings:
        _check_setting(key, cfg, comp, topology)
    if topology == "ring" and comp.groups:
        raise ValueError(
            "compression.groups: a ring all-reduce needs one payload format on every device; "
            'remove [compression.groups] or use train.topology = "star"'
        )
    if comp.adapt.enabled:
        if topology == "ring":
            raise ValueError(
                "compression.adapt.enabled: per-device densities give payloads of different "
                'sizes, which a ring all-reduce cannot sum; use train.topology = "star"'
            )
        for key, cfg in settings:
            if not cfg.spec.adapt_density:
                raise ValueError(
                    f"{key}.compressor: adaptation sets each device's density, which "
                    f"{cfg.compressor} does not have; use one of: "
                    f"{', '.join(compressor_names(lambda s: s.adapt_density))}"
                )


def _check_setting(key: str, cfg: CompressorConfig, comp: CompressionConfig, topology: str) -> None:
    """One fleet or group setting against the others and the topology."""
    spec = cfg.spec
    if spec.num_phases > 1 and comp.groups:
        raise ValueError(
            f"{key}.compressor: {cfg.compressor} exchanges in rounds among all devices, so "
            "every device must use it: remove [compression.groups]"
        )
    if spec.num_phases > 1 and cfg.values != "fp32":
        raise ValueError(
            f'{key}.values: {cfg.compressor} computes its rounds in float32; set values = "fp32"'
        )
    if spec.owns_momentum and comp.groups:
        names = {c.compressor for c in [comp, *comp.groups.values()]}
        if names != {cfg.compressor}:
            raise ValueError(
                f"{key}.compressor: {cfg.compressor} moves the optimizer's momentum into each "
                f"device's memory, so every device must use {cfg.compressor} (or none must)"
            )
    if topology == "ring":
        if not spec.allreduce:
            raise ValueError(
                f"{key}.compressor: {cfg.compressor} payloads cannot ride a ring all-reduce "
                f'(they cannot be summed on the way); use train.topology = "star", or one '
                f"of: {', '.join(compressor_names(lambda s: s.allreduce))}"
            )
        if cfg.zstd:
            raise ValueError(
                f"{key}.zstd: zstd-compressed bytes cannot be summed in a ring all-reduce; "
                'set it to false or use train.topology = "star"'
            )
