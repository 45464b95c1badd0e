"""What shrinks honest updates' noise before a robust rule, on hand-made updates: each
device's own momentum (what it keeps, what it sends, what a crash costs) and the
coordinator's mixing (bucketing, nearest-neighbour mixing) with its records and cost."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgeddl.aggregation.robust import RobustAggregator
from edgeddl.config.loader import scenario_from_dict
from edgeddl.config.robust import RobustConfig
from edgeddl.config.schema import TrainConfig
from edgeddl.fleet.behaviors import Behaviors
from edgeddl.strategy.build import build_strategy
from edgeddl.strategy.data_parallel import DataParallel
from edgeddl.strategy.robust_dp import DeviceMomentum, RobustDataParallel

NAMES = [f"d{i}" for i in range(9)]


# --- each device's momentum -----------------------------------------------------------------


def test_device_momentum_by_hand_and_a_crash_restarts_it() -> None:
    m = DeviceMomentum(momentum=0.5, weight_decay=0.1)
    weights = torch.tensor([1.0, 2.0])
    (first,) = m.update([3], [torch.tensor([1.0, 0.0])], weights)
    torch.testing.assert_close(first, torch.tensor([1.1, 0.2]))  # g + 0.1 w
    (second,) = m.update([3], [torch.tensor([0.0, 1.0])], weights)
    torch.testing.assert_close(second, torch.tensor([0.65, 1.3]))  # 0.5 m + g + 0.1 w
    m.forget(3)
    (fresh,) = m.update([3], [torch.tensor([0.0, 1.0])], weights)
    torch.testing.assert_close(fresh, torch.tensor([0.1, 1.2]))  # from zero again


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4 * n, 3, generator=g), torch.randint(0, 2, (4 * n,), generator=g), [4] * n


def _momentum_dp(behaviors: list[str], cfg: RobustConfig) -> RobustDataParallel:
    train = TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.01)
    s = RobustDataParallel(_linear(), train, device_momentum=True)
    s.robust = RobustAggregator(cfg, NAMES, len(behaviors))
    s.behaviors = Behaviors(behaviors, [1.0] * len(behaviors), num_classes=2, seed=0)
    return s


def test_with_the_mean_device_momentum_is_the_coordinators_momentum() -> None:
    train = TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.01)
    server = DataParallel(_linear(), train)
    screened = RobustConfig(rule="mean", max_update_norm=1e9, device_momentum=True)
    devices = _momentum_dp(["honest"] * 4, screened)
    assert devices.optimizer.defaults["momentum"] == 0 == devices.optimizer.defaults["weight_decay"]
    for step in range(4):
        x, y, counts = _batch(4, step)
        for s in (server, devices):
            s.commit(s.prepare(x, y, counts, np.arange(4), step), np.ones(4, dtype=bool))
    for a, b in zip(server.params, devices.params, strict=True):
        torch.testing.assert_close(a, b)


def test_an_attacker_tampers_with_its_momentum_and_a_crash_forgets_it() -> None:
    s = _momentum_dp(["honest", "sign_flip", "honest"], RobustConfig(rule="median"))
    x, y, counts = _batch(3, 0)
    ex = s.prepare(x, y, counts, np.arange(3), 0)
    assert s.device_momentum is not None
    buffers = s.device_momentum.buffers
    torch.testing.assert_close(ex.updates[1].values, -buffers[1])
    torch.testing.assert_close(ex.updates[0].values, buffers[0])
    s.commit(ex, np.ones(3, dtype=bool))
    s.forget(2)
    assert sorted(buffers) == [0, 1]
    grads = s.device_gradients(x, y, counts, [0, 1, 2]).grads  # pure: the same as prepare's
    ex = s.prepare(x, y, counts, np.arange(3), 1)
    torch.testing.assert_close(ex.updates[2].values, grads[2] + 0.01 * _flat(s))


def _flat(s: DataParallel) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in s.params])


def test_build_moves_the_momentum_to_the_devices() -> None:
    raw = {
        "fleet": {"devices": [{"name": "pi", "profile": "rpi4", "count": 5}]},
        "robust": {"rule": "median", "device_momentum": True},
    }
    strategy, _ = build_strategy(scenario_from_dict(raw), _linear(), nn.functional.cross_entropy)
    assert isinstance(strategy, RobustDataParallel) and strategy.device_momentum is not None
    assert strategy.device_momentum.momentum == 0.9 == scenario_from_dict(raw).train.momentum
    assert strategy.optimizer.defaults["momentum"] == 0


# --- mixing at the coordinator --------------------------------------------------------------


def _updates() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    honest = [torch.tensor([1.0, -1.0, 2.0]) + torch.randn(3, generator=g) for _ in range(7)]
    return honest + [torch.tensor([-10.0, 10.0, -20.0])] * 2


def test_bucketing_is_seeded_by_run_and_step() -> None:
    cfg = RobustConfig(rule="median", num_byzantine=1, pre_aggregation="bucketing")

    def combined(seed: int, step: int) -> torch.Tensor:
        out, passed = RobustAggregator(cfg, NAMES, 9, seed).combine(
            step, list(range(9)), _updates(), [1.0] * 9
        )
        assert out is not None and passed == list(range(9))
        return out

    assert torch.equal(combined(0, 5), combined(0, 5))
    assert not torch.equal(combined(0, 5), combined(0, 6))
    assert not torch.equal(combined(0, 5), combined(1, 5))


def test_nnm_before_trimmed_mean_gives_the_honest_mean() -> None:
    cfg = RobustConfig(rule="trimmed_mean", num_byzantine=2, pre_aggregation="nnm")
    agg = RobustAggregator(cfg, NAMES, 9)
    updates = _updates()
    out, _ = agg.combine(0, list(range(9)), updates, [1.0] * 9)
    assert out is not None
    torch.testing.assert_close(out, torch.stack(updates[:7]).mean(dim=0))
    assert agg.summary()["pre_aggregation"] == "nnm"


def test_too_few_buckets_skip_the_step_and_say_why() -> None:
    cfg = RobustConfig(rule="median", num_byzantine=2, pre_aggregation="bucketing")
    agg = RobustAggregator(cfg, NAMES, 9)
    out, passed = agg.combine(4, [0, 1, 2, 3, 4], _updates()[:5], [1.0] * 5)
    assert out is None and passed == [0, 1, 2, 3, 4]
    assert agg.skipped == [
        {"step": 4, "reason": "median needs more than 2f = 4 buckets of 2, got 3"}
    ]


def test_mixing_adds_its_cost_and_the_rule_sees_fewer_rows() -> None:
    d = 1000

    def flops(**cfg: object) -> float:
        return RobustAggregator(RobustConfig(**cfg), NAMES, 8).flops_per_update(d)  # type: ignore[arg-type]

    median = flops(rule="median", num_byzantine=1)
    assert median == 3 * d + 3 * d + d  # screen, 8 log2 8 comparisons / 8, one pass
    # Buckets of 2: each value added once; the median of 4 rows, per arrived update.
    assert flops(rule="median", num_byzantine=1, pre_aggregation="bucketing") == (
        3 * d + d + (2 * d + d) * 4 / 8
    )
    # nnm: 8 * 7 / 2 distances (3 FLOPs a value) and an 8 x 8 mixing product, per update.
    assert flops(rule="median", num_byzantine=1, pre_aggregation="nnm") == (
        median + 1.5 * d * 7 + 2 * d * 8
    )
