"""Misbehaving devices: what a broken or hostile device does to what it sends.

A device's behaviour changes its update (its gradient, or a federated client's delta) before
the wire; with compression the device then runs the honest protocol (error feedback,
compressor, codec) on its tampered update. The coordinator's defence is `aggregation`.
"""

from __future__ import annotations

import numpy as np
import torch

from edgeddl.config.schema import Scenario
from edgeddl.rng import seeded_generator


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
            g = seeded_generator(self.seed, step, d)
            rms = float(update.double().pow(2).mean().sqrt())
            noise = torch.randn(update.shape, generator=g, dtype=update.dtype)
            return noise.to(update.device) * (scale * rms)
        return update  # honest, and label_flip (poisoned before training)
