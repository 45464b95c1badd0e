"""The Strategy interface: what each device computes, what it sends, how it is aggregated.

A strategy cannot tell whether its payloads travel on the simulated or a real transport: it
only sees batches of the devices whose work arrived, in order, with their sample counts.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Strategy(Protocol):
    name: str
    model: nn.Module

    def payload_bytes(self) -> tuple[int, int]:
        """(up, down) bytes one device sends and receives per step."""
        ...

    def aggregation_flops(self) -> float:
        """FLOPs for the aggregator to take in one device's contribution."""
        ...

    def step(self, x: torch.Tensor, y: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Apply one update from the contributing devices' batches; return the detached loss."""
        ...

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(mean loss, accuracy) of the current model on a held-out set."""
        ...
