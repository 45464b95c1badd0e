"""What every real-fleet exchange shares: the step's table summed through the quorum, what
an exchange leaves between the sum and the quorum's verdict, and the `DeviceExchange`
protocol the device loop is typed against (`AllReduceStep`, `SecureDevice`, `SplitDevice`).

Every member of a step sums one small table through the quorum's fault-tolerant collective:
one slot per member (its device index, weight, measured speed, loss, payload bytes, work
seconds) and, beyond it, whatever the exchange sums (an update's packed values or extras).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from edgeddl.strategy.base import Update

SLOT = 6
"""Values per member in the step's table: device index + 1, samples, speed (smoothed),
loss sum, payload bytes, seconds its work took this step."""


class Collective(Protocol):
    def allreduce_sum(self, t: torch.Tensor) -> bool:
        """Sum `t` in place over the members; False if the exchange failed (do not use `t`)."""
        ...


class ExchangeError(ValueError):
    """A member's contribution cannot be read (the step is given up everywhere)."""


@dataclass(slots=True)
class StepOutcome:
    """What the members' table said, and what this device sent and received."""

    devices: list[int]
    """The device index of each member that contributed samples, in slot order."""
    counts: list[int]
    speeds: list[float]
    work_s: list[float]
    """Seconds each member's work (data and compute) took this step."""
    total: int
    loss: float
    payload_bytes: int = 0
    """This device's payloads in wire-codec bytes (all phases)."""
    received_bytes: dict[int, int] = field(default_factory=dict)
    """Payload bytes taken from each other contributing device (single-phase compressors;
    counted only by a device that contributed itself)."""
    sent_to: list[int] = field(default_factory=list)
    """The other contributing devices this device's payload reached."""
    wire_bytes: int = 0
    """Bytes the collective moved for this device (a ring all-reduce sends twice (m-1)/m of
    the buffer)."""


Apply = Callable[[], None]


class Pending:
    """Between the exchange and the quorum's verdict: what `commit` applies, and what
    `abandon` undoes of a tentative update (the step was not committed)."""

    def __init__(
        self, outcome: StepOutcome, apply: list[Apply], undo: list[Apply] | None = None
    ) -> None:
        self.outcome = outcome
        self._apply = apply
        self._undo = undo or []

    def commit(self) -> None:
        for fn in self._apply:
            fn()

    def abandon(self) -> None:
        for fn in self._undo:
            fn()


def ring_bytes(buffer_bytes: int, members: int) -> int:
    """Bytes one member sends in a ring all-reduce of a buffer (reduce-scatter + all-gather)."""
    return round(2 * (members - 1) / members * buffer_bytes) if members > 1 else 0


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class DeviceExchange(Protocol):
    """How a device of a real fleet carries its step: its own work on its batch (which may
    itself talk to the coordinator), then the fleet's sum, up to the quorum's verdict."""

    def local_step(
        self, store: Any, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[Update, float]:
        """The device's update on (x, y) and the seconds it spent in requests
        (`LinkError` if a request failed: the device sits the step out)."""
        ...

    def exchange(
        self,
        store: Any,
        update: Update | None,
        speed: float,
        slot: int | None,
        members: int,
        step: int,
        collective: Collective,
        work_s: float = 0.0,
    ) -> Pending | None:
        """The fleet's sum for this step with this device's `update` (None: it sends
        nothing). None if the exchange failed or carried nothing to apply; `ExchangeError`
        if a member's contribution cannot be read."""
        ...


@dataclass(frozen=True, slots=True)
class Contribution:
    """One member's part of a weighted sum: its values, its weight (samples, or a client's
    weight), mean loss, payload bytes and work seconds."""

    flat: torch.Tensor
    weight: float
    loss: float
    payload_bytes: int
    work_s: float
    speed: float = 0.0


def sum_weighted(
    mine: Contribution | None,
    size: int,
    device: int,
    slot: int | None,
    members: int,
    collective: Collective,
    comm: torch.device,
) -> tuple[StepOutcome, torch.Tensor, list[list[float]]] | None:
    """Sum `mine` (None, or no slot: this member sends nothing) times its weight with the
    members' in one collective: the step's table read out, the weighted mean of the `size`
    values (zeros if nobody contributed) and the table's rows. None if the exchange
    failed."""
    own = torch.zeros(members * SLOT + size)
    if mine is not None and slot is not None:
        w = mine.weight
        own[slot * SLOT : (slot + 1) * SLOT] = torch.tensor(
            [device + 1, w, mine.speed, mine.loss * w, mine.payload_bytes, mine.work_s]
        )
        if size:
            own[members * SLOT :] = mine.flat.reshape(-1).to(own.dtype) * w
    buf = own.to(comm)
    if not collective.allreduce_sum(buf):
        return None
    outcome = read_table(buf, members)
    outcome.wire_bytes = ring_bytes(nbytes(buf), members)
    outcome.payload_bytes = mine.payload_bytes if mine is not None and slot is not None else 0
    rows = buf[: members * SLOT].view(members, SLOT).tolist()
    return outcome, buf[members * SLOT :] / max(outcome.total, 1), rows


def read_table(table: torch.Tensor, members: int) -> StepOutcome:
    """The members' rows of a summed table (rows without a device or samples left out)."""
    rows = table[: members * SLOT].view(members, SLOT).tolist()
    used = [r for r in rows if r[0] >= 1 and r[1] > 0]
    total = round(sum(r[1] for r in used))
    return StepOutcome(
        devices=[int(r[0]) - 1 for r in used],
        counts=[round(r[1]) for r in used],
        speeds=[float(r[2]) for r in used],
        work_s=[float(r[5]) for r in used],
        total=total,
        loss=sum(r[3] for r in used) / max(total, 1),
    )
