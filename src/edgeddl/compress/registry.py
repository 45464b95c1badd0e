"""Compressors by name, built from their config, and the checks a scenario must pass.

The checks read the compressors' declared capabilities (class attributes), so an impossible
combination is refused when the scenario is built, with the key to change, not at step 300.
"""

from __future__ import annotations

from typing import Any

from edgeddl.compress.base import Compressor, ErrorFeedback, Layout, PhasedCompressor
from edgeddl.compress.codec import Codec
from edgeddl.compress.feedback import MomentumFeedback, NoFeedback, ResidualFeedback
from edgeddl.compress.lowrank import PowerSGD
from edgeddl.compress.quantize import (
    FP16Compressor,
    Int8Compressor,
    NoneCompressor,
    QSGDCompressor,
    SignSGDCompressor,
)
from edgeddl.compress.significance import DGCCompressor, TwoStepCompressor
from edgeddl.compress.sparse import (
    RandomKCompressor,
    ThresholdCompressor,
    TopKCompressor,
)
from edgeddl.config.compression import CompressionConfig, CompressorConfig

COMPRESSORS: dict[str, Any] = {
    "none": NoneCompressor,
    "fp16": FP16Compressor,
    "int8": Int8Compressor,
    "qsgd": QSGDCompressor,
    "topk": TopKCompressor,
    "randomk": RandomKCompressor,
    "threshold": ThresholdCompressor,
    "two_step": TwoStepCompressor,
    "dgc": DGCCompressor,
    "signsgd": SignSGDCompressor,
    "powersgd": PowerSGD,
}
DENSITY_COMPRESSORS = ("topk", "randomk", "two_step", "dgc")
"""Compressors whose density a network-aware policy can set."""
# Each class declares `fixed_size`, `allreduce` and `num_phases` (see compress/base.py).


def device_seed(seed: int, device_index: int) -> int:
    """An independent, reproducible seed for one device's compressor."""
    return (seed * 1_000_003 + device_index + 1) % 2**63


def build_compressor(
    cfg: CompressorConfig, layout: Layout, seed: int, device_index: int
) -> Compressor:
    """One device's compressor (random-k shares the run seed: every device picks alike)."""
    own = device_seed(seed, device_index)
    match cfg.compressor:
        case "none":
            return NoneCompressor()
        case "fp16":
            return FP16Compressor()
        case "int8":
            return Int8Compressor(layout)
        case "qsgd":
            return QSGDCompressor(layout, cfg.levels, own)
        case "signsgd":
            return SignSGDCompressor(layout)
        case "topk":
            return TopKCompressor(cfg.density)
        case "randomk":
            return RandomKCompressor(cfg.density, seed)
        case "threshold":
            return ThresholdCompressor(cfg.threshold)
        case "two_step":
            return TwoStepCompressor(
                layout,
                cfg.density,
                cfg.criterion,
                cfg.threshold,
                cfg.adapt_threshold,
                cfg.sample_fraction,
                own,
            )
        case "dgc":
            return DGCCompressor(cfg.density, cfg.warmup_steps, cfg.sample_fraction, own)
    raise ValueError(f"compressor {cfg.compressor!r} is not single-phase")


def build_phased(cfg: CompressorConfig, layout: Layout, seed: int) -> PhasedCompressor:
    return PowerSGD(layout, cfg.rank, seed)


def build_feedback(cfg: CompressorConfig, momentum: float, num_devices: int) -> ErrorFeedback:
    """DGC keeps momentum-corrected memory; others the plain residual, if on (auto: all but
    qsgd, which is unbiased and whose variance would feed the memory)."""
    if cfg.compressor == "dgc":
        return MomentumFeedback(momentum, cfg.clip_norm, num_devices)
    on = cfg.error_feedback == "on" or (cfg.error_feedback == "auto" and cfg.compressor != "qsgd")
    return ResidualFeedback() if on else NoFeedback()


def build_codec(cfg: CompressorConfig) -> Codec:
    return Codec(values=cfg.values, zstd=cfg.zstd)


def check_compression(comp: CompressionConfig, topology: str) -> None:
    """Refuse combinations no transport can carry; the message names the key to change."""
    settings = [("compression", comp)] + [
        (f"compression.groups.{k}", g) for k, g in comp.groups.items()
    ]
    for key, cfg in settings:
        cls = COMPRESSORS[cfg.compressor]
        if cls.num_phases > 1 and comp.groups:
            raise ValueError(
                f"{key}.compressor: {cfg.compressor} exchanges in rounds among all devices, so "
                "every device must use it: remove [compression.groups]"
            )
        if cls.num_phases > 1 and cfg.values != "fp32":
            raise ValueError(
                f"{key}.values: {cfg.compressor} computes its rounds in float32; "
                'set values = "fp32"'
            )
        if cfg.compressor == "dgc" and comp.groups:
            names = {c.compressor for _, c in settings}
            if names != {"dgc"}:
                raise ValueError(
                    f"{key}.compressor: dgc moves the optimizer's momentum into each device's "
                    "memory, so every device must use dgc (or none must)"
                )
        if topology == "ring":
            if not cls.allreduce:
                allowed = ", ".join(n for n, c in COMPRESSORS.items() if c.allreduce)
                raise ValueError(
                    f"{key}.compressor: {cfg.compressor} payloads cannot ride a ring all-reduce "
                    f'(they cannot be summed on the way); use train.topology = "star", or one '
                    f"of: {allowed}"
                )
            if cfg.zstd:
                raise ValueError(
                    f"{key}.zstd: zstd-compressed bytes cannot be summed in a ring all-reduce; "
                    'set it to false or use train.topology = "star"'
                )
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
            if cfg.compressor not in DENSITY_COMPRESSORS:
                raise ValueError(
                    f"{key}.compressor: adaptation sets each device's density, which "
                    f"{cfg.compressor} does not have; use one of: "
                    f"{', '.join(DENSITY_COMPRESSORS)}"
                )
