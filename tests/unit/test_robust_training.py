"""Robust aggregation wired into the strategies, on hand-made updates: what misbehaving
devices send, the screen's rejections with reasons, the rules' cost, and the configuration
(one-line errors naming the key, a strict round trip)."""

from __future__ import annotations

import json
import tomllib
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from edgeddl.aggregation.robust import RobustAggregator
from edgeddl.config.federated import FederatedConfig
from edgeddl.config.loader import ConfigError, scenario_from_dict, to_toml
from edgeddl.config.robust import RobustConfig
from edgeddl.config.schema import TrainConfig
from edgeddl.fleet.behaviors import Behaviors
from edgeddl.strategy.build import build_strategy
from edgeddl.strategy.data_parallel import DataParallel
from edgeddl.strategy.federated import Federated
from edgeddl.strategy.robust_dp import RobustDataParallel

NAMES = [f"d{i}" for i in range(5)]


def _raw(**sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "fleet": {
            "devices": [
                {"name": "pi", "profile": "rpi4", "count": 7},
                {"name": "bad", "profile": "rpi4", "count": 2, "behavior": "sign_flip"},
            ]
        },
        "robust": {"rule": "median"},
    }
    for key, value in sections.items():
        raw[key] = value
    return json.loads(json.dumps(raw))


