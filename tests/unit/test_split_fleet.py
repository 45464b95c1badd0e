"""Split learning on a real fleet (`runtime/fleet/split_device.py`, `split_rear.py`) is
the simulator's split learning.

Three devices run in threads, each with its own copy of the strategy, as separate processes
would; they reach the coordinator's `SplitRear` through an in-process link (what the gloo
link carries: the encoded bytes) and sum through an in-process collective (what the engine
gives them). The rear and every front must end where the simulator's `SplitLearning` ends.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from torch import nn

from edgeddl.compress.bitpack import CodecError
from edgeddl.config.compression import CompressorConfig
from edgeddl.config.schema import TrainConfig
from edgeddl.config.split import SplitConfig
from edgeddl.models import build_model
from edgeddl.runtime.fleet.coordinator_link import LinkError
from edgeddl.runtime.fleet.split_device import SplitDevice
from edgeddl.runtime.fleet.split_rear import SplitRear
from edgeddl.strategy.split.learning import SplitLearning

COUNTS = [5, 3, 8]
NAMES = ["pi-0", "pi-1", "pi-2"]
CE = nn.functional.cross_entropy


def _strategy(model: nn.Module, **split: object) -> SplitLearning:
    train = TrainConfig(lr=0.1, momentum=0.9)
    cfg = SplitConfig(**split)  # type: ignore[arg-type]
    return SplitLearning(copy.deepcopy(model), train, cfg, 3, (1, 40), 10, seed=0, loss_fn=CE)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn1d", input_shape=(1, 40), num_classes=10)


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    n = sum(COUNTS)
    return [
        (torch.randn(n, 1, 40, generator=g), torch.randint(0, 10, (n,), generator=g))
        for _ in range(steps)
    ]


class _Link:
    """What a `CoordinatorLink` does, in process: the request's bytes to the service."""

    def __init__(self, service: SplitRear, name: str) -> None:
        self.service, self.name, self.seconds = service, name, 0.0
        self.session = None

    def call(self, op, step, device, count, parts, loss=0.0, members=0):  # type: ignore[no-untyped-def]
        try:
            header = [0.0, step, device, count, loss, members, 0.0, 0.0]
            return self.service.answer(self.name, op, step, device, count, parts, header)
        except (CodecError, ValueError) as e:
            raise LinkError(f"the coordinator refused {op}: {e}") from None


class _Sum:
    """An in-process all-reduce among the threads of a step (rank order)."""

    def __init__(self, members: int, commits: bool) -> None:
        self.barrier = threading.Barrier(members)
        self.bufs: dict[int, torch.Tensor] = {}
        self.commits = commits
        """The engine's verdict on the step."""

    def member(self, rank: int) -> _Member:
        return _Member(self, rank)


class _Member:
    def __init__(self, group: _Sum, rank: int) -> None:
        self.group, self.rank = group, rank

    def allreduce_sum(self, t: torch.Tensor) -> bool:
        g = self.group
        g.bufs[self.rank] = t.clone()
        g.barrier.wait()
        total = sum(g.bufs[r] for r in sorted(g.bufs))
        g.barrier.wait()
        t.copy_(total)  # type: ignore[arg-type]
        return True


def _simulate(steps: int, lost: dict[int, int], **split: object) -> SplitLearning:
    s = _strategy(_model(), **split)
    for step, (x, y) in enumerate(_batches(steps)):
        ex = s.prepare(x, y, COUNTS, np.arange(3), step)
        arrived = np.array([lost.get(step) != d for d in range(3)])
        s.commit(ex, arrived)
    return s


def _devices(service: SplitRear, **split: object) -> list[SplitDevice]:
    """The three devices, each reaching `service` over an in-process link."""
    return [
        SplitDevice(
            _strategy(_model(), **split),
            r,
            NAMES[r],
            torch.device("cpu"),
            10.0,
            connect=lambda store, name, t, handshake: _Link(service, name),
        )
        for r in range(3)
    ]


