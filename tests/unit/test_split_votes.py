"""With `[security]`, split learning's rear takes a step once most of the step's senders told
it the step was committed with the same table (`runtime/fleet/split_rear.py`).

The devices and the in-process link and sum are test_split_fleet.py's. The rear's envelopes
and ledger are `_Seal`'s: parts pass as they came, each gets an entry, and each aggregate is
recorded, so what is tested is who commits a step and when.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_split_fleet import (
    COUNTS,
    NAMES,
    _batches,
    _close,
    _devices,
    _Link,
    _model,
    _simulate,
    _strategy,
    _Sum,
)

from edgeddl.runtime.fleet.exchange import Pending
from edgeddl.runtime.fleet.split_device import SplitDevice
from edgeddl.runtime.fleet.split_rear import SplitRear
from edgeddl.strategy.base import Update

ROWS = [slice(a, b) for a, b in zip(np.cumsum([0, *COUNTS[:-1]]), np.cumsum(COUNTS), strict=True)]


class _Seal:
    """What the rear asks of `CoordinatorParty`, without keys."""

    def __init__(self) -> None:
        self.num_entries = 0
        self.aggregates: list[tuple[int, list[int]]] = []
        """(step, the entries its aggregate names), in the order recorded."""

    def hello(self, name: str) -> bytes:
        return b""

    def open(self, name: str, step: int, wire: bytes) -> tuple[bytes, int]:
        self.num_entries += 1
        return wire, self.num_entries

    def seal(self, name: str, body: bytes, step: int) -> bytes:
        return body

    def aggregate(self, step: int, entries: list[int], digest: str) -> None:
        self.aggregates.append((step, entries))


class _Watched(threading.Condition):
    """The rear's `decided`, which says when a request starts waiting on it."""

    def __init__(self, lock: threading.RLock) -> None:
        super().__init__(lock)
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)


def _rear(seal: _Seal | None, split: dict[str, object], vote_wait_s: float = 60.0) -> SplitRear:
    strategy = _strategy(_model(), **split)
    rear = SplitRear(strategy, NAMES, sum(COUNTS), seal=seal, vote_wait_s=vote_wait_s)  # type: ignore[arg-type]
    rear.decided = _Watched(rear.lock)
    return rear


def _local(device: SplitDevice, step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> Update:
    x, y = batch
    return device.local_step(None, x[ROWS[device.idx]], y[ROWS[device.idx]], step)[0]


def _sum(devices: list[SplitDevice], updates: list[Update | None], step: int) -> list[Pending]:
    """The engine's sum among `devices` (each with its update, None: it sits the step out),
    in threads: each one's pending step, which tells the rear when it is committed."""
    group = _Sum(len(devices), commits=True)
    out: list[Pending | None] = [None] * len(devices)

    def run(slot: int) -> None:
        d, member = devices[slot], group.member(slot)
        out[slot] = d.exchange(None, updates[slot], 1.0, slot, len(devices), step, member)

    threads = [threading.Thread(target=run, args=(slot,)) for slot in range(len(devices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(p is not None for p in out)
    return [p for p in out if p is not None]


def test_a_stolen_key_cannot_commit_a_step_with_a_subset_of_its_senders() -> None:
    split = {"cut": 1}
    batch = _batches(1)[0]
    alone = np.array([0, COUNTS[0]], dtype=np.int64).tobytes()  # pi-0, its own samples
    for seal in (None, _Seal()):
        service = _rear(seal, split)
        devices = _devices(service, **split)
        updates: list[Update | None] = [_local(d, 0, batch) for d in devices]
        rogue = _Link(service, "pi-0")  # a session of its own as pi-0: the key was stolen
        rogue.call("commit", 0, 0, 0, [alone])
        if seal is None:  # without [security] the first tell decides
            assert service.strategy.rear.steps_applied == 1
            continue
        assert service.strategy.rear.steps_applied == 0 and seal.aggregates == []
        for pending in _sum(devices, updates, 0):  # the fleet's tells
            pending.commit()
        _close(service.strategy.parts.rear, _simulate(1, {}, **split).parts.rear)
        assert service.strategy.rear.steps_applied == 1 and service.dropped == 0
        assert [(step, len(e)) for step, e in seal.aggregates] == [(0, 6)]  # 3 x (x, labels)


@pytest.mark.parametrize("sat_out", [False, True], ids=["sent", "sat_out"])
def test_an_honest_fleets_tells_commit_and_its_next_step_waits_for_them(sat_out: bool) -> None:
    """pi-0 tells first and goes on to step 1 at once: its request waits until most of step
    0's senders told (with pi-0 among them, or not: it sat step 0 out, so its tell is no
    vote), then has the rear that took step 0."""
    split = {"cut": 1, "splitfed": True}
    seal = _Seal()
    service = _rear(seal, split)
    devices = _devices(service, **split)
    batches = _batches(2)
    updates = [None if sat_out and d.idx == 0 else _local(d, 0, batches[0]) for d in devices]
    first, *others = _sum(devices, updates, 0)
    first.commit()
    ahead: list[Update] = []
    thread = threading.Thread(target=lambda: ahead.append(_local(devices[0], 1, batches[1])))
    thread.start()
    assert isinstance(service.decided, _Watched)
    while thread.is_alive() and not service.decided.waiting.wait(0.01):
        pass  # until its request waits (or, wrongly, it is answered)
    assert service.strategy.rear.steps_applied == 0 and thread.is_alive()
    for pending in others:
        pending.commit()
    thread.join()
    assert service.strategy.rear.steps_applied == 1
    updates = [ahead[0], *(_local(d, 1, batches[1]) for d in devices[1:])]
    for pending in _sum(devices, updates, 1):
        pending.commit()
    sim = _simulate(2, {0: 0} if sat_out else {}, **split)
    _close(service.strategy.parts.rear, sim.parts.rear)
    for r, d in enumerate(devices):
        for a, b in zip(d.s.parts.device_modules(r), sim.parts.device_modules(r), strict=True):
            _close(a, b)
    assert service.strategy.rear.steps_applied == 2 and service.dropped == 0
    assert [step for step, _ in seal.aggregates] == [0, 1]


def test_a_step_most_of_whose_senders_never_tell_is_dropped_and_the_next_goes_on() -> None:
    """All three send at step 0, then two are lost: pi-0's tell alone cannot commit it, so
    its step 1 waits `vote_wait_s`, the rear drops step 0, and step 1 (pi-0 alone) commits."""
    split = {"cut": 1}
    seal = _Seal()
    service = _rear(seal, split, vote_wait_s=0.05)
    devices = _devices(service, **split)
    batches = _batches(2)
    update, *_ = [_local(d, 0, batches[0]) for d in devices]
    (pending,) = _sum(devices[:1], [update], 0)
    pending.commit()
    assert service.strategy.rear.steps_applied == 0
    update = _local(devices[0], 1, batches[1])
    assert service.dropped == 1 and service.strategy.rear.steps_applied == 0
    (pending,) = _sum(devices[:1], [update], 1)
    pending.commit()
    assert service.strategy.rear.steps_applied == 1
    assert [step for step, _ in seal.aggregates] == [1]
    assert service.summary()["rear_steps_dropped"] == 1
