"""The simulated transport: when each device's payloads arrive, on the virtual clock.

Given who takes part in a step, their local work times and the real payload sizes, it lays
the step out on each device's link (``edgeddl.fleet.link``) for a ``star`` (parameter server
on the coordinator) or a ``ring`` (all-reduce among the devices), and says whose work a
crash lost.
Details: docs/architecture.md#the-simulated-transport
"""

from __future__ import annotations

import numpy as np

from edgeddl.fleet.fleet import Fleet
from edgeddl.fleet.link import LinkEstimate, fifo_finish_s, goodput_bps, transfer_time_s
from edgeddl.fleet.timeline import PipelineRequest, StepRequest, StepTimeline, truncate_phases


def _timeline(
    req: StepRequest,
    end: float,
    lost: np.ndarray,
    crash: np.ndarray,
    phases: list[tuple[str, np.ndarray]],
    bytes_up: np.ndarray,
    bytes_down: np.ndarray,
    dropped: np.ndarray | None = None,
) -> StepTimeline:
    """Package a laid-out step; each device's phases stop at its crash or the step's end."""
    if dropped is not None and dropped.any():  # a straggler's phases stop at the deadline
        crash = np.where(dropped, end, crash)
    return StepTimeline(
        start_s=req.start_s,
        end_s=req.start_s + end,
        devices=req.devices,
        contributed=~lost,
        # Without a crash every phase is already within the step: nothing to cut.
        phases=truncate_phases(phases, np.minimum(crash, end)) if (crash <= end).any() else phases,
        bytes_up=bytes_up.astype(np.int64),
        bytes_down=bytes_down.astype(np.int64),
        dropped=dropped,
    )


