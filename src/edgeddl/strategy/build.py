"""The scenario's strategy: data-parallel, federated or split, with its compression (checked).

The simulator and every device of a real fleet build it the same way, so the maths is the
same whatever carries the payloads.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from edgeddl.aggregation.robust import RobustAggregator
from edgeddl.compress.adapt import AdaptiveDensity, DensityPolicy
from edgeddl.config.compression import check_compression
from edgeddl.config.compressors import COMPRESSORS
from edgeddl.config.loader import ConfigError
from edgeddl.config.schema import Scenario
from edgeddl.data import DatasetInfo
from edgeddl.fleet.behaviors import Behaviors
from edgeddl.models.layers import model_layers, resolve_cut
from edgeddl.strategy.base import Strategy
from edgeddl.strategy.compressed import CompressedDataParallel
from edgeddl.strategy.data_parallel import DataParallel, LossFn
from edgeddl.strategy.federated import Federated
from edgeddl.strategy.robust_dp import RobustDataParallel
from edgeddl.strategy.split.learning import SplitLearning
from edgeddl.workload import as_config_error


def build(
    scenario: Scenario, model: nn.Module, loss: LossFn, info: DatasetInfo, shard_sizes: np.ndarray
) -> tuple[Strategy, AdaptiveDensity | None]:
    """The scenario's strategy, whichever it is, and its network-aware density (if on)."""
    if scenario.train.strategy == "split":
        return build_split(scenario, model, loss, info), None
    return build_strategy(scenario, model, loss, shard_sizes, info.num_classes)


def build_strategy(
    scenario: Scenario,
    model: nn.Module,
    loss: LossFn,
    shard_sizes: np.ndarray | None = None,
    num_classes: int = 0,
) -> tuple[DataParallel, AdaptiveDensity | None]:
    """Plain data-parallel, or with the scenario's compression (checked here); `loss` is
    the task's (`Workload.task.loss_fn`). Federated (`train.strategy`) needs each device's
    `shard_sizes` (its clients weigh and plan by them). `[robust]` and misbehaving devices
    (label flips need the data set's `num_classes`) are wired in here. Split learning:
    `build_split`."""
    comp = scenario.compression
    if scenario.train.strategy == "split":
        raise ValueError("split learning is built by build_split")
    strategy: DataParallel
    policy = None
    wire = None
    if scenario.train.strategy == "federated":
        if shard_sizes is None:
            raise ValueError("a federated strategy needs the devices' shard sizes")
        wire = _compressed(scenario, model, loss) if comp.enabled else None
        strategy = Federated(
            model, scenario.train, scenario.federated, shard_sizes, scenario.run.seed, loss, wire
        )
        _wire_robust(scenario, [strategy] + ([wire] if wire is not None else []), num_classes)
    elif comp.enabled:
        strategy = _compressed(scenario, model, loss)
        if comp.adapt.enabled:
            policy = AdaptiveDensity(DensityPolicy(comp.adapt, strategy.numel), strategy)
        _wire_robust(scenario, [strategy], num_classes)
    elif scenario.robust.screens or scenario.misbehaving or scenario.security.enabled:
        # each device's own gradient: to screen, to tamper with, or to seal
        strategy = RobustDataParallel(
            model, scenario.train, loss, device_momentum=scenario.robust.device_momentum
        )
        _wire_robust(scenario, [strategy], num_classes)
    else:  # a trusting mean of honest devices: the fused pass
        strategy = DataParallel(model, scenario.train, loss)
    if scenario.security.enabled:  # no payload is decoded past the configured limit
        for part in [strategy] + ([wire] if wire is not None else []):
            part.max_payload_bytes = scenario.security.max_payload_bytes
    return strategy, policy


def _wire_robust(scenario: Scenario, parts: list[DataParallel], num_classes: int) -> None:
    """One aggregator and one set of behaviours, shared by a strategy and its wire.

    On a ring nobody sees a single update: the rule is the mean (checked in the config), and
    the sum takes whatever the devices send, unscreened.
    """
    if not (scenario.robust.screens or scenario.misbehaving):
        return
    if any(g.behavior == "label_flip" for g in scenario.fleet.devices) and num_classes < 2:
        raise ConfigError("fleet.devices: label_flip needs the data set's number of classes")
    if scenario.robust.screens and COMPRESSORS[scenario.compression.compressor].num_phases > 1:
        raise ConfigError(
            f"robust.rule: {scenario.compression.compressor} sums factors over several rounds, "
            "so no one sees a device's update; use a single-payload compressor (e.g. topk, "
            'qsgd, int8) or rule = "mean" with max_update_norm = 0'
        )
    names = scenario.fleet.device_names()
    n = len(names)
    if scenario.train.strategy == "federated":
        n = min(n, max(1, int(scenario.federated.fraction * n + 0.5)))
    robust = RobustAggregator(scenario.robust, names, n, scenario.run.seed)
    behaviors = Behaviors.from_scenario(scenario, num_classes) if scenario.misbehaving else None
    parts[0].behaviors = behaviors  # the strategy's devices; a federated wire only encodes
    for part in parts:
        if scenario.train.topology == "star":
            part.robust = robust


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
        split = SplitLearning(
            model,
            scenario.train,
            cfg,
            len(scenario.fleet.device_names()),
            info.input_shape,
            info.num_classes,
            scenario.run.seed,
            loss,
        )
    if scenario.security.enabled:  # no tensor is decoded past the configured limit
        split.wire.max_bytes = scenario.security.max_payload_bytes
    return split


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
        if COMPRESSORS[cfg.compressor].every_device:
            raise ConfigError(
                f"{key}.compressor: {cfg.compressor} needs every device in every step, which "
                'federated rounds do not have; with train.strategy = "federated" use a '
                "single-payload compressor (e.g. topk, two_step, qsgd, int8)"
            )
