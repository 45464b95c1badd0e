"""One device of a real fleet: the simulator's strategy, step by step, over a quorum.

Each device is one process that builds the simulator's workload and strategy and trains
through the strategy's interface. Membership, the fault-tolerant sum and commit-or-nothing
belong to a `Quorum` (torchft or torchrun elastic), which this loop cannot tell apart. Step
times are split as the simulator's are, so the run folder has the same keys. Raw data never
leaves the device; only payloads cross the network.
Details (one step, on every member): docs/real-fleet.md#the-device-loop
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeddl.config.loader import to_toml
from edgeddl.config.schema import Scenario
from edgeddl.data import ShardSampler
from edgeddl.runtime.fleet.allreduce import AllReduceStep, checksum
from edgeddl.runtime.fleet.checkpoint import (
    KEY_CHECKPOINT,
    KEY_CHECKPOINT_STEP,
    KEY_FINAL_STATE,
    CheckpointError,
    await_state,
    pack,
    unpack,
)
from edgeddl.runtime.fleet.coordinator_link import LinkError
from edgeddl.runtime.fleet.device_setup import DeviceOptions, pacing_fleet, prove_run
from edgeddl.runtime.fleet.exchange import DeviceExchange, ExchangeError
from edgeddl.runtime.fleet.quorum import DeviceStats, Quorum, RestartRequired, recoveries
from edgeddl.runtime.fleet.secure_device import SecureDevice
from edgeddl.runtime.fleet.split_device import SplitDevice
from edgeddl.runtime.fleet.store import (
    KEY_DONE,
    KEY_ROWS,
    KEY_ROWS_KNOWN,
    final_key,
    progress_key,
    row_key,
)
from edgeddl.security.parties import DeviceParty
from edgeddl.strategy.balance import balance_shares
from edgeddl.strategy.base import Strategy, Update
from edgeddl.strategy.build import build_split, build_strategy
from edgeddl.threads import scenario_threads
from edgeddl.workload import Workload, build_workload

SPEED_SMOOTHING = 0.5
"""Weight of the newest measurement in a device's seconds per sample (one step is noisy)."""


