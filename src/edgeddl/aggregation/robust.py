"""Robust aggregation in the strategies: the coordinator's side of misbehaving devices.

`RobustAggregator` screens each arrived update
(`rules.screen`: non-finite values, norms over `max_update_norm`), records every
rejection with its reason, mixes the rest (`pre_aggregation`: bucketing, seeded per run and
step, or nearest-neighbour mixing) and combines them with the scenario's rule. Every strategy
that aggregates per-device updates calls it: data-parallel on raw gradients
(`robust_dp.py`), compressed data-parallel and compressed federated on the *decoded*
payloads (what the server actually receives), federated on the clients' deltas.
The devices' side is `fleet.behaviors`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from edgeddl.aggregation.rules import aggregate, bucket_means, nearest_neighbor_mixing, screen
from edgeddl.config.robust import RobustConfig
from edgeddl.rng import seeded_generator


class RobustAggregator:
    """Screen, mixing, then the rule; rejections and skipped steps are kept for
    `summary.json`."""

    def __init__(
        self, cfg: RobustConfig, names: list[str], expected_updates: int, seed: int = 0
    ) -> None:
        self.cfg = cfg
        self.names = names
        self.expected_updates = expected_updates
        """Updates a step usually brings (for the aggregation's cost on the virtual clock)."""
        self.seed = seed
        """The run's seed: bucketing shuffles with (seed, step)."""
        self.max_norm = cfg.max_update_norm or math.inf
        self.rejected: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self._screened: tuple[int, dict[int, str]] = (-1, {})
        """The last `combine`'s step and the updates its screen refused."""

    def combine(
        self,
        step: int,
        devices: list[int],
        updates: list[torch.Tensor],
        weights: Sequence[float],
    ) -> tuple[torch.Tensor | None, list[int]]:
        """(the aggregate, positions of the updates that passed the screen); the aggregate
        is None when no update passed or too few for the rule (the step changes nothing)."""
        stacked = torch.stack(updates)
        keep_mask, reasons = screen(stacked, self.max_norm)
        self._screened = (step, {devices[i]: why for i, why in reasons.items()})
        for i, why in reasons.items():
            self.rejected.append({"step": step, "device": self.names[devices[i]], "reason": why})
        keep = torch.nonzero(keep_mask).flatten().tolist()
        short = self.cfg.shortfall(len(keep)) if keep else ("", "no update passed the screen")
        if short is not None:
            self.skipped.append({"step": step, "reason": short[1]})
            return None, keep
        rows = self.pre_aggregate(stacked[keep], step)
        w = torch.tensor([weights[i] for i in keep], dtype=torch.float64)
        if self.cfg.pre_aggregation != "none":  # only the mean weighs, and it does not mix
            w = torch.ones(len(rows), dtype=torch.float64)
        most = len(rows) - self.cfg.num_byzantine
        agg = aggregate(
            rows,
            w,
            self.cfg.rule,
            trim=self.cfg.trim_each_end,
            num_byzantine=self.cfg.num_byzantine,
            multi=min(self.cfg.multi_krum_m or most, most),
        )
        return agg.to(updates[0].dtype), keep

    def screened_at(self, step: int) -> dict[int, str]:
        """Device -> reason for the updates the screen refused at `step` (its last
        `combine`, for the ledger's aggregate entry)."""
        return dict(self._screened[1]) if self._screened[0] == step else {}

    def pre_aggregate(self, updates: torch.Tensor, step: int) -> torch.Tensor:
        """What the rule sees: the updates, or their buckets' means, or their mixing."""
        if self.cfg.pre_aggregation == "bucketing":
            generator = seeded_generator(self.seed, step)
            return bucket_means(updates, self.cfg.bucket_size, generator)
        if self.cfg.pre_aggregation == "nnm":
            return nearest_neighbor_mixing(updates, self.cfg.num_byzantine)
        return updates

    def flops_per_update(self, numel: int) -> float:
        """The coordinator's FLOPs per arrived update with `expected_updates` of them:
        the screen (finite check, norm), the mixing, then the rule on the m rows it sees.
        Bucketing adds each value once; nnm computes n(n-1)/2 squared distances (3 FLOPs a
        value) and an n x n mixing product. Median and trimmed mean sort every coordinate's
        m values (m log2 m comparisons); Krum computes m(m-1)/2 squared distances."""
        n, d = max(self.expected_updates, 1), float(numel)
        m = self.cfg.rule_inputs(n)
        per_update = 3.0 * d
        if self.cfg.pre_aggregation == "bucketing":
            per_update += d
        elif self.cfg.pre_aggregation == "nnm":
            per_update += 1.5 * d * (n - 1) + 2.0 * d * n
        rule = self.cfg.rule
        if rule == "mean":
            per_row = 2.0 * d
        elif rule in ("median", "trimmed_mean"):
            per_row = d * max(1.0, math.log2(m)) + d
        else:
            per_row = 1.5 * d * (m - 1) + 2.0 * d
        return per_update + per_row * m / n

    def summary(self) -> dict[str, Any]:
        kinds = Counter(r["reason"].split(" ")[0] for r in self.rejected)
        return {
            "rule": self.cfg.rule,
            "pre_aggregation": self.cfg.pre_aggregation,
            "device_momentum": self.cfg.device_momentum,
            "num_rejected": len(self.rejected),
            "rejected_by_kind": dict(kinds),
            "rejected_updates": self.rejected,
            "skipped_steps": self.skipped,
        }
