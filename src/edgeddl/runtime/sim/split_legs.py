"""What the reference loop does differently for split learning: balancing and the step's
legs in time (the strategy gives FLOPs and bytes; the fleet turns FLOPs into seconds; the
simulated transport lays the legs out on the links)."""

from __future__ import annotations

import numpy as np

from edgeddl.fleet.fleet import Fleet
from edgeddl.fleet.timeline import PipelineRequest
from edgeddl.runtime.sim.network import SimNetwork
from edgeddl.strategy.data_parallel import Exchange
from edgeddl.strategy.split.learning import SplitLearning


def split_balance_inputs(
    fleet: Fleet,
    transport: SimNetwork,
    strategy: SplitLearning,
    idx: np.ndarray,
    sample_bytes: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(seconds per sample, fixed seconds per step) of devices `idx`: their own part of the
    model, the data, and the cut tensors on their path; the round trips' latencies."""
    c = strategy.cost
    flops = c.front_flops + c.head_flops
    up, down = strategy.payload_bytes(idx)
    no_bytes = transport.expected_link_s(idx, 0.0, 0.0)
    per_sample = fleet.seconds_per_sample(flops, sample_bytes)[idx] + (
        transport.expected_link_s(idx, up, down) - no_bytes
    )
    round_trips = 1 if strategy.parts.heads is None else 2
    fixed = fleet.fixed_step_s(c.device_ops)[idx] + round_trips * no_bytes
    if strategy.cfg.splitfed:
        state = float(strategy.device_state_bytes)
        fixed = fixed + transport.expected_link_s(idx, state, state) - no_bytes
    return per_sample, fixed


def split_request(
    fleet: Fleet,
    strategy: SplitLearning,
    ex: Exchange,
    start_s: float,
    data_s: np.ndarray,
    down_bytes: np.ndarray,
    crash_at_s: np.ndarray,
    extra_device_s: np.ndarray | None = None,
) -> PipelineRequest:
    """The step's legs in time: the averaged front down (SplitFed), the data, then the
    strategy's chain with the devices' and the coordinator's FLOPs in seconds."""
    idx = ex.devices
    legs: list[tuple[str, np.ndarray]] = [("down", down_bytes.astype(np.float64)), ("data", data_s)]
    first = True
    for leg in strategy.legs(ex):
        if leg.kind == "device":
            seconds = fleet.device_seconds(idx, leg.amount, leg.ops)
            if first:  # the step's fixed cost (and sealing, `extra_device_s`), once
                seconds = seconds + fleet.step_overhead_s[idx]
                if extra_device_s is not None:
                    seconds = seconds + extra_device_s
                first = False
            legs.append(("device", seconds))
        elif leg.kind == "coordinator":
            legs.append(("coordinator", fleet.coordinator_seconds(leg.amount, leg.ops)))
        else:
            legs.append((leg.kind, leg.amount))
    return PipelineRequest(
        start_s=start_s,
        devices=idx,
        legs=legs,
        crash_at_s=crash_at_s,
        end_work_s=float(fleet.coordinator_seconds(strategy.update_flops())),
        end_work_each_s=float(fleet.coordinator_seconds(strategy.aggregation_flops())),
    )
