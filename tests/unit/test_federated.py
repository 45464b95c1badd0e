"""Federated learning's maths on hand-made cases: weighting, FedProx, FedAdam/FedYogi, client
sampling, local work, FedAvg reducing to SGD, BatchNorm statistics, compressed updates, and
the configuration around it."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from edgeddl.config.compression import CompressionConfig, CompressorConfig
from edgeddl.config.federated import FederatedConfig
from edgeddl.config.loader import ConfigError, scenario_from_dict, to_toml
from edgeddl.config.schema import TrainConfig
from edgeddl.runtime.fleet.device_setup import DeviceOptions, read_scenario
from edgeddl.runtime.fleet.store import KEY_SCENARIO
from edgeddl.strategy.base import StepPayloads, Update
from edgeddl.strategy.compressed import CompressedDataParallel
from edgeddl.strategy.federated import Federated, add_proximal_grad
from edgeddl.strategy.server_opt import ServerOptimizer


def _linear(weights: list[float]) -> nn.Module:
    model = nn.Linear(len(weights), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weights]))
    return model


def _fed(model: nn.Module, shard_sizes: list[int], **kw: Any) -> Federated:
    train = TrainConfig(lr=0.1, momentum=0.0)
    return Federated(model, train, FederatedConfig(**kw), np.array(shard_sizes), seed=0)


def _exchange(deltas: list[list[float]]) -> StepPayloads:
    n = len(deltas)
    updates = [
        Update(device=i, weight=1.0, loss=torch.ones(()), values=torch.tensor(d))
        for i, d in enumerate(deltas)
    ]
    up = np.ones((1, n), dtype=np.int64)
    return StepPayloads(devices=np.arange(n), counts=[1] * n, step=0, up_bytes=up, updates=updates)


# --- aggregation ----------------------------------------------------------------------------


def test_server_averages_the_arrived_updates_weighted_by_shard_size() -> None:
    model = _linear([1.0, 2.0])
    fed = _fed(model, [300, 100, 600])
    ex = _exchange([[4.0, 0.0], [0.0, 8.0], [100.0, 100.0]])
    fed.commit(ex, np.array([True, True, False]))  # the third missed the round
    # (300 * [4, 0] + 100 * [0, 8]) / 400 = [3, 2]
    assert model.weight.detach().tolist() == [[4.0, 4.0]]
    uniform = _fed(_linear([1.0, 2.0]), [300, 100, 600], weighting="uniform")
    uniform.commit(_exchange([[4.0, 0.0], [0.0, 8.0], [0.0, 0.0]]), np.array([True, True, False]))
    assert uniform.model.weight.detach().tolist() == [[3.0, 6.0]]
    assert fed.commit(ex, np.zeros(3, dtype=bool)) is None  # nobody arrived: nothing moves
    assert model.weight.detach().tolist() == [[4.0, 4.0]]


def test_proximal_gradient_matches_autograd_of_the_fedprox_term() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    params = list(model.parameters())
    anchor = [p.detach() + 0.3 * torch.randn_like(p) for p in params]
    x, y, mu = torch.randn(8, 5), torch.randint(0, 3, (8,)), 0.7
    loss = nn.functional.cross_entropy(model(x), y)
    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
    expected = torch.autograd.grad(loss + mu / 2 * prox, params)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    add_proximal_grad(params, anchor, mu)
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, e)


def test_fedadam_step_by_hand() -> None:
    opt = ServerOptimizer(
        FederatedConfig(server_optimizer="adam", server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    )
    x = torch.tensor([1.0, 1.0], dtype=torch.float64)
    opt.step(x, torch.tensor([0.5, -2.0], dtype=torch.float64))
    # m = 0.1 d; v = 0.99 tau^2 + 0.01 d^2; x += 0.1 m / (sqrt(v) + tau)
    m = [0.05, -0.2]
    v = [0.99e-6 + 0.01 * 0.25, 0.99e-6 + 0.01 * 4.0]
    want = [1.0 + 0.1 * mi / (math.sqrt(vi) + 1e-3) for mi, vi in zip(m, v, strict=True)]
    assert x.tolist() == pytest.approx(want, rel=1e-12)


def test_fedyogi_steps_by_hand_move_v_additively() -> None:
    cfg = FederatedConfig(server_optimizer="yogi", server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    opt = ServerOptimizer(cfg)
    x = torch.zeros(1, dtype=torch.float64)
    opt.step(x, torch.tensor([2.0], dtype=torch.float64))
    # v0 = tau^2 < d^2: v = tau^2 + 0.01 * 4 (sign -1); m = 0.2
    v1, m1 = 1e-6 + 0.04, 0.2
    x1 = 0.1 * m1 / (math.sqrt(v1) + 1e-3)
    assert float(x[0]) == pytest.approx(x1, rel=1e-12)
    opt.step(x, torch.tensor([0.1], dtype=torch.float64))
    # v1 > d^2 = 0.01: v = v1 - 0.01 * 0.01 (sign +1); m = 0.9 * 0.2 + 0.1 * 0.1
    v2, m2 = v1 - 0.01 * 0.01, 0.9 * m1 + 0.01
    assert float(x[0]) == pytest.approx(x1 + 0.1 * m2 / (math.sqrt(v2) + 1e-3), rel=1e-12)
    assert opt.v is not None and float(opt.v[0]) == pytest.approx(v2, rel=1e-12)


# --- who takes part, with how much work -------------------------------------------------------


def test_client_sampling_is_seeded_sized_and_skips_members_without_data() -> None:
    sizes = [50] * 9 + [0]
    fed = _fed(_linear([0.0]), sizes, fraction=0.3)
    members = np.arange(10)
    picks = [fed.plan(members, r).devices for r in range(20)]
    assert all(len(p) == 3 for p in picks)  # 0.3 of the 9 members with data: 2.7 -> 3
    assert all(set(p.tolist()) <= set(range(9)) for p in picks)
    again = _fed(_linear([0.0]), sizes, fraction=0.3)
    assert all(np.array_equal(p, again.plan(members, r).devices) for r, p in enumerate(picks))
    assert len({tuple(p) for p in picks}) > 5  # rounds differ
    assert len(_fed(_linear([0.0]), sizes, fraction=0.01).plan(members, 0).devices) == 1


def test_local_steps_and_local_epochs_give_the_sample_counts() -> None:
    steps = _fed(_linear([0.0]), [100, 50], local_steps=5, local_batch=32)
    plan = steps.plan(np.array([0, 1]), 0)
    clients, samples, num = plan.devices, plan.samples, plan.local_steps
    assert clients.tolist() == [0, 1] and samples.tolist() == [160, 160] and num.tolist() == [5, 5]
    epochs = _fed(_linear([0.0]), [100, 50], local_epochs=2, local_batch=32)
    plan = epochs.plan(np.array([0, 1]), 0)
    samples, num = plan.samples, plan.local_steps
    assert samples.tolist() == [200, 100] and num.tolist() == [7, 4]  # ceil(200 / 32) = 7


# --- a whole round ------------------------------------------------------------------------------


def test_fedavg_with_one_client_and_one_local_step_is_one_sgd_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    ref = copy.deepcopy(model)
    fed = _fed(model, [100], local_steps=1, local_batch=16, local_lr=0.2)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    ex = fed.prepare(x, y, [16], np.array([0]), 0)
    fed.commit(ex, np.array([True]))
    opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    nn.functional.cross_entropy(ref(x), y).backward()
    opt.step()
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-6)
    assert ex.up_bytes.tolist() == [[fed.dense_up_bytes]]


def test_batchnorm_statistics_are_the_clients_weighted_mean_and_stay_uncompressed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    fed = _fed(model, [300, 100], local_steps=2, local_batch=8)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    ex = fed.prepare(x, y, [16, 16], np.array([0, 1]), 0)
    bn = model[1]
    assert float(bn.running_mean.abs().sum()) == 0.0  # prepare leaves the global model alone
    fed.commit(ex, np.array([True, True]))
    means = [u.stats[0] for u in ex.updates]  # running_mean is the first float buffer
    torch.testing.assert_close(bn.running_mean, 0.75 * means[0] + 0.25 * means[1])
    assert int(bn.num_batches_tracked) == 2
    assert fed.buffer_bytes == 2 * 6 * 4  # running mean and variance, float32


def test_compressed_updates_keep_a_dropped_clients_memory() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    comp = CompressionConfig(compressor="topk", density=0.05)
    train = TrainConfig(lr=0.1, momentum=0.0)
    wire = CompressedDataParallel(
        model,
        train,
        comp,
        [CompressorConfig(**{"compressor": "topk", "density": 0.05})] * 2,
        seed=0,
    )
    fed = Federated(
        model,
        train,
        FederatedConfig(local_steps=2, local_batch=8),
        np.array([100, 100]),
        0,
        wire=wire,
    )
    x, y = torch.randn(32, 20), torch.randint(0, 4, (32,))
    before = fed.flat_params()
    ex = fed.prepare(x, y, [16, 16], np.array([0, 1]), 0)
    assert (ex.up_bytes < fed.dense_up_bytes / 5).all()
    fed.commit(ex, np.array([True, False]))
    moved = fed.flat_params() - before
    assert 0 < int((moved != 0).sum()) <= int(0.05 * fed.numel) + 1  # client 0's top-k only
    assert wire.memories[0].residual is not None  # what client 0 did not send is kept
    assert wire.memories[1].residual is None  # the dropped client's memory is as it was
    fed.forget(0)
    assert 0 not in wire.memories


# --- configuration ----------------------------------------------------------------------------


def _raw(**federated: Any) -> dict[str, Any]:
    return {
        "fleet": {"devices": [{"name": "pi", "profile": "rpi4", "count": 3}]},
        "train": {"strategy": "federated"},
        "federated": federated,
    }


def test_federated_section_round_trips_and_refuses_what_it_cannot_do() -> None:
    import tomllib

    s = scenario_from_dict(_raw(fraction=0.5, server_optimizer="yogi", deadline_s=2.0))
    assert scenario_from_dict(tomllib.loads(to_toml(s))) == s
    with pytest.raises(ConfigError, match=r"^federated\.fraktion: unknown key; did you mean"):
        scenario_from_dict(_raw(fraktion=0.5))
    with pytest.raises(ConfigError, match=r"^federated\.fraction must be in \(0, 1\]"):
        scenario_from_dict(_raw(fraction=0.0))
    with pytest.raises(ConfigError, match=r"^federated\.server_optimizer: expected one of"):
        scenario_from_dict(_raw(server_optimizer="sgd"))
    ring = _raw()
    ring["train"]["topology"] = "ring"
    with pytest.raises(ConfigError, match=r'^train\.topology: .*set topology = "star"'):
        scenario_from_dict(ring)


class _Store:
    def __init__(self, text: str) -> None:
        self.text = text

    def get(self, key: str) -> bytes:
        assert key == KEY_SCENARIO
        return self.text.encode()

    def check(self, keys: list[str]) -> bool:
        return False


def test_a_real_fleet_refuses_what_it_cannot_carry_with_one_line() -> None:
    def read(raw: dict[str, Any]) -> None:
        store = _Store(to_toml(scenario_from_dict(raw)))
        read_scenario(store, DeviceOptions(coordinator="h:1", name="pi-0"))

    read(_raw(fraction=0.5))  # plain federated runs
    with pytest.raises(ConfigError, match=r"^federated\.deadline_s: a real fleet waits"):
        read(_raw(deadline_s=1.0))
    compressed = {**_raw(), "compression": {"compressor": "topk"}}
    with pytest.raises(ConfigError, match=r"^compression: federated updates travel dense"):
        read(compressed)
    split = {**_raw(), "train": {"strategy": "split"}}
    read(split)  # split learning runs on a real fleet too
