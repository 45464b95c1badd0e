"""The user's cache: generated MNIST-1D and measured model costs are made once, read back
identical, and made again when the entry is damaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeddl.data import datasets
from edgeddl.models import build_model, cached_model_cost, model_cost


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEDDL_CACHE_DIR", str(tmp_path))
    datasets._generate_mnist1d.cache_clear()
    yield tmp_path
    datasets._generate_mnist1d.cache_clear()


def test_mnist1d_is_generated_once_then_read_back_identical(cache: Path) -> None:
    first = datasets._generate_mnist1d(200, 3)
    (entry,) = cache.glob("mnist1d-*.npz")
    datasets._generate_mnist1d.cache_clear()
    again = datasets._generate_mnist1d(200, 3)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not again["x"].flags.writeable  # shared between callers: read-only
    other = datasets._generate_mnist1d(200, 4)  # another seed: another entry
    assert len(list(cache.glob("mnist1d-*.npz"))) == 2
    assert not np.array_equal(first["x"], other["x"])
    entry.write_bytes(b"not a zip")  # damaged: made again, and the entry repaired
    datasets._generate_mnist1d.cache_clear()
    repaired = datasets._generate_mnist1d(200, 3)
    assert np.array_equal(first["x"], repaired["x"])
    with np.load(entry) as f:
        assert np.array_equal(f["x"], first["x"])


def test_model_cost_is_measured_once_then_read_back(cache: Path) -> None:
    model = build_model("cnn1d", input_shape=(1, 40), num_classes=10)
    measured = model_cost(model, (1, 40))
    assert cached_model_cost(model, (1, 40)) == measured
    (entry,) = cache.glob("cost-*.json")
    entry.write_text('{"num_params": 1}')  # damaged (a field missing): measured again
    assert cached_model_cost(model, (1, 40)) == measured
    wider = build_model("cnn1d", input_shape=(1, 40), num_classes=10, width=64)
    assert cached_model_cost(wider, (1, 40)).num_params > measured.num_params
    assert len(list(cache.glob("cost-*.json"))) == 2