def _error(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        scenario_from_dict(raw)
    message = str(e.value)
    assert "\n" not in message
    return message


# --- what a misbehaving device sends --------------------------------------------------------


def _behaviors(kind: str, scale: float = 1.0) -> Behaviors:
    return Behaviors(["honest", kind], [1.0, scale], num_classes=10, seed=0)


@pytest.mark.parametrize(
    ("kind", "scale", "expected"),
    [
        ("honest", 1.0, [1.0, -2.0, 3.0]),
        ("sign_flip", 1.0, [-1.0, 2.0, -3.0]),
        ("scaled", -10.0, [-10.0, 20.0, -30.0]),
        ("free_rider", 1.0, [0.0, 0.0, 0.0]),
        ("label_flip", 1.0, [1.0, -2.0, 3.0]),  # its gradient is honest, on poisoned labels
    ],
)
def test_each_behavior_changes_what_is_sent(kind: str, scale: float, expected: list) -> None:
    update = torch.tensor([1.0, -2.0, 3.0])
    honest, sent = _behaviors(kind, scale).tamper([update, update], [0, 1], step=4)
    assert torch.equal(honest, update)
    assert torch.equal(sent, torch.tensor(expected))


def test_noise_replaces_the_update_with_seeded_noise_scaled_to_its_rms() -> None:
    update = torch.full((20_000,), 0.5)
    b = _behaviors("noise", 3.0)
    (sent,) = b.tamper([update], [1], step=2)
    assert abs(float(sent.std()) - 1.5) < 0.05  # 3 x the RMS 0.5
    assert abs(float(sent.mean())) < 0.05  # noise instead of the update, not added to it
    (again,) = b.tamper([update], [1], step=2)
    (other,) = b.tamper([update], [1], step=3)
    assert torch.equal(sent, again) and not torch.equal(sent, other)


def test_nan_device_sends_nan() -> None:
    (sent,) = _behaviors("nan").tamper([torch.ones(3)], [1], step=0)
    assert torch.isnan(sent).all()


def test_label_flip_poisons_only_its_devices_rows() -> None:
    y = torch.tensor([0, 3, 9, 0, 3, 9])
    out = _behaviors("label_flip").poison_labels(y, [3, 3], [0, 1])
    assert out.tolist() == [0, 3, 9, 9, 6, 0]


# --- the aggregator: screen, rule, records ----------------------------------------------------


def test_screen_rejects_with_reasons_and_the_rule_sees_the_rest() -> None:
    agg = RobustAggregator(RobustConfig(rule="mean", max_update_norm=10.0), NAMES, 5)
    updates = [
        torch.tensor([1.0, 1.0]),
        torch.tensor([float("nan"), 0.0]),
        torch.tensor([3.0, 3.0]),
        torch.tensor([100.0, 0.0]),
    ]
    out, passed = agg.combine(7, [0, 1, 2, 4], updates, [1.0, 1.0, 3.0, 1.0])
    assert passed == [0, 2]
    assert torch.allclose(out, torch.tensor([2.5, 2.5]))  # weights 1 and 3, renormalised
    assert agg.rejected == [
        {"step": 7, "device": "d1", "reason": "non-finite values"},
        {"step": 7, "device": "d4", "reason": "norm 100 over 10"},
    ]
    summary = agg.summary()
    assert summary["num_rejected"] == 2
    assert summary["rejected_by_kind"] == {"non-finite": 1, "norm": 1}


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multi_krum"])
def test_robust_rules_ignore_two_hostile_updates_of_nine(rule: str) -> None:
    cfg = RobustConfig(rule=rule, num_byzantine=2)  # type: ignore[arg-type]
    agg = RobustAggregator(cfg, [f"d{i}" for i in range(9)], 9)
    g = torch.Generator().manual_seed(0)
    honest = [torch.tensor([1.0, -1.0, 2.0]) + 0.01 * torch.randn(3, generator=g) for _ in range(7)]
    hostile = [torch.tensor([-10.0, 10.0, -20.0])] * 2
    out, _ = agg.combine(0, list(range(9)), honest + hostile, [1.0] * 9)
    assert out is not None and torch.allclose(out, torch.tensor([1.0, -1.0, 2.0]), atol=0.05)
    mean, _ = RobustAggregator(RobustConfig(), NAMES, 9).combine(
        0, list(range(9)), honest + hostile, [1.0] * 9
    )
    assert mean is not None and mean[0] < 0  # the trusting mean is dragged the wrong way


def test_too_few_updates_for_krum_skip_the_step_and_say_why() -> None:
    agg = RobustAggregator(RobustConfig(rule="krum", num_byzantine=1), NAMES, 5)
    out, passed = agg.combine(3, [0, 1, 2, 3], [torch.ones(2)] * 4, [1.0] * 4)
    assert out is None and passed == [0, 1, 2, 3]
    assert agg.skipped == [{"step": 3, "reason": "krum needs more than 2f + 2 = 4 updates, got 4"}]


def test_aggregation_flops_grow_with_the_rule() -> None:
    d = 1000

    def flops(rule: str, n: int) -> float:
        cfg = RobustConfig(rule=rule, num_byzantine=1)  # type: ignore[arg-type]
        return RobustAggregator(cfg, NAMES, n).flops_per_update(d)

    assert flops("mean", 8) == 5 * d  # screen (3 per value) and one multiply-add
    assert flops("median", 8) == 3 * d + 3 * d + d  # sort: log2(8) comparisons per value
    assert flops("krum", 8) == 3 * d + 1.5 * d * 7 + 2 * d  # n(n-1)/2 distances, 3 per value
    assert flops("krum", 16) > 2 * flops("krum", 8) - 6 * d  # O(n) per update, O(n^2) in all


# --- the strategies ---------------------------------------------------------------------


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _robust_dp(rule: str, behaviors: list[str], scales: list[float] | None = None) -> DataParallel:
    model = _linear()
    s = RobustDataParallel(model, TrainConfig(lr=0.1, momentum=0.0))
    n = len(behaviors)
    s.robust = RobustAggregator(
        RobustConfig(rule=rule, num_byzantine=1 if rule != "mean" else 0),  # type: ignore[arg-type]
        [f"d{i}" for i in range(n)],
        n,
    )
    s.behaviors = Behaviors(behaviors, scales or [1.0] * n, num_classes=2, seed=0)
    return s


def _batch(n: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4 * n, 3, generator=g), torch.randint(0, 2, (4 * n,), generator=g), [4] * n


def test_robust_data_parallel_with_honest_devices_and_the_mean_matches_the_fused_pass() -> None:
    x, y, counts = _batch(4)
    fused = DataParallel(_linear(), TrainConfig(lr=0.1, momentum=0.0))
    fused.commit(fused.prepare(x, y, counts, np.arange(4), 0), np.ones(4, dtype=bool))
    robust = _robust_dp("mean", ["honest"] * 4)
    ex = robust.prepare(x, y, counts, np.arange(4), 0)
    assert np.array_equal(ex.up_bytes, np.full((1, 4), fused.dense_up_bytes))  # same bytes
    robust.commit(ex, np.ones(4, dtype=bool))
    for a, b in zip(fused.params, robust.params, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_nan_device_is_rejected_and_the_step_goes_on() -> None:
    x, y, counts = _batch(5)
    s = _robust_dp("median", ["honest"] * 4 + ["nan"])
    before = [p.detach().clone() for p in s.params]
    loss = s.commit(s.prepare(x, y, counts, np.arange(5), 3), np.ones(5, dtype=bool))
    assert loss is not None and torch.isfinite(loss)
    assert all(
        torch.isfinite(p).all() and not torch.equal(p, b)
        for p, b in zip(s.params, before, strict=True)
    )
    assert s.report()["robust"]["rejected_updates"] == [
        {"step": 3, "device": "d4", "reason": "non-finite values"}
    ]


def test_a_crashed_device_is_left_out_before_the_rule() -> None:
    x, y, counts = _batch(5)
    s = _robust_dp("median", ["honest"] * 4 + ["nan"])
    arrived = np.array([True, True, True, True, False])
    s.commit(s.prepare(x, y, counts, np.arange(5), 0), arrived)
    assert s.robust is not None and s.robust.rejected == []  # its NaN never arrived


def test_federated_clients_deltas_go_through_the_screen() -> None:
    model = _linear()
    fed = Federated(
        model,
        TrainConfig(lr=0.1, momentum=0.0),
        FederatedConfig(local_steps=2, local_batch=2),
        np.array([4] * 5),
        seed=0,
    )
    fed.behaviors = Behaviors(["honest"] * 3 + ["nan", "scaled"], [1.0] * 4 + [1e6], 2, 0)
    fed.robust = RobustAggregator(RobustConfig(rule="median", max_update_norm=1e3), NAMES, 5)
    x, y, counts = _batch(5)
    loss = fed.commit(fed.prepare(x, y, counts, np.arange(5), 0), np.ones(5, dtype=bool))
    assert loss is not None and torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in fed.params)
    reasons = [(r["device"], r["reason"].split(" ")[0]) for r in fed.robust.rejected]
    assert reasons == [("d3", "non-finite"), ("d4", "norm")]


def test_build_wires_the_rule_and_the_behaviors() -> None:
    scenario = scenario_from_dict(_raw())
    strategy, _ = build_strategy(scenario, _linear(), nn.functional.cross_entropy, None, 10)
    assert isinstance(strategy, RobustDataParallel)
    assert strategy.robust is not None and strategy.robust.cfg.rule == "median"
    assert strategy.behaviors is not None and strategy.behaviors.behaviors[7:] == ["sign_flip"] * 2
    one = {"devices": [{"name": "pi", "profile": "rpi4"}]}
    honest = scenario_from_dict(_raw(robust={}, fleet=one))
    plain, _ = build_strategy(honest, _linear(), nn.functional.cross_entropy)
    assert type(plain) is DataParallel  # a trusting mean of honest devices keeps the fused pass


def test_compressed_payloads_are_aggregated_robustly_after_decoding() -> None:
    raw = _raw(compression={"compressor": "int8"})
    raw["fleet"]["devices"][1].update(behavior="scaled", behavior_scale=-10.0)
    strategy, _ = build_strategy(scenario_from_dict(raw), _linear(), nn.functional.cross_entropy)
    assert strategy.robust is not None
    x, y, _ = _batch(1)  # every device the same batch: the honest gradients are equal
    before = [p.detach().clone() for p in strategy.params]
    ex = strategy.prepare(x.repeat(9, 1), y.repeat(9), [4] * 9, np.arange(9), 0)
    strategy.commit(ex, np.ones(9, dtype=bool))
    honest = DataParallel(_linear(), TrainConfig(lr=0.05))
    honest.commit(honest.prepare(x, y, [4], np.arange(1), 0), np.ones(1, dtype=bool))
    for p, h, b in zip(strategy.params, honest.params, before, strict=True):
        # The median of the decoded payloads is the honest one, at int8's precision.
        assert torch.allclose(p - b, h.detach() - b, rtol=0.02, atol=1e-4)
    attacked, _ = build_strategy(
        scenario_from_dict(_raw(compression={"compressor": "int8"}, robust={})),
        _linear(),
        nn.functional.cross_entropy,
    )
    assert attacked.robust is not None and attacked.robust.cfg.rule == "mean"


# --- configuration ----------------------------------------------------------------------


def test_robust_scenario_round_trips() -> None:
    raw = _raw(robust={"rule": "multi_krum", "num_byzantine": 2, "multi_krum_m": 4})
    raw["robust"].update(pre_aggregation="nnm", device_momentum=True)
    raw["fleet"]["devices"][1].update(behavior="noise", behavior_scale=2.5)
    scenario = scenario_from_dict(raw)
    text = to_toml(scenario)
    assert scenario_from_dict(tomllib.loads(text)) == scenario
    assert to_toml(scenario_from_dict(tomllib.loads(text))) == text


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"robust": {"rule": "krum", "num_byzantine": 4}}, "robust.num_byzantine: krum needs more"),
        ({"robust": {"rule": "median", "trim": 1}}, "robust.trim: only trimmed_mean uses it"),
        ({"robust": {"rule": "trimmed_mean"}}, "robust.trim: trimmed_mean that trims nothing"),
        (
            {"robust": {"rule": "trimmed_mean", "trim": 5}},
            "robust.trim: trimmed_mean trims 5 at each end of 9 updates (the fleet gives 9",
        ),
        ({"robust": {"rule": "median", "multi_krum_m": 3}}, "robust.multi_krum_m: only multi"),
        (
            {"robust": {"rule": "multi_krum", "num_byzantine": 2, "multi_krum_m": 8}},
            "robust.multi_krum_m: 8 is more than",
        ),
        ({"robust": {"rule": "vote"}}, "robust.rule: expected one of 'mean'"),
        ({"robust": {"max_update_norm": -1}}, "robust.max_update_norm must be >= 0"),
        ({"train": {"topology": "ring"}}, "robust.rule: median (and the screen) needs a server"),
        ({"train": {"strategy": "split"}}, "robust: split learning sends activations"),
        ({"data": {"dataset": "sensors"}, "model": {"name": "autoencoder1d"}, "robust": {}}, ""),
        ({"robust": {"rule": "median", "bucket_size": 3}}, "robust.bucket_size: only pre_agg"),
        (
            {"robust": {"rule": "median", "pre_aggregation": "bucketing", "bucket_size": 1}},
            "robust.bucket_size must be >= 2",
        ),
        (
            {
                "robust": {
                    "rule": "median",
                    "num_byzantine": 2,
                    "pre_aggregation": "bucketing",
                    "bucket_size": 3,
                }
            },
            "robust.bucket_size: median needs more than 2f = 4 buckets of 3, got 3",
        ),
        (
            {"robust": {"rule": "krum", "num_byzantine": 2, "pre_aggregation": "bucketing"}},
            "robust.bucket_size: krum needs more than 2f + 2 = 6 buckets of 2, got 5",
        ),
        ({"robust": {"pre_aggregation": "nnm"}}, "robust.pre_aggregation: nnm only changes"),
        (
            {"robust": {"rule": "median", "pre_aggregation": "nnm"}},
            "robust.pre_aggregation: nnm averages each update with its n - f nearest",
        ),
        ({"robust": {"pre_aggregation": "sort"}}, "robust.pre_aggregation: expected one of"),
        ({"robust": {"device_momentum": True}}, "robust.device_momentum: with the trusting"),
        (
            {
                "robust": {"rule": "median", "device_momentum": True},
                "train": {"strategy": "federated"},
            },
            "robust.device_momentum: federated devices do not send gradients",
        ),
        (
            {
                "robust": {"rule": "median", "device_momentum": True},
                "compression": {"compressor": "int8"},
            },
            "robust.device_momentum: compressed gradients keep their own memory",
        ),
        (
            {"robust": {"rule": "median", "device_momentum": True}, "train": {"momentum": 0.0}},
            "robust.device_momentum: train.momentum is 0",
        ),
    ],
)
def test_config_errors_are_one_line_and_name_the_key(change: dict, expected: str) -> None:
    raw = _raw(**change)
    if not expected:  # anomaly detection with a sign flip is fine; with label flip it is not
        scenario_from_dict(raw)
        raw["fleet"]["devices"][1]["behavior"] = "label_flip"
        expected = "fleet.devices[1].behavior: label_flip needs class labels"
    assert _error(raw).startswith(expected)


