"""The scenario's strategy: plain data-parallel, or with its compression (checked here).

The simulator and every device of a real fleet build it the same way, so the maths is the
same whatever carries the payloads.
"""

from __future__ import annotations

from torch import nn

from edgeddl.compress.adapt import DensityPolicy
from edgeddl.compress.registry import check_compression
from edgeddl.config.schema import Scenario
from edgeddl.strategy.compressed import CompressedDataParallel
from edgeddl.strategy.data_parallel import DataParallel, LossFn
from edgeddl.workload import as_config_error


def build_strategy(
    scenario: Scenario, model: nn.Module, loss: LossFn
) -> tuple[DataParallel, DensityPolicy | None]:
    """Plain data-parallel, or with the scenario's compression (checked here); `loss` is
    the task's (`Workload.task.loss_fn`)."""
    comp = scenario.compression
    if not comp.enabled:
        return DataParallel(model, scenario.train, loss), None
    with as_config_error(""):
        check_compression(comp, scenario.train.topology)
    settings = [
        comp.for_device(name, g.name) for g in scenario.fleet.devices for name in g.device_names()
    ]
    strategy = CompressedDataParallel(
        model, scenario.train, comp, settings, scenario.run.seed, loss
    )
    policy = DensityPolicy(comp.adapt, strategy.numel) if comp.adapt.enabled else None
    return strategy, policy
