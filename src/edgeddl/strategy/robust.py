"""Robust aggregation in the strategies, and the simulator's misbehaving devices.

`RobustAggregator` is the coordinator's side: it screens each arrived update
(`security.robust.screen`: non-finite values, norms over `max_update_norm`), records every
rejection with its reason, and combines the rest with the scenario's rule. Every strategy
that aggregates per-device updates calls it: data-parallel on raw gradients
(`robust_dp.py`), compressed data-parallel and compressed federated on the *decoded*
payloads (what the server actually receives), federated on the clients' deltas.

`Behaviors` is the devices' side: what a misbehaving device does to what it sends (its
gradient, or a federated client's delta) before the wire; with compression, the device then
runs the honest protocol (error feedback, compressor, codec) on its tampered update.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from edgeddl.config.robust import RobustConfig
from edgeddl.config.schema import Scenario
from edgeddl.security.robust import aggregate, screen


class Behaviors:
    """Each device's behaviour (by device index) and how it changes what the device sends."""

    def __init__(
        self, behaviors: list[str], scales: list[float], num_classes: int, seed: int
    ) -> None:
        self.behaviors = behaviors
        self.scales = scales
        self.num_classes = num_classes
        self.seed = seed

    @classmethod
    def from_scenario(cls, scenario: Scenario, num_classes: int) -> Behaviors:
        groups = [(g.behavior, g.behavior_scale, g.count) for g in scenario.fleet.devices]
        return cls(
            [b for b, _, k in groups for _ in range(k)],
            [s for _, s, k in groups for _ in range(k)],
            num_classes,
            scenario.run.seed,
        )

    def poison_labels(self, y: torch.Tensor, counts: list[int], devices: list[int]) -> torch.Tensor:
        """`y` with the rows of label-flipping devices mapped y -> C - 1 - y."""
        flips = [self.behaviors[d] == "label_flip" for d in devices]
        if not any(flips):
            return y
        rows = torch.from_numpy(np.repeat(np.array(flips), counts)).to(y.device)
        return torch.where(rows, self.num_classes - 1 - y, y)

    def tamper(
        self, updates: list[torch.Tensor], devices: list[int], step: int
    ) -> list[torch.Tensor]:
        """What each device sends instead of its honest `updates` (the same list if honest)."""
        return [self._tamper(u, d, step) for u, d in zip(updates, devices, strict=True)]

    def _tamper(self, update: torch.Tensor, d: int, step: int) -> torch.Tensor:
        kind, scale = self.behaviors[d], self.scales[d]
        if kind == "sign_flip":
            return -update
        if kind == "scaled":
            return update * scale
        if kind == "free_rider":
            return torch.zeros_like(update)
        if kind == "nan":
            return torch.full_like(update, float("nan"))
        if kind == "noise":  # seeded per (run, step, device): reproducible, independent
            g = torch.Generator().manual_seed(
                int(np.random.SeedSequence([self.seed, step, d]).generate_state(1)[0])
            )
            rms = float(update.double().pow(2).mean().sqrt())
            noise = torch.randn(update.shape, generator=g, dtype=update.dtype)
            return noise.to(update.device) * (scale * rms)
        return update  # honest, and label_flip (poisoned before training)


class RobustAggregator:
    """Screen, then the rule; rejections and skipped steps are kept for `summary.json`."""

    def __init__(self, cfg: RobustConfig, names: list[str], expected_updates: int) -> None:
        self.cfg = cfg
        self.names = names
        self.expected_updates = expected_updates
        """Updates a step usually brings (for the aggregation's cost on the virtual clock)."""
        self.max_norm = cfg.max_update_norm or math.inf
        self.rejected: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []

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
        for i, why in reasons.items():
            self.rejected.append({"step": step, "device": self.names[devices[i]], "reason": why})
        keep = torch.nonzero(keep_mask).flatten().tolist()
        n, f = len(keep), self.cfg.num_byzantine
        problem = ""
        if n == 0:
            problem = "no update passed the screen"
        elif self.cfg.rule in ("krum", "multi_krum") and n <= 2 * f + 2:
            problem = f"{self.cfg.rule} needs more than 2f + 2 = {2 * f + 2} updates, got {n}"
        elif self.cfg.rule == "trimmed_mean" and 2 * self.cfg.trim_each_end >= n:
            problem = f"trimmed_mean trims {self.cfg.trim_each_end} at each end of {n} updates"
        if problem:
            self.skipped.append({"step": step, "reason": problem})
            return None, keep
        w = torch.tensor([weights[i] for i in keep], dtype=torch.float64)
        agg = aggregate(
            stacked[keep],
            w,
            self.cfg.rule,
            trim=self.cfg.trim_each_end,
            num_byzantine=f,
            multi=self.cfg.multi_krum_m or n - f,
        )
        return agg.to(updates[0].dtype), keep

    def flops_per_update(self, numel: int) -> float:
        """The coordinator's FLOPs per arrived update with `expected_updates` of them:
        the screen (finite check, norm), then the rule. Median and trimmed mean sort every
        coordinate's n values (n log2 n comparisons); Krum computes n(n-1)/2 squared
        distances of 3 FLOPs per value (O(n^2 d) in all)."""
        n, d = max(self.expected_updates, 1), float(numel)
        screen_flops = 3.0 * d
        rule = self.cfg.rule
        if rule == "mean":
            return screen_flops + 2.0 * d
        if rule in ("median", "trimmed_mean"):
            return screen_flops + d * max(1.0, math.log2(n)) + d
        return screen_flops + 1.5 * d * (n - 1) + 2.0 * d

    def summary(self) -> dict[str, Any]:
        kinds = Counter(r["reason"].split(" ")[0] for r in self.rejected)
        return {
            "rule": self.cfg.rule,
            "num_rejected": len(self.rejected),
            "rejected_by_kind": dict(kinds),
            "rejected_updates": self.rejected,
            "skipped_steps": self.skipped,
        }
