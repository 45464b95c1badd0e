"""Sparse compressors: a device sends some of its gradient's values and where they lie.

* `TopKCompressor` ("topk"): the ``k = density * n`` values of largest magnitude, exactly.
* `RandomKCompressor` ("randomk"): ``k`` positions drawn from the run's seed and the step, so
  every device draws the same ones; only the values travel, and payloads can be summed.
* `ThresholdCompressor` ("threshold", Strom 2015): every value whose magnitude reaches a fixed
  threshold.
* `TwoStepCompressor` ("two_step", the S-global scheme of Sudharsan et al. 2021): only
  significant values are sent (by magnitude, or by magnitude relative to their layer's scale),
  and only once they pass a threshold; the threshold can follow a target density.
* `DGCCompressor` ("dgc", Lin et al. 2018): the selection part of Deep Gradient Compression, a
  threshold estimated from a sample, with an exact top-k when the estimate lets far too many
  through, and the warm-up of the density. Momentum correction, clipping and factor masking
  live in DGC's error-feedback memory (`edgeddl.compress.feedback`), not here.

All of them work on one flat float32 tensor (a device's whole gradient) and never
communicate. One instance serves one device, so per-device state (a threshold that adapts, a
generator) lives in the instance. `density` is a plain attribute that a network-aware policy
may change between steps; it is read at every `compress`.

Sparse payloads carry sorted, distinct int64 `indices` (the wire codec delta-encodes them)
and the float32 `values` there, taken from the input unchanged. A payload with nothing to
send has `numel` only. Selecting never sorts the whole tensor: top-k is a partial selection,
and the threshold schemes estimate their threshold from a random sample.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from edgeddl.compress.base import Layout, Payload

Criterion = Literal["magnitude", "layer_normalized"]

_MIN_SAMPLE = 1000
_MIN_SAMPLE_HITS = 100
"""The sample holds enough values for this many of them to lie above the threshold: the
count that passes then misses its target by about 1/sqrt(100) = 10 %, however small `k`."""
_TINY = torch.finfo(torch.float32).tiny
"""Thresholds never fall below this, so a zero is never sent as if it were significant."""
_STAGES = (0.25, 0.0625, 0.015625, 0.00390625)
"""DGC's warm-up densities (sparsity 75 %, 93.75 %, 98.4 %, 99.6 %), one per quarter."""
_MASK64 = (1 << 64) - 1


def estimate_threshold(
    score: torch.Tensor, k: int, sample_fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """A threshold that about `k` of the non-negative `score` values reach (0-dim tensor).

    It is the matching quantile of a random sample (drawn with replacement by `generator`, a
    CPU generator) of ``max(sample_fraction * n, 1000, 100 * n / k)`` values, found with a
    partial selection on the sample; when that sample would be the whole tensor, the k-th
    largest score exactly. The result is on `score`'s device and never below the smallest
    positive float32, so zero scores never pass. Callers check how many actually pass: ties or
    a heavy tail can let far more through (DGC then recomputes exactly).
    """
    n = score.numel()
    if n == 0:
        return score.new_tensor(math.inf)
    k = min(max(k, 1), n)
    size = max(math.ceil(sample_fraction * n), _MIN_SAMPLE, math.ceil(_MIN_SAMPLE_HITS * n / k))
    if size >= n:
        threshold = torch.topk(score, k, sorted=False).values.min()
    else:
        picks = torch.randint(n, (size,), generator=generator, device=generator.device)
        sample = score[picks.to(score.device)]
        hits = max(1, round(k * size / n))
        threshold = torch.topk(sample, hits, sorted=False).values.min()
    return threshold.clamp(min=_TINY)


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] (got {density})")


def _target_k(density: float, n: int) -> int:
    """Values to send at `density`: at least one, at most all of them."""
    _check_density(density)
    return min(n, max(1, round(density * n)))


def _check_flat(x: torch.Tensor, numel: int | None = None) -> None:
    if x.dim() != 1 or (numel is not None and x.numel() != numel):
        expected = "a flat tensor" if numel is None else f"a flat tensor of {numel} elements"
        raise ValueError(f"expected {expected}, got shape {tuple(x.shape)}")


def _sparse_payload(x: torch.Tensor, indices: torch.Tensor) -> Payload:
    """The payload of `x` at sorted `indices`; `numel` alone when there are none."""
    if indices.numel() == 0:
        return Payload(numel=x.numel())
    return Payload(numel=x.numel(), indices=indices, values=x[indices].to(torch.float32))


