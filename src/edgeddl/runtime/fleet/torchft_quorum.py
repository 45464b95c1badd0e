"""The real fleet's default engine: torchft on torch.distributed (gloo, or NCCL on GPUs).

Membership, heartbeats and healing are torchft's (its Manager, and the lighthouse the
coordinator runs); the sum is its fault-tolerant all-reduce: no socket protocol of our own.
A step is applied only if every member's sum succeeded, and a lost coordinator is survived.
Details: docs/real-fleet.md#the-torchft-engine
"""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

import torch
from torch.distributed import ReduceOp

from edgeddl.runtime.fleet.checkpoint import KEY_CHECKPOINT_EVERY, KEY_RESUME, unpack
from edgeddl.runtime.fleet.device import DeviceRun
from edgeddl.runtime.fleet.device_setup import DeviceOptions
from edgeddl.runtime.fleet.secure_device import SecureDevice
from edgeddl.runtime.fleet.signed_store import fleet_store
from edgeddl.runtime.fleet.store import (
    KEY_LIGHTHOUSE,
    advertised_host,
    answers,
    connect,
    engine_key,
    mark_joined,
    parse_address,
    wait_for_devices,
    wait_for_engines,
)


class TorchftQuorum:
    """torchft's Manager as the device loop's engine."""

    def __init__(self, run: DeviceRun, store: Any, opts: DeviceOptions, backend: str) -> None:
        from torch.distributed import TCPStore
        from torchft import Manager  # the engine: imported only by a real device

        self.advertised = opts.host or advertised_host(parse_address(opts.coordinator)[0])
        # The Manager's own store must outlive it.
        self.group_store = TCPStore(self.advertised, 0, is_master=True, wait_for_workers=False)
        timeout = timedelta(seconds=opts.timeout_s)
        self.manager = Manager(
            checkpoint_transport=_heal_transport(run, store, timeout),
            pg=_process_group(backend, timeout),
            load_state_dict=run.strategy.load_replica_state,
            state_dict=run.strategy.replica_state,
            min_replica_size=1,
            replica_id=opts.name,
            lighthouse_addr=store.get(KEY_LIGHTHOUSE).decode(),
            store_addr=self.advertised,
            store_port=self.group_store.port,
            rank=0,
            world_size=1,
            hostname=self.advertised,
            timeout=timeout,
            # Also how long a device blocked in a quorum takes to notice a dead coordinator.
            quorum_timeout=timedelta(seconds=max(10.0, 3 * opts.timeout_s)),
            connect_timeout=timedelta(seconds=opts.connect_timeout_s),
        )

    def start_step(self) -> tuple[int, int | None]:
        m = self.manager
        m.start_quorum()
        return m.num_participants(), m.participating_rank() if m.is_participating() else None

    def current_step(self) -> int:
        return int(self.manager.current_step())

    def allreduce_sum(self, t: torch.Tensor) -> bool:
        if self.manager.errored() is not None:
            return False
        self.manager.allreduce(t, reduce_op=ReduceOp.SUM).wait()
        return self.manager.errored() is None

    def report_error(self, e: Exception) -> None:
        if self.manager.errored() is None:
            self.manager.report_error(e)

    def should_commit(self) -> bool:
        return bool(self.manager.should_commit())

    def is_lead(self) -> bool:
        return self.manager.participating_rank() == 0

    def batches_committed(self) -> int:
        return int(self.manager.batches_committed())

    def catch_up(self, step: int, batches_committed: int) -> None:
        self.manager.load_state_dict({"step": step, "batches_committed": batches_committed})

    def shutdown(self) -> None:
        self.manager.shutdown(wait=False)


def _heal_transport(run: DeviceRun, store: Any, timeout: timedelta) -> Any:
    """Where this device takes the fleet's state when torchft heals it: a secured
    data-parallel fleet's coordinator, over its session; else a peer, tensors only
    (docs/trust.md#the-lighthouse)."""
    from edgeddl.runtime.fleet.heal import CoordinatorTransport, SafeHTTPTransport, state_bound

    ex = run.exchange
    if isinstance(ex, SecureDevice):
        return CoordinatorTransport(lambda step: ex.coordinator_state(store, step), run.toml)
    return SafeHTTPTransport(timeout, state_bound(run.strategy.replica_state()))


