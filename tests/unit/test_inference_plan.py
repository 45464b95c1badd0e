"""The inference planner's DP against brute force, on many small random cases."""

from __future__ import annotations

import numpy as np
import pytest

from edgeddl.inference.plan import (
    ChainDevices,
    LayerCosts,
    brute_force_plan,
    plan_split,
    transfer_s,
)


def _case(rng: np.random.Generator, n: int, m: int, tight: bool) -> tuple[LayerCosts, ChainDevices]:
    layers = LayerCosts(
        flops=rng.uniform(1e5, 1e8, n),
        ops=rng.integers(1, 20, n).astype(float),
        param_bytes=rng.uniform(1e3, 1e6, n),
        out_bytes=rng.uniform(1e2, 1e6, n),
        input_bytes=float(rng.uniform(1e2, 1e6)),
    )
    devices = ChainDevices(
        names=tuple(f"d{i}" for i in range(m)),
        flops_per_s=rng.uniform(1e8, 1e11, m),
        op_overhead_s=rng.uniform(0, 1e-4, m),
        memory_bytes=rng.uniform(1e6, 4e6, m) if tight else np.full(m, 1e12),
        up_bps=rng.uniform(1e6, 1e9, m),
        down_bps=rng.uniform(1e6, 1e9, m),
        latency_s=rng.uniform(0, 0.05, m),
    )
    return layers, devices


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_the_dp_is_optimal_against_brute_force(objective: str) -> None:
    rng = np.random.default_rng(0)
    checked = 0
    for case in range(300):
        layers, devices = _case(
            rng, int(rng.integers(1, 7)), int(rng.integers(1, 5)), case % 3 == 0
        )
        try:
            reference = brute_force_plan(layers, devices, objective)  # type: ignore[arg-type]
        except ValueError:
            with pytest.raises(ValueError, match="fits the devices' memory"):
                plan_split(layers, devices, objective)  # type: ignore[arg-type]
            continue
        plan = plan_split(layers, devices, objective)  # type: ignore[arg-type]
        key = "latency_s" if objective == "latency" else "bottleneck_s"
        assert getattr(plan, key) == pytest.approx(getattr(reference, key), rel=1e-12)
        starts = [s for s, _ in plan.segments]
        assert starts[0] == 0 and plan.segments[-1][1] == len(layers)
        assert all(
            e == s2 for (_, e), (s2, _) in zip(plan.segments, plan.segments[1:], strict=False)
        )
        checked += 1
    assert checked > 150


def test_a_slow_link_keeps_everything_on_the_first_device() -> None:
    layers = LayerCosts(
        flops=np.full(4, 1e7), ops=np.ones(4), param_bytes=np.full(4, 1e4),
        out_bytes=np.full(4, 1e6), input_bytes=1e6,
    )  # fmt: skip
    devices = ChainDevices(
        names=("pi", "gpu"), flops_per_s=np.array([1e9, 1e13]), op_overhead_s=np.zeros(2),
        memory_bytes=np.full(2, 1e12), up_bps=np.array([1e6, 1e9]),
        down_bps=np.array([1e9, 1e9]), latency_s=np.array([0.01, 0.01]),
    )  # fmt: skip
    plan = plan_split(layers, devices, "latency")
    assert plan.segments == ((0, 4), (4, 4))  # 40 ms on the Pi beats 8 s to ship 1 MB
    assert plan.latency_s == pytest.approx(4 * 1e7 / 1e9)
    assert transfer_s(devices, 0, 1, 1e6) > plan.latency_s
