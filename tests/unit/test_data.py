"""Tests for dataset loading and partitioning across fleet devices."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeddl.data import DatasetInfo, load_dataset, partition
from edgeddl.data.datasets import CIFAR10_MEAN, CIFAR10_STD


def _write_cifar_batch(path: Path, labels: list[int], fill_offset: int) -> np.ndarray:
    data = np.arange(len(labels) * 3072, dtype=np.int64).reshape(len(labels), 3072) + fill_offset
    data = (data % 256).astype(np.uint8)
    with path.open("wb") as handle:
        pickle.dump({b"data": data, b"labels": labels, b"filenames": []}, handle)
    return data


def test_cifar10_loads_standard_python_format(tmp_path: Path) -> None:
    raw_1 = _write_cifar_batch(tmp_path / "data_batch_1", [3, 1, 4], 0)
    raw_2 = _write_cifar_batch(tmp_path / "data_batch_2", [1, 5], 7)
    raw_test = _write_cifar_batch(tmp_path / "test_batch", [9, 2], 11)
    assert raw_test[0, 1] == 12

    train, test, info = load_dataset("cifar10", root=str(tmp_path))

    assert info == DatasetInfo("cifar10", (3, 32, 32), 10, 3072)
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    assert x_train.shape == (5, 3, 32, 32) and x_test.shape == (2, 3, 32, 32)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert y_train.tolist() == [3, 1, 4, 1, 5]  # batches concatenated in file order
    assert y_test.tolist() == [9, 2]
    raw_train = np.concatenate([raw_1, raw_2]).reshape(-1, 3, 32, 32)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    expected = (torch.from_numpy(raw_train).float() / 255 - mean) / std
    torch.testing.assert_close(x_train, expected)
    # Spot-check one pixel by hand: channel 1 of sample 0 starts at raw byte 1024 % 256 == 0.
    assert x_train[0, 1, 0, 0].item() == pytest.approx(-0.4822 / 0.2435, rel=1e-5)
    assert x_test[0, 0, 0, 1].item() == pytest.approx((12 / 255 - 0.4914) / 0.2470, rel=1e-5)


def test_cifar10_accepts_batches_py_subfolder(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_cifar_batch(folder / "data_batch_3", [0, 1], 0)
    _write_cifar_batch(folder / "test_batch", [2], 0)

    train, test, _ = load_dataset("cifar10", root=str(tmp_path))

    assert train.tensors[1].tolist() == [0, 1]
    assert test.tensors[1].tolist() == [2]


def test_cifar10_missing_folder_names_it_and_refuses_download(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as excinfo:
        load_dataset("cifar10", root=str(missing))
    message = str(excinfo.value)
    assert str(missing) in message and "test_batch" in message and "no download" in message
    assert "\n" not in message


def test_cifar10_needs_test_batch(tmp_path: Path) -> None:
    _write_cifar_batch(tmp_path / "data_batch_1", [0], 0)
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_dataset("cifar10", root=str(tmp_path))


def test_cifar10_empty_root_asks_for_data_root() -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.root") as excinfo:
        load_dataset("cifar10")
    assert "\n" not in str(excinfo.value)


def test_cifar10_corrupt_file_is_value_error_naming_it(tmp_path: Path) -> None:
    _write_cifar_batch(tmp_path / "data_batch_1", [0], 0)
    (tmp_path / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset("cifar10", root=str(tmp_path))


def test_cifar10_wrong_data_shape_is_value_error(tmp_path: Path) -> None:
    _write_cifar_batch(tmp_path / "test_batch", [0], 0)
    with (tmp_path / "data_batch_1").open("wb") as handle:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, handle)
    with pytest.raises(ValueError, match="data_batch_1"):
        load_dataset("cifar10", root=str(tmp_path))


def test_mnist1d_default_shapes_and_keeps_global_rng() -> None:
    random.seed(123)
    np.random.seed(123)
    expected_py, expected_np = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)

    train, test, info = load_dataset("mnist1d")

    assert (random.random(), np.random.rand()) == (expected_py, expected_np)
    assert info == DatasetInfo("mnist1d", (1, 40), 10, 160)
    assert train.tensors[0].shape == (4000, 1, 40) and test.tensors[0].shape == (1000, 1, 40)
    assert train.tensors[0].dtype == torch.float32 and train.tensors[1].dtype == torch.int64
    assert set(train.tensors[1].tolist()) == set(range(10))
    again, _, _ = load_dataset("mnist1d")
    assert torch.equal(again.tensors[0], train.tensors[0])
    for tensor in again.tensors:
        tensor.zero_()  # callers own their tensors: the in-process cache must not change
    fresh, _, _ = load_dataset("mnist1d")
    assert torch.equal(fresh.tensors[0], train.tensors[0])
    assert torch.equal(fresh.tensors[1], train.tensors[1]) and fresh.tensors[1].any()


def test_mnist1d_num_samples_and_seed() -> None:
    train, test, _ = load_dataset("mnist1d", num_samples=500, seed=1)
    other, _, _ = load_dataset("mnist1d", num_samples=500, seed=2)
    assert len(train) == 400 and len(test) == 100
    assert not torch.equal(train.tensors[0], other.tensors[0])
    with pytest.raises(ValueError, match="num_samples"):
        load_dataset("mnist1d", num_samples=5)


def test_digits_shapes_and_seeded_stratified_split() -> None:
    train, test, info = load_dataset("digits", seed=3)
    assert info == DatasetInfo("digits", (1, 8, 8), 10, 64)
    assert train.tensors[0].shape == (1437, 1, 8, 8) and test.tensors[0].shape == (360, 1, 8, 8)
    assert train.tensors[0].min() >= 0.0 and train.tensors[0].max() <= 1.0
    assert torch.bincount(test.tensors[1]).min() >= 35  # stratified: ~36 per class
    same, _, _ = load_dataset("digits", seed=3)
    other, _, _ = load_dataset("digits", seed=4)
    assert torch.equal(same.tensors[1], train.tensors[1])
    assert not torch.equal(other.tensors[1], train.tensors[1])


def test_synthetic_shape_options_and_determinism() -> None:
    train, test, info = load_dataset(
        "synthetic", num_samples=100, input_shape=(3, 4, 4), num_classes=5, seed=7
    )
    assert info == DatasetInfo("synthetic", (3, 4, 4), 5, 3 * 4 * 4 * 4)
    assert train.tensors[0].shape == (100, 3, 4, 4) and test.tensors[0].shape == (20, 3, 4, 4)
    assert set(train.tensors[1].tolist()) == set(range(5))
    same, _, _ = load_dataset(
        "synthetic", num_samples=100, input_shape=(3, 4, 4), num_classes=5, seed=7
    )
    assert torch.equal(same.tensors[0], train.tensors[0])


def test_synthetic_is_learnable_by_small_mlp() -> None:
    train, test, info = load_dataset("synthetic", seed=0)
    assert info.input_shape == (1, 40) and len(train) == 2000 and len(test) == 400
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_train, y_train = train.tensors
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = torch.randint(0, len(train), (64,), generator=generator)
        loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x_test, y_test = test.tensors
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    assert accuracy > 0.8


def test_unknown_dataset_lists_allowed_names() -> None:
    with pytest.raises(ValueError, match=r"mnist1d.*digits.*cifar10.*synthetic"):
        load_dataset("imagenet")


# --- partition -------------------------------------------------------------------------------


def _labels(num_samples: int = 1000, num_classes: int = 10) -> torch.Tensor:
    return torch.arange(num_samples) % num_classes


def _assert_disjoint_cover(parts: list[np.ndarray], num_samples: int) -> None:
    assert all(part.dtype == np.int64 for part in parts)
    merged = np.concatenate(parts)
    assert len(merged) == num_samples
    assert np.array_equal(np.sort(merged), np.arange(num_samples))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_disjoint_covering_and_seeded(scheme: str) -> None:
    labels = _labels()
    parts = partition(labels, 7, scheme=scheme, seed=1)
    _assert_disjoint_cover(parts, len(labels))
    assert len(parts) == 7
    same = partition(labels, 7, scheme=scheme, seed=1)
    other = partition(labels, 7, scheme=scheme, seed=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_follow_weights() -> None:
    parts = partition(_labels(1001), 3, weights=[1.0, 2.0, 7.0])
    # Quotas 100.1, 200.2, 700.7: the one leftover sample goes to the largest remainder.
    assert [len(part) for part in parts] == [100, 200, 701]
    equal = partition(_labels(1000), 4)
    assert [len(part) for part in equal] == [250, 250, 250, 250]


def _mean_label_entropy(labels: torch.Tensor, parts: list[np.ndarray]) -> float:
    entropies = []
    for part in parts:
        counts = np.bincount(labels.numpy()[part], minlength=10).astype(np.float64)
        probs = counts[counts > 0] / counts.sum()
        entropies.append(float(-(probs * np.log(probs)).sum()))
    return float(np.mean(entropies))


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    labels = _labels(2000)
    skewed = partition(labels, 10, scheme="dirichlet", alpha=0.1, seed=0)
    mild = partition(labels, 10, scheme="dirichlet", alpha=100.0, seed=0)
    iid = partition(labels, 10, seed=0)
    assert _mean_label_entropy(labels, skewed) < _mean_label_entropy(labels, mild) - 0.5
    assert _mean_label_entropy(labels, mild) == pytest.approx(
        _mean_label_entropy(labels, iid), abs=0.1
    )


def test_dirichlet_weights_scale_part_sizes() -> None:
    labels = _labels(5000)
    parts = partition(labels, 2, scheme="dirichlet", alpha=50.0, weights=[1.0, 4.0], seed=0)
    assert len(parts[1]) > 3 * len(parts[0])


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_min_size_is_honoured(scheme: str) -> None:
    labels = _labels(200)
    weights = [1.0] + [1000.0] * 4
    parts = partition(labels, 5, scheme=scheme, alpha=0.05, weights=weights, min_size=15, seed=3)
    _assert_disjoint_cover(parts, len(labels))
    assert min(len(part) for part in parts) >= 15


def test_min_size_can_be_exactly_tight() -> None:
    parts = partition(_labels(20), 4, scheme="dirichlet", alpha=0.01, min_size=5, seed=0)
    assert [len(part) for part in parts] == [5, 5, 5, 5]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_parts": 0}, "num_parts"),
        ({"num_parts": 3, "scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"num_parts": 3, "scheme": "dirichlet", "alpha": -1.0}, "alpha"),
        ({"num_parts": 3, "weights": [1.0, 2.0]}, "weights"),
        ({"num_parts": 2, "weights": [1.0, 0.0]}, "weights"),
        ({"num_parts": 2, "weights": [1.0, -2.0]}, "weights"),
        ({"num_parts": 11, "min_size": 10}, "min_size|samples"),
        ({"num_parts": 2, "scheme": "shards"}, "iid.*dirichlet"),
    ],
)
def test_partition_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match) as excinfo:
        partition(_labels(100), **kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(excinfo.value)