def test_federated_sample_is_what_krum_is_checked_against() -> None:
    raw = _raw(robust={"rule": "krum", "num_byzantine": 2}, train={"strategy": "federated"})
    scenario_from_dict(raw)  # 9 clients a round > 2f + 2
    raw["federated"] = {"fraction": 0.5}
    assert _error(raw).startswith(
        "robust.num_byzantine: krum needs more than 2f + 2 = 6 updates, got 5 "
        "(federated.fraction 0.5 of 9 gives 5 updates a step)"
    )


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        ({"behavior": "scaled"}, "fleet.devices[1].behavior_scale: scaled by 1 is honest"),
        ({"behavior": "scaled", "behavior_scale": 0}, "behavior_scale: scaled by 0 is free_rider"),
        ({"behavior": "noise", "behavior_scale": -1}, "behavior_scale: noise needs a std > 0"),
        ({"behavior_scale": 3}, "fleet.devices[1].behavior_scale: only scaled and noise"),
        ({"behavior": "evil"}, "fleet.devices[1].behavior: expected one of 'honest'"),
    ],
)
def test_behavior_errors_are_one_line(group: dict, expected: str) -> None:
    raw = _raw()
    raw["fleet"]["devices"][1].update(group)
    assert expected in _error(raw)


def test_powersgd_and_a_robust_rule_are_refused_at_build() -> None:
    raw = _raw(compression={"compressor": "powersgd"})
    with pytest.raises(ConfigError, match=r"^robust.rule: powersgd sums factors"):
        build_strategy(scenario_from_dict(raw), _linear(), nn.functional.cross_entropy)
