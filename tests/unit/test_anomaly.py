"""Anomaly detection: the sensor series, the autoencoder, the AUROC evaluation, the checks
that keep classifiers and autoencoders on their own data sets, and a whole run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import edgeddl
from edgeddl.config.loader import ConfigError, load_scenario
from edgeddl.data import load_dataset, partition
from edgeddl.data.sensors import ANOMALY_KINDS, NUM_MACHINE_TYPES, make_sensors
from edgeddl.models import build_model, model_cost
from edgeddl.report.files import RUN_FILES
from edgeddl.report.recorder import metric_summary
from edgeddl.task import AnomalyDetection, Classification, auroc, build_task


def test_sensor_series_shapes_and_splits() -> None:
    train, test, info = load_dataset("sensors", num_samples=800)
    x_train, machine = train.tensors
    x_test, anomaly = test.tensors
    assert info.name == "sensors" and info.input_shape == (3, 64)
    assert info.sample_bytes == 3 * 64 * 4 and info.num_classes == NUM_MACHINE_TYPES
    assert x_train.shape == (800, 3, 64) and x_test.shape == (200, 3, 64)
    assert x_train.dtype == torch.float32 and machine.dtype == torch.int64
    assert torch.isfinite(x_train).all() and torch.isfinite(x_test).all()
    # Training labels are machine types, every type present; test labels are 0/1 flags.
    assert set(machine.tolist()) == set(range(NUM_MACHINE_TYPES))
    assert set(anomaly.tolist()) == {0, 1}
    assert 0.25 <= float(anomaly.float().mean()) <= 0.35


def test_sensor_series_are_seeded() -> None:
    a, b, c = make_sensors(400, seed=1), make_sensors(400, seed=1), make_sensors(400, seed=2)
    for split_a, split_b in zip(a, b, strict=True):
        assert np.array_equal(split_a.x, split_b.x) and np.array_equal(split_a.kind, split_b.kind)
    assert not np.array_equal(a[0].x, c[0].x)


def test_training_holds_no_anomaly_and_the_test_set_every_kind() -> None:
    train, test = make_sensors(800, seed=0)
    assert not train.anomaly.any() and (train.kind == -1).all()
    counts = np.bincount(test.kind[test.kind >= 0], minlength=len(ANOMALY_KINDS))
    assert (counts == counts[0]).all() and counts[0] >= 10  # every kind, equally often
    assert np.array_equal(test.anomaly, (test.kind >= 0).astype(np.int64))
    # The test set's labels from the loader are the anomaly flags, not machine types.
    _, loaded, _ = load_dataset("sensors", num_samples=800)
    assert np.array_equal(loaded.tensors[1].numpy(), test.anomaly)


def test_anomalies_differ_from_normal_series_where_they_should() -> None:
    _, test = make_sensors(4000, seed=0)
    normal = test.x[test.kind == -1]
    spikes = test.x[test.kind == ANOMALY_KINDS.index("spike")]
    flat = test.x[test.kind == ANOMALY_KINDS.index("flatline")]
    assert np.abs(spikes).max(axis=(1, 2)).mean() > 1.5 * np.abs(normal).max(axis=(1, 2)).mean()
    # A stuck sensor repeats one value: runs of zero differences that noise never makes.
    assert (np.diff(flat, axis=2) == 0).sum(axis=(1, 2)).min() >= 15
    assert (np.diff(normal, axis=2) == 0).sum() == 0


def test_too_few_sensor_series_is_refused() -> None:
    with pytest.raises(ValueError, match="num_samples >= 40"):
        load_dataset("sensors", num_samples=10)


def test_dirichlet_partition_skews_machine_types_across_devices() -> None:
    train, _, _ = load_dataset("sensors", num_samples=2000)
    machine = train.tensors[1]
    shards = partition(machine, 8, scheme="dirichlet", alpha=0.1, seed=0)
    assert sum(len(s) for s in shards) == 2000
    # With strong skew most devices hold mostly one machine type (IID would give ~25 %).
    top = [np.bincount(machine[s].numpy(), minlength=4).max() / len(s) for s in shards]
    assert np.median(top) > 0.6


@pytest.mark.parametrize(
    ("shape", "width"), [((3, 64), 0), ((3, 64), 8), ((1, 40), 4), ((2, 17), 6)]
)
def test_autoencoder_output_has_the_input_shape(shape: tuple[int, int], width: int) -> None:
    torch.manual_seed(0)
    model = build_model("autoencoder1d", input_shape=shape, num_classes=4, width=width)
    assert model(torch.randn(5, *shape)).shape == (5, *shape)
    cost = model_cost(model, shape)
    assert cost.num_params == sum(p.numel() for p in model.parameters())
    assert cost.train_flops_per_sample > cost.forward_flops_per_sample > 0


def test_autoencoder_width_scales_it_and_needs_a_series() -> None:
    def size(width: int) -> int:
        model = build_model("autoencoder1d", input_shape=(3, 64), num_classes=2, width=width)
        return sum(p.numel() for p in model.parameters())

    assert size(8) < size(16) < size(32) == size(0)
    with pytest.raises(ValueError, match="2-D"):
        build_model("autoencoder1d", input_shape=(3, 8, 8), num_classes=2)


def test_auroc_of_perfect_reversed_and_tied_detectors() -> None:
    labels = torch.tensor([0, 0, 1, 0, 1, 1])
    perfect = torch.tensor([0.1, 0.2, 0.9, 0.3, 0.8, 0.7])
    assert auroc(perfect, labels) == 1.0
    assert auroc(-perfect, labels) == 0.0
    assert auroc(torch.ones(6), labels) == 0.5
    with pytest.raises(ValueError, match="both normal"):
        auroc(perfect, torch.zeros(6, dtype=torch.int64))


class _Zero(nn.Module):
    """Reconstructs every series as zeros: the error is the series' own energy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_anomaly_evaluation_on_a_hand_made_case() -> None:
    # Anomalies carry more energy than normal samples, so the zero model ranks them all
    # above; the reversed case (quiet anomalies) ranks them all below.
    x = torch.tensor([1.0, 1.0, 3.0, 1.0, 3.0]).view(5, 1, 1).expand(5, 2, 4).contiguous()
    labels = torch.tensor([0, 0, 1, 0, 1])
    task = AnomalyDetection()
    model = _Zero().train()
    metrics = task.evaluate(model, x, labels, batch=2)  # batches: the same as one pass
    assert metrics == {"test_loss": pytest.approx((3 * 1 + 2 * 9) / 5), "test_auroc": 1.0}
    assert model.training  # left in the mode it was in
    assert task.evaluate(model, x, 1 - labels)["test_auroc"] == 0.0
    assert torch.equal(task.target(x, labels), x)  # the loss compares with the input


