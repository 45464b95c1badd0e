"""Per-sample compute and memory cost of a model, measured once to drive the device simulator.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which counts only matmul- and
convolution-like ops (2 FLOPs per multiply-accumulate); element-wise ops such as ReLU,
BatchNorm and additions are not counted. They are memory-bound on real hardware and small next
to the convolutions, so the count is a good proxy for the compute time of the models in the zoo.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

_FLOAT32_BYTES = 4
# Two samples, not one: BatchNorm in training mode rejects a batch of one.
_PROBE_BATCH_SIZE = 2


@dataclass(frozen=True, slots=True)
class ModelCost:
    """Size of a model and what one training sample costs to push through it."""

    num_params: int
    param_bytes: int
    forward_flops_per_sample: float
    train_flops_per_sample: float
    activation_bytes_per_sample: float
    ops_per_step: int
    """Operators dispatched by one training step (forward, backward, SGD update), whatever
    the batch: what a device's per-operator overhead (framework, kernel launch) multiplies."""


def cached_model_cost(model: nn.Module, input_shape: tuple[int, ...]) -> ModelCost:
    """`model_cost`, kept in the user's cache: counting a ResNet's FLOPs takes seconds, on
    every device process and every restart. Only for the zoo's models, whose structure
    (`repr`), input shape, torch and this code identify the cost."""
    from edgeddl.cache import cache_path
    from edgeddl.io import write_text_atomic
    from edgeddl.models import zoo

    sources = "".join(inspect.getsource(m) for m in (zoo, sys.modules[__name__]))
    where = next((p.device for p in model.parameters()), "cpu")
    path = cache_path(
        "cost", repr(model), input_shape, where, torch.__version__, sources, suffix=".json"
    )
    try:
        return ModelCost(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # absent or damaged
        cost = model_cost(model, input_shape)
        with contextlib.suppress(OSError):  # a read-only home: measure every time
            write_text_atomic(path, json.dumps(dataclasses.asdict(cost)))
        return cost


def model_cost(
    model: nn.Module, input_shape: tuple[int, ...], *, input_grad: bool = False
) -> ModelCost:
    """Measure `model` on a probe batch for one-sample `input_shape` (channel-first).

    Works on a deep copy in training mode, so the caller's weights, gradients and BatchNorm
    running statistics are untouched. `train_flops_per_sample` is forward plus backward;
    `activation_bytes_per_sample` sums the fp32 size of every leaf module's output in one forward.
    """
    num_params = sum(param.numel() for param in model.parameters())
    param_bytes = sum(param.numel() * param.element_size() for param in model.parameters())
    probe = copy.deepcopy(model).train()
    first_param = next(probe.parameters(), None)
    device = first_param.device if first_param is not None else torch.device("cpu")
    # Fixed generator: the counts depend only on shapes, but a fixed input keeps the probe
    # from consuming the caller's global RNG stream.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(_PROBE_BATCH_SIZE, *input_shape, generator=generator).to(device)

    activation_bytes = _forward_activation_bytes(probe, x)
    forward_flops = _count_flops(probe, x, backward=False)
    # A part of a split model also returns the gradient at its input (`input_grad`).
    train_flops = _count_flops(probe, x.requires_grad_(input_grad), backward=True)
    ops = _count_step_ops(probe, x)
    return ModelCost(
        num_params=num_params,
        param_bytes=param_bytes,
        forward_flops_per_sample=forward_flops / _PROBE_BATCH_SIZE,
        train_flops_per_sample=train_flops / _PROBE_BATCH_SIZE,
        activation_bytes_per_sample=activation_bytes / _PROBE_BATCH_SIZE,
        ops_per_step=ops,
    )


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _count_step_ops(probe: nn.Module, x: torch.Tensor) -> int:
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.0, momentum=0.9)
    probe(x).sum().backward()
    optimizer.step()  # the first step creates the momentum buffers: count a later one
    optimizer.zero_grad(set_to_none=True)
    with OpCounter() as counter:
        probe(x).sum().backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return counter.count


def _count_flops(probe: nn.Module, x: torch.Tensor, *, backward: bool) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        if backward:
            probe(x).sum().backward()
        else:
            with torch.no_grad():
                probe(x)
    return counter.get_total_flops()


def _output_numel(output: object) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel()
    if isinstance(output, list | tuple):
        return sum(_output_numel(item) for item in output)
    if isinstance(output, dict):
        return sum(_output_numel(item) for item in output.values())
    return 0


def _forward_activation_bytes(probe: nn.Module, x: torch.Tensor) -> int:
    num_elements = 0

    def record(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal num_elements
        num_elements += _output_numel(output)

    leaves = [module for module in probe.modules() if next(module.children(), None) is None]
    handles = [leaf.register_forward_hook(record) for leaf in leaves]
    try:
        with torch.no_grad():
            probe(x)
    finally:
        for handle in handles:
            handle.remove()
    return num_elements * _FLOAT32_BYTES
