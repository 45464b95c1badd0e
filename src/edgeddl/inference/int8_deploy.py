"""Float against int8 for deployment: a run folder's model, calibrated three ways, measured.

Calibrations: `synthetic` (inputs synthesised from the model's BatchNorm statistics, no data:
`synthesize.py`), `real` (training samples), `noise` (the unit Gaussian noise the synthesis
starts from: the foil that shows what the optimisation adds). Each variant gets its test
accuracy, serialized size, and median batch-1 latency on this CPU with one thread.

Latency on a fleet's devices is this CPU's measured latency times the ratio of the device's
predicted forward time to this machine's, both from the simulator's cost model (forward
FLOPs / flops_per_s + operators x op_overhead_s, the float model's counts), with this
machine's profile measured by `edgeddl calibrate`'s probe. Assumed, not measured: that int8
gains on the device what it gains here (qnnpack on ARM NEON and fbgemm on AVX2 differ).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgeddl.config.loader import ConfigError, load_recorded
from edgeddl.config.schema import DeviceProfile, Scenario
from edgeddl.data import DatasetInfo
from edgeddl.inference.deploy import MODEL_FILE, load_deployment, read_weights, run_config
from edgeddl.inference.quantize import (
    QuantizedSpec,
    accuracy,
    latencies_s,
    quantize_int8,
    state_dict_bytes,
)
from edgeddl.inference.synthesize import (
    NO_BATCHNORM,
    SynthesisConfig,
    batchnorm_layers,
    bn_statistics_loss,
    synthesize_calibration,
)

Calibration = Literal["synthetic", "real", "noise"]
CALIBRATIONS: tuple[str, ...] = get_args(Calibration)


@dataclass(frozen=True, slots=True)
class RunModel:
    """A run folder's trained model and the data set it was trained on."""

    scenario: Scenario
    model: nn.Module
    train: TensorDataset
    test: TensorDataset
    info: DatasetInfo

    def spec(self, backend: str) -> QuantizedSpec:
        return QuantizedSpec(
            model=self.scenario.model.name,
            width=self.scenario.model.width,
            input_shape=self.info.input_shape,
            num_classes=self.info.num_classes,
            backend=backend,
        )


def load_run(run_dir: Path) -> RunModel:
    """The model in `run_dir` (config.resolved.toml + model.pt, loaded as `edgeddl infer`
    loads it) and its data; ConfigError with a one-line reason when either is missing or
    does not fit the other."""
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: not a run folder")
    require_zoo_run(run_dir)
    deployed = load_deployment(str(run_dir))
    scenario = deployed.scenario
    if scenario.task != "classification":
        raise ConfigError(f"{run_dir}: int8 deployment compares accuracy, so it needs a "
                          f"classification run (this one is {scenario.task})")  # fmt: skip
    return RunModel(scenario, deployed.model, deployed.train, deployed.test, deployed.info)


def require_zoo_run(run_dir: Path) -> None:
    """Refuse a run that trained your own model or data: an int8 spec rebuilds zoo models."""
    rec = load_recorded(run_config(run_dir))
    if rec.model is not None or rec.data is not None:
        own = rec.model.describe() if rec.model is not None else "data set"
        raise ConfigError(f"{run_dir}: int8 deployment takes the zoo's models and data sets, "
                          f"but this run trained your own ({own})")  # fmt: skip


def require_batchnorm(run_dir: Path) -> None:
    """Refuse data-free calibration of a run whose weights hold no BatchNorm statistics,
    from `model.pt` alone: before the seconds that loading the data and measuring take.
    (A BatchNorm layer with running statistics saves its `running_mean`.)"""
    weights = run_dir / MODEL_FILE
    if not weights.is_file():
        return  # load_run says what is missing
    require_zoo_run(run_dir)
    if not any(key.endswith(".running_mean") for key in read_weights(weights)):
        raise ConfigError(f"{weights}: {NO_BATCHNORM}")


@dataclass(frozen=True, slots=True)
class Variant:
    """One deployable form of the model and what was measured of it."""

    name: str
    model: nn.Module
    accuracy: float
    size_bytes: int
    latency_s: float
    calibration_loss: float | None
    """BatchNorm-statistics loss of its calibration inputs (None: float, or no BatchNorm)."""