def test_classification_evaluation_and_custom_loss() -> None:
    x = torch.eye(3)
    labels = torch.tensor([0, 1, 1])
    model = nn.Identity()
    metrics = Classification().evaluate(model, x * 5, labels)
    assert metrics["test_accuracy"] == pytest.approx(2 / 3)
    assert set(metrics) == {"test_loss", "test_accuracy"}
    task = build_task("classification", loss_fn=lambda out, y: out.sum() * 0)
    assert task.evaluate(model, x, labels)["test_loss"] == 0.0


def test_summary_keys_follow_the_metric() -> None:
    rows = [{"test_loss": 0.5, "test_auroc": 0.7}, {"test_loss": 0.4, "test_auroc": 0.6}]
    assert metric_summary(rows, "test_auroc") == {
        "final_test_auroc": 0.6,
        "final_test_loss": 0.4,
        "best_test_auroc": 0.7,
    }


def test_real_fleet_summary_has_the_task_metric() -> None:
    from edgeddl.runtime.fleet.coordinator import _summary

    rows = [{"step": 0, "test_loss": 0.5, "test_auroc": 0.7}]
    s = _summary(load_scenario("anomaly_fleet"), rows, [], wall_s=1.0)
    assert s["task"] == "anomaly_detection" and s["final_test_auroc"] == 0.7
    assert "final_test_accuracy" not in s


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        (["model.name=cnn1d"], "model.name: 'cnn1d' is a classifier"),
        (["data.dataset=mnist1d"], "model.name: 'autoencoder1d' reconstructs its input"),
    ],
)
def test_mismatched_model_and_data_set_are_refused(overrides: list[str], start: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_scenario("anomaly_fleet", overrides)
    assert str(e.value).startswith(start) and "\n" not in str(e.value)


def test_anomaly_fleet_is_bundled_and_partitions_by_machine_type() -> None:
    scenario = load_scenario("anomaly_fleet")
    assert scenario.task == "anomaly_detection" and scenario.data.partition == "dirichlet"
    assert load_scenario("paper_fleet").task == "classification"


def test_anomaly_fleet_run_learns_and_reports_auroc(tmp_path: Path) -> None:
    overrides = [
        "train.num_steps=60",
        "train.eval_every=30",
        "data.num_samples=800",
        "run.threads=1",
    ]
    result = edgeddl.run("anomaly_fleet", overrides=overrides, out_dir=tmp_path, progress=False)
    s = result.summary
    assert s["task"] == "anomaly_detection" and "final_test_accuracy" not in s
    assert s["final_test_auroc"] > 0.75  # chance is 0.5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 30, 60]
    assert all("test_auroc" in r and "test_accuracy" not in r for r in rows)
    assert rows[-1]["test_auroc"] == s["final_test_auroc"] > rows[0]["test_auroc"]
    assert rows[-1]["train_loss"] < rows[1]["train_loss"]  # reconstruction improves
    for name in (*RUN_FILES, "auroc.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not (tmp_path / "accuracy.png").exists()
