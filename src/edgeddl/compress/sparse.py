"""Sparse compressors: a device sends some of its gradient's values and where they lie.

`TopKCompressor`, `RandomKCompressor` and `ThresholdCompressor`, and the pieces they share
(the threshold-estimating ones are in `significance.py`). One instance serves one device, so
per-device state lives in it; `density` is read at every `compress`, so a network-aware
policy may change it between steps. Selecting never sorts the whole tensor.
Details: docs/compression.md#sparse-compressors
"""

from __future__ import annotations

import math

import torch

from edgeddl.compress.base import Payload
from edgeddl.compress.segments import check_flat
from edgeddl.config.compression import CompressorConfig
from edgeddl.config.compressors import BuildContext

_MIN_SAMPLE = 1000
_MIN_SAMPLE_HITS = 100
"""The sample holds enough values for this many of them to lie above the threshold: the
count that passes then misses its target by about 1/sqrt(100) = 10 %, however small `k`."""
TINY = torch.finfo(torch.float32).tiny
"""Thresholds never fall below this, so a zero is never sent as if it were significant."""
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
    return threshold.clamp(min=TINY)


def check_sample_fraction(sample_fraction: float) -> None:
    if not 0 < sample_fraction <= 1:
        raise ValueError(f"sample_fraction must be in (0, 1] (got {sample_fraction})")


def check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] (got {density})")


def target_k(density: float, n: int) -> int:
    """Values to send at `density`: at least one, at most all of them."""
    check_density(density)
    return min(n, max(1, round(density * n)))


def sparse_payload(x: torch.Tensor, indices: torch.Tensor) -> Payload:
    """The payload of `x` at sorted `indices`; `numel` alone when there are none."""
    if indices.numel() == 0:
        return Payload(numel=x.numel())
    return Payload(numel=x.numel(), indices=indices, values=x[indices].to(torch.float32))


def top_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the `k` largest scores, sorted (a partial selection, not a sort)."""
    return torch.topk(score, k, sorted=False).indices.sort().values


def passing(score: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Sorted positions where `score` reaches `threshold` (one host sync, for the count)."""
    return torch.nonzero(score >= threshold, as_tuple=True)[0]


def scatter(payload: Payload, device: torch.device) -> torch.Tensor:
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
        check_density(density)
        self.density = density
        self._device = torch.device("cpu")

    def compress(self, x: torch.Tensor, step: int) -> Payload:
        check_flat(x)
        self._device = x.device
        k = target_k(self.density, x.numel())
        return sparse_payload(x, top_indices(x.abs(), k))

    def decompress(self, payload: Payload, step: int) -> torch.Tensor:
        return scatter(payload, self._device)


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
        check_density(density)
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
        check_flat(x)
        n = x.numel()
        indices = self.positions(n, target_k(self.density, n), step, x.device)
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
        check_flat(x)
        self._device = x.device
        return sparse_payload(x, passing(x.abs(), self.threshold))

    def decompress(self, payload: Payload, step: int) -> torch.Tensor:
        return scatter(payload, self._device)


# How `config/compressors.py` builds these from a scenario's settings.


def build_topk(c: CompressorConfig, at: BuildContext) -> TopKCompressor:
    return TopKCompressor(c.density)


def build_randomk(c: CompressorConfig, at: BuildContext) -> RandomKCompressor:
    return RandomKCompressor(c.density, at.seed)  # the run's seed: every device picks alike


def build_threshold(c: CompressorConfig, at: BuildContext) -> ThresholdCompressor:
    return ThresholdCompressor(c.threshold)
