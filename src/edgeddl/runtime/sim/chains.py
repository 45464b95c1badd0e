"""The simulated network for steps that are chains of legs (split learning).

Each device walks through its legs in order: its own data loading and compute, transfers to
and from the coordinator, and work on the coordinator. Three resources are shared, each
first come, first served: the coordinator's compute, its downlink (what devices send up)
and its uplink (what it sends down). A transfer takes as long as the device's own path
(drawn once, with jitter and loss) unless the shared link is busy, as in the star's upload
queue. A device that crashes before its last leg is done is lost: its work does not count,
and the step cannot end before the coordinator notices (after `failure_detection_s`).
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import numpy as np

from edgeddl.fleet.timeline import PipelineRequest, StepTimeline, truncate_phases

if TYPE_CHECKING:
    from edgeddl.runtime.sim.network import SimNetwork

_STATE = {
    "data": "data_loading",
    "device": "compute",
    "up": "communication",
    "down": "communication",
    "coordinator": "idle",  # the device waits while the coordinator works for it
}


def pipeline_step(sim: SimNetwork, req: PipelineRequest) -> StepTimeline:
    """Lay out one chained step on the virtual clock; see the module docstring."""
    idx, legs = req.devices, req.legs
    num, c = len(idx), sim.fleet.coordinator_link
    crash = req.crash_at_s - req.start_s
    for kind, _ in legs:
        if kind not in _STATE:
            raise ValueError(f"unknown leg kind {kind!r}; allowed: {', '.join(_STATE)}")
    # Each transfer's own time is drawn once, in leg order: the same seed, the same step.
    own = [
        np.where(amount > 0, sim.path_time_s(idx, amount, up=kind == "up"), 0.0)
        if kind in ("up", "down")
        else np.asarray(amount, dtype=np.float64)
        for kind, amount in legs
    ]
    serve_bps = {"up": c.down_bps, "down": c.up_bps}
    free = {"up": 0.0, "down": 0.0, "coordinator": 0.0}
    finish = np.full((len(legs), num), np.nan)
    lost = np.zeros(num, dtype=bool)
    ready = [(0.0, k, 0) for k in range(num)]  # (time, device, next leg)
    heapq.heapify(ready)
    while ready:
        t, k, i = heapq.heappop(ready)
        if t > crash[k]:
            lost[k] = True
            continue
        if i == len(legs):
            continue
        kind, amount = legs[i]
        a = float(amount[k])
        if kind in ("data", "device"):
            end = t + a
        elif kind == "coordinator":
            end = max(t, free[kind]) + a
            free[kind] = end
        elif a <= 0:
            end = t
        else:
            serve = 8.0 * a / serve_bps[kind]
            end = max(t + max(float(own[i][k]), serve), free[kind] + serve)
            free[kind] = end
        finish[i, k] = end
        heapq.heappush(ready, (end, k, i + 1))

    done = finish[-1] if len(legs) else np.zeros(num)
    survivors = ~lost
    end_s = float(done[survivors].max()) if survivors.any() else 0.0
    if lost.any():  # the coordinator waits for a lost device until it notices
        end_s = max(end_s, float((crash[lost] + sim.fleet.failure_detection_s).max()))
    coordinator_s = req.end_work_s + req.end_work_each_s * int(survivors.sum())
    end_s += coordinator_s if survivors.any() else 0.0
    # Phases: each leg from the previous leg's end (a lost device's unfinished legs take
    # their own length; the crash cuts them), then idle until the step ends.
    previous = np.zeros(num)
    phases: list[tuple[str, np.ndarray]] = []
    up = np.zeros(num)
    down = np.zeros(num)
    for i, (kind, amount) in enumerate(legs):
        at = np.where(np.isnan(finish[i]), previous + own[i], finish[i])
        phases.append((_STATE[kind], at - previous))
        completed = ~np.isnan(finish[i]) & (finish[i] <= crash)
        if kind == "up":
            up += np.where(completed, amount, 0)
        elif kind == "down":
            down += np.where(completed, amount, 0)
        previous = at
    phases.append(("idle", np.maximum(end_s - previous, 0.0)))
    if sim.fleet.step_sync_s > 0:
        end_s += sim.fleet.step_sync_s
        phases.append(("communication", np.where(survivors, sim.fleet.step_sync_s, 0.0)))
    limit = np.minimum(crash, end_s)
    return StepTimeline(
        start_s=req.start_s,
        end_s=req.start_s + end_s,
        devices=idx,
        contributed=survivors,
        phases=truncate_phases(phases, limit) if (crash <= end_s).any() else phases,
        bytes_up=up.astype(np.int64),
        bytes_down=down.astype(np.int64),
    )
