"""A plan executed across real processes, re-planned when a device leaves or crashes.

The inference side of `pipeline.run_processes`: it picks the first plan as the
simulator does (`choose_plan`: fixed cuts or the planner's best), turns each `Leave` at a
sample into the micro-batch its device's process leaves before, and re-plans the survivors
with the same planner over the chain without the departed (`plan_split`). Time-based
leaves are simulated only: a virtual time means nothing on a wall clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from edgeddl.fleet.fleet import Fleet
from edgeddl.inference.activations import ActivationCodec, largest_payload_bytes, wire_costs
from edgeddl.inference.pipeline import ProcessRun, run_processes
from edgeddl.inference.plan import LayerCosts, Plan
from edgeddl.inference.profile import chain_devices
from edgeddl.inference.simulate import PipelineConfig, choose_plan
from edgeddl.inference.stages import StageRunner


@dataclass(frozen=True, slots=True)
class ProcessResult:
    run: ProcessRun
    plans: list[tuple[Plan, tuple[str, ...]]]
    """Each plan used and its chain, in order (one per `run.generations`)."""
    names: tuple[str, ...]
    """The chain's devices: process i is device names[i]."""

    def device(self, process: int) -> str:
        return self.names[process]


def run_on_processes(
    layers: list[tuple[str, nn.Module]],
    costs: LayerCosts,
    fleet: Fleet,
    names: list[str],
    x: torch.Tensor,
    cfg: PipelineConfig,
    *,
    crashes: Mapping[str, int] | None = None,
    timeout_s: float = 60.0,
    threads: int = 1,
) -> ProcessResult:
    """Stream `x` through one process per device of the chain `names` (see the module doc).

    `cfg.leaves` (at a sample) are requested leaves; `crashes[name] = b` kills that device's
    process with SIGKILL right before micro-batch b (fault injection, for tests). Raises
    ValueError for a leave the chain cannot take, TimeoutError or RuntimeError from the run.
    """
    mb = cfg.micro_batch
    leaves: dict[int, int] = {}
    for lv in cfg.leaves:
        if lv.at_sample is None:
            raise ValueError(
                f"leave of {lv.device} at {lv.at_s:g} s: a virtual time is simulated only; "
                "across processes give a sample (NAME@SAMPLE)"
            )
        if lv.device not in names:
            raise ValueError(f"leave: {lv.device} is not one of the chain's devices")
        if lv.device == names[0]:
            raise ValueError(
                f"{lv.device} holds the input (the chain's first device); it cannot leave"
            )
        if lv.at_sample >= len(x):
            raise ValueError(
                f"leave of {lv.device} at sample {lv.at_sample}: only {len(x)} samples"
            )
        leaves[names.index(lv.device)] = lv.at_sample // mb
    codec = ActivationCodec(cfg.activations)
    wire = wire_costs(costs, codec, mb)
    first = choose_plan(wire, chain_devices(fleet, names), cfg, first=True)
    plans = [(first, tuple(names))]

    def replan(present: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        chain = chain_devices(fleet, [names[i] for i in present])
        plan = choose_plan(wire, chain, cfg, first=False)
        plans.append((plan, chain.names))
        return plan.segments

    run = run_processes(
        StageRunner(layers),
        first.segments,
        x,
        codec,
        mb,
        max_payload_bytes=largest_payload_bytes(costs, codec, mb),
        replan=replan,
        leaves=leaves,
        crashes={names.index(n): b for n, b in (crashes or {}).items()},
        timeout_s=timeout_s,
        threads=threads,
    )
    return ProcessResult(run, plans, tuple(names))
