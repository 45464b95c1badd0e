"""The compression interfaces: payloads, compressors, error-feedback memories.

A compressor is pure (a flat tensor to a `Payload` and back, never communicating), so the
same one serves every transport. Error feedback is a component of its own, so any
compressor runs with or without it. Capabilities (fixed size, summable on a ring, number of
phases) are class attributes, checked when a scenario is built.
Details: docs/compression.md#the-compression-interfaces
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True, slots=True)
class Layout:
    """Shapes of the tensors laid end to end in a flat gradient (one per parameter)."""

    shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of `flat` in the layout's shapes."""
        return [t.view(s) for t, s in zip(flat.split(self.sizes()), self.shapes, strict=True)]


@dataclass(frozen=True, slots=True)
class Payload:
    """What one device sends for one flat tensor in one phase.

    Every field is optional except `numel`; the codec packs each kind its own way:

    * `values`: float values, either dense (`numel` of them) or at `indices`;
    * `indices`: sorted, distinct int64 positions in ``[0, numel)`` of the `values`;
    * `codes`: unsigned integer codes in ``[0, 2**bits)``, one per element or per index,
      packed `bits` to a value (quantizers, signs);
    * `scales`: a few float32 scalars (norms, scales).
    """

    numel: int
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    bits: int = 0
    scales: torch.Tensor | None = None

    @property
    def num_sent(self) -> int:
        """Elements the payload carries a value or code for (its density times numel)."""
        if self.indices is not None:
            return int(self.indices.numel())
        if self.values is not None:
            return int(self.values.numel())
        if self.codes is not None:
            return int(self.codes.numel())
        return 0


class Compressor(Protocol):
    """Turns a flat tensor into a payload and back; single-phase."""

    name: str
    fixed_size: bool
    allreduce: bool
    num_phases: int

    def compress(self, x: torch.Tensor, step: int) -> Payload:
        """The payload for `x` (flat, float32) at training step `step`."""
        ...

    def decompress(self, payload: Payload, step: int) -> torch.Tensor:
        """The flat float32 tensor a receiver reconstructs (zeros where nothing was sent)."""
        ...


class ErrorFeedback(Protocol):
    """One device's memory of what it has not sent yet.

    `compensate` is pure (it returns what the compressor should see this step); `commit`
    updates the memory once the step's work is known to have arrived. The contract:
    after ``c = compensate(g)`` and ``commit(g, c, sent)``, the residual is ``c - sent``
    (nothing is lost: sent + residual = the accumulated input).
    """

    def compensate(self, grad: torch.Tensor) -> torch.Tensor: ...

    def commit(self, grad: torch.Tensor, compensated: torch.Tensor, sent: torch.Tensor) -> None: ...

    @property
    def residual(self) -> torch.Tensor | None:
        """What is held back (None before the first commit)."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The memory as tensors (a device that restarts keeps it)."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a phase's weighted payloads over the devices not in this process (identity if none)."""


@dataclass(frozen=True, slots=True)
class PhasedResult:
    """One step of a multi-phase scheme among the devices whose work arrived."""

    payloads: list[list[Payload]]
    """payloads[k][i]: what device i sends in phase k."""
    reductions: list[Payload]
    """The weighted mean of each phase's payloads: what comes back to every device."""
    sent: list[torch.Tensor]
    """Each device's own reconstruction of what it sent, for its error feedback."""
    aggregate: torch.Tensor
    """The weighted mean reconstruction every device applies (flat, float32)."""


class PhasedCompressor(Protocol):
    """A scheme whose devices exchange several phases per step (PowerSGD).

    `run` computes every phase for all devices at once, given the reductions the transport
    would carry between phases; it changes no state, so a step whose set of devices changes
    (a crash) can be computed again. `commit` keeps what carries over to the next step
    (PowerSGD's warm start).
    """

    name: str
    fixed_size: bool
    allreduce: bool
    num_phases: int

    def run(
        self,
        xs: list[torch.Tensor],
        weights: torch.Tensor,
        step: int,
        reduce: Reduce | None = None,
    ) -> PhasedResult:
        """Every phase for the devices `xs` (weights: their share of the mean).

        Each phase's mean is `reduce(weights @ payloads)`: in one process (`reduce=None`)
        that is the mean itself; a device of a real fleet passes its own input alone, its
        weight its share of the step's samples, and an all-reduce SUM as `reduce`.
        """
        ...

    def commit(self, result: PhasedResult) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What carries over between steps and every replica shares (for healing)."""
        ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def example_payloads(self) -> list[Payload]:
        """One payload of each phase with the sizes every payload has (for planning bytes)."""
        ...
