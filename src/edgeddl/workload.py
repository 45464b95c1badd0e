"""What a run trains, set up the same way by the simulator and by every real device.

The data set (generated or read from a local folder), the task (what the loss compares the
output with, how the test set is scored), the model (seeded, so every replica starts
equal), its cost, the fleet's profiles and each device's shard: every process of a real
fleet builds exactly this from the scenario and the seed, and takes its own shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from edgeddl.config.loader import ConfigError
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

    def sample_caps(self) -> np.ndarray:
        """The most samples each device's memory holds in one step."""
        return sample_caps(self.fleet, self.cost, self.info.sample_bytes)


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
    if (train_set is None) != (test_set is None):
        raise ValueError("pass both train_set and test_set, or neither")
    built_in: DatasetInfo | None = None
    if train_set is None or test_set is None:
        train_set, test_set, built_in = scenario_data(scenario)
    if scenario.run.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError('run.device: "cuda" asked for but torch sees no CUDA device')
    device = torch.device(scenario.run.device)
    x_train, labels = (t.to(device) for t in _tensors(train_set))
    x_test, y_test = (t.to(device) for t in _tensors(test_set))
    # A built-in data set knows its stored sample size (uint8 images are 1 byte a value);
    # for a user's data set the in-memory tensors are all we know.
    info = built_in or DatasetInfo(
        name="custom",
        input_shape=tuple(x_train.shape[1:]),
        num_classes=int(max(labels.max(), y_test.max())) + 1,
        sample_bytes=x_train[0].numel() * x_train.element_size(),
    )
    if scenario.train.global_batch > len(x_train):
        raise ConfigError(
            f"train.global_batch: {scenario.train.global_batch} is more than the "
            f"{len(x_train)} training samples"
        )
    custom = model is not None
    if model is None:
        model = scenario_model(scenario, info)
    model.to(device)
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
    task = build_task(scenario.task, loss_fn)
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
    )