class DeviceRun:
    """Everything one device trains with, and the step loop over an quorum."""

    def __init__(
        self, opts: DeviceOptions, scenario: Scenario, idx: int, backend: str = "gloo"
    ) -> None:
        self.opts, self.scenario, self.idx = opts, scenario, idx
        self.names = scenario.fleet.device_names()
        # NCCL sums on this process's GPU (torchrun's LOCAL_RANK picks it on a machine with
        # several; the model, with run.device = "cuda", lands there too); gloo sums on the
        # CPU, also for a model on a GPU.
        comm = torch.device("cpu")
        if backend == "nccl":
            comm = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(comm)
        self.comm = comm
        """Where the quorum's sums happen."""
        self.w: Workload = build_workload(scenario)
        w = self.w
        torch.set_num_threads(scenario_threads(scenario, w.cost.train_flops_per_sample))
        self.strategy: Strategy
        self.exchange: DeviceExchange
        """How this device carries its steps (chosen once, from the scenario)."""
        self.split: SplitDevice | None = None
        if scenario.train.strategy == "split":  # a conversation with the rear, each step
            split = build_split(scenario, w.model, w.task.loss_fn, w.info)
            seal = (
                DeviceParty(scenario, idx, opts.name, opts.keys_dir)
                if scenario.security.enabled
                else None
            )
            self.split = SplitDevice(split, idx, opts.name, comm, opts.timeout_s, seal=seal)
            self.strategy, self.exchange = split, self.split
        else:
            shard_sizes = np.array([len(x) for x in w.shards], dtype=np.int64)
            local, _ = build_strategy(scenario, w.model, w.task.loss_fn, shard_sizes)
            self.strategy = local
            # sealed, payloads go to the coordinator: a sum cannot carry ciphertexts
            self.exchange = (
                SecureDevice(
                    scenario, local, idx, opts.name, comm, opts.timeout_s, keys_dir=opts.keys_dir
                )
                if scenario.security.enabled
                else AllReduceStep(local, idx, comm)
            )
        self.sampler = ShardSampler(self.w.shards, scenario.run.seed)
        batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in w.model.modules())
        self.min_share = 2 if batchnorm else 1  # a batch statistic needs two samples
        self.caps = self.w.sample_caps()
        self.pace = pacing_fleet(scenario, opts.name, opts.profile)
        self.toml = to_toml(scenario)
        self.stats = DeviceStats()
        self.checkpoint_every = 0
        self.measured: dict[int, float] = {}  # device -> seconds per sample, last step's table
        self.own_s_per_sample = 0.0  # smoothed
        self.critical = False  # committing a step: a stop request waits until it is done
        self.stop_requested = False
        self.rows: list[dict[str, Any]] = []
        """The evaluation rows this device reported (a restarted coordinator may lack some)."""

    def prove_run(self, store: Any) -> None:
        """`[security]`: the run `store` is bound to, proven by the coordinator's handshake on
        this device's link (opened now; the exchange goes on with it): `prove_run`."""
        exchange = self.exchange
        if isinstance(exchange, SecureDevice | SplitDevice):
            prove_run(store, lambda: exchange.link(store), self.opts.connect_timeout_s)

    def train(self, quorum: Quorum, store: Any) -> None:
        """Steps until the scenario's last one. A device the others finished without (left
        out of the last step's quorum on a busy machine, or too late to get in) takes the
        state they left and stops: it never takes a step they took."""
        t = self.scenario.train
        while quorum.current_step() < t.num_steps:
            if store.check([KEY_DONE]):
                self._take_final_state(quorum, store)
                return
            self.step(quorum, store)
        self._leave_final_state(quorum, store)

    def _leave_final_state(self, quorum: Quorum, store: Any) -> None:
        """The fleet's state at the last step, for a device left behind (the first device to
        finish leaves it before it says the run is done, so it is there once that is said)."""
        try:
            if not store.check([KEY_FINAL_STATE]):
                state = self.strategy.replica_state()
                step, batches = quorum.current_step(), quorum.batches_committed()
                store.set(KEY_FINAL_STATE, pack(step, batches, state, self.toml))
        except (RuntimeError, OSError):
            pass  # the coordinator has gone: nobody is left to take it

    def _take_final_state(self, quorum: Quorum, store: Any) -> None:
        """Left behind: the others' last step, as they left it. (Their quorum was the only
        one with that step; alone, this device would take it again: a second history.)"""
        if not store.check([KEY_FINAL_STATE]):  # the run ended short (another's error)
            return
        ex = self.exchange
        if isinstance(ex, SecureDevice):  # the coordinator's, not a value any key can sign
            try:
                ck = await_state(
                    lambda s: ex.coordinator_state(store, s),
                    self.scenario.train.num_steps,
                    self.opts.timeout_s,
                    self.toml,
                )
            except (CheckpointError, LinkError) as e:
                print(f"edgeddl device {self.opts.name}: the final state: {e}", file=sys.stderr)
                return
        else:
            ck = unpack(store.get(KEY_FINAL_STATE), self.toml, "the fleet's final state")
        self.strategy.load_replica_state(ck["replica"])
        quorum.catch_up(int(ck["step"]), int(ck["batches_committed"]))

    def step(self, quorum: Quorum, store: Any) -> None:
        st = self.stats
        t0 = time.perf_counter()
        members, slot = quorum.start_step()
        if store.check([KEY_DONE]):
            # Left out of the last step's quorum, this device got a quorum only once the
            # others had finished and gone: that step is theirs (`train` takes their state).
            return
        share = self._my_share(members)
        step = quorum.current_step()
        t1 = time.perf_counter()
        update, share, data_s, work_s, speed, link_s = self._local_work(
            store, slot, share, step, t1
        )
        t2 = time.perf_counter()
        try:
            pending = self.exchange.exchange(
                store, update, speed, slot, members, step, quorum, work_s
            )
        except ExchangeError as e:  # every member read the same bytes: all give up
            print(f"edgeddl device {self.opts.name}: {e}", file=sys.stderr)
            quorum.report_error(e)
            pending = None
        if pending is None:  # nothing to apply: nobody commits
            quorum.report_error(RuntimeError("the step's exchange carried no samples"))
        # From the verdict to the applied update, a stop request waits (the step counter
        # and the model must stay in agreement).
        self.critical = True
        try:
            ok = quorum.should_commit() and pending is not None
            t3 = time.perf_counter()
            if ok and pending is not None:
                pending.commit()
            elif pending is not None:
                pending.abandon()
        finally:
            self.critical = False
        if self.stop_requested:
            raise RestartRequired("stopped by the quorum")
        t4 = time.perf_counter()
        idle = 0.0
        worked = update is not None
        if pending is not None and worked:  # waiting inside the sum for a slower member
            out = pending.outcome
            slowest = max(
                (w for d, w in zip(out.devices, out.work_s, strict=True) if d != self.idx),
                default=0.0,
            )
            idle = min(max(slowest - work_s, 0.0), t3 - t2)
        for state, secs in (
            ("data_loading", data_s),
            ("compute", (t2 - t1 - data_s - link_s) + (t4 - t3)),
            ("communication", (t1 - t0) + link_s + (t3 - t2) - idle),
            ("idle", idle),
        ):
            st.seconds[state] += secs
        if not ok or pending is None:
            st.failed += 1
            st.failures.append(time.time())
            return
        out = pending.outcome
        self.measured = {d: 1.0 / v for d, v in zip(out.devices, out.speeds, strict=True) if v > 0}
        st.committed += 1
        st.samples += share if worked and self.idx in out.devices else 0  # counted if used
        st.bytes_up += out.wire_bytes
        st.payload_bytes += out.payload_bytes
        for d, n in out.received_bytes.items():
            st.received[self.names[d]] = st.received.get(self.names[d], 0) + n
        for d in out.sent_to:
            st.sent_to[self.names[d]] = st.sent_to.get(self.names[d], 0) + out.payload_bytes
        st.commits.append((time.time(), members))
        self._after_commit(quorum, store, quorum.current_step(), out.loss, members)

    def _batch(self, share: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This device's next `share` samples of its own shard."""
        rows = torch.from_numpy(self.sampler.take(self.idx, share)).to(self.w.x_train.device)
        return self.w.x_train[rows], self.w.y_train[rows]

    def _measured_speed(self, own_s_per_sample: float) -> float:
        """Samples per second, smoothed over steps (one step is noisy)."""
        self.own_s_per_sample = (
            own_s_per_sample
            if not self.own_s_per_sample
            else SPEED_SMOOTHING * own_s_per_sample + (1 - SPEED_SMOOTHING) * self.own_s_per_sample
        )
        return 1.0 / self.own_s_per_sample

    def _local_work(
        self, store: Any, slot: int | None, share: int, step: int, t1: float
    ) -> tuple[Update | None, int, float, float, float, float]:
        """This device's update if it takes part: (update, samples, data-loading s, work s,
        measured speed, seconds in requests). A federated round's seeded sample (over the
        scenario's devices) decides who trains; a sampled device that is absent simply sends
        nothing, like a client that dropped out. A failed request (split learning's rear)
        makes the device sit the step out."""
        s, num_steps = self.strategy, 1
        plan = s.plan(np.arange(len(self.names)), step)
        if plan is not None:
            if slot is None or self.idx not in plan.devices:
                return None, 0, 0.0, 0.0, 0.0, 0.0
            i = int(np.flatnonzero(plan.devices == self.idx)[0])
            share, num_steps = int(plan.samples[i]), int(plan.local_steps[i])
        elif slot is None or share <= 0:
            return None, share, 0.0, 0.0, 0.0, 0.0
        x, y = self._batch(share)
        data_s = time.perf_counter() - t1
        try:
            update, link_s = self.exchange.local_step(store, x, y, step)
        except LinkError as e:  # refused, or the link failed: it sits this step out
            print(f"edgeddl device {self.opts.name}: {e}", file=sys.stderr)
            return None, share, data_s, time.perf_counter() - t1, 0.0, 0.0
        own = s.step_cost(np.array([self.idx]))  # its own part of the model (split learning)
        data_s = self._pace(
            share, t1, data_s, num_steps, own.flops_per_sample, own.ops, excluded_s=link_s
        )
        work_s = time.perf_counter() - t1
        speed = self._measured_speed(work_s / share) if plan is None else 0.0
        return update, share, data_s, work_s, speed, link_s

    def _pace(
        self,
        share: int,
        t0: float,
        data_s: float,
        num_steps: int = 1,
        flops: float | None = None,
        ops: int | None = None,
        excluded_s: float = 0.0,
    ) -> float:
        """Wait out the rest of what the profile's device takes for `flops` a sample (the
        whole model's by default; `excluded_s` of the time since `t0` was not this device's
        work); its data-loading seconds."""
        if self.pace is None:
            return data_s
        w = self.w
        prof_data, prof_compute = self.pace.work_time_s(
            np.array([self.idx]),
            np.array([share]),
            w.cost.train_flops_per_sample if flops is None else flops,
            w.info.sample_bytes,
            w.cost.ops_per_step if ops is None else ops,
            num_steps,
        )
        spent = time.perf_counter() - t0 - excluded_s
        left = float(prof_data[0] + prof_compute[0]) - spent
        if left > 0:
            time.sleep(left)
        else:
            self.stats.pacing_overruns += 1
        return max(data_s, float(prof_data[0]))

    def _after_commit(
        self, quorum: Quorum, store: Any, step: int, loss: float, members: int
    ) -> None:
        t = self.scenario.train
        lead = quorum.is_lead()
        evaluate = lead and (step % t.eval_every == 0 or step == t.num_steps)
        if evaluate and self.split is None:  # kept even if the coordinator is lost now
            self.rows.append(self._evaluate(step, loss, members))
        try:  # a lost coordinator is noticed at the next step's start
            store.set(progress_key(self.opts.name), str(step))
            if not lead:
                return
            if evaluate:
                if self.split is not None:  # the rear is on the coordinator: it tests there
                    self.split.evaluate(store, step, loss, members)
                else:
                    _send_row(store, self.rows[-1])
            # a secured fleet's coordinator checkpoints its own replica
            own = not isinstance(self.exchange, SecureDevice)
            if own and self.checkpoint_every and step % self.checkpoint_every == 0:
                batches = quorum.batches_committed()
                data = pack(step, batches, self.strategy.replica_state(), self.toml)
                store.set(KEY_CHECKPOINT, data)
                store.set(KEY_CHECKPOINT_STEP, str(step))
        except (RuntimeError, OSError):
            pass

    def _my_share(self, members: int) -> int:
        """This device's share of the global batch: the simulator's balancing, fed with the
        seconds per sample every member measured at the last step. A device that was not
        measured at the last step (it just joined, or membership changed) takes an equal
        share for one step."""
        t, idx = self.scenario.train, self.idx
        if idx not in self.measured:
            equal = max(self.min_share, t.global_batch // max(members, 1))
            return int(min(equal, self.caps[idx]))
        known = sorted(self.measured)
        per = np.array([self.measured[d] for d in known])
        shares = balance_shares(
            t.global_batch, per, np.zeros(len(known)), self.caps[known], t.balance, self.min_share
        )
        return int(shares[known.index(idx)])

    def _evaluate(self, step: int, train_loss: float, members: int) -> dict[str, Any]:
        """Test the model (replicas are equal; the simulator's evaluation): the row."""
        w = self.w
        return {
            "step": step,
            "at": time.time(),  # the coordinator makes it a wall time since its own start
            "train_loss": train_loss,
            **w.task.evaluate(self.strategy.model, w.x_test, w.y_test),
            "num_members": members,
        }

    def resend_rows(self, store: Any) -> None:
        """Connected to a restarted coordinator: hand it the rows this device reported after
        the last one the lost coordinator wrote (it died before it read them, or they never
        reached it)."""
        known = int(store.get(KEY_ROWS_KNOWN)) if store.check([KEY_ROWS_KNOWN]) else -1
        for row in self.rows:
            if row["step"] > known:
                _send_row(store, row)

    def report(self, final_step: int, resumed_from: int | None) -> dict[str, Any]:
        """This device's part of summary.json: the simulator's per-device keys, in wall time,
        and what only a real fleet has."""
        st, fleet = self.stats, self.w.fleet
        secs = st.seconds
        return {
            "name": self.opts.name,
            "profile": fleet.profile_names[self.idx],
            "link": fleet.link_names[self.idx],
            "steps": st.committed,
            "samples": st.samples,
            "time_s": sum(secs.values()),
            "busy_s": secs["compute"] + secs["data_loading"] + secs["communication"],
            "idle_s": secs["idle"],
            "breakdown_s": dict(secs),
            "bytes_up": st.bytes_up,
            "bytes_down": st.bytes_up,
            "steps_not_committed": st.failed,
            "payload_bytes": st.payload_bytes,
            "payload_bytes_to": st.sent_to,
            "payload_bytes_from": st.received,
            "wall_time_s": time.time() - st.started_at,
            "final_step": final_step,
            "checksum": self.split.checksum()
            if self.split is not None
            else checksum(self.strategy.model),
            "recovery_s": recoveries(st.commits, st.failures),
            "restarts": st.restarts,
            "pacing_overruns": st.pacing_overruns,
            "coordinator_reconnects": st.reconnects,
            "resumed_from_step": resumed_from,
        }

    def finish(self, store: Any, final_step: int, resumed_from: int | None) -> dict[str, Any]:
        report = self.report(final_step, resumed_from)
        try:
            store.set(final_key(self.opts.name), json.dumps(report))
            if final_step >= self.scenario.train.num_steps:
                store.set(KEY_DONE, self.opts.name)
        except (RuntimeError, OSError):
            print(
                f"edgeddl device {self.opts.name}: the coordinator had already ended the run; "
                "this report reached only the console",
                file=sys.stderr,
            )
        return report


def _send_row(store: Any, row: dict[str, Any]) -> None:
    """An evaluation row to the coordinator: announced, then written (it reads it once it
    is there)."""
    store.set(row_key(store.add(KEY_ROWS, 1)), json.dumps(row))
