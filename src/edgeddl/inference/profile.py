"""What the planner needs to know of a model and a fleet: per-layer costs, chained devices.

Per layer (the model as `model_layers` lists it): forward FLOPs and dispatched operators per
sample (torch's FlopCounterMode and a dispatch counter, on a probe batch), weight bytes, and
the bytes of its output per sample (fp32: what crosses a cut there). Devices come from a
scenario's fleet: profile speed, per-operator overhead, memory, and access link.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgeddl.fleet.fleet import Fleet
from edgeddl.inference.plan import ChainDevices, LayerCosts, Plan
from edgeddl.models.cost import OpCounter
from edgeddl.models.layers import model_layers

_PROBE = 2  # samples: BatchNorm layers are in eval mode, but keep the batch honest


@torch.no_grad()
def layer_costs(model: nn.Module, input_shape: tuple[int, ...]) -> LayerCosts:
    """Forward cost of each of `model`'s layers for one sample of `input_shape`."""
    model = model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.zeros(_PROBE, *input_shape, device=device)
    flops, ops, params, out, names = [], [], [], [], []
    shapes: list[tuple[int, ...]] = []
    for name, layer in model_layers(model):
        counter = FlopCounterMode(display=False)
        with counter, OpCounter() as dispatched:
            y = layer(x)
        names.append(name)
        flops.append(counter.get_total_flops() / _PROBE)
        ops.append(dispatched.count)
        params.append(sum(p.numel() * p.element_size() for p in layer.parameters()))
        out.append(4.0 * y[0].numel())
        shapes.append(tuple(y.shape[1:]))
        x = y
    return LayerCosts(
        flops=np.array(flops, dtype=np.float64),
        ops=np.array(ops, dtype=np.float64),
        param_bytes=np.array(params, dtype=np.float64),
        out_bytes=np.array(out, dtype=np.float64),
        input_bytes=4.0 * math.prod(input_shape),
        names=tuple(names),
        out_shapes=tuple(shapes),
        input_shape=tuple(input_shape),
    )


def chain_devices(fleet: Fleet, names: list[str] | None = None) -> ChainDevices:
    """The fleet's devices (or `names`, in that order) as a chain; the first holds the input."""
    order = [fleet.names.index(n) for n in names] if names else list(range(fleet.num_devices))
    idx = np.array(order, dtype=np.int64)
    return ChainDevices(
        names=tuple(fleet.names[i] for i in order),
        flops_per_s=fleet.flops_per_s[idx],
        op_overhead_s=fleet.op_overhead_s[idx],
        memory_bytes=fleet.memory_bytes[idx],
        up_bps=fleet.up_bps[idx],
        down_bps=fleet.down_bps[idx],
        latency_s=fleet.latency_s[idx],
    )


def plan_rows(layers: LayerCosts, chain: ChainDevices, plan: Plan) -> list[list[str]]:
    """The plan as table rows: device, layers, compute, bytes out, link time (per sample)."""
    rows = []
    for d, (start, end) in enumerate(plan.segments):
        if start == end and plan.out_bytes[d] == 0:
            continue  # skipped, and not the input's holder
        span = f"{layers.names[start]}..{layers.names[end - 1]}" if end > start else "(input)"
        rows.append([
            chain.names[d],
            span,
            f"{plan.compute_s[d] * 1e3:.3f}",
            f"{plan.out_bytes[d]:,.0f}",
            f"{plan.transfer_s[d] * 1e3:.3f}",
        ])  # fmt: skip
    return rows