def _real(
    steps: int, lost: dict[int, int], fail_at: set[int], **split: object
) -> tuple[SplitRear, list[SplitDevice]]:
    """Three device threads against one service. `lost[step]`: a device that sends its
    activations and then vanishes (it never joins the sum); `fail_at`: steps whose first
    sum fails everywhere (the engine's verdict: not committed), so they are tried again."""
    service = SplitRear(_strategy(_model(), **split), NAMES, sum(COUNTS))
    devices = _devices(service, **split)
    starts = np.concatenate([[0], np.cumsum(COUNTS)])
    errors: list[BaseException] = []
    for step, (x, y) in enumerate(_batches(steps)):
        for attempt in range(2 if step in fail_at else 1):
            alive = [r for r in range(3) if lost.get(step) != r]
            group = _Sum(len(alive), commits=attempt > 0 or step not in fail_at)

            rows = [slice(starts[r], starts[r + 1]) for r in range(3)]
            threads = [
                threading.Thread(
                    target=_device_step,
                    args=(devices[r], x[rows[r]], y[rows[r]], step, group, alive, errors),
                )
                for r in range(3)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for r in set(range(3)) - set(alive):  # it comes back and heals from a peer
                devices[r].s.load_replica_state(devices[alive[0]].s.replica_state())
    assert not errors, errors
    return service, devices


def _device_step(
    device: SplitDevice,
    x: torch.Tensor,
    y: torch.Tensor,
    step: int,
    group: _Sum,
    alive: list[int],
    errors: list[BaseException],
) -> None:
    try:
        update, _ = device.local_step(None, x, y, step)
        if device.idx not in alive:
            return  # it vanished after its activations
        slot = alive.index(device.idx)
        pending = device.exchange(None, update, 1.0, slot, len(alive), step, group.member(slot))
        assert pending is not None
        if group.commits:
            pending.commit()
        else:
            pending.abandon()
    except BaseException as e:
        errors.append(e)
        group.barrier.abort()


def _close(a: nn.Module, b: nn.Module) -> None:
    for (name, u), v in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(u, v, msg=name, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "split",
    [
        {"cut": 1},
        {"cut": 1, "splitfed": True},
        {"cut": 1, "labels": "u_shaped", "head_cut": "5", "splitfed": True},
        {"cut": 3, "compression": CompressorConfig(compressor="int8")},
    ],
    ids=["split", "splitfed", "u_shaped", "int8"],
)
def test_the_rear_and_every_front_end_where_the_simulator_ends(split: dict[str, object]) -> None:
    steps = 3
    sim = _simulate(steps, {}, **split)
    service, devices = _real(steps, {}, set(), **split)
    _close(service.strategy.parts.rear, sim.parts.rear)
    for r, d in enumerate(devices):
        for a, b in zip(d.s.parts.device_modules(r), sim.parts.device_modules(r), strict=True):
            _close(a, b)
    assert service.strategy.rear.steps_applied == steps
    checksums = {d.checksum() for d in devices}
    assert len(checksums) == 1 if split.get("splitfed") else checksums == {None}


def test_a_step_tried_again_and_a_device_lost_mid_step_count_once_and_not_at_all() -> None:
    split = {"cut": 1, "splitfed": True}
    lost = {2: 1}  # at step 2, device 1 sends its activations and is gone
    sim = _simulate(4, lost, **split)
    service, devices = _real(4, lost, {1}, **split)  # step 1's first sum fails everywhere
    _close(service.strategy.parts.rear, sim.parts.rear)
    for r in (0, 2):
        for a, b in zip(
            devices[r].s.parts.device_modules(r), sim.parts.device_modules(r), strict=True
        ):
            _close(a, b)
    assert service.strategy.rear.steps_applied == 4


def test_a_step_the_rear_took_is_not_taken_again_by_another_quorum() -> None:
    """torchft's lighthouse forms a quorum of the replicas it has heard from. At a fleet's
    start on a loaded machine the first device in took step 0 alone, then two others, in a
    quorum of their own, took the same step 0 (the rear stepped 41 times in 40 steps). The
    rear takes a step once: the second quorum's request for it is refused, so that quorum
    commits nothing (its members heal from the first at their next quorum)."""
    split = {"cut": 1, "splitfed": True}
    service = SplitRear(_strategy(_model(), **split), NAMES, sum(COUNTS))
    devices = _devices(service, **split)
    x, y = _batches(1)[0]
    errors: list[BaseException] = []
    _device_step(devices[0], x[:5], y[:5], 0, _Sum(1, commits=True), [0], errors)
    assert not errors and service.strategy.rear.steps_applied == 1
    before = copy.deepcopy(service.strategy.parts.rear.state_dict())
    _device_step(devices[1], x[5:8], y[5:8], 0, _Sum(1, commits=True), [1], errors)
    assert service.strategy.rear.steps_applied == 1
    assert [type(e) for e in errors] == [LinkError] and "took step 0" in str(errors[0])
    for name, v in service.strategy.parts.rear.state_dict().items():
        assert torch.equal(v, before[name])
    # The fleet goes on at step 1, every member in one quorum.
    _device_step(devices[1], x[5:8], y[5:8], 1, _Sum(1, commits=True), [1], errors)
    assert len(errors) == 1 and service.strategy.rear.steps_applied == 2


def test_the_rear_refuses_what_it_cannot_use_and_keeps_nothing_of_it() -> None:
    service = SplitRear(_strategy(_model(), cut=1), NAMES, sum(COUNTS))
    before = copy.deepcopy(service.strategy.parts.rear.state_dict())
    link = _Link(service, "pi-0")
    with pytest.raises(LinkError, match="spoke for device 1"):
        link.call("activations", 0, 1, 4, [b"", b""])
    with pytest.raises(LinkError, match="17 samples"):
        link.call("activations", 0, 0, 17, [b"x", b"y"])
    with pytest.raises(LinkError, match="expected 2 tensors"):
        link.call("activations", 0, 0, 4, [b"x"])
    with pytest.raises(LinkError, match="activations"):  # not a codec payload
        link.call("activations", 0, 0, 4, [b"\x01garbage", b"\x01garbage"])
    with pytest.raises(LinkError, match="before its activations"):
        link.call("head_gradients", 0, 0, 4, [b"x"])
    assert link.call("commit", 0, 0, 0, [np.array([0, 4], dtype=np.int64).tobytes()]) == (b"", 0.0)
    assert service.strategy.rear.steps_applied == 0  # nothing to commit: nothing applied
    _close(service.strategy.parts.rear, _strategy(_model(), cut=1).parts.rear)
    for name, v in service.strategy.parts.rear.state_dict().items():
        assert torch.equal(v, before[name])
