"""The Strategy interface: what each device computes, what it sends, how it is aggregated.

A strategy cannot tell whether its payloads travel on the simulated or a real transport: it
says what each device sends (`prepare`), and is told whose payload arrived (`commit`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from edgeddl.strategy.data_parallel import Exchange


class Strategy(Protocol):
    name: str
    model: nn.Module

    def payload_bytes(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Typical (up, down) bytes of devices `idx` per step (for balancing)."""
        ...

    def forget(self, device: int) -> None:
        """A device crashed: whatever it kept (error-feedback memory) is gone."""
        ...

    def aggregation_flops(self) -> float:
        """FLOPs for the aggregator to take in one device's contribution."""
        ...

    def down_bytes(self, needs_model: np.ndarray) -> np.ndarray:
        """Bytes each device receives at a step's start (star); `needs_model`: it missed one."""
        ...

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], devices: np.ndarray, step: int
    ) -> Exchange:
        """Each device's work on its batch (consecutive `counts` rows): what it sends."""
        ...

    def commit(self, ex: Exchange, contributed: np.ndarray) -> torch.Tensor | None:
        """Apply the update from the devices whose payloads arrived; the detached loss."""
        ...

    def compression_summary(self) -> dict[str, float]:
        """Gradient bytes sent per device and step, and the ratio to dense."""
        ...