def calibration_inputs(
    kind: str, model: nn.Module, train: TensorDataset, synthesis: SynthesisConfig
) -> torch.Tensor:
    """`synthesis.num_samples` calibration inputs of `kind` (seeded by `synthesis.seed`)."""
    x = train.tensors[0]
    shape = tuple(x.shape[1:])
    if kind == "synthetic":
        return synthesize_calibration(model, shape, synthesis).inputs
    generator = torch.Generator().manual_seed(synthesis.seed)
    if kind == "real":
        pick = torch.randperm(len(x), generator=generator)[: synthesis.num_samples]
        return x[pick]
    if kind == "noise":  # the very noise the synthesis starts from
        return torch.randn(synthesis.num_samples, *shape, generator=generator)
    raise ValueError(f"unknown calibration {kind!r}; allowed: {', '.join(CALIBRATIONS)}")


def compare(
    model: nn.Module,
    train: TensorDataset,
    test: TensorDataset,
    *,
    calibrations: Sequence[str] = CALIBRATIONS,
    backend: str = "qnnpack",
    synthesis: SynthesisConfig | None = None,
    repeats: int = 200,
) -> list[Variant]:
    """The float model and one int8 variant per calibration, each measured."""
    synthesis = synthesis or SynthesisConfig()
    model = model.eval()
    shape = tuple(train.tensors[0].shape[1:])
    has_bn = bool(batchnorm_layers(model))

    candidates: list[tuple[str, nn.Module, float | None]] = [("float", model, None)]
    for kind in calibrations:
        inputs = calibration_inputs(kind, model, train, synthesis)
        loss = None
        if has_bn:
            with torch.no_grad():
                loss = float(bn_statistics_loss(model, inputs)[0])
        candidates.append((f"int8 {kind}", quantize_int8(model, inputs, backend=backend), loss))
    times = latencies_s([m for _, m, _ in candidates], shape, repeats=repeats)
    variants = [
        Variant(name, m, accuracy(m, test), state_dict_bytes(m), t, loss)
        for (name, m, loss), t in zip(candidates, times, strict=True)
    ]
    return variants


def profile_scales(
    model: nn.Module,
    input_shape: tuple[int, ...],
    here: DeviceProfile,
    targets: dict[str, DeviceProfile],
) -> dict[str, float]:
    """Per target profile: its predicted forward time of `model` over this machine's."""
    from edgeddl.inference.profile import layer_costs

    layers = layer_costs(model, input_shape)
    flops, ops = float(layers.flops.sum()), float(layers.ops.sum())

    def predicted_s(p: DeviceProfile) -> float:
        return flops / p.flops_per_s + ops * p.op_overhead_s

    return {name: predicted_s(p) / predicted_s(here) for name, p in targets.items()}


def fleet_profiles(scenario: Scenario) -> dict[str, DeviceProfile]:
    """The device profiles a scenario's fleet uses, in order of first use."""
    from edgeddl.config.profiles import DEVICE_PROFILES

    known = {**DEVICE_PROFILES, **scenario.profiles}
    return {g.profile: known[g.profile] for g in scenario.fleet.devices}


def variant_rows(variants: Sequence[Variant], scales: dict[str, float]) -> list[list[str]]:
    """The comparison as table rows: `variant_header(scales)` names the columns (a device
    profile's column: milliseconds per sample)."""
    base = variants[0].size_bytes
    rows = []
    for v in variants:
        loss = "-" if v.calibration_loss is None else f"{v.calibration_loss:.2g}"
        rows.append([
            v.name, f"{v.accuracy:.1%}", f"{v.size_bytes / 1024:,.1f}",
            f"{base / v.size_bytes:.2f}", loss, f"{v.latency_s * 1e6:,.0f}",
            *(f"{v.latency_s * s * 1e3:,.3f}" for s in scales.values()),
        ])  # fmt: skip
    return rows


def variant_header(scales: dict[str, float]) -> list[str]:
    return [
        "model", "acc", "KiB", "ratio", "BN loss", "CPU us", *scales,
    ]  # fmt: skip
