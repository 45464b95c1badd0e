"""Capability-aware batch balancing: split a fixed global batch by what devices can do.

Each device's step time is linear in its share (fixed costs plus seconds per sample), so
shares can follow speed (``capability``), minimise the slowest device's time (``min_time``,
water-filling) or be ``equal`` (the foil). They are rounded to whole samples within each
device's memory cap.
Details: docs/scenarios.md#balancing-trainbalance
"""

from __future__ import annotations

import heapq

import numpy as np


class BalanceError(ValueError):
    """The global batch cannot be placed on the devices (e.g. it does not fit in memory)."""


def _round_to(
    total: int,
    ideal: np.ndarray,
    cap: np.ndarray,
    fixed: np.ndarray,
    per: np.ndarray,
    within_one: bool = True,
) -> np.ndarray:
    """Whole samples: round `ideal` down, then each sample left over goes to the device that
    would finish earliest with one more; `within_one` keeps every share within one sample of
    its ideal (at most one extra each), otherwise the greedy choice is free (min_time)."""
    base = np.minimum(np.floor(ideal + 1e-9).astype(np.int64), cap)
    left = total - int(base.sum())
    if not within_one:
        heap = [(fixed[i] + (base[i] + 1) * per[i], int(i)) for i in np.flatnonzero(base < cap)]
        heapq.heapify(heap)
        for _ in range(left):  # earliest finish first: optimal for the slowest device's time
            _, i = heapq.heappop(heap)
            base[i] += 1
            if base[i] < cap[i]:
                heapq.heappush(heap, (fixed[i] + (base[i] + 1) * per[i], i))
        return base
    finish = fixed + (base + 1) * per
    for room in (base < np.minimum(np.ceil(ideal - 1e-9), cap), base < cap):
        if left <= 0:
            break
        cand = np.flatnonzero(room)
        pick = cand[np.argsort(finish[cand], kind="stable")[:left]]
        base[pick] += 1
        left -= len(pick)
        finish = fixed + (base + 1) * per
    return base


def _capped_proportional(total: int, weight: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Real shares proportional to `weight`, capped; what a cap cuts goes to the others."""
    ideal = np.zeros(len(weight))
    free = np.ones(len(weight), dtype=bool)
    left = float(total)
    while left > 1e-9 and free.any():
        share = left * weight * free / weight[free].sum()
        over = free & (ideal + share > cap)
        if not over.any():
            return ideal + share
        ideal[over] = cap[over]
        free &= ~over
        left = total - ideal.sum()
    return ideal


def balance_shares(
    global_batch: int,
    per_sample_s: np.ndarray,
    fixed_s: np.ndarray,
    cap: np.ndarray,
    mode: str = "capability",
    min_share: int = 1,
) -> np.ndarray:
    """Integer samples per device summing to `global_batch`
    (docs/scenarios.md#balancing-trainbalance).

    A device that takes part gets at least `min_share` samples (2 for models with BatchNorm,
    which cannot normalise a batch of one); when the batch is too small for every device to
    get that many, the slowest devices sit the step out.
    """
    if global_batch < min_share:
        raise BalanceError(
            f"global batch {global_batch} is too small: this model needs at "
            f"least {min_share} samples per device (BatchNorm)"
        )
    shares = _balance(global_batch, per_sample_s, fixed_s, cap, mode)
    if min_share <= 1 or not np.any((shares > 0) & (shares < min_share)):
        return shares
    per = np.asarray(per_sample_s, dtype=np.float64)
    keep = np.zeros(len(per), dtype=bool)
    room = np.asarray(cap) >= min_share
    fastest = np.argsort(np.where(room, per, np.inf), kind="stable")
    keep[fastest[: min(int(room.sum()), global_batch // min_share)]] = True
    shares = np.zeros(len(per), dtype=np.int64)
    shares[keep] = _balance(
        global_batch, per[keep], np.asarray(fixed_s)[keep], np.asarray(cap)[keep], mode
    )
    for i in np.flatnonzero(keep & (shares < min_share)):
        while shares[i] < min_share:  # the largest share can spare one: the total allows it
            shares[int(np.argmax(shares))] -= 1
            shares[i] += 1
    return shares


def _balance(
    global_batch: int,
    per_sample_s: np.ndarray,
    fixed_s: np.ndarray,
    cap: np.ndarray,
    mode: str,
) -> np.ndarray:
    n = len(per_sample_s)
    if n == 0:
        raise BalanceError("no device is in the fleet to take the batch")
    cap = np.asarray(cap, dtype=np.int64)
    per = np.asarray(per_sample_s, dtype=np.float64)
    fixed = np.asarray(fixed_s, dtype=np.float64)
    if int(cap.sum()) < global_batch:
        raise BalanceError(
            f"global batch {global_batch} does not fit in the devices' memory "
            f"(room for {int(cap.sum())} samples); lower train.global_batch"
        )
    if mode == "equal":
        ideal = np.full(n, global_batch / n)
        if np.any(ideal > cap):
            raise BalanceError(
                f"an equal share of {global_batch / n:.0f} samples exceeds a "
                "device's memory; lower train.global_batch or use "
                'balance = "capability"'
            )
        return _round_to(global_batch, ideal, cap, fixed, per)
    if mode == "capability":
        ideal = _capped_proportional(global_batch, 1.0 / per, cap)
        return _round_to(global_batch, ideal, cap, fixed, per)
    if mode != "min_time":
        raise ValueError(f"unknown balance mode {mode!r}; allowed: capability, min_time, equal")

    def placed(t: float) -> float:
        return float(np.clip((t - fixed) / per, 0.0, cap).sum())

    lo, hi = float(fixed.min()), float((fixed + per * global_batch).max())
    for _ in range(100):  # bisection on the common finish time
        mid = 0.5 * (lo + hi)
        if placed(mid) < global_batch:
            lo = mid
        else:
            hi = mid
    ideal = np.clip((hi - fixed) / per, 0.0, cap)
    ideal *= global_batch / ideal.sum()
    return _round_to(global_batch, np.minimum(ideal, cap), cap, fixed, per, within_one=False)
