"""Robust aggregation's maths: combining updates when some devices may be broken or hostile.

A trusting mean lets one bad update move the model anywhere. Each rule here (mean, median,
trimmed mean, Krum, multi-Krum) takes the updates as rows (devices x values) with their sample
weights and returns one aggregate that a few bad rows cannot wreck. Mixing (bucketing,
nearest-neighbour mixing) shrinks honest noise first; `screen` rejects non-finite or
out-of-range updates with a reason. `aggregation/robust.py` wires this into the strategies.
Details: docs/trust.md#the-robust-rules
"""

from __future__ import annotations

import torch

from edgeddl.config.robust import RuleName


def screen(
    updates: torch.Tensor, max_norm: float = float("inf")
) -> tuple[torch.Tensor, dict[int, str]]:
    """Which rows may be aggregated (a bool mask), and why each other row was refused."""
    finite = torch.isfinite(updates).all(dim=1)
    norms = torch.linalg.vector_norm(torch.nan_to_num(updates), dim=1)
    keep = finite & (norms <= max_norm)
    reasons = {}
    for i in torch.nonzero(~keep).flatten().tolist():
        reasons[i] = (
            "non-finite values" if not finite[i] else f"norm {norms[i]:.3g} over {max_norm:.3g}"
        )
    return keep, reasons


def krum_scores(updates: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Each row's summed squared distance to its n - f - 2 nearest other rows."""
    n = len(updates)
    if n <= 2 * num_byzantine + 2:
        raise ValueError(f"krum needs more than 2f + 2 updates: {n} updates, f = {num_byzantine}")
    dist = torch.cdist(updates.double(), updates.double()).pow(2)
    dist.fill_diagonal_(float("inf"))
    nearest = torch.topk(dist, n - num_byzantine - 2, dim=1, largest=False).values
    return nearest.sum(dim=1)


def bucket_means(
    updates: torch.Tensor, bucket_size: int, generator: torch.Generator
) -> torch.Tensor:
    """The rows shuffled by `generator`, then each run of `bucket_size` averaged (the last
    bucket holds what is left): ceil(n / s) rows."""
    order = torch.randperm(len(updates), generator=generator).to(updates.device)
    return torch.stack([updates[rows].mean(dim=0) for rows in order.split(bucket_size)])


def nearest_neighbor_mixing(updates: torch.Tensor, num_byzantine: int) -> torch.Tensor:
    """Each row replaced by the mean of its n - f nearest rows (L2), itself included."""
    n = len(updates)
    k = n - num_byzantine
    if k < 1:
        raise ValueError(f"nnm needs more than f updates: {n} updates, f = {num_byzantine}")
    dist = torch.cdist(updates.double(), updates.double())
    dist.fill_diagonal_(-1.0)  # a row is its own nearest, whatever cdist's rounding says
    nearest = torch.topk(dist, k, dim=1, largest=False).indices
    mixing = torch.zeros(n, n, dtype=updates.dtype, device=updates.device)
    mixing.scatter_(1, nearest, 1.0 / k)
    return mixing @ updates


def aggregate(
    updates: torch.Tensor,
    weights: torch.Tensor,
    rule: RuleName = "mean",
    *,
    trim: int = 0,
    num_byzantine: int = 0,
    multi: int = 1,
) -> torch.Tensor:
    """One aggregate of `updates` (devices x values) under `rule`."""
    if updates.ndim != 2 or len(updates) == 0:
        raise ValueError("updates: expected a non-empty devices x values matrix")
    if rule == "mean":
        w = weights.to(updates.dtype) / weights.sum()
        return (w[:, None] * updates).sum(dim=0)
    if rule == "median":
        return updates.median(dim=0).values if len(updates) % 2 else _mid_median(updates)
    if rule == "trimmed_mean":
        if not 0 <= 2 * trim < len(updates):
            raise ValueError(f"trim {trim}: needs 2 * trim < {len(updates)} updates")
        ordered = updates.sort(dim=0).values
        return ordered[trim : len(updates) - trim].mean(dim=0)
    scores = krum_scores(updates, num_byzantine)
    if rule == "krum":
        return updates[int(scores.argmin())].clone()
    if not 1 <= multi <= len(updates):
        raise ValueError(f"multi {multi}: must be in 1..{len(updates)}")
    best = torch.topk(scores, multi, largest=False).indices
    return updates[best].mean(dim=0)


def _mid_median(updates: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise median of an even count: the mean of the two middle values
    (torch's median returns the lower one, which biases every coordinate down)."""
    ordered = updates.sort(dim=0).values
    mid = len(updates) // 2
    return (ordered[mid - 1] + ordered[mid]) / 2
