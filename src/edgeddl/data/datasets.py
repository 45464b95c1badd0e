"""Dataset loaders: every dataset comes back as in-memory train/test tensors plus its metadata.

All loaders are offline. MNIST-1D, the synthetic task and the sensor series are generated,
digits ships with scikit-learn, and CIFAR-10 is read from a local folder in its standard
python format; nothing is ever downloaded, so runs are reproducible on air-gapped machines
and in CI.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import pickle
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from torch.utils.data import TensorDataset

from edgeddl.config.schema import DatasetName
from edgeddl.data.sensors import (
    DEFAULT_NUM_TRAIN,
    NUM_CHANNELS,
    NUM_MACHINE_TYPES,
    SERIES_LENGTH,
    make_sensors,
)

DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)  # one list: the config's

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_SUBFOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
_CIFAR10_SAMPLE_BYTES = 3 * 32 * 32

_MNIST1D_LENGTH = 40
_FLOAT32_BYTES = 4
_DEFAULT_SYNTHETIC_SAMPLES = 2000
_DEFAULT_SYNTHETIC_SHAPE = (1, 40)
# Noise std relative to unit-variance class prototypes: on (1, 40) a small MLP reaches ~97 %,
# well above chance yet not saturated, so strategies still differ in time-to-accuracy.
_SYNTHETIC_NOISE_STD = 1.5
_SYNTHETIC_TEST_FRACTION = 0.2


@dataclass(frozen=True, slots=True)
class DatasetInfo:
    """Static description of a dataset, enough to size models and model I/O cost."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    """Distinct training labels (for sensors: machine types, what partitioning skews)."""
    sample_bytes: int


def load_dataset(
    name: str,
    *,
    root: str = "",
    seed: int = 0,
    num_samples: int = 0,
    input_shape: tuple[int, ...] = (),
    num_classes: int = 10,
) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    """Load dataset `name` as (train, test, info); x is float32 channel-first, y is int64.

    `root` is used by cifar10 only. `seed` selects the generated data for mnist1d (0 keeps the
    package's canonical seed 42), synthetic and sensors, and the train/test split for digits.
    `num_samples` is the total sample count for mnist1d (split 80/20), the train count for
    synthetic (plus 20 % for test) and sensors (plus 25 %); 0 keeps the default.
    `input_shape` and `num_classes` shape synthetic only.
    Parameters a dataset does not use are ignored.

    sensors is for anomaly detection: its training labels are machine types (normal series
    only), its test labels 1 for an anomaly and 0 for a normal series (`data/sensors.py`).
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0 (0 = dataset default), got {num_samples}")
    if name == "mnist1d":
        return _load_mnist1d(seed, num_samples)
    if name == "digits":
        return _load_digits(seed)
    if name == "cifar10":
        return _load_cifar10(root)
    if name == "sensors":
        return _load_sensors(seed, num_samples or DEFAULT_NUM_TRAIN)
    if name == "synthetic":
        shape = tuple(input_shape) or _DEFAULT_SYNTHETIC_SHAPE
        return _load_synthetic(seed, num_samples or _DEFAULT_SYNTHETIC_SAMPLES, shape, num_classes)
    raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASET_NAMES)}")


