"""A new way to carry steps is one class and its registration (`runtime/sim/exchange.py`).

`QueueExchange` lives only in this test: every device's payload goes through an in-memory
queue with a seeded random delay, and the aggregator takes what arrived by a deadline. The
reference loop, the strategies and `[security]` (which wraps any exchange) run it unchanged.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import edgeddl
from edgeddl.cli.main import main
from edgeddl.config.loader import ConfigError, scenario_from_dict
from edgeddl.fleet.link import LinkEstimate
from edgeddl.fleet.timeline import StepTimeline
from edgeddl.runtime.sim.exchange import EXCHANGES, StepCarry, WorkModel, register_exchange
from edgeddl.runtime.sim.network import SimNetwork
from edgeddl.security.keys import Identity, save_identity
from edgeddl.security.ledger import LEDGER_FILE, read_entries
from edgeddl.strategy.base import StepCost, Strategy

DELAY_S = 0.02
"""Mean queueing delay of a payload (exponential)."""
DEADLINE_S = 0.03
"""The aggregator waits this long after the last device finished its work."""


class QueueExchange:
    """Payloads through an in-memory priority queue, each after a random delay."""

    def __init__(self, network: SimNetwork, work: WorkModel) -> None:
        self.work = work
        self.rng = np.random.default_rng(7)
        self.carried = 0
        self.late = 0

    def balance_inputs(self, cost: StepCost, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        per_sample = self.work.fleet.seconds_per_sample(
            self.work.train_flops_per_sample, self.work.sample_bytes
        )[idx]
        return per_sample, np.zeros(len(idx))

    def link_estimate(self, idx: np.ndarray) -> LinkEstimate:
        raise NotImplementedError("no links here")

    def carry(self, c: StepCarry) -> StepTimeline:
        devices = c.sent.devices
        work_s = c.data_s + c.compute_s
        if c.device_extra_s is not None:  # sealing's time on the device
            work_s = work_s + c.device_extra_s
        delays = self.rng.exponential(DELAY_S, len(devices))
        queue: list[tuple[float, int]] = []
        for i, (w, d) in enumerate(zip(work_s.tolist(), delays.tolist(), strict=True)):
            heapq.heappush(queue, (w + d, i))
        deadline = float(work_s.max()) + DEADLINE_S
        arrived = np.zeros(len(devices), dtype=bool)
        end = 0.0
        while queue and queue[0][0] <= deadline:
            at, i = heapq.heappop(queue)
            arrived[i], end = True, at
        self.carried += 1
        self.late += int((~arrived).sum())
        waited = np.where(arrived, delays, np.maximum(deadline - work_s, 0.0))
        up = c.sent.up_bytes.sum(axis=0)
        return StepTimeline(
            start_s=c.start_s,
            end_s=c.start_s + (end if arrived.any() else deadline),
            devices=devices,
            contributed=arrived,
            phases=[("compute", work_s), ("communication", waited)],
            bytes_up=np.where(arrived, up, 0).astype(np.int64),
            bytes_down=c.down_bytes.astype(np.int64),
            dropped=~arrived,
        )

    def committed(self, c: StepCarry, tl: StepTimeline, strategy: Strategy) -> None:
        return None


@pytest.fixture()
def queue_exchange() -> Iterator[list[QueueExchange]]:
    made: list[QueueExchange] = []

    def factory(network: SimNetwork, work: WorkModel) -> QueueExchange:
        made.append(QueueExchange(network, work))
        return made[-1]

    register_exchange("queue", factory)
    yield made
    del EXCHANGES["queue"]


def _raw(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "run": {"name": "queue", "seed": 3, "exchange": "queue", "checkpoint_every": 0},
        "fleet": {
            "devices": [
                {"name": "pc", "profile": "pc", "count": 2},
                {"name": "pi", "profile": "rpi4", "count": 4},
            ]
        },
        "data": {"dataset": "mnist1d", "num_samples": 1500},
        "model": {"name": "cnn1d"},
        "train": {"global_batch": 96, "num_steps": 40, "eval_every": 20, "lr": 0.05},
    }
    for section, values in extra.items():
        raw.setdefault(section, {}).update(values)
    return raw


def _run(raw: dict[str, Any], out: Path) -> edgeddl.RunResult:
    return edgeddl.run(scenario_from_dict(raw), out_dir=out, progress=False)


def test_a_registered_exchange_carries_the_steps_and_drops_the_late_payloads(
    queue_exchange: list[QueueExchange], tmp_path: Path
) -> None:
    a = _run(_raw(), tmp_path / "a")
    (exchange,) = queue_exchange
    assert exchange.carried == 40
    assert exchange.late > 0  # the queue's delays made some payloads miss the deadline
    s = a.summary
    assert len(s["dropped_updates"]) == exchange.late
    assert s["steps_with_lost_work"] > 0
    first = json.loads((a.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert s["final_test_accuracy"] > first["test_accuracy"] + 0.05  # it learned from them
    b = _run(_raw(), tmp_path / "b")  # seeded delays: the same run again
    ma, mb = (torch.load(r.run_dir / "model.pt") for r in (a, b))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_security_wraps_the_new_exchange_and_its_ledger_verifies(
    queue_exchange: list[QueueExchange], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    names = ["coordinator", "pc-0", "pc-1", "pi-0", "pi-1", "pi-2", "pi-3"]
    public = {}
    for name in names:
        identity = Identity.generate(name)
        save_identity(identity, keys)
        cfg = identity.public().to_config()
        public[name] = {"sign": cfg.sign, "agree": cfg.agree}
    security = {
        "enabled": True,
        "keys_dir": str(keys),
        "coordinator": public.pop("coordinator"),
        "devices": public,
    }
    raw = _raw(security=security, robust={"rule": "median"})
    raw["train"]["num_steps"] = 12
    result = _run(raw, tmp_path / "run")
    assert queue_exchange[0].carried == 12
    kinds = [e["kind"] for e in read_entries(result.run_dir / LEDGER_FILE)[0] if e is not None]
    assert kinds.count("aggregate") == 12 and kinds.count("update") > 12
    assert main(["ledger", "verify", str(result.run_dir)]) == 0


def test_an_unknown_exchange_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run.exchange: 'carrier_pigeon' is not a registered"):
        _run(_raw(run={"exchange": "carrier_pigeon"}), tmp_path)
