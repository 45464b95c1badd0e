"""The scenario's strategy: data-parallel, federated or split, with its compression (checked).

The simulator and every device of a real fleet build it the same way, so the maths is the
same whatever carries the payloads.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from edgeddl.compress.adapt import DensityPolicy
from edgeddl.compress.registry import COMPRESSORS, check_compression
from edgeddl.config.loader import ConfigError
from edgeddl.config.schema import Scenario
from edgeddl.data import DatasetInfo
from edgeddl.models.layers import model_layers, resolve_cut
from edgeddl.strategy.compressed import CompressedDataParallel
from edgeddl.strategy.data_parallel import DataParallel, LossFn
from edgeddl.strategy.federated import Federated
from edgeddl.strategy.split_learning import SplitLearning
from edgeddl.workload import as_config_error


def build_strategy(
    scenario: Scenario,
    model: nn.Module,
    loss: LossFn,
    shard_sizes: np.ndarray | None = None,
) -> tuple[DataParallel, DensityPolicy | None]:
    """Plain data-parallel, or with the scenario's compression (checked here); `loss` is
    the task's (`Workload.task.loss_fn`). Federated (`train.strategy`) needs each device's
    `shard_sizes` (its clients weigh and plan by them). Split learning: `build_split`."""
    comp = scenario.compression
    if scenario.train.strategy == "split":
        raise ValueError("split learning is built by build_split")
    if scenario.train.strategy == "federated":
        if shard_sizes is None:
            raise ValueError("a federated strategy needs the devices' shard sizes")
        wire = _compressed(scenario, model, loss) if comp.enabled else None
        fed = Federated(
            model, scenario.train, scenario.federated, shard_sizes, scenario.run.seed, loss, wire
        )
        return fed, None
    if not comp.enabled:
        return DataParallel(model, scenario.train, loss), None
    strategy = _compressed(scenario, model, loss)
    policy = DensityPolicy(comp.adapt, strategy.numel) if comp.adapt.enabled else None
    return strategy, policy


def build_split(
    scenario: Scenario, model: nn.Module, loss: LossFn, info: DatasetInfo
) -> SplitLearning:
    """Split learning with the scenario's cut, label placement and cut compression."""
    if scenario.compression.enabled:
        raise ConfigError(
            "compression: split learning sends activations, not gradients; compress what "
            "crosses the cut with [split.compression] and leave [compression] at none"
        )
    if scenario.task == "anomaly_detection" and scenario.split.labels == "send":
        raise ConfigError(
            "split.labels: an autoencoder's target is its input, so sending labels would "
            'send the raw data; use labels = "u_shaped"'
        )
    cfg = scenario.split
    with as_config_error("split.cut"):
        layers = model_layers(model)
        at = resolve_cut(layers, cfg.cut)
    if cfg.labels == "u_shaped":
        with as_config_error("split.head_cut"):
            if resolve_cut(layers, cfg.head_cut) <= at:
                raise ValueError(
                    f"{cfg.head_cut!r} is not after the cut ({cfg.cut!r}): the coordinator's "
                    "part would be empty"
                )
    with as_config_error("split"):
        return SplitLearning(
            model,
            scenario.train,
            cfg,
            len(scenario.fleet.device_names()),
            info.input_shape,
            info.num_classes,
            scenario.run.seed,
            loss,
        )


def _compressed(scenario: Scenario, model: nn.Module, loss: LossFn) -> CompressedDataParallel:
    comp = scenario.compression
    with as_config_error(""):
        check_compression(comp, scenario.train.topology)
    if scenario.train.strategy == "federated":
        _check_federated_compression(scenario)
    settings = [
        comp.for_device(name, g.name) for g in scenario.fleet.devices for name in g.device_names()
    ]
    return CompressedDataParallel(model, scenario.train, comp, settings, scenario.run.seed, loss)


def _check_federated_compression(scenario: Scenario) -> None:
    """Federated updates ride single-round compressors with a plain memory."""
    comp = scenario.compression
    if comp.adapt.enabled:
        raise ConfigError(
            "compression.adapt: network-aware density is for data-parallel steps; set "
            'compression.adapt.enabled = false with train.strategy = "federated"'
        )
    settings = [("compression", comp)] + [
        (f"compression.groups.{k}", g) for k, g in comp.groups.items()
    ]
    for key, cfg in settings:
        if COMPRESSORS[cfg.compressor].num_phases > 1 or cfg.compressor == "dgc":
            raise ConfigError(
                f"{key}.compressor: {cfg.compressor} needs every device in every step, which "
                'federated rounds do not have; with train.strategy = "federated" use a '
                "single-payload compressor (e.g. topk, two_step, qsgd, int8)"
            )
