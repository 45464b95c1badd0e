"""A device's compressor, error-feedback memory and wire codec, built from its config.

Which compressors exist, what each can do and how each is built is registered once, in
`edgeddl.config.compressors` (torch-free, so configs are validated without torch); this module
turns a validated setting into the objects a strategy holds.
"""

from __future__ import annotations

from typing import cast

from edgeddl.compress.base import Compressor, ErrorFeedback, Layout, PhasedCompressor
from edgeddl.compress.codec import Codec
from edgeddl.compress.feedback import MomentumFeedback, NoFeedback, ResidualFeedback
from edgeddl.config.compression import CompressorConfig


def build_compressor(
    cfg: CompressorConfig, layout: Layout, seed: int, device_index: int
) -> Compressor:
    """One device's single-phase compressor (each draws from its own seed but random-k, which
    shares the run's: every device picks alike)."""
    if cfg.spec.num_phases > 1:
        raise ValueError(f"compressor {cfg.compressor!r} is not single-phase")
    return cast(Compressor, cfg.build(layout, seed, device_index))


def build_phased(cfg: CompressorConfig, layout: Layout, seed: int) -> PhasedCompressor:
    """The fleet's multi-phase scheme (one for all devices: its phases involve them all)."""
    if cfg.spec.num_phases == 1:
        raise ValueError(f"compressor {cfg.compressor!r} is single-phase")
    return cast(PhasedCompressor, cfg.build(layout, seed))


def build_feedback(cfg: CompressorConfig, momentum: float, num_devices: int) -> ErrorFeedback:
    """A compressor that owns the momentum (DGC) keeps momentum-corrected memory; others the
    plain residual, if on (auto: as registered, e.g. off for qsgd, which is unbiased and whose
    variance would feed the memory)."""
    spec = cfg.spec
    if spec.owns_momentum:
        return MomentumFeedback(momentum, cfg.clip_norm, num_devices)
    auto = cfg.error_feedback == "auto" and spec.feedback_by_default
    return ResidualFeedback() if cfg.error_feedback == "on" or auto else NoFeedback()


def build_codec(cfg: CompressorConfig) -> Codec:
    return Codec(values=cfg.values, zstd=cfg.zstd)
