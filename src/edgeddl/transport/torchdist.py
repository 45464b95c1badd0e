"""The real fleet's device process: one device of the scenario, on torch.distributed + torchft.

Each device is one process (`edgeddl device --coordinator HOST:PORT --name NAME`). It reads
the scenario from the coordinator's key-value store (torch's `TCPStore`), builds the same
workload as the simulator (`edgeddl.workload`: data, seeded model, its own shard), and
trains with torchft: membership, heartbeats and healing are torchft's `Manager` and
lighthouse, the gradient exchange is a gloo all-reduce. No socket protocol of our own.

One step, on every member of the current quorum:

1. `start_quorum`: torchft settles who takes part; a (re)joining device heals from a peer
   (model and optimizer state) before its first contribution.
2. Its share of the global batch: proportional to the throughput every member measured at
   the previous step (equal shares when membership just changed).
3. Its own mean gradient (the simulator's per-device pass), times its sample count, with
   the sample count, measured throughput and loss appended, summed over the members in one
   all-reduce: the sample-weighted mean, whatever the shares (torchft's AVG would divide by
   the number of members instead). A healing member contributes zeros.
4. `should_commit`: only if every member's all-reduce succeeded does the optimizer step, so
   a step is applied everywhere or nowhere; a member killed mid-step costs that step only.

Raw data never leaves the device; only gradients cross the network. Bytes counted are the
wire codec's length of the dense payload each member contributes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import socket
import sys
import time
import tomllib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch.distributed import ReduceOp, TCPStore

from edgeddl.config.loader import ConfigError, scenario_from_dict, to_toml
from edgeddl.config.schema import Scenario
from edgeddl.data import ShardSampler
from edgeddl.fleet.fleet import Fleet
from edgeddl.strategy.balance import balance_shares
from edgeddl.strategy.build import build_strategy
from edgeddl.strategy.per_device import per_device_gradients
from edgeddl.transport.checkpoint import (
    KEY_CHECKPOINT,
    KEY_CHECKPOINT_EVERY,
    KEY_CHECKPOINT_STEP,
    KEY_RESUME,
    pack,
    unpack,
)
from edgeddl.transport.replica import ExchangeError, ReplicaStep
from edgeddl.workload import build_workload

KEY_SCENARIO = "edgeddl/scenario"
KEY_LIGHTHOUSE = "edgeddl/lighthouse"
KEY_ROWS = "edgeddl/rows"
KEY_DONE = "edgeddl/done"
KEY_JOINED = "edgeddl/joined"
"""How many device processes have connected (each connection counts)."""
KEY_FAILED = "edgeddl/failed"
"""How many device processes have stopped on an error; the last one's message is under
KEY_FAILED + "/last"."""


def row_key(i: int) -> str:
    return f"edgeddl/row/{i}"


def final_key(name: str) -> str:
    return f"edgeddl/final/{name}"


def progress_key(name: str) -> str:
    return f"edgeddl/progress/{name}"


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT, or a one-line ConfigError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--coordinator: expected HOST:PORT, got {address!r}")
    return host, int(port)


def _advertised_host(coordinator_host: str) -> str:
    """The address peers reach this device at: the interface that routes to the coordinator."""
    if coordinator_host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((coordinator_host, 9))  # no packet is sent: this only picks the route
        return str(s.getsockname()[0])


@dataclass(kw_only=True, slots=True)
class DeviceOptions:
    coordinator: str
    """The coordinator's HOST:PORT."""
    name: str
    """Which device of the scenario this process is ('': torchrun's RANK says)."""
    host: str = ""
    """Address the other devices reach this one at ('': the route to the coordinator)."""
    timeout_s: float = 5.0
    """How long a collective may wait for a peer before the step is given up: it bounds the
    recovery after a crash, and must exceed the longest wait for a slower peer."""
    connect_timeout_s: float = 60.0
    """How long to wait for the coordinator at start."""
    profile: str = ""
    """Pace this process to a device profile's speed ('scenario': the device's own), so a
    fleet of processes on one machine behaves like a mixed fleet; '' runs at full speed."""


