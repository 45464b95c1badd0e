"""Split a labelled dataset across fleet devices, IID or with Dirichlet label skew.

Every scheme returns disjoint index arrays that together cover every sample exactly once, so a
fleet never silently drops or duplicates data. Splits are seeded and reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import numpy as np
import torch

from edgeddl.config.schema import PartitionName

PARTITION_SCHEMES: tuple[str, ...] = get_args(PartitionName)  # one list: the config's


def partition(
    labels: torch.Tensor,
    num_parts: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split sample indices into `num_parts` disjoint, covering int64 arrays (sorted).

    "iid" shuffles and cuts sizes proportional to `weights` (equal when None). "dirichlet" draws,
    per class, part proportions ~ Dirichlet(alpha), scaled by `weights`; smaller alpha means
    stronger label skew. Both then top up parts below `min_size` from the largest parts.
    """
    label_array = torch.as_tensor(labels).cpu().numpy()
    if label_array.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(label_array.shape)}")
    part_weights = _check_args(len(label_array), num_parts, scheme, alpha, weights, min_size)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = _split_iid(len(label_array), part_weights, rng)
    else:
        parts = _split_dirichlet(label_array, part_weights, alpha, rng)
    _enforce_min_size(parts, min_size)
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def _check_args(
    num_samples: int,
    num_parts: int,
    scheme: str,
    alpha: float,
    weights: Sequence[float] | None,
    min_size: int,
) -> np.ndarray:
    """Validate arguments; return the part weights normalised to sum to 1."""
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(
            f"unknown partition scheme {scheme!r}; allowed: {', '.join(PARTITION_SCHEMES)}"
        )
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if num_parts * min_size > num_samples:
        raise ValueError(
            f"cannot give {num_parts} parts at least {min_size} samples each: "
            f"only {num_samples} samples"
        )
    if weights is None:
        return np.full(num_parts, 1.0 / num_parts)
    part_weights = np.asarray(weights, dtype=np.float64)
    if part_weights.shape != (num_parts,):
        raise ValueError(f"weights must have one entry per part ({num_parts}), got {len(weights)}")
    if not np.all(np.isfinite(part_weights)) or np.any(part_weights <= 0):
        raise ValueError(f"weights must be finite and > 0, got {list(weights)}")
    return part_weights / part_weights.sum()


def _largest_remainder(total: int, fractions: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, each within 1 of total * fraction (Hamilton method)."""
    quotas = total * fractions / fractions.sum()
    counts = np.floor(quotas).astype(np.int64)
    num_left = total - int(counts.sum())
    # Stable sort: ties go to the lower part index, keeping the result deterministic.
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[:num_left]] += 1
    return counts


def _split_iid(
    num_samples: int, part_weights: np.ndarray, rng: np.random.Generator
) -> list[list[int]]:
    shuffled = rng.permutation(num_samples)
    bounds = np.cumsum(_largest_remainder(num_samples, part_weights))[:-1]
    return [chunk.tolist() for chunk in np.split(shuffled, bounds)]


def _split_dirichlet(
    labels: np.ndarray, part_weights: np.ndarray, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    num_parts = len(part_weights)
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    for label in np.unique(labels):
        class_indices = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_parts, alpha)) * part_weights
        counts = _largest_remainder(len(class_indices), proportions)
        bounds = np.cumsum(counts)[:-1]
        for part, chunk in zip(parts, np.split(class_indices, bounds), strict=True):
            part.extend(chunk.tolist())
    return parts


def _enforce_min_size(parts: list[list[int]], min_size: int) -> None:
    """Move samples one at a time from the currently largest part into parts below min_size.

    Callers guarantee num_parts * min_size <= num_samples, so while any part is short some part
    holds more than min_size and can donate without falling short itself.
    """
    sizes = np.array([len(part) for part in parts])
    for receiver in range(len(parts)):
        while sizes[receiver] < min_size:
            donor = int(np.argmax(sizes))  # first largest: deterministic tie-break
            parts[receiver].append(parts[donor].pop())
            sizes[donor] -= 1
            sizes[receiver] += 1
