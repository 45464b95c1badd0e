"""IoT sensor series for anomaly detection: normal series to train on, held-out anomalies.

Each series is a window of a 3-axis vibration sensor on one of four machine types, generated
with numpy in milliseconds, seeded and offline. Training labels are the machine type: no
loss sees them, the Dirichlet partitioner skews them, so non-IID means each device sees
mostly some kinds of machine. Test labels are 0 = normal, 1 = anomaly, for the AUROC.
Details: docs/scenarios.md#how-the-sensor-series-are-made
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_CHANNELS = 3
SERIES_LENGTH = 64
NUM_MACHINE_TYPES = 4
ANOMALY_KINDS = ("spike", "frequency_shift", "level_shift", "flatline")
"""Test anomalies: impulses; the machine running at another speed; a step in the reading;
a stuck sensor (one channel reads a constant over a stretch)."""
DEFAULT_NUM_TRAIN = 4000
TEST_FRACTION = 0.25
"""Test series per training series."""
ANOMALY_FRACTION = 0.3
"""Share of the test set that is anomalous (split evenly among the kinds)."""

# Cycles per window of each machine type's two components, per channel: distinct enough
# that the types differ, close enough that one small autoencoder learns them all.
_BASE_CYCLES = np.array([3.0, 5.0, 7.0, 9.5])
_CHANNEL_RATIO = np.array([1.0, 1.5, 2.0])
_HARMONIC = 3.0
_PHASE_OFFSETS = np.random.default_rng(12345).uniform(
    0, 2 * np.pi, (NUM_MACHINE_TYPES, NUM_CHANNELS, 2)
)  # fixed: part of what a machine type is, the same for every seed
_LOAD_STD = 0.05
_HARMONIC_GAIN = 0.4
_SPEED_JITTER = 0.03  # relative speed spread between normal series
_NOISE_STD = 0.05
_DRIFT_STD = 0.1  # per-series slope of the slow drift, over the window


@dataclass(frozen=True, slots=True)
class SensorSeries:
    """One split: series (N, 3, 64) float32, machine types, anomaly flags and kinds."""

    x: np.ndarray
    machine: np.ndarray
    """Machine type of each series (0..3), int64."""
    anomaly: np.ndarray
    """1 for an anomalous series, 0 for a normal one, int64."""
    kind: np.ndarray
    """Index into ANOMALY_KINDS for an anomaly, -1 for a normal series."""


def make_sensors(
    num_train: int = DEFAULT_NUM_TRAIN, seed: int = 0
) -> tuple[SensorSeries, SensorSeries]:
    """(train, test): `num_train` normal series; a test set a quarter that size, 30 % of it
    anomalies, every kind equally often."""
    num_kinds = len(ANOMALY_KINDS)
    num_test = round(num_train * TEST_FRACTION)
    num_anomalies = num_kinds * max(1, round(num_test * ANOMALY_FRACTION / num_kinds))
    if num_test - num_anomalies < 1:
        raise ValueError(f"sensors needs num_samples >= 40, got {num_train}")
    rng = np.random.default_rng(seed)
    train = _normal(rng, num_train)
    test_normal = _normal(rng, num_test - num_anomalies)
    kinds = np.repeat(np.arange(num_kinds), num_anomalies // num_kinds)
    anomalies = _anomalies(rng, kinds)
    order = rng.permutation(num_test)
    x = np.concatenate([test_normal.x, anomalies.x])[order]
    machine = np.concatenate([test_normal.machine, anomalies.machine])[order]
    kind = np.concatenate([test_normal.kind, anomalies.kind])[order]
    test = SensorSeries(x=x, machine=machine, anomaly=(kind >= 0).astype(np.int64), kind=kind)
    return train, test


def _series(rng: np.random.Generator, machine: np.ndarray, speed: np.ndarray) -> np.ndarray:
    """Clean series of `machine` types at relative `speed`, at a random shaft angle, with
    a random load (amplitude) and drift."""
    n = len(machine)
    t = np.arange(SERIES_LENGTH) / SERIES_LENGTH
    cycles = _BASE_CYCLES[machine][:, None] * _CHANNEL_RATIO[None, :] * speed[:, None]  # (n, C)
    # One shaft angle per series drives every channel; each machine type has its own fixed
    # offsets between channels and harmonics, so a series has few degrees of freedom.
    angle = 2 * np.pi * cycles[:, :, None] * t + rng.uniform(0, 2 * np.pi, (n, 1, 1))
    offset = _PHASE_OFFSETS[machine][..., None]  # (n, C, 2, 1)
    x = np.sin(angle + offset[:, :, 0]) + _HARMONIC_GAIN * np.sin(
        _HARMONIC * angle + offset[:, :, 1]
    )
    load = 1.0 + _LOAD_STD * rng.standard_normal((n, 1, 1))
    slope = rng.normal(0.0, _DRIFT_STD, (n, NUM_CHANNELS, 1))
    return load * x + slope * (t - 0.5)


def _normal(rng: np.random.Generator, n: int) -> SensorSeries:
    machine = rng.integers(0, NUM_MACHINE_TYPES, n)
    speed = 1.0 + _SPEED_JITTER * rng.standard_normal(n)
    x = _series(rng, machine, speed) + _NOISE_STD * rng.standard_normal(
        (n, NUM_CHANNELS, SERIES_LENGTH)
    )
    return SensorSeries(
        x=x.astype(np.float32),
        machine=machine.astype(np.int64),
        anomaly=np.zeros(n, dtype=np.int64),
        kind=np.full(n, -1, dtype=np.int64),
    )


def _anomalies(rng: np.random.Generator, kinds: np.ndarray) -> SensorSeries:
    """One anomalous series per entry of `kinds` (indices into ANOMALY_KINDS)."""
    n = len(kinds)
    machine = rng.integers(0, NUM_MACHINE_TYPES, n)
    speed = 1.0 + _SPEED_JITTER * rng.standard_normal(n)
    shifted = kinds == ANOMALY_KINDS.index("frequency_shift")
    # 15-30 % faster or 13-23 % slower: between two machine types' speeds, not on one.
    factor = rng.uniform(1.15, 1.3, n) ** rng.choice([-1.0, 1.0], n)
    speed = np.where(shifted, speed * factor, speed)
    x = _series(rng, machine, speed)
    x += _NOISE_STD * rng.standard_normal(x.shape)
    channel = rng.integers(0, NUM_CHANNELS, n)
    start = rng.integers(8, SERIES_LENGTH - 24, n)
    for i in range(n):  # a few hundred series: a loop reads clearer than masks
        c, s, kind = channel[i], start[i], ANOMALY_KINDS[kinds[i]]
        if kind == "spike":  # one to three impulses of 1.5-3x the signal's peak
            at = rng.choice(SERIES_LENGTH, rng.integers(1, 4), replace=False)
            x[i, c, at] += rng.choice([-1.0, 1.0], len(at)) * rng.uniform(2.0, 4.0, len(at))
        elif kind == "level_shift":  # the reading steps by about one amplitude and stays
            x[i, c, s:] += rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.2)
        elif kind == "flatline":  # stuck sensor: the last good value for 16-24 samples
            x[i, c, s : s + rng.integers(16, 25)] = x[i, c, s - 1]
    return SensorSeries(
        x=x.astype(np.float32),
        machine=machine.astype(np.int64),
        anomaly=np.ones(n, dtype=np.int64),
        kind=kinds.astype(np.int64),
    )
