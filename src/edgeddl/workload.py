"""What a run trains, set up the same way by the simulator and by every real device.

The data set (generated or read from a local folder), the task (what the loss compares the
output with, how the test set is scored), the model (seeded, so every replica starts
equal), its cost, the fleet's profiles and each device's shard: every process of a real
fleet builds exactly this from the scenario and the seed, and takes its own shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from edgeddl.config.custom import CustomDataRecord, CustomModelRecord
from edgeddl.config.loader import ConfigError, first_line, to_toml
from edgeddl.config.schema import Scenario
from edgeddl.data import DatasetInfo, load_dataset, partition
from edgeddl.fleet.fleet import Fleet
from edgeddl.models import ModelCost, build_model, cached_model_cost, model_cost
from edgeddl.task import LossFn, Task, build_task


def _tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a data set as (inputs, int64 labels) held in memory (the simulator's data)."""
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        x, y = ds.tensors
    else:
        loader = torch.utils.data.DataLoader(ds, batch_size=4096)
        xs, ys = zip(*loader, strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
    return x.float(), y.long()


def own_data(
    train_set: Dataset, test_set: Dataset
) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    """Your own data sets held in memory (train, test, info): for them the in-memory
    tensors are all we know (a built-in one knows its stored sample size)."""
    x_train, labels = _tensors(train_set)
    x_test, y_test = _tensors(test_set)
    if x_test.shape[1:] != x_train.shape[1:]:
        raise ConfigError(
            f"test_set: samples of shape {tuple(x_test.shape[1:])}, but the training samples "
            f"are {tuple(x_train.shape[1:])}"
        )
    info = DatasetInfo(
        name="custom",
        input_shape=tuple(x_train.shape[1:]),
        num_classes=int(max(labels.max(), y_test.max())) + 1,
        sample_bytes=x_train[0].numel() * x_train.element_size(),
    )
    return TensorDataset(x_train, labels), TensorDataset(x_test, y_test), info


def check_model_fits(
    model: nn.Module, x: torch.Tensor, task: Task, num_classes: int, *, exact: bool
) -> None:
    """Push two training samples through `model` (eval mode, no gradients) before anything
    slow: a model that does not take the data, or whose outputs do not fit the task, is one
    ConfigError line naming the shapes, not a traceback from deep inside training."""
    sample, name = x[:2], type(model).__name__
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as e:  # a model of your own can raise anything
        raise ConfigError(
            f"model: {name} fails on inputs of shape {tuple(sample.shape)} (samples of shape "
            f"{tuple(x.shape[1:])}): {first_line(e)}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"model: {name} returns a {type(out).__name__}, not a tensor of outputs")
    why = task.output_mismatch(tuple(out.shape), tuple(sample.shape), num_classes, exact)
    if why:
        raise ConfigError(
            f"model: {name} gives outputs of shape {tuple(out.shape)} for inputs of shape "
            f"{tuple(sample.shape)}; {why}"
        )


@contextlib.contextmanager
def as_config_error(key: str) -> Iterator[None]:
    """A data set or model the scenario cannot have is the user's mistake: say which key."""
    try:
        yield
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{key}: {e}" if key else str(e)) from None


OPTIMIZER_STATE_COPIES = 4
"""Parameter-sized buffers a device holds: weights, gradients, momentum, a received copy."""


@dataclass(frozen=True, slots=True)
class Workload:
    x_train: torch.Tensor
    y_train: torch.Tensor
    """Training targets, what the loss compares the output with: class labels, or for
    anomaly detection the inputs themselves (the same tensor as `x_train`)."""
    x_test: torch.Tensor
    y_test: torch.Tensor
    """Test labels: classes, or 1 for an anomaly and 0 for a normal sample."""
    info: DatasetInfo
    task: Task
    model: nn.Module
    cost: ModelCost
    fleet: Fleet
    per_sample_s: np.ndarray
    """Each device's profile seconds per training sample (compute and data loading)."""
    shards: list[np.ndarray]
    """Each device's training sample indices (raw data never leaves its device)."""
    scenario: Scenario
    model_record: CustomModelRecord | None
    """Your own model, as the run folder records it (None: the scenario's zoo model)."""
    data_record: CustomDataRecord | None
    """Your own data set, as the run folder records it (None: the scenario's)."""

    def sample_caps(self) -> np.ndarray:
        """The most samples each device's memory holds in one step."""
        return sample_caps(self.fleet, self.cost, self.info.sample_bytes)

    def resolved_toml(self) -> str:
        """config.resolved.toml: the scenario, its [model] and [data] saying what ran."""
        return to_toml(self.scenario, self.model_record, self.data_record)

    def summary_entries(self) -> dict[str, Any]:
        """summary.json's "dataset" and "model": what was trained on what."""
        info, cost = self.info, self.cost
        data = dataclasses.asdict(self.data_record) if self.data_record else {}
        model = dataclasses.asdict(self.model_record) if self.model_record else {}
        data.pop("dataset", None)
        return {
            "dataset": {
                "name": info.name,
                "num_train": len(self.x_train),
                "num_test": len(self.x_test),
                "input_shape": list(info.input_shape),
                "num_classes": info.num_classes,
                **data,
            },
            "model": {
                "name": self.scenario.model.name,
                **model,
                "num_params": cost.num_params,
                "train_flops_per_sample": cost.train_flops_per_sample,
            },
        }


def sample_caps(fleet: Fleet, cost: ModelCost, sample_bytes: float) -> np.ndarray:
    """The most samples each device's memory holds in one step (model state + activations)."""
    return fleet.max_samples(
        OPTIMIZER_STATE_COPIES * cost.param_bytes,
        2 * cost.activation_bytes_per_sample + sample_bytes,
    )


def scenario_data(scenario: Scenario) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    """The scenario's built-in data set (train, test, info), seeded; one-line errors."""
    d = scenario.data
    with as_config_error("data"):
        return load_dataset(
            d.dataset,
            root=d.root,
            seed=scenario.run.seed,
            num_samples=d.num_samples,
            input_shape=tuple(d.input_shape),
            num_classes=d.num_classes,
        )


def scenario_model(scenario: Scenario, info: DatasetInfo) -> nn.Module:
    """The scenario's zoo model for the data set `info` describes (the torch seed decides
    its initial weights); one-line errors."""
    with as_config_error("model"):
        return build_model(
            scenario.model.name,
            input_shape=info.input_shape,
            num_classes=info.num_classes,
            width=scenario.model.width,
        )


def build_workload(
    scenario: Scenario,
    model: nn.Module | None = None,
    train_set: Dataset | None = None,
    test_set: Dataset | None = None,
    loss_fn: LossFn | None = None,
) -> Workload:
    """Data, task, model, cost, fleet and shards of `scenario` (seeded: the same in every
    process).

    Bring your own `model`, `train_set`/`test_set` and `loss_fn` to replace the scenario's.
    The training labels decide the partition (for anomaly detection, e.g. the machine type
    that produced a series); the loss sees the task's target.
    """
    seed = scenario.run.seed
    torch.manual_seed(seed)
    d = scenario.data
    train, test, info, data_record = workload_data(scenario, train_set, test_set)
    if scenario.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError('run.device: "cuda" asked for but torch sees no CUDA device')
    device = torch.device(scenario.run.device)
    x_train, labels = (t.to(device) for t in _tensors(train))
    x_test, y_test = (t.to(device) for t in _tensors(test))
    if scenario.train.global_batch > len(x_train):
        raise ConfigError(
            f"train.global_batch: {scenario.train.global_batch} is more than the "
            f"{len(x_train)} training samples"
        )
    custom = model is not None
    if model is None:
        model = scenario_model(scenario, info)
    model.to(device)
    task = build_task(scenario.task, loss_fn)
    # Before anything slow (FLOP counting, partitioning): one line if model and data differ.
    check_model_fits(model, x_train, task, info.num_classes, exact=data_record is None)
    cost = (
        model_cost(model, info.input_shape)
        if custom
        else cached_model_cost(model, info.input_shape)
    )
    fleet = Fleet.from_scenario(scenario)
    per_sample_s = fleet.seconds_per_sample(cost.train_flops_per_sample, info.sample_bytes)
    weights = (1.0 / per_sample_s).tolist() if d.shard_sizes == "capability" else None
    with as_config_error("data.partition"):
        shards = partition(
            labels.cpu(),
            fleet.num_devices,
            scheme=d.partition,
            alpha=d.alpha,
            seed=seed,
            weights=weights,
        )
    return Workload(
        x_train=x_train,
        y_train=task.target(x_train, labels),
        x_test=x_test,
        y_test=y_test,
        info=info,
        task=task,
        model=model,
        cost=cost,
        fleet=fleet,
        per_sample_s=per_sample_s,
        shards=shards,
        scenario=scenario,
        model_record=_model_record(model, cost, info) if custom else None,
        data_record=data_record,
    )


def _model_record(model: nn.Module, cost: ModelCost, info: DatasetInfo) -> CustomModelRecord:
    cls = type(model)
    return CustomModelRecord(
        class_name=cls.__qualname__,
        module=cls.__module__,
        num_params=cost.num_params,
        input_shape=list(info.input_shape),
    )


def workload_data(
    scenario: Scenario, train_set: Dataset | None = None, test_set: Dataset | None = None
) -> tuple[TensorDataset, TensorDataset, DatasetInfo, CustomDataRecord | None]:
    """(train, test, info) of the scenario's data set, or of your own and its record."""
    if (train_set is None) != (test_set is None):
        raise ValueError("pass both train_set and test_set, or neither")
    if train_set is None or test_set is None:
        return (*scenario_data(scenario), None)
    train, test, info = own_data(train_set, test_set)
    cls = type(train_set)
    record = CustomDataRecord(
        class_name=cls.__qualname__,
        module=cls.__module__,
        task=scenario.task,
        num_train=len(train),
        num_test=len(test),
        input_shape=list(info.input_shape),
        num_classes=info.num_classes,
    )
    return train, test, info, record
