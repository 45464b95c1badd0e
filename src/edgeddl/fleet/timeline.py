"""One step's timeline: what each participating device did, in virtual seconds.

A device goes through a sequence of phases (communication, data loading, compute, idle) whose
durations add up to the step's length for it; a crash cuts the sequence short.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STATES = ("compute", "data_loading", "communication", "idle")


@dataclass(frozen=True, slots=True)
class StepRequest:
    """One step to carry: who takes part, their local work, what they send, who crashes."""

    start_s: float
    devices: np.ndarray
    data_s: np.ndarray
    """Each participant's data-loading seconds for its share."""
    compute_s: np.ndarray
    """Each participant's compute seconds for its share."""
    up_bytes: int | np.ndarray
    """Bytes each device sends: one number for all, one per device, or one row per phase
    (phases x devices; PowerSGD sends twice)."""
    down_bytes: int | np.ndarray
    """Bytes each device receives: star, at the step's start (the model state, or the last
    step's aggregate); ring, what a joiner fetches (the model state)."""
    crash_at_s: np.ndarray
    """Each participant's next crash time (absolute), inf if none is scheduled."""
    needs_model: np.ndarray
    """True for a device that must first fetch the current model (ring: a joiner)."""
    agg_flops: float
    """FLOPs for the aggregator to take in one contribution."""
    mid_down_bytes: tuple[int, ...] = ()
    """Star with several phases: what the coordinator sends every device between phases."""
    open_s: float = 0.0
    """Star: the coordinator's seconds to open one sealed update, first come first served
    as the updates arrive (0: nothing sealed)."""
    deadline_s: float = 0.0
    """Star: seconds from the step's start by which a device's upload must have arrived, or
    it is dropped (a federated round's deadline); 0 for none."""

    def up_phases(self) -> np.ndarray:
        """Bytes sent as phases x devices (float64)."""
        up = np.asarray(self.up_bytes, dtype=np.float64)
        if up.ndim < 2:
            up = np.broadcast_to(up, len(self.devices))[None]
        return up

    def down_each(self) -> np.ndarray:
        """Bytes each device receives at the step's start (float64, one per device)."""
        return np.broadcast_to(np.asarray(self.down_bytes, dtype=np.float64), len(self.devices))


@dataclass(frozen=True, slots=True)
class PipelineRequest:
    """One step as a chain of legs per device (split learning): each device goes through
    the legs in order; the coordinator's compute, downlink and uplink serve the devices'
    legs first come, first served."""

    start_s: float
    devices: np.ndarray
    legs: list[tuple[str, np.ndarray]]
    """(kind, amount per device): "data" (data loading) and "device" (compute) in the
    device's seconds, "coordinator" in the coordinator's seconds, "up" and "down" in bytes."""
    crash_at_s: np.ndarray
    """Each participant's next crash time (absolute), inf if none is scheduled."""
    end_work_s: float = 0.0
    """Coordinator seconds after the last arrival, once per step (the rear's update)."""
    end_work_each_s: float = 0.0
    """Coordinator seconds per contributing device after the last arrival (averaging)."""


@dataclass(slots=True)
class StepTimeline:
    """What one step cost each participant; arrays are aligned with `devices`."""

    start_s: float
    end_s: float
    devices: np.ndarray
    contributed: np.ndarray
    """True where the device's work made it into the aggregate (False: crashed)."""
    phases: list[tuple[str, np.ndarray]]
    """(state, seconds) in the order the device went through them; sums to its time."""
    bytes_up: np.ndarray
    bytes_down: np.ndarray
    dropped: np.ndarray | None = None
    """True where the device's upload missed the step's deadline (it is not contributed)."""

    def seconds(self, state: str) -> np.ndarray:
        return sum((d for s, d in self.phases if s == state), np.zeros(len(self.devices)))


def truncate_phases(
    phases: list[tuple[str, np.ndarray]], limit: np.ndarray
) -> list[tuple[str, np.ndarray]]:
    """Cut each device's phase sequence at `limit` seconds (a crash ends the device's step)."""
    out, used = [], np.zeros_like(limit)
    for state, d in phases:
        # A lost device's planned phases can run past the step's end: never negative.
        take = np.clip(limit - used, 0.0, np.maximum(d, 0.0))
        out.append((state, take))
        used = used + take
    return out