def _pacing_fleet(scenario: Scenario, name: str, profile: str) -> Fleet | None:
    """The fleet with this device's group on `profile`, for its paced work times."""
    if not profile:
        return None
    groups = [
        dataclasses.replace(g, profile=profile)
        if profile != "scenario" and name in g.device_names()
        else g
        for g in scenario.fleet.devices
    ]
    try:
        paced = dataclasses.replace(
            scenario, fleet=dataclasses.replace(scenario.fleet, devices=groups)
        )
    except ValueError:
        raise ConfigError(
            f"--profile: unknown device profile {profile!r} (see `edgeddl profiles`)"
        ) from None
    return Fleet.from_scenario(paced)


def _checksum(model: torch.nn.Module) -> float:
    """One number that differs if any parameter differs (to compare replicas)."""
    return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def _name_from_rank(names: list[str]) -> str:
    """Under torchrun (which sets RANK): the scenario's device at that position."""
    rank = os.environ.get("RANK", "")
    if not rank.isdigit():
        raise ConfigError("--name: required (or launch with torchrun, which sets RANK)")
    if int(rank) >= len(names):
        raise ConfigError(
            f"--name: torchrun's RANK {rank} has no device: the scenario has {len(names)}"
        )
    return names[int(rank)]


def _connect(opts: DeviceOptions) -> TCPStore:
    """The coordinator's store, waiting up to `connect_timeout_s` for it to answer."""
    host, port = parse_address(opts.coordinator)
    try:
        return TCPStore(
            host, port, is_master=False, timeout=timedelta(seconds=opts.connect_timeout_s)
        )
    except RuntimeError:  # torch's DistStoreError: nobody answered in time
        raise ConnectionError(
            f"--coordinator: no coordinator answered at {opts.coordinator} within "
            f"{opts.connect_timeout_s:g} s (is `edgeddl coordinator` running there?)"
        ) from None


def run_device(opts: DeviceOptions) -> dict[str, Any]:
    """Train as device `opts.name` until the scenario's last step; return its report.

    An error that stops the device is also left with the coordinator, which reports it.
    """
    store = _connect(opts)
    store.add(KEY_JOINED, 1)
    try:
        return _run_device(opts, store)
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        try:
            store.set(KEY_FAILED + "/last", f"{opts.name or 'device'}: {reason}")
            store.add(KEY_FAILED, 1)
        except (RuntimeError, OSError):
            pass  # the coordinator is gone too
        raise


