"""What a device's step loop needs from its quorum (torchft or elastic), and what it reports.

`Quorum` is the membership and commit-or-nothing contract that torchft's Manager
(`torchft_quorum.py`) and torchrun elastic (`elastic.py`) both fulfil; `DeviceStats` is what a
device counts (plain values, so an elastic worker can keep them on disk across restarts);
`recoveries` reads its commits and failures as recovery times.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from edgeddl.fleet.timeline import STATES


class RestartRequired(Exception):
    """The engine lost a member, or stops this process: it must end and be restarted
    (torchrun elastic brings it back)."""


class Quorum(Protocol):
    """Membership and commit-or-nothing steps of a real fleet."""

    def start_step(self) -> tuple[int, int | None]:
        """Settle who takes part: (members, this device's slot, None while it heals)."""
        ...

    def current_step(self) -> int: ...

    def allreduce_sum(self, t: torch.Tensor) -> bool:
        """Sum `t` in place over the members; False if the exchange failed."""
        ...

    def report_error(self, e: Exception) -> None:
        """This member cannot take this step: nobody commits it."""
        ...

    def should_commit(self) -> bool:
        """Whether every member's exchange succeeded (then the step counter advances)."""
        ...

    def is_lead(self) -> bool:
        """Whether this device reports evaluations and checkpoints for the fleet."""
        ...

    def batches_committed(self) -> int:
        """The engine's own count of committed batches (kept in checkpoints)."""
        ...

    def catch_up(self, step: int, batches_committed: int) -> None:
        """Take the fleet's counters: this device took the fleet's state at `step`."""
        ...


@dataclass(slots=True)
class DeviceStats:
    """What a device reports; plain values, so an elastic worker can keep them on disk."""

    committed: int = 0
    failed: int = 0
    samples: int = 0
    bytes_up: int = 0
    payload_bytes: int = 0
    sent_to: dict[str, int] = field(default_factory=dict)
    """Payload bytes this device's payloads brought each peer."""
    received: dict[str, int] = field(default_factory=dict)
    """Payload bytes taken from each peer."""
    commits: list[tuple[float, int]] = field(default_factory=list)
    """(wall-clock time, members) of each committed step."""
    failures: list[float] = field(default_factory=list)
    """Wall-clock time of each step that was not committed."""
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STATES, 0.0))
    restarts: int = 0
    reconnects: int = 0
    pacing_overruns: int = 0
    """Steps whose real work took longer than the paced profile allows (pacing did not hold:
    the machine is too busy or too slow for the profile)."""
    started_at: float = field(default_factory=time.time)


def recoveries(commits: list[tuple[float, int]], failures: list[float]) -> list[float]:
    """Seconds from the last commit before an interruption to the first commit after: a
    step given up in between, or fewer members (an elastic restart gives up nothing)."""
    gaps = []
    for (t_prev, m_prev), (t_next, m_next) in itertools.pairwise(commits):
        if m_next < m_prev or any(t_prev < f < t_next for f in failures):
            gaps.append(t_next - t_prev)
    return gaps