def _top_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the `k` largest scores, sorted (a partial selection, not a sort)."""
    return torch.topk(score, k, sorted=False).indices.sort().values


def _passing(score: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Sorted positions where `score` reaches `threshold` (one host sync, for the count)."""
    return torch.nonzero(score >= threshold, as_tuple=True)[0]


def _scatter(payload: Payload, device: torch.device) -> torch.Tensor:
    """The dense float32 tensor of a sparse payload; zeros on `device` when it is empty."""
    if payload.values is None:
        if payload.indices is not None:
            raise ValueError("payload has indices but no values")
        return torch.zeros(payload.numel, dtype=torch.float32, device=device)
    if payload.indices is None:
        raise ValueError("payload has values but no indices")
    out = torch.zeros(payload.numel, dtype=torch.float32, device=payload.values.device)
    out[payload.indices] = payload.values.to(torch.float32)
    return out


def _splitmix64(z: int) -> int:
    """A 64-bit mix, so that nearby (seed, step) pairs give unrelated generator seeds."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _random_positions(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """`k` distinct positions in ``[0, n)``, uniformly at random, sorted (on the CPU)."""
    if 4 * k >= n:
        return torch.randperm(n, generator=generator)[:k].sort().values
    # For small k a permutation of all n costs far more than the draw itself: draw a few more
    # than k with replacement instead and keep a random k of the distinct ones. The distinct
    # draws are a uniform subset of their size, so the k kept are a uniform k-subset too.
    size = k + k // 4 + 32
    while True:
        drawn = torch.randint(n, (size,), generator=generator).unique()
        if drawn.numel() >= k:
            break
        size *= 2
    keep = torch.randperm(drawn.numel(), generator=generator)[:k]
    return drawn[keep].sort().values


class TopKCompressor:
    """The ``k = round(density * n)`` values of largest magnitude (at least one).

    Exact, by a partial selection (`torch.topk`), not a sort. A payload always holds `k`
    values, so its size is fixed for a given density (a policy that changes the density
    changes it).
    """

    name: str = "topk"
    fixed_size: bool = True
    allreduce: bool = False
    num_phases: int = 1

    def __init__(self, density: float) -> None:
        _check_density(density)
        self.density = density
        self._device = torch.device("cpu")

    def compress(self, x: torch.Tensor, step: int) -> Payload:
        _check_flat(x)
        self._device = x.device
        k = _target_k(self.density, x.numel())
        return _sparse_payload(x, _top_indices(x.abs(), k))

    def decompress(self, payload: Payload, step: int) -> torch.Tensor:
        return _scatter(payload, self._device)


class RandomKCompressor:
    """`k` positions drawn from the run's seed and the step: the same on every device.

    Since every device (and every receiver) can draw the positions itself, a payload carries
    only the `k` values, in position order, and payloads of different devices can be summed
    on the way (a ring all-reduce). The values are sent as they are, not scaled by
    ``n / k``: the estimate is biased (shrunk by ``k / n`` on average), which error feedback
    makes good by sending what was left out later; scaling would instead inflate the variance.
    The receiver takes `k` from the payload, so it needs no density of its own.
    """

    name: str = "randomk"
    fixed_size: bool = True
    allreduce: bool = True
    num_phases: int = 1

    def __init__(self, density: float, seed: int) -> None:
        _check_density(density)
        self.density = density
        self.seed = seed
        # The last draw, reused when the same step is decompressed (the aggregate comes back
        # at the step the device compressed in).
        self._cached: tuple[tuple[int, int, int], torch.Tensor] | None = None

    def positions(self, n: int, k: int, step: int, device: torch.device) -> torch.Tensor:
        """The sorted positions every device uses at `step` for `k` of `n` values."""
        key = (step, n, k)
        if self._cached is None or self._cached[0] != key:
            # A CPU generator seeded from (seed, step) only: the same draw on every device,
            # whatever its accelerator.
            generator = torch.Generator().manual_seed(
                _splitmix64(_splitmix64(self.seed) + step) >> 1
            )
            self._cached = (key, _random_positions(n, k, generator))
        return self._cached[1].to(device)

    def compress(self, x: torch.Tensor, step: int) -> Payload:
        _check_flat(x)
        n = x.numel()
        indices = self.positions(n, _target_k(self.density, n), step, x.device)
        return Payload(numel=n, values=x[indices].to(torch.float32))

    def decompress(self, payload: Payload, step: int) -> torch.Tensor:
        if payload.values is None:
            raise ValueError("payload has no values")
        values = payload.values.to(torch.float32)
        indices = self.positions(payload.numel, values.numel(), step, values.device)
        out = torch.zeros(payload.numel, dtype=torch.float32, device=values.device)
        out[indices] = values
        return out


class ThresholdCompressor:
    """Every value with ``|x| >= threshold`` (Strom 2015), so the payload size varies."""

    name: str = "threshold"
    fixed_size: bool = False
    allreduce: bool = False
    num_phases: int = 1

    def __init__(self, threshold: float) -> None:
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0 (got {threshold})")
        self.threshold = threshold
        self._device = torch.device("cpu")

    def compress(self, x: torch.Tensor, step: int) -> Payload:
        _check_flat(x)
        self._device = x.device
        return _sparse_payload(x, _passing(x.abs(), self.threshold))

    def decompress(self, payload: Payload, step: int) -> torch.Tensor:
        return _scatter(payload, self._device)


class _LayerScale:
    """Each element's inverse layer RMS, from a layer-id tensor built once per device."""

    def __init__(self, layout: Layout) -> None:
        self.sizes = layout.sizes()
        self.numel = layout.numel
        self._ids: dict[torch.device, torch.Tensor] = {}
        self._counts: dict[torch.device, torch.Tensor] = {}

    def inverse_rms(self, x: torch.Tensor) -> torch.Tensor:
        """``1 / rms(layer)`` at every element of `x`; 0 in a layer that is all zeros."""
        if not self.sizes:
            return x.new_zeros(0)
        ids = self._ids.get(x.device)
        if ids is None:
            sizes = torch.tensor(self.sizes, dtype=torch.int64, device=x.device)
            layers = torch.arange(len(self.sizes), device=x.device)
            ids = torch.repeat_interleave(layers, sizes, output_size=self.numel)
            self._ids[x.device] = ids
            self._counts[x.device] = sizes.to(torch.float32).clamp_(min=1)
        # One fused norm over views of the layers, then one gather: a handful of kernels
        # whatever the number of layers.
        norms = torch.stack(torch._foreach_norm(list(x.split(self.sizes)), 2))
        rms = norms / self._counts[x.device].sqrt()
        inverse = torch.where(rms > 0, rms.reciprocal(), torch.zeros_like(rms))
        return inverse.index_select(0, ids)


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
        _check_density(density)
        if criterion not in ("magnitude", "layer_normalized"):
            raise ValueError(f"criterion must be magnitude or layer_normalized (got {criterion!r})")
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0 (got {threshold})")
        if not 0 < sample_fraction <= 1:
            raise ValueError(f"sample_fraction must be in (0, 1] (got {sample_fraction})")
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
        self._scale = _LayerScale(layout) if criterion == "layer_normalized" else None
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
        _check_flat(x, self.layout.numel)
        self._device = x.device
        k = _target_k(self.density, x.numel())
        score = self.score(x)
        if self.tau is None:
            self.tau = self._estimate(score, k)
        tau = self.tau
        indices = _passing(score, tau)
        if indices.numel() > self.burst_factor * k:
            self.recomputes += 1
            tau = self._estimate(score, k)
            indices = _passing(score, tau)
            if indices.numel() > self.burst_factor * k:  # ties at the estimate
                indices = _top_indices(score, k)
                tau = float(score[indices].min())
        if self.adapt_threshold:
            self.tau = self._next_tau(score, indices, tau, k)
        return _sparse_payload(x, indices)

    def _next_tau(self, score: torch.Tensor, indices: torch.Tensor, tau: float, k: int) -> float:
        """The threshold for the next step, moved toward letting `k` values pass."""
        passed = indices.numel()
        if passed == 0:
            return max(tau / self.max_factor, _TINY)
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
        return max(tau * factor, _TINY)

    def decompress(self, payload: Payload, step: int) -> torch.Tensor:
        return _scatter(payload, self._device)


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
        _check_density(density)
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (got {warmup_steps})")
        if not 0 < sample_fraction <= 1:
            raise ValueError(f"sample_fraction must be in (0, 1] (got {sample_fraction})")
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
        _check_flat(x)
        self._device = x.device
        k = _target_k(self.density_at(step), x.numel())
        score = x.abs()
        threshold = estimate_threshold(score, k, self.sample_fraction, self._generator)
        indices = _passing(score, threshold)
        if indices.numel() > self.recompute_factor * k:
            self.recomputes += 1
            indices = _top_indices(score, k)
        return _sparse_payload(x, indices)

    def decompress(self, payload: Payload, step: int) -> torch.Tensor:
        return _scatter(payload, self._device)