def _run_device(opts: DeviceOptions, store: TCPStore) -> dict[str, Any]:
    host, _ = parse_address(opts.coordinator)
    scenario = scenario_from_dict(tomllib.loads(store.get(KEY_SCENARIO).decode()))
    names = scenario.fleet.device_names()
    if not opts.name:
        opts = dataclasses.replace(opts, name=_name_from_rank(names))
    if opts.name not in names:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise ConfigError(
            f"--name: {opts.name!r} is not a device of the scenario; allowed: {shown}"
        )
    idx = names.index(opts.name)
    if store.check([KEY_DONE]):
        raise ConfigError(f"--coordinator: the run at {opts.coordinator} has already finished")
    if scenario.run.threads:
        torch.set_num_threads(scenario.run.threads)
    if scenario.compression.adapt.enabled:
        raise ConfigError(
            "compression.adapt: network-aware adaptation runs on the simulated fleet only; "
            "set compression.adapt.enabled = false for a real fleet"
        )
    w = build_workload(scenario)
    t = scenario.train
    strategy, _ = build_strategy(scenario, w.model)
    model = strategy.model
    replica = ReplicaStep(strategy, idx)
    sampler = ShardSampler(w.shards, scenario.run.seed)
    min_share = 2 if strategy.batchnorms else 1
    caps = w.sample_caps()

    from torchft import Manager  # the engine: imported only by a real device
    from torchft.process_group import ProcessGroupGloo

    advertised = opts.host or _advertised_host(host)
    toml = to_toml(scenario)
    resume: dict[str, Any] | None = None
    if store.check([KEY_RESUME]):  # a restarted coordinator: start from its checkpoint
        resume = unpack(store.get(KEY_RESUME), toml, "the coordinator's checkpoint")
        strategy.load_replica_state(resume["replica"])

    group_stores: list[TCPStore] = []  # each Manager's own store must outlive it

    def make_manager(store: TCPStore) -> Any:

        group_store = TCPStore(advertised, 0, is_master=True, wait_for_workers=False)
        group_stores.append(group_store)
        timeout = timedelta(seconds=opts.timeout_s)
        return Manager(
            pg=ProcessGroupGloo(timeout=timeout),
            load_state_dict=strategy.load_replica_state,
            state_dict=strategy.replica_state,
            min_replica_size=1,
            replica_id=opts.name,
            lighthouse_addr=store.get(KEY_LIGHTHOUSE).decode(),
            store_addr=advertised,
            store_port=group_store.port,
            rank=0,
            world_size=1,
            hostname=advertised,
            timeout=timeout,
            quorum_timeout=timedelta(seconds=max(30.0, 3 * opts.timeout_s)),
            connect_timeout=timedelta(seconds=opts.connect_timeout_s),
        )

    manager = make_manager(store)
    if resume is not None:
        manager.load_state_dict(
            {"step": resume["step"], "batches_committed": resume["batches_committed"]}
        )
    every = int(store.get(KEY_CHECKPOINT_EVERY)) if store.check([KEY_CHECKPOINT_EVERY]) else 0
    reconnects = 0
    collective = _ManagerCollective(manager)
    pace = _pacing_fleet(scenario, opts.name, opts.profile)
    measured: dict[int, float] = {}  # device -> seconds per sample, from the last step's table
    committed = failed = samples = bytes_up = payload_bytes = 0
    sent_to: dict[str, int] = {}  # payload bytes this device's payloads brought each peer
    received: dict[str, int] = {}  # payload bytes taken from each peer
    commit_times: list[tuple[float, int]] = []
    start = time.perf_counter()
    try:
        while manager.current_step() < t.num_steps:
            try:
                if store.check([KEY_DONE]):  # the others finished before this device got in
                    break
                manager.start_quorum()
                members = manager.num_participants()
                slot = manager.participating_rank() if manager.is_participating() else None
                share = _my_share(t, w, caps, measured, idx, members, min_share)
                step = manager.current_step()
                g, speed = None, 0.0
                if slot is not None and share > 0:
                    rows = torch.from_numpy(sampler.take(idx, share)).to(w.x_train.device)
                    t0 = time.perf_counter()
                    g = per_device_gradients(
                        model,
                        strategy.params,
                        strategy.loss_fn,
                        w.x_train[rows],
                        w.y_train[rows],
                        [share],
                        strategy.batchnorms,
                    )
                    if pace is not None:  # wait out the rest of what the profile's device takes
                        data_s, compute_s = pace.work_time_s(
                            np.array([idx]),
                            np.array([share]),
                            w.cost.train_flops_per_sample,
                            w.info.sample_bytes,
                            w.cost.ops_per_step,
                        )
                        left = float(data_s[0] + compute_s[0]) - (time.perf_counter() - t0)
                        if left > 0:
                            time.sleep(left)
                    speed = share / max(time.perf_counter() - t0, 1e-6)
                try:
                    pending = replica.exchange(g, share, speed, slot, members, step, collective)
                except ExchangeError as e:  # every member read the same bytes: all give up
                    print(f"edgeddl device {opts.name}: {e}", file=sys.stderr)
                    manager.report_error(e)
                    pending = None
                if pending is None and manager.errored() is None:  # nothing to apply: no commit
                    manager.report_error(RuntimeError("the step's exchange carried no samples"))
                if manager.should_commit() and pending is not None:
                    pending.commit()
                    out = pending.outcome
                    measured = {
                        d: 1.0 / v for d, v in zip(out.devices, out.speeds, strict=True) if v > 0
                    }
                    committed += 1
                    samples += share if g is not None else 0
                    bytes_up += out.wire_bytes
                    payload_bytes += out.payload_bytes
                    for d, n in out.received_bytes.items():
                        received[names[d]] = received.get(names[d], 0) + n
                    for d in out.sent_to:
                        sent_to[names[d]] = sent_to.get(names[d], 0) + out.payload_bytes
                    commit_times.append((time.perf_counter() - start, members))
                    step = manager.current_step()
                    try:  # a lost coordinator is noticed at the next step's start
                        store.set(progress_key(opts.name), str(step))
                        if manager.participating_rank() == 0:
                            if step % t.eval_every == 0 or step == t.num_steps:
                                wall = time.perf_counter() - start
                                _report_eval(store, model, w, step, wall, out.loss, members)
                            if every and step % every == 0:
                                batches = manager.batches_committed()
                                data = pack(step, batches, strategy.replica_state(), toml)
                                store.set(KEY_CHECKPOINT, data)  # type: ignore[arg-type]
                                store.set(KEY_CHECKPOINT_STEP, str(step))
                    except (RuntimeError, OSError):
                        pass
                else:
                    failed += 1
            except (RuntimeError, OSError) as e:
                if _answers(store):
                    raise
                # The coordinator is gone: wait for its restart, keep this (newer) state.
                print(
                    f"edgeddl device {opts.name}: coordinator lost ({e}); reconnecting",
                    file=sys.stderr,
                )
                state = manager.state_dict()
                manager.shutdown(wait=False)
                store = _connect(opts)
                store.add(KEY_JOINED, 1)
                manager = make_manager(store)
                manager.load_state_dict(state)
                collective = _ManagerCollective(manager)
                reconnects += 1
    finally:
        manager.shutdown(wait=False)
    report = {
        "name": opts.name,
        "profile": w.fleet.profile_names[idx],
        "link": w.fleet.link_names[idx],
        "steps": committed,
        "steps_not_committed": failed,
        "samples": samples,
        "bytes_up": bytes_up,
        "bytes_down": bytes_up,
        "payload_bytes": payload_bytes,
        "payload_bytes_to": sent_to,
        "payload_bytes_from": received,
        "time_s": time.perf_counter() - start,
        "final_step": manager.current_step(),
        "checksum": _checksum(model),
        "recovery_s": _recoveries(commit_times),
        "coordinator_reconnects": reconnects,
        "resumed_from_step": resume["step"] if resume is not None else None,
    }
    store.set(final_key(opts.name), json.dumps(report))
    if manager.current_step() >= t.num_steps:
        store.set(KEY_DONE, opts.name)
    return report


