"""A plan's stages as modules, and a micro-batch's route through the chain's devices.

A stage is a contiguous run of the model's layers (`model_layers`) as an `nn.Sequential`
sharing the model's modules: running the stages one after the other is the model's forward
pass, operator for operator, so fp32 outputs equal the model's own bit for bit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from edgeddl.inference.plan import Plan


@dataclass(frozen=True, slots=True)
class Hop:
    """One device's part of a micro-batch's route: it runs layers [start, end) (none if
    start == end: it only holds the activation, e.g. the input, and sends it on)."""

    device: str
    start: int
    end: int


def build_stages(
    layers: list[tuple[str, nn.Module]], plan: Plan, names: tuple[str, ...]
) -> list[tuple[str, nn.Sequential]]:
    """(device, its layers) for each device the plan gives layers, in chain order."""
    return [
        (names[d], nn.Sequential(OrderedDict(layers[s:e])))
        for d, (s, e) in enumerate(plan.segments)
        if e > s
    ]


def route(plan: Plan, names: tuple[str, ...], from_layer: int = 0, holder: str = "") -> list[Hop]:
    """The hops of a micro-batch whose first `from_layer` layers are done, its activation
    held by `holder` (default: the chain's first device, which holds the input)."""
    holder = holder or names[0]
    hops = [
        Hop(names[d], max(s, from_layer), e)
        for d, (s, e) in enumerate(plan.segments)
        if e > max(s, from_layer)
    ]
    if not hops or hops[0].device != holder:
        hops.insert(0, Hop(holder, from_layer, from_layer))
    return hops


class StageRunner:
    """Runs layer ranges of one model, each range's `nn.Sequential` built once."""

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self.layers = layers
        self._stages: dict[tuple[int, int], nn.Sequential] = {}

    def __call__(self, start: int, end: int, x: torch.Tensor) -> torch.Tensor:
        stage = self._stages.get((start, end))
        if stage is None:
            stage = self._stages[start, end] = nn.Sequential(OrderedDict(self.layers[start:end]))
        with torch.inference_mode():
            return stage(x)


@torch.inference_mode()
def single_device_outputs(model: nn.Module, x: torch.Tensor, micro_batch: int) -> torch.Tensor:
    """The reference: the whole model (its own forward) on one device, micro-batch by
    micro-batch (the same batches the pipeline runs: kernels may round differently for
    another batch size)."""
    model.eval()
    return torch.cat([model(x[i : i + micro_batch]) for i in range(0, len(x), micro_batch)])
