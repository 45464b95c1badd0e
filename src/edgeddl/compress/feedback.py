"""Error-feedback memories: what a device has not sent yet, added back on the next step.

A compressor drops values; a memory keeps them so they are sent later rather than lost.
`ResidualFeedback` (classic error feedback), `MomentumFeedback` (DGC's momentum-corrected
memory) and `NoFeedback` satisfy `edgeddl.compress.base.ErrorFeedback`. State is created
lazily, so a memory needs to know nothing in advance.
Details: docs/compression.md#error-feedback-memories
"""

from __future__ import annotations

import math

import torch


class ResidualFeedback:
    """Classic error feedback: ``c = g + e``, then ``e = c - sent``."""

    def __init__(self) -> None:
        self._error: torch.Tensor | None = None

    def compensate(self, grad: torch.Tensor) -> torch.Tensor:
        # A fresh tensor even before the first commit, so the caller may change either freely.
        if self._error is None:
            return grad.clone()
        return grad + self._error

    def commit(self, grad: torch.Tensor, compensated: torch.Tensor, sent: torch.Tensor) -> None:
        self._error = compensated - sent

    @property
    def residual(self) -> torch.Tensor | None:
        return self._error

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self._error is None else {"error": self._error}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._error = state.get("error")


class MomentumFeedback:
    """DGC's momentum-corrected memory with local clipping and momentum factor masking.

    Per step, with ``g'`` the clipped gradient: ``u = m u + g'`` (velocity) and the compressor
    sees ``c = v + u`` (``v``: what was accumulated and not sent). After sending, ``v = c - sent``
    and ``u`` is cleared where something was sent, so stale momentum does not push a value that
    has already gone out (momentum factor masking). DGC also clears ``v`` there; ``c - sent`` is
    already zero where the exact value went out, and keeping the small remainder a lossy wire
    format (fp16 values, quantized codes) leaves there is what conserves the gradient mass.

    Masking is meant for sparsifiers: with a dense compressor (every entry sent) the velocity is
    cleared everywhere each step and the memory degenerates to plain residual feedback.
    """

    def __init__(self, momentum: float, clip_norm: float = 0.0, num_devices: int = 1) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if clip_norm < 0.0:
            raise ValueError(f"clip_norm must be >= 0, got {clip_norm}")
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {num_devices}")
        self.momentum = momentum
        self.clip_norm = clip_norm
        self.num_devices = num_devices
        # DGC clips each device's gradient to the global threshold scaled by N^-1/2, so the
        # summed gradient of N devices stays within the threshold in expectation.
        self._threshold = clip_norm / math.sqrt(num_devices)
        self._velocity: torch.Tensor | None = None
        self._accumulated: torch.Tensor | None = None

    def clip(self, grad: torch.Tensor) -> torch.Tensor:
        """`grad` scaled down so that its L2 norm is at most ``clip_norm / sqrt(num_devices)``."""
        if self._threshold <= 0.0:
            return grad
        norm = torch.linalg.vector_norm(grad)
        # A tensor factor instead of a branch on the norm: no device sync. A zero norm gives
        # an infinite ratio, clamped to 1.
        return grad * (self._threshold / norm).clamp(max=1.0)

    def _next_velocity(self, grad: torch.Tensor) -> torch.Tensor:
        clipped = self.clip(grad)
        if self._velocity is None:
            # A copy: the caller's gradient must never alias the state that commit masks.
            return clipped.clone()
        return torch.mul(self._velocity, self.momentum).add_(clipped)

    def compensate(self, grad: torch.Tensor) -> torch.Tensor:
        velocity = self._next_velocity(grad)
        if self._accumulated is None:
            return velocity
        return velocity.add_(self._accumulated)

    def commit(self, grad: torch.Tensor, compensated: torch.Tensor, sent: torch.Tensor) -> None:
        # The velocity is recomputed rather than kept from compensate, so compensate stays pure
        # and can be called again (e.g. when a step is recomputed after a crash).
        velocity = self._next_velocity(grad)
        velocity.masked_fill_(sent != 0, 0.0)
        self._velocity = velocity
        self._accumulated = compensated - sent

    @property
    def velocity(self) -> torch.Tensor | None:
        """The momentum buffer ``u`` (None before the first commit)."""
        return self._velocity

    @property
    def residual(self) -> torch.Tensor | None:
        return self._accumulated

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"velocity": self._velocity, "accumulated": self._accumulated}
        return {k: v for k, v in state.items() if v is not None}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._velocity, self._accumulated = state.get("velocity"), state.get("accumulated")


class NoFeedback:
    """No memory: the compressor sees the raw gradient, and what it drops is lost."""

    def compensate(self, grad: torch.Tensor) -> torch.Tensor:
        return grad

    def commit(self, grad: torch.Tensor, compensated: torch.Tensor, sent: torch.Tensor) -> None:
        return None

    @property
    def residual(self) -> torch.Tensor | None:
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None
