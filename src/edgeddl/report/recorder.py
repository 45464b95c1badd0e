"""Everything a run reports: per-device totals, evaluation rows, the summary, the timeline.

Totals are numpy arrays indexed by device, updated once per step with vectorized adds, so
recording costs the same for 11 devices or 10 000. Durations are virtual seconds unless the
key says `wall_`. Each device's breakdown (compute, data loading, communication, idle) adds
up to `time_s`, the virtual time it spent in steps; the fleet totals add up the devices'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeddl.fleet.timeline import STATES, StepTimeline

TIMELINE_STEPS = 12
"""Steps kept, interval by interval, for the busy/idle timeline plot."""


@dataclass(slots=True)
class TimelineSpan:
    device: int
    state: str
    start_s: float
    seconds: float


@dataclass
class RunRecorder:
    names: list[str]
    profiles: list[str]
    links: list[str]
    seconds: dict[str, np.ndarray] = field(init=False)
    bytes_up: np.ndarray = field(init=False)
    bytes_down: np.ndarray = field(init=False)
    samples: np.ndarray = field(init=False)
    steps: np.ndarray = field(init=False)
    evals: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    """Updates that missed a federated round's deadline: round, device, the deadline's time."""
    timeline: list[TimelineSpan] = field(default_factory=list)
    num_steps: int = 0
    steps_with_lost_work: int = 0
    loss_sum: Any = 0.0
    """Sum of train losses since the last evaluation: a tensor, read out only at evaluation."""
    loss_count: int = 0

    def __post_init__(self) -> None:
        n = len(self.names)
        self.seconds = {s: np.zeros(n) for s in STATES}
        self.bytes_up = np.zeros(n, dtype=np.int64)
        self.bytes_down = np.zeros(n, dtype=np.int64)
        self.samples = np.zeros(n, dtype=np.int64)
        self.steps = np.zeros(n, dtype=np.int64)

    def add_step(self, tl: StepTimeline, shares: np.ndarray, loss: Any | None) -> None:
        """Add one step; `loss` is None when no device's work arrived."""
        idx = tl.devices
        # A device appears at most once per step, so fancy-index += is exact (and fast).
        for state, secs in tl.phases:
            self.seconds[state][idx] += secs
        self.bytes_up[idx] += tl.bytes_up
        self.bytes_down[idx] += tl.bytes_down
        self.samples[idx] += np.where(tl.contributed, shares, 0)
        self.steps[idx] += tl.contributed
        self.steps_with_lost_work += int(not tl.contributed.all())
        if self.num_steps < TIMELINE_STEPS:
            t = np.full(len(idx), tl.start_s)
            for state, secs in tl.phases:
                for k in np.flatnonzero(secs > 0):
                    self.timeline.append(
                        TimelineSpan(int(idx[k]), state, float(t[k]), float(secs[k]))
                    )
                t = t + secs
        self.num_steps += 1
        if loss is not None:
            self.loss_sum = self.loss_sum + loss
            self.loss_count += 1

    def add_event(self, at_s: float, device: int, action: str) -> None:
        self.events.append({"at_s": at_s, "device": self.names[device], "action": action})

    def add_dropped(self, round_index: int, at_s: float, devices: np.ndarray) -> None:
        for d in devices.tolist():
            self.dropped.append({"round": round_index, "device": self.names[d], "at_s": at_s})

    def add_eval(
        self,
        *,
        step: int,
        virtual_time_s: float,
        wall_time_s: float,
        metrics: dict[str, float],
        num_members: int,
    ) -> dict[str, Any]:
        """One evaluation row; `metrics`: the task's (`test_loss` and its own metric)."""
        row = {
            "step": step,
            "clock": "virtual",
            "time_s": virtual_time_s,
            "virtual_time_s": virtual_time_s,
            "wall_time_s": wall_time_s,
            "train_loss": float(self.loss_sum) / self.loss_count if self.loss_count else None,
            **metrics,
            "samples": int(self.samples.sum()),
            "bytes_up": int(self.bytes_up.sum()),
            "bytes_down": int(self.bytes_down.sum()),
            "num_members": num_members,
        }
        self.loss_sum, self.loss_count = 0.0, 0
        self.evals.append(row)
        return row

    def device_time_s(self) -> np.ndarray:
        return sum((self.seconds[s] for s in STATES), np.zeros(len(self.names)))

    def summary(
        self, *, metric: str, virtual_time_s: float, wall_time_s: float, extra: dict[str, Any]
    ) -> dict[str, Any]:
        busy = (
            self.seconds["compute"] + self.seconds["data_loading"] + self.seconds["communication"]
        )
        time_s = self.device_time_s()
        per_device = [
            {
                "name": self.names[i],
                "profile": self.profiles[i],
                "link": self.links[i],
                "steps": int(self.steps[i]),
                "samples": int(self.samples[i]),
                "time_s": float(time_s[i]),
                "busy_s": float(busy[i]),
                "idle_s": float(self.seconds["idle"][i]),
                "breakdown_s": {s: float(self.seconds[s][i]) for s in STATES},
                "bytes_up": int(self.bytes_up[i]),
                "bytes_down": int(self.bytes_down[i]),
            }
            for i in range(len(self.names))
        ]
        total_samples = int(self.samples.sum())
        return {
            **metric_summary(self.evals, metric),
            "clock": "virtual",
            "time_s": virtual_time_s,
            "virtual_time_s": virtual_time_s,
            "wall_time_s": wall_time_s,
            "num_devices": len(self.names),
            "num_steps": self.num_steps,
            "steps_with_lost_work": self.steps_with_lost_work,
            "samples": total_samples,
            "samples_per_s": total_samples / virtual_time_s if virtual_time_s else 0.0,
            "samples_per_virtual_s": total_samples / virtual_time_s if virtual_time_s else 0.0,
            "bytes_up": int(self.bytes_up.sum()),
            "bytes_down": int(self.bytes_down.sum()),
            "breakdown_s": {s: float(self.seconds[s].sum()) for s in STATES},
            **extra,
            "events": self.events,
            "dropped_updates": self.dropped,
            "per_device": per_device,
        }


def metric_summary(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The summary's view of the evaluation rows: the last and best values of `metric`
    (`final_test_accuracy`, `best_test_auroc`, ...) and the last test loss."""
    last = rows[-1] if rows else {}
    return {
        f"final_{metric}": last.get(metric),
        "final_test_loss": last.get("test_loss"),
        f"best_{metric}": max((r[metric] for r in rows), default=None),
    }
