"""Your own model and data set, as a run folder's config.resolved.toml records them.

`edgeddl.run(model=..., train_set=..., test_set=...)` trains what no scenario names. Its
resolved config says what ran in place of the scenario's zoo model and data set: [model]
name = "custom" with the class, its module, the parameter count and the input shape; [data]
dataset = "custom" with the class, the sample counts, the input shape, the classes and the
task, beside the partition keys (they still applied). Loading such a file never builds a zoo
model or data set in their place: the loader refuses in one line unless the caller brings
its own (`loader.load_scenario(..., own_model=True)`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from edgeddl.config.checks import require as _require
from edgeddl.config.schema import (
    ANOMALY_DATASETS,
    RECONSTRUCTION_MODELS,
    DataConfig,
    ModelConfig,
    Scenario,
    TaskName,
    dataset_task,
)

CUSTOM = "custom"
PARTITION_KEYS = ("partition", "alpha", "shard_sizes")
"""[data] keys that apply to your own data set too: how it is spread over the fleet."""


@dataclass(kw_only=True, slots=True)
class _CodeRecord:
    """Which class of your code ran, and on samples of which shape."""

    class_name: str
    """The class's `__qualname__`."""
    module: str
    """The class's `__module__` (`edgeddl infer` imports a model's class from it)."""
    input_shape: list[int]
    """One sample's shape, channel-first."""

    def __post_init__(self) -> None:
        _require(bool(self.class_name and self.module), "class_name and module must be set")
        shape = self.input_shape
        _require(bool(shape) and all(d >= 1 for d in shape), f"input_shape: no shape {shape}")


@dataclass(kw_only=True, slots=True)
class CustomModelRecord(_CodeRecord):
    """Your own nn.Module, as [model] records it (never rebuilt from the file alone)."""

    name: Literal["custom"] = "custom"
    num_params: int

    def __post_init__(self) -> None:
        _CodeRecord.__post_init__(self)
        _require(self.num_params >= 0, f"num_params must be >= 0 (got {self.num_params})")

    def describe(self) -> str:
        return f"{self.module}.{self.class_name}, {self.num_params:,} parameters"


@dataclass(kw_only=True, slots=True)
class CustomDataRecord(_CodeRecord):
    """Your own data set (its training set's class), as [data] records it beside the
    partition keys."""

    dataset: Literal["custom"] = "custom"
    task: TaskName
    """What the run learned (from the scenario's data set when it ran)."""
    num_train: int
    num_test: int
    num_classes: int
    """One more than the largest label (anomaly detection: training labels, e.g. machines)."""

    def __post_init__(self) -> None:
        _CodeRecord.__post_init__(self)
        _require(self.num_train >= 1 and self.num_test >= 1, "num_train and num_test must be >= 1")
        _require(self.num_classes >= 1, f"num_classes must be >= 1 (got {self.num_classes})")

    def describe(self) -> str:
        return f"{self.module}.{self.class_name}, {self.num_train:,} training samples"


@dataclass(frozen=True, slots=True)
class Recorded:
    """A loaded scenario and its records of your own model and data (None: the scenario's
    own). Under a record, the scenario's [model] or [data] is a stand-in of the same task
    (a zoo model, a built-in data set) that nothing may build."""

    scenario: Scenario
    model: CustomModelRecord | None = None
    data: CustomDataRecord | None = None


def record_table(
    scenario: Scenario,
    model: CustomModelRecord | None = None,
    data: CustomDataRecord | None = None,
) -> dict[str, Any]:
    """`scenario` as a TOML table, with [model] and [data] saying what ran."""
    raw = dataclasses.asdict(scenario)
    if model is not None:  # what it is first, as in any other scenario
        raw["model"] = {"name": model.name, **dataclasses.asdict(model)}
    if data is not None:
        partition = {k: raw["data"][k] for k in PARTITION_KEYS}
        raw["data"] = {"dataset": data.dataset, **dataclasses.asdict(data), **partition}
    return raw


def take_records(
    raw: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
    """(`raw` with stand-ins for recorded tables, the [model] record, the [data] record)."""
    model, data = raw.get("model"), raw.get("data")
    model = model if isinstance(model, dict) and model.get("name") == CUSTOM else None
    data = data if isinstance(data, dict) and data.get("dataset") == CUSTOM else None
    if model is None and data is None:
        return raw, None, None
    raw = dict(raw)
    if data is not None:
        data = dict(data)
        anomaly = data.get("task") == "anomaly_detection"
        stand_in = {k: data.pop(k) for k in PARTITION_KEYS if k in data}
        stand_in["dataset"] = ANOMALY_DATASETS[0] if anomaly else DataConfig().dataset
        raw["data"] = stand_in
    if model is not None:
        table = raw.get("data")
        dataset = table.get("dataset", "") if isinstance(table, dict) else ""
        anomaly = dataset_task(dataset) == "anomaly_detection"
        raw["model"] = {"name": RECONSTRUCTION_MODELS[0] if anomaly else ModelConfig().name}
    return raw, model, data
