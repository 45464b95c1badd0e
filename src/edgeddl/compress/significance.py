"""Sparsifiers that estimate their threshold rather than sort: S-global two-step and DGC.

* `TwoStepCompressor` ("two_step", the S-global scheme of Sudharsan et al. 2021): only
  significant values are sent (by magnitude, or by magnitude relative to their layer's scale),
  and only once they pass a threshold; the threshold can follow a target density.
* `DGCCompressor` ("dgc", Lin et al. 2018): the selection part of Deep Gradient Compression, a
  threshold estimated from a sample, with an exact top-k when the estimate lets far too many
  through, and the warm-up of the density. Momentum correction, clipping and factor masking
  live in DGC's error-feedback memory (`edgeddl.compress.feedback`), not here.

Both keep per-device state (a threshold, a generator) in the instance; `density` is read at
every `compress`, so a network-aware policy may change it between steps.
"""

from __future__ import annotations

from typing import Literal

import torch

from edgeddl.compress.base import Layout, Payload
from edgeddl.compress.segments import Segments, check_flat
from edgeddl.compress.sparse import (
    TINY,
    check_density,
    check_sample_fraction,
    estimate_threshold,
    passing,
    scatter,
    sparse_payload,
    target_k,
    top_indices,
)
from edgeddl.config.compression import CompressorConfig
from edgeddl.config.compressors import BuildContext

Criterion = Literal["magnitude", "layer_normalized"]

_STAGES = (0.25, 0.0625, 0.015625, 0.00390625)
"""DGC's warm-up densities (sparsity 75 %, 93.75 %, 98.4 %, 99.6 %), one per quarter."""


class TwoStepCompressor:
    """S-global's two-step compression: significant values only, sent once past a threshold.

    Step one judges significance by a score: the magnitude ``|x|``, or with
    ``criterion="layer_normalized"`` the magnitude over the root mean square of the value's
    layer, so a layer of small gradients (a bias, a late layer) is judged against its own
    scale and still gets a share. Step two sends the values whose score reaches the threshold
    ``tau`` and nothing else: if none does, the payload is empty, and what was held back
    accumulates (in the strategy's error feedback) until it passes.

    ``tau`` starts at `threshold`, or, when that is 0, at an estimate from a sample for the
    target density at the first step. With `adapt_threshold` it follows the target density
    (read at every step) without sorting: after each step it is multiplied by
    ``(sent / k) ** (0.5 / alpha)``, at most halved or doubled, with ``alpha`` the tail
    exponent estimated from the values that passed (a damped Newton step on the log count).
    Without it, ``tau`` stays where it started, and a device sends only when enough has
    accumulated. In both modes a burst that
    would send more than four times the target is cut back to about the target, by a fresh
    estimate from a sample (or an exact top-k if that still lets too many through), so one
    odd step never sends a huge payload.
    """

    name: str = "two_step"
    fixed_size: bool = False
    allreduce: bool = False
    num_phases: int = 1

    gain: float = 0.5
    """Share of the error (in log count) corrected per step: it damps the noise of one
    step's count and still settles within a few steps."""
    min_tail: int = 16
    """Values that must pass for the tail exponent to be estimated anew (else the last)."""
    max_alpha: float = 32.0
    """Bound on the tail exponent, so ties just above the threshold cannot freeze it."""
    max_factor: float = 2.0
    """The most the threshold moves in one step (up or down)."""
    burst_factor: float = 4.0
    """More than this times the target passing is a burst: the threshold is estimated anew."""

    def __init__(
        self,
        layout: Layout,
        density: float,
        criterion: Criterion = "magnitude",
        threshold: float = 0.0,
        adapt_threshold: bool = True,
        sample_fraction: float = 0.01,
        seed: int = 0,
    ) -> None:
        check_density(density)
        if criterion not in ("magnitude", "layer_normalized"):
            raise ValueError(f"criterion must be magnitude or layer_normalized (got {criterion!r})")
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0 (got {threshold})")
        check_sample_fraction(sample_fraction)
        self.layout = layout
        self.density = density
        self.criterion = criterion
        self.adapt_threshold = adapt_threshold
        self.sample_fraction = sample_fraction
        self.tau: float | None = threshold if threshold > 0 else None
        """The threshold the next step uses (None until estimated at the first step)."""
        self.recomputes = 0
        """Steps on which a burst made the threshold be estimated anew."""
        self._alpha = 4.0  # until the first estimate: between a Laplace and a Gaussian tail
        self._scale = Segments(layout) if criterion == "layer_normalized" else None
        self._generator = torch.Generator().manual_seed(seed)
        self._device = torch.device("cpu")

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """What is compared with the threshold: ``|x|``, or ``|x| / rms(layer)``."""
        if self._scale is None:
            return x.abs()
        return x.abs().mul_(self._scale.inverse_rms(x))

    def _estimate(self, score: torch.Tensor, k: int) -> float:
        threshold = estimate_threshold(score, k, self.sample_fraction, self._generator)
        return float(threshold)

    def compress(self, x: torch.Tensor, step: int) -> Payload:
        check_flat(x, self.layout.numel)
        self._device = x.device
        k = target_k(self.density, x.numel())
        score = self.score(x)
        if self.tau is None:
            self.tau = self._estimate(score, k)
        tau = self.tau
        indices = passing(score, tau)
        if indices.numel() > self.burst_factor * k:
            self.recomputes += 1
            tau = self._estimate(score, k)
            indices = passing(score, tau)
            if indices.numel() > self.burst_factor * k:  # ties at the estimate
                indices = top_indices(score, k)
                tau = float(score[indices].min())
        if self.adapt_threshold:
            self.tau = self._next_tau(score, indices, tau, k)
        return sparse_payload(x, indices)

    def _next_tau(self, score: torch.Tensor, indices: torch.Tensor, tau: float, k: int) -> float:
        """The threshold for the next step, moved toward letting `k` values pass."""
        passed = indices.numel()
        if passed == 0:
            return max(tau / self.max_factor, TINY)
        if passed >= self.min_tail:
            # Hill's estimate of the tail exponent from the values that passed: near tau
            # the count above t falls about as t**-alpha, so a step of (passed / k)**(1 /
            # alpha) would land on k. A fixed exponent cannot do this: alpha is about 2 for
            # a heavy tail but 8 to 12 for a Gaussian one at 1 % to 0.1 %, and a gain right
            # for one makes the count swing by 100x around the target for the other.
            mean_log = float(score[indices].div(tau).log_().mean())
            self._alpha = min(self.max_alpha, max(1.0, 1.0 / max(mean_log, 1e-6)))
        factor = (passed / k) ** (self.gain / self._alpha)
        factor = min(self.max_factor, max(1.0 / self.max_factor, factor))
        return max(tau * factor, TINY)

    def decompress(self, payload: Payload, step: int) -> torch.Tensor:
        return scatter(payload, self._device)


