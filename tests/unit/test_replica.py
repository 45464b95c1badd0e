"""A real fleet's device step (`runtime/fleet/allreduce.py`) is the simulator's step.

Three replicas run in threads and exchange through an in-process sum (what torchft's
all-reduce gives them); each must end where the simulator's strategy ends with the same
three devices, and all three must hold the identical model.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from edgeddl.config.compression import CompressionConfig, CompressorConfig
from edgeddl.config.schema import TrainConfig
from edgeddl.models import build_model
from edgeddl.runtime.fleet.allreduce import AllReduceStep
from edgeddl.runtime.fleet.exchange import SLOT, ExchangeError, StepOutcome
from edgeddl.strategy.compressed import CompressedDataParallel
from edgeddl.strategy.data_parallel import DataParallel

COUNTS = [5, 3, 8]
STEPS = 3


class _Group:
    def __init__(self, members: int) -> None:
        self.barrier = threading.Barrier(members)
        self.bufs: list[torch.Tensor | None] = [None] * members
        self.calls: list[list[int]] = [[] for _ in range(members)]


class _ThreadCollective:
    """Sums in place over the threads of a group, in rank order (every member alike)."""

    def __init__(self, group: _Group, rank: int, tamper: bool = False) -> None:
        self.group, self.rank, self.tamper = group, rank, tamper

    def allreduce_sum(self, t: torch.Tensor) -> bool:
        g = self.group
        g.calls[self.rank].append(t.numel() * t.element_size())
        g.bufs[self.rank] = t.clone()
        g.barrier.wait()
        total = g.bufs[0].clone()  # type: ignore[union-attr]
        for b in g.bufs[1:]:
            total += b  # type: ignore[operator]
        g.barrier.wait()
        t.copy_(total)
        if self.tamper and t.dtype == torch.uint8 and t.numel():
            t[: min(3, t.numel())] = 255  # a broken header
        return True


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20", input_shape=(3, 8, 8), num_classes=4, width=4)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    n = sum(COUNTS)
    return [
        (torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g))
        for _ in range(STEPS)
    ]


def _strategy(name: str, **kw: object) -> DataParallel:
    cfg = TrainConfig(lr=0.1, momentum=0.9)
    if name == "dense":
        return DataParallel(_model(), cfg)
    comp = CompressionConfig(compressor=name, **kw)  # type: ignore[arg-type]
    settings = [CompressorConfig(compressor=name, **kw)] * len(COUNTS)  # type: ignore[arg-type]
    return CompressedDataParallel(_model(), cfg, comp, settings, seed=0)


def _simulated(name: str, **kw: object) -> DataParallel:
    s = _strategy(name, **kw)
    devices = np.arange(len(COUNTS))
    for step, (x, y) in enumerate(_batches()):
        ex = s.prepare(x, y, COUNTS, devices, step)
        s.commit(ex, np.ones(len(COUNTS), dtype=bool))
    return s


def _real(
    name: str, tamper: bool = False, **kw: object
) -> tuple[list[DataParallel], list[list[StepOutcome]], _Group, list[BaseException]]:
    group = _Group(len(COUNTS))
    replicas = [_strategy(name, **kw) for _ in COUNTS]
    outcomes: list[list[StepOutcome]] = [[] for _ in COUNTS]
    errors: list[BaseException] = []
    starts = np.concatenate([[0], np.cumsum(COUNTS)])

    def device(r: int) -> None:
        s, rs = replicas[r], AllReduceStep(replicas[r], r)
        coll = _ThreadCollective(group, r, tamper)
        try:
            for step, (x, y) in enumerate(_batches()):
                rows = slice(starts[r], starts[r + 1])
                update = s.local_update(r, x[rows], y[rows], step)
                pending = rs.exchange(None, update, 1.0, r, len(COUNTS), step, coll)
                assert pending is not None
                pending.commit()
                outcomes[r].append(pending.outcome)
        except ExchangeError as e:  # every member reads the same bytes: all raise it
            errors.append(e)
        except BaseException as e:
            errors.append(e)
            group.barrier.abort()  # the others must not wait for this one

    threads = [threading.Thread(target=device, args=(r,)) for r in range(len(COUNTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replicas, outcomes, group, errors


def _flat(s: DataParallel) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in s.model.state_dict().values()]).double()


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("dense", {}),
        ("none", {}),
        ("fp16", {}),
        ("two_step", {"density": 0.05}),
        ("topk", {"density": 0.05}),
        ("qsgd", {"levels": 4}),
        ("dgc", {"density": 0.05}),
        ("powersgd", {"rank": 2}),
    ],
)
def test_every_replica_ends_where_the_simulator_ends(name: str, kw: dict[str, object]) -> None:
    sim = _simulated(name, **kw)
    replicas, outcomes, _, errors = _real(name, **kw)
    assert not errors, errors
    first = _flat(replicas[0])
    for r in replicas[1:]:
        assert torch.equal(_flat(r), first)  # replicas identical, BatchNorm stats included
    assert torch.allclose(first, _flat(sim), rtol=1e-4, atol=1e-5)
    assert not torch.equal(first, _flat(_strategy(name, **kw)))  # it did train
    assert all(o.total == sum(COUNTS) for per in outcomes for o in per)


def test_payload_bytes_received_are_the_bytes_each_sender_encoded() -> None:
    replicas, outcomes, group, errors = _real("two_step", density=0.02)
    assert not errors, errors
    dense = replicas[0].dense_up_bytes
    for step in range(STEPS):
        sent = {r: outcomes[r][step].payload_bytes for r in range(len(COUNTS))}
        assert all(0 < b < dense / 5 for b in sent.values())
        for r in range(len(COUNTS)):
            got = outcomes[r][step].received_bytes
            assert got == {d: sent[d] for d in range(len(COUNTS)) if d != r}
            # The collective carried the table, then exactly the payloads end to end.
            table = (len(COUNTS) * SLOT + 2 * sum(_bn_features(replicas[0]))) * 4
            assert group.calls[r][2 * step : 2 * step + 2] == [table, sum(sent.values())]


def _bn_features(s: DataParallel) -> list[int]:
    return [int(m.num_features) for m in s.batchnorms]


def test_an_unreadable_payload_stops_the_step_with_a_clear_error() -> None:
    _, _, _, errors = _real("two_step", tamper=True, density=0.02)
    assert errors and all(isinstance(e, ExchangeError) for e in errors)
    assert "device 0's payload" in str(errors[0])