def _answers(store: TCPStore) -> bool:
    """Whether the coordinator's store still answers."""
    try:
        store.check([KEY_SCENARIO])
    except (RuntimeError, OSError):
        return False
    return True


class _ManagerCollective:
    """torchft's fault-tolerant all-reduce (SUM) as the replica step's collective."""

    def __init__(self, manager: Any) -> None:
        self.manager = manager

    def allreduce_sum(self, t: torch.Tensor) -> bool:
        if self.manager.errored() is not None:
            return False
        self.manager.allreduce(t, reduce_op=ReduceOp.SUM).wait()
        return self.manager.errored() is None


def _my_share(
    t: Any,
    w: Any,
    caps: np.ndarray,
    measured: dict[int, float],
    idx: int,
    members: int,
    min_share: int,
) -> int:
    """This device's share of the global batch: the simulator's balancing, fed with the
    seconds per sample every member measured at the last step (the profile for a device
    not measured yet). A device that was not measured at the last step (it just joined, or
    membership changed) takes an equal share for one step."""
    if idx not in measured:
        return int(min(max(min_share, t.global_batch // max(members, 1)), caps[idx]))
    known = sorted(measured)
    per = np.array([measured[d] for d in known])
    shares = balance_shares(
        t.global_batch, per, np.zeros(len(known)), caps[known], t.balance, min_share
    )
    return int(shares[known.index(idx)])


def _recoveries(commits: list[tuple[float, int]]) -> list[float]:
    """Seconds from the last commit before a member was lost to the first commit after."""
    gaps = []
    for (t_prev, m_prev), (t_next, m_next) in itertools.pairwise(commits):
        if m_next < m_prev:
            gaps.append(t_next - t_prev)
    return gaps


@torch.no_grad()
def _report_eval(
    store: TCPStore,
    model: torch.nn.Module,
    w: Any,
    step: int,
    wall_s: float,
    train_loss: float,
    members: int,
) -> None:
    """Test the model (replicas are equal) and hand the row to the coordinator."""
    model.eval()
    out = model(w.x_test)
    row = {
        "step": step,
        "wall_time_s": wall_s,
        "train_loss": train_loss,
        "test_loss": float(torch.nn.functional.cross_entropy(out, w.y_test)),
        "test_accuracy": float((out.argmax(1) == w.y_test).float().mean()),
        "num_members": members,
    }
    i = store.add(KEY_ROWS, 1)
    store.set(row_key(i), json.dumps(row))
    model.train()


def silence_engine_logs() -> None:
    """torchft's lighthouse and managers log every quorum at INFO: keep warnings only."""
    os.environ.setdefault("RUST_LOG", "warn")