class SimNetwork:
    """Times one step's exchange on the fleet's links; draws jitter and loss from `seed`."""

    def __init__(self, fleet: Fleet, topology: str, seed: int) -> None:
        if topology not in ("star", "ring"):
            raise ValueError(f"unknown topology {topology!r}; allowed: star, ring")
        self.fleet = fleet
        self.topology = topology
        self.rng = np.random.default_rng(seed)
        # Each device's path to the coordinator crosses both access links, fixed for the run.
        f, c = fleet, fleet.coordinator_link
        self._path_up_bps = np.minimum(f.up_bps, c.down_bps)
        self._path_down_bps = np.minimum(f.down_bps, c.up_bps)
        self._path_latency_s = f.latency_s + c.latency_s
        self._path_jitter_s = f.jitter_s + c.jitter_s
        self._path_loss = 1 - (1 - f.loss) * (1 - c.loss)

    def path_time_s(self, idx: np.ndarray, num_bytes: np.ndarray | float, up: bool) -> np.ndarray:
        """One transfer per device between it and the coordinator (jitter and loss drawn)."""
        return self._to_coordinator(idx, num_bytes, up)

    def pipeline(self, req: PipelineRequest) -> StepTimeline:
        """Carry a step that is a chain of legs per device (`chains.py`)."""
        from edgeddl.runtime.sim.chains import pipeline_step

        return pipeline_step(self, req)

    def _to_coordinator(
        self, idx: np.ndarray, num_bytes: np.ndarray | float, up: bool
    ) -> np.ndarray:
        bw = self._path_up_bps[idx] if up else self._path_down_bps[idx]
        return transfer_time_s(
            num_bytes,
            bw,
            self._path_latency_s[idx],
            self._path_jitter_s[idx],
            self._path_loss[idx],
            self.rng,
        )

    def expected_link_s(
        self, idx: np.ndarray, up_bytes: np.ndarray | float, down_bytes: np.ndarray | float
    ) -> np.ndarray:
        """Jitter- and loss-free transfer time per device, for balancing (0 in a ring)."""
        if self.topology == "ring":
            return np.zeros(len(idx))
        return (
            2 * self._path_latency_s[idx]
            + 8 * up_bytes / self._path_up_bps[idx]
            + 8 * down_bytes / self._path_down_bps[idx]
        )

    def link_estimate(self, idx: np.ndarray) -> LinkEstimate:
        """Each device's path as a probe would measure it (star: to the coordinator)."""
        f = self.fleet
        if self.topology == "ring":  # to the next device: its own access link dominates
            bw_up, bw_down, lat, loss = (
                f.up_bps[idx],
                f.down_bps[idx],
                2 * f.latency_s[idx],
                f.loss[idx],
            )
            jitter = 2 * f.jitter_s[idx]
        else:
            bw_up, bw_down = self._path_up_bps[idx], self._path_down_bps[idx]
            lat, loss = self._path_latency_s[idx], self._path_loss[idx]
            jitter = self._path_jitter_s[idx]
        return LinkEstimate(
            up_goodput_bps=goodput_bps(bw_up, lat, loss),
            down_goodput_bps=goodput_bps(bw_down, lat, loss),
            latency_s=lat,
            jitter_s=jitter,
            shared_down_bps=np.inf if self.topology == "ring" else f.coordinator_link.up_bps,
        )

    def step(self, req: StepRequest) -> StepTimeline:
        crash = req.crash_at_s - req.start_s
        tl = self._star(req, crash) if self.topology == "star" else self._ring(req, crash)
        sync = self.fleet.step_sync_s
        if sync > 0:  # the engine's quorum and commit, after the exchange, for those still in
            tl.end_s += sync
            tl.phases.append(("communication", np.where(tl.contributed, sync, 0.0)))
        return tl

    def _broadcast(self, idx: np.ndarray, num_bytes: np.ndarray | float) -> np.ndarray:
        """When each device has what the coordinator sends it, counted from the send.

        The coordinator's uplink serves the devices one after another, fastest path first;
        a device with nothing to receive (a replica at the first step) does not wait.
        """
        own = self._to_coordinator(idx, num_bytes, up=False)
        own = np.where(np.asarray(num_bytes) > 0, own, 0.0)  # nothing to send: no wait
        serve = np.broadcast_to(
            8.0 * np.asarray(num_bytes) / self.fleet.coordinator_link.up_bps, len(idx)
        )
        order = np.argsort(own, kind="stable")
        recv = np.empty(len(idx))
        recv[order] = fifo_finish_s(np.maximum(own, serve)[order], serve[order])
        return recv

    def _star(self, req: StepRequest, crash: np.ndarray) -> StepTimeline:
        idx = req.devices
        c = self.fleet.coordinator_link
        up, down = req.up_phases(), req.down_each()
        recv = self._broadcast(idx, down)
        done = recv + req.data_s + req.compute_s
        # Every transfer is drawn once; which devices are lost only changes the queueing.
        up_own = [self._to_coordinator(idx, row, up=True) for row in up]
        mid = [self._broadcast(idx, b) for b in req.mid_down_bytes]
        agg_s = req.agg_flops / self.fleet.coordinator.flops_per_s

        def arrivals(keep: np.ndarray, start: float = 0.0) -> tuple[np.ndarray, float]:
            """Last arrival of each device's upload, and the end of the last phase, with the
            first upload no earlier than `start`."""
            ready, out, sel = (
                np.maximum(done, start),
                np.full(len(idx), np.inf),
                np.flatnonzero(keep),
            )
            end = 0.0
            for r, row in enumerate(up):
                serve_in = 8.0 * row / c.down_bps
                at = ready + np.maximum(up_own[r], serve_in)
                o = sel[np.argsort(at[sel], kind="stable")]
                out = np.full(len(idx), np.inf)
                out[o] = fifo_finish_s(at[o], serve_in[o])
                if req.open_s:  # sealed: the coordinator opens each update as it arrives
                    out[o] = fifo_finish_s(out[o] + req.open_s, np.full(len(o), req.open_s))
                end = (out[sel].max() if len(sel) else 0.0) + agg_s * len(sel)
                if r < len(mid):  # the phase's reduction goes back before the next phase
                    ready = end + mid[r]
            return out, end

        lost = np.zeros(len(idx), dtype=bool)
        arrive, in_s = arrivals(~lost)
        detect = 0.0
        while (newly := ~lost & (crash < arrive)).any():  # until no survivor crashes first
            lost |= newly
            detect = float((crash[lost] + self.fleet.failure_detection_s).max())
            # Several phases: a reduction may already hold the lost device's share, so the
            # survivors run every phase again once they notice (never under-charged).
            arrive, in_s = arrivals(~lost, detect if len(up) > 1 else 0.0)
        end = max(in_s, detect + agg_s * int((~lost).sum()))
        dropped = np.zeros(len(idx), dtype=bool)
        if req.deadline_s > 0 and end > req.deadline_s:
            # The server stops waiting at the deadline: who has not arrived is dropped (a
            # crashed device too), and the phase ends once the arrived updates are taken in.
            dropped = ~lost & (arrive > req.deadline_s)
            lost |= dropped
            arrive, in_s = arrivals(~lost)
            end = max(in_s, req.deadline_s)
        arrive = np.where(lost, np.maximum(end, done), arrive)
        phases = [
            ("communication", recv),
            ("data_loading", req.data_s),
            ("compute", req.compute_s),
            ("communication", arrive - done),
            ("idle", end - arrive),
        ]
        return _timeline(
            req,
            end,
            lost,
            crash,
            phases,
            np.where(lost, 0, up.sum(axis=0)),
            np.where(crash >= recv, down, 0) + np.where(lost, 0, sum(req.mid_down_bytes)),
            dropped,
        )

    def _ring_time(self, members: np.ndarray, num_bytes: float) -> float:
        m = len(members)
        if m < 2:
            return 0.0
        f = self.fleet
        src, dst = members, np.roll(members, -1)
        phases = 2 * (m - 1)
        bw = np.minimum(f.up_bps[src], f.down_bps[dst])
        lat = f.latency_s[src] + f.latency_s[dst]
        jit = f.jitter_s[src] + f.jitter_s[dst]
        loss = 1 - (1 - f.loss[src]) * (1 - f.loss[dst])
        if not loss.any():
            return self._ring_time_lossless(num_bytes / m, bw, lat, jit, phases)
        hop = transfer_time_s(num_bytes / m, bw, lat, jit, loss, self.rng, size=(phases, m))
        return float(hop.max(axis=1).sum())

    def _ring_time_lossless(
        self, chunk_bytes: float, bw: np.ndarray, lat: np.ndarray, jit: np.ndarray, phases: int
    ) -> float:
        """Ring time without loss, drawing per kind of hop rather than per hop.

        A phase lasts as long as its slowest hop, ``base + jitter * E`` with E ~ Exp(1). Hops
        of one kind (same base and jitter) are identically distributed, and the largest of
        ``n`` standard exponentials is ``-log(1 - U**(1/n))``: one draw per kind and phase,
        exactly the same distribution as drawing every hop. Fleets have a few kinds of link,
        so a 1000-device ring costs a few thousand draws per step instead of two million.
        """
        base = lat + 8.0 * chunk_bytes / bw
        kinds, count = np.unique(np.stack([base, jit]), axis=1, return_counts=True)
        u = self.rng.random((phases, len(count)))
        slowest = kinds[0] + kinds[1] * -np.log1p(-(u ** (1.0 / count)))
        return float(slowest.max(axis=1).sum())

    def _ring_phases_s(self, members: np.ndarray, phase_bytes: list[float]) -> float:
        return sum(self._ring_time(members, b) for b in phase_bytes)

    def _ring(self, req: StepRequest, crash: np.ndarray) -> StepTimeline:
        idx, needs_model = req.devices, req.needs_model
        down_bytes = req.down_each()
        # All-reduce payloads have one size on every device: one all-reduce per phase.
        phase_bytes = [float(row.max()) for row in req.up_phases()]
        f = self.fleet
        fetch = np.where(
            needs_model,
            transfer_time_s(
                down_bytes,
                f.down_bps[idx],
                2 * f.latency_s[idx],
                f.jitter_s[idx],
                f.loss[idx],
                self.rng,
            ),
            0.0,
        )
        done = fetch + req.data_s + req.compute_s
        lost = crash < done
        while True:  # a device crashing while it waits for slower peers is lost too
            detect = (crash[lost] + f.failure_detection_s).max() if lost.any() else 0.0
            reduce_at = max(done[~lost].max() if (~lost).any() else 0.0, detect)
            waiting = ~lost & (crash < reduce_at)
            if not waiting.any():
                break
            lost |= waiting
        start_reduce = reduce_at  # the first attempt: from here on devices communicate
        end = reduce_at + self._ring_phases_s(idx[~lost], phase_bytes)
        # A crash during the all-reduce breaks it: the survivors notice, then run it again,
        # as often as it takes. (Bytes of broken attempts are not counted: partial.)
        while (broke := ~lost & (crash < end)).any():
            lost |= broke
            reduce_at = max(reduce_at, float((crash[broke] + f.failure_detection_s).max()))
            end = reduce_at + self._ring_phases_s(idx[~lost], phase_bytes)
        reduce_at = start_reduce
        m = int((~lost).sum())
        ring_bytes = round(2 * (m - 1) / m * sum(phase_bytes)) if m > 1 else 0
        phases = [
            ("communication", fetch),
            ("data_loading", req.data_s),
            ("compute", req.compute_s),
            ("idle", np.maximum(reduce_at - done, 0.0)),
            ("communication", end - np.maximum(reduce_at, done)),
        ]
        moved = np.where(lost, 0, ring_bytes)
        return _timeline(
            req,
            end,
            lost,
            crash,
            phases,
            moved,
            moved + np.where(needs_model & (crash >= fetch), down_bytes, 0),
        )