def _tensor_dataset(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> TensorDataset:
    return TensorDataset(
        torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    )


_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")


@functools.lru_cache(maxsize=8)
def _generate_mnist1d(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """MNIST-1D as generated for (num_samples, seed), from the disk cache when it is there:
    every process of a real fleet, and every restart, would otherwise spend seconds on it."""
    from importlib.metadata import version

    from edgeddl.cache import cache_path
    from edgeddl.io import write_bytes_atomic

    path = cache_path("mnist1d", version("mnist1d"), num_samples, seed, suffix=".npz")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in _MNIST1D_KEYS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # absent or damaged
        arrays = _make_mnist1d(num_samples, seed)
        buf = io.BytesIO()
        np.savez(
            buf, x=arrays["x"], y=arrays["y"], x_test=arrays["x_test"], y_test=arrays["y_test"]
        )
        with contextlib.suppress(OSError):  # a read-only home: generate every time
            write_bytes_atomic(path, buf.getvalue())
    for array in arrays.values():
        array.setflags(write=False)  # cached and shared between calls
    return arrays


def _make_mnist1d(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    if num_samples:
        args.num_samples = num_samples
    if seed:
        args.seed = seed
    # make_dataset reseeds the global `random` and numpy RNGs; restore them so loading data
    # does not silently change what the caller's own seeded code draws afterwards.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        generated = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {key: np.asarray(generated[key]) for key in _MNIST1D_KEYS}


def _load_mnist1d(seed: int, num_samples: int) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    num_classes = 10
    if 0 < num_samples < num_classes:
        raise ValueError(f"mnist1d needs num_samples >= {num_classes}, got {num_samples}")
    arrays = _generate_mnist1d(num_samples, seed)

    def as_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        # Copies, so callers own tensors that cannot write through to the shared cache.
        return _tensor_dataset(np.array(x, dtype=np.float32)[:, None, :], np.array(y, np.int64))

    info = DatasetInfo(
        "mnist1d", (1, _MNIST1D_LENGTH), num_classes, _MNIST1D_LENGTH * _FLOAT32_BYTES
    )
    return (
        as_dataset(arrays["x"], arrays["y"]),
        as_dataset(arrays["x_test"], arrays["y_test"]),
        info,
    )


def _load_digits(seed: int) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixels are 4-bit intensities 0..16; scale to [0, 1].
    x = (digits.data / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=seed
    )
    info = DatasetInfo("digits", (1, 8, 8), 10, 64)
    return _tensor_dataset(x_train, y_train), _tensor_dataset(x_test, y_test), info


def check_local_files(name: str, root: str) -> None:
    """Refuse, as `load_dataset` does and without reading a sample, a data set whose local
    files are not there (`edgeddl validate` checks what `edgeddl run` would find)."""
    if name == "cifar10":
        _find_cifar10_folder(root)


def _find_cifar10_folder(root: str) -> Path:
    if not root:
        raise FileNotFoundError(
            "dataset 'cifar10' needs data.root to name the folder holding the CIFAR-10 python "
            f"batches ({', '.join(CIFAR10_TRAIN_FILES)}, {CIFAR10_TEST_FILE}); "
            "no download is attempted"
        )
    base = Path(root)
    for folder in (base, base / CIFAR10_SUBFOLDER):
        has_train = any((folder / file_name).is_file() for file_name in CIFAR10_TRAIN_FILES)
        if has_train and (folder / CIFAR10_TEST_FILE).is_file():
            return folder
    raise FileNotFoundError(
        f"CIFAR-10 not found in {base} (nor in {base / CIFAR10_SUBFOLDER}): expected "
        f"{CIFAR10_TEST_FILE} and at least one of {', '.join(CIFAR10_TRAIN_FILES)} in the "
        "CIFAR-10 python format; no download is attempted"
    )


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled batch; only point data.root at trusted files, since pickle runs code."""
    try:
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    # A damaged pickle can fail with almost any exception type; all mean "unreadable file".
    except Exception as exc:
        raise ValueError(f"unreadable CIFAR-10 batch file {path}: {exc!r}") from exc
    if data.ndim != 2 or data.shape[1] != _CIFAR10_SAMPLE_BYTES:
        raise ValueError(f"CIFAR-10 batch file {path}: data shape {data.shape}, expected (N, 3072)")
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise ValueError(f"CIFAR-10 batch file {path}: labels must be N values in 0..9")
    return data, labels


def _normalize_cifar10(data: np.ndarray) -> torch.Tensor:
    images = torch.from_numpy(data).reshape(-1, 3, 32, 32).to(torch.float32).div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std)


def _load_cifar10(root: str) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    folder = _find_cifar10_folder(root)
    train_paths = [folder / name for name in CIFAR10_TRAIN_FILES if (folder / name).is_file()]
    train_batches = [_read_cifar10_batch(path) for path in train_paths]
    test_data, test_labels = _read_cifar10_batch(folder / CIFAR10_TEST_FILE)
    train_data = np.concatenate([data for data, _ in train_batches])
    train_labels = np.concatenate([labels for _, labels in train_batches])
    train = _tensor_dataset(_normalize_cifar10(train_data), train_labels)
    test = _tensor_dataset(_normalize_cifar10(test_data), test_labels)
    return train, test, DatasetInfo("cifar10", (3, 32, 32), 10, _CIFAR10_SAMPLE_BYTES)


def _load_synthetic(
    seed: int, num_train: int, input_shape: tuple[int, ...], num_classes: int
) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    """Gaussian class clusters: one fixed random prototype per class plus isotropic noise."""
    if num_classes < 2:
        raise ValueError(f"synthetic needs num_classes >= 2, got {num_classes}")
    if any(dim < 1 for dim in input_shape):
        raise ValueError(f"synthetic input_shape dims must be >= 1, got {input_shape}")
    num_features = math.prod(input_shape)
    num_test = max(1, round(num_train * _SYNTHETIC_TEST_FRACTION))
    num_total = num_train + num_test
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((num_classes, num_features))
    # Balanced classes, shuffled, so both splits see every class in proportion.
    labels = rng.permutation(np.arange(num_total) % num_classes)
    noise = rng.standard_normal((num_total, num_features))
    features = prototypes[labels] + _SYNTHETIC_NOISE_STD * noise
    x = features.reshape(num_total, *input_shape)
    train = _tensor_dataset(x[:num_train], labels[:num_train])
    test = _tensor_dataset(x[num_train:], labels[num_train:])
    info = DatasetInfo("synthetic", input_shape, num_classes, num_features * _FLOAT32_BYTES)
    return train, test, info


def _load_sensors(seed: int, num_train: int) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    train, test = make_sensors(num_train, seed)
    shape = (NUM_CHANNELS, SERIES_LENGTH)
    info = DatasetInfo("sensors", shape, NUM_MACHINE_TYPES, math.prod(shape) * _FLOAT32_BYTES)
    return _tensor_dataset(train.x, train.machine), _tensor_dataset(test.x, test.anomaly), info
