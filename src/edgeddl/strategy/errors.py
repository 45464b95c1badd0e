"""Errors a strategy raises that are the user's to fix (no torch here: the CLI imports it)."""

from __future__ import annotations


class TrainingDiverged(ValueError):
    """A device's gradient is no longer finite (the step size or the compression is off)."""

    def __init__(self, step: int, device: int, name: str = "") -> None:
        super().__init__(
            f"training diverged at step {step}: the gradient of {name or f'device {device}'} "
            "is not finite; lower train.lr or change [compression]"
        )
        self.step = step
        self.device = device