class DGCCompressor:
    """Deep Gradient Compression's selection (Lin et al. 2018): sampled threshold, warm-up.

    At each step the density is `density_at(step)`; the threshold for that many values is
    estimated on ``|x|`` from a random sample (`estimate_threshold`). If more than twice the
    target pass (a heavy tail or ties fooled the sample), the top-k is computed exactly, as
    DGC does; if fewer pass, what passes is sent, without forcing the count up. The threshold
    is global over the flat tensor (the paper's is per layer).
    """

    name: str = "dgc"
    fixed_size: bool = False
    allreduce: bool = False
    num_phases: int = 1

    recompute_factor: float = 2.0
    """More than this times the target passing makes the selection exact."""

    def __init__(
        self,
        density: float,
        warmup_steps: int = 0,
        sample_fraction: float = 0.01,
        seed: int = 0,
    ) -> None:
        check_density(density)
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (got {warmup_steps})")
        check_sample_fraction(sample_fraction)
        self.density = density
        self.warmup_steps = warmup_steps
        self.sample_fraction = sample_fraction
        self.recomputes = 0
        """Steps whose selection had to be made exact."""
        self._generator = torch.Generator().manual_seed(seed)
        self._device = torch.device("cpu")

    def density_at(self, step: int) -> float:
        """25 %, 6.25 %, 1.5625 %, 0.390625 %, a quarter of the warm-up each, then `density`.

        Never below `density`: the warm-up only ever sends more.
        """
        if step >= self.warmup_steps or step < 0:
            return self.density
        stage = step * len(_STAGES) // self.warmup_steps
        return max(self.density, _STAGES[stage])

    def compress(self, x: torch.Tensor, step: int) -> Payload:
        check_flat(x)
        self._device = x.device
        k = target_k(self.density_at(step), x.numel())
        score = x.abs()
        threshold = estimate_threshold(score, k, self.sample_fraction, self._generator)
        indices = passing(score, threshold)
        if indices.numel() > self.recompute_factor * k:
            self.recomputes += 1
            indices = top_indices(score, k)
        return sparse_payload(x, indices)

    def decompress(self, payload: Payload, step: int) -> torch.Tensor:
        return scatter(payload, self._device)


# How `config/compressors.py` builds these from a scenario's settings.


def build_two_step(c: CompressorConfig, at: BuildContext) -> TwoStepCompressor:
    return TwoStepCompressor(
        at.layout,
        c.density,
        c.criterion,
        c.threshold,
        c.adapt_threshold,
        c.sample_fraction,
        at.device_seed,
    )


def build_dgc(c: CompressorConfig, at: BuildContext) -> DGCCompressor:
    return DGCCompressor(c.density, c.warmup_steps, c.sample_fraction, at.device_seed)