def _process_group(backend: str, timeout: timedelta) -> Any:
    from torchft.process_group import ProcessGroupGloo, ProcessGroupNCCL

    return ProcessGroupNCCL(timeout=timeout) if backend == "nccl" else ProcessGroupGloo(timeout)


def run_torchft(opts: DeviceOptions, store: Any, run: DeviceRun, backend: str) -> dict[str, Any]:
    """Train `run` on torchft until the scenario's last step; its report."""
    resume: dict[str, Any] | None = None
    if store.check([KEY_RESUME]):  # a restarted coordinator: start from its checkpoint
        resume = unpack(store.get(KEY_RESUME), run.toml, "the coordinator's checkpoint")
        run.strategy.load_replica_state(resume["replica"])
    quorum = TorchftQuorum(run, store, opts, backend)
    if resume is not None:
        quorum.catch_up(resume["step"], resume["batches_committed"])
    if store.check([KEY_CHECKPOINT_EVERY]):
        run.checkpoint_every = int(store.get(KEY_CHECKPOINT_EVERY))
    try:
        _await_the_others(store, opts, run.names)
        while True:
            try:
                run.train(quorum, store)
                break
            except (RuntimeError, OSError) as e:
                if answers(store):
                    raise
                if quorum.current_step() >= run.scenario.train.num_steps:
                    break  # the run is over; the coordinator left first: nothing to wait for
                # The coordinator is gone: wait for its restart (then go on from this,
                # newer, state; a secured fleet from the restarted coordinator's).
                print(
                    f"edgeddl device {opts.name}: coordinator lost ({e}); reconnecting",
                    file=sys.stderr,
                )
                state = quorum.manager.state_dict()
                quorum.shutdown()
                store = connect(opts.coordinator, opts.connect_timeout_s)
                if run.scenario.security.enabled:  # values signed, reads checked
                    store = fleet_store(store, run.scenario, opts.name, opts.keys_dir)
                    run.prove_run(store)  # bound to the new coordinator's run, proven
                mark_joined(store, opts.name)
                run.resend_rows(store)  # those the lost coordinator never wrote
                # A restarted coordinator's --min-devices holds the first back until the
                # others are in again (else it could finish the run before they notice).
                wait_for_devices(store, run.names, opts.connect_timeout_s)
                quorum = TorchftQuorum(run, store, opts, backend)
                if isinstance(run.exchange, SecureDevice):
                    # [security]: the coordinator's replica is the fleet's, also when a
                    # restarted one resumed from a checkpoint behind this device
                    _adopt_coordinator_state(run, quorum, store)
                else:  # keep this (newer) state
                    quorum.manager.load_state_dict(state)
                _await_the_others(store, opts, run.names)
                run.stats.reconnects += 1
        # Done before the Manager goes: a device left out of the last step gets a quorum of
        # its own only once this one stops heartbeating, and must then see the run is over.
        return run.finish(store, quorum.current_step(), resume["step"] if resume else None)
    finally:
        quorum.shutdown()


def _adopt_coordinator_state(run: DeviceRun, quorum: TorchftQuorum, store: Any) -> None:
    """Go on from the coordinator's replica and step (a secured data-parallel fleet)."""
    assert isinstance(run.exchange, SecureDevice)
    data = run.exchange.coordinator_state(store, -1)
    if data is None:  # the coordinator serves a negative step at once
        raise RuntimeError("the coordinator did not give its state")
    ck = unpack(data, run.toml, "the coordinator's state")
    run.strategy.load_replica_state(ck["replica"])
    quorum.catch_up(int(ck["step"]), int(ck["batches_committed"]))


def _await_the_others(store: Any, opts: DeviceOptions, names: list[str]) -> None:
    """This device's Manager is up: the first quorum waits for --min-devices of them (see
    `wait_for_engines`: else the first device in could take step 0 alone and the others
    the same step again)."""
    store.set(engine_key(opts.name), "1")
    wait_for_engines(store, names, opts.connect_timeout_s)
