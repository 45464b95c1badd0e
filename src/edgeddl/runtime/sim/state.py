"""A simulated run's state: what changes as it trains (saved by checkpoints) and what a
session works with and never changes (rebuilt from the scenario when a run resumes).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edgeddl.compress.adapt import AdaptiveDensity
from edgeddl.config.loader import apply_override, load_scenario, scenario_from_dict
from edgeddl.config.schema import Scenario
from edgeddl.data import ShardSampler
from edgeddl.fleet.clock import FleetSchedule, VirtualClock
from edgeddl.report.recorder import RunRecorder
from edgeddl.runtime.sim.exchange import Exchange
from edgeddl.runtime.sim.network import SimNetwork
from edgeddl.security.session import SecureRun
from edgeddl.strategy.base import Strategy
from edgeddl.strategy.build import build
from edgeddl.strategy.fused import batchnorm_layers
from edgeddl.workload import Workload


def scenario_of(
    config: Scenario | str | Path | None,
    overrides: Sequence[str],
    *,
    own_model: bool = False,
    own_data: bool = False,
) -> Scenario:
    """The scenario `config` names, with `overrides`; `own_model`/`own_data`: the caller
    brings them (a run folder's record of a user's model loads only then)."""
    if isinstance(config, Scenario):
        if not overrides:
            return config
        raw = dataclasses.asdict(config)  # the same strict path as a file: edit, validate
        for assignment in overrides:
            apply_override(raw, assignment)
        return scenario_from_dict(raw)
    return load_scenario(config, tuple(overrides), own_model=own_model, own_data=own_data)


@dataclass(slots=True)
class SimState:
    """Everything a simulated run changes as it goes: what a checkpoint saves."""

    strategy: Strategy
    adapt: AdaptiveDensity | None
    sampler: ShardSampler
    network: SimNetwork
    schedule: FleetSchedule
    clock: VirtualClock
    rec: RunRecorder
    participated: np.ndarray
    """Who holds the current model (took part in the last step)."""
    step: int = 0
    members: tuple[int, ...] = ()
    members_key: tuple[int, ...] = ()
    """The membership the shares were balanced for."""
    active: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    shares: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    num_local: np.ndarray | int = 1
    """Local steps per device (federated clients: several)."""
    wall_s: float = 0.0
    """Wall seconds of the run's earlier sessions (before a resume)."""


@dataclass(slots=True)
class SimRun:
    """What one session of a simulated run works with and never changes."""

    scenario: Scenario
    w: Workload
    run_dir: Path
    secure: SecureRun | None
    caps: np.ndarray
    min_share: int
    agg_flops: float
    threads: int
    wall_start: float = field(default_factory=time.perf_counter)
    exchange: Exchange = field(init=False)
    """How steps are carried (built once the run's state and ledger are known)."""

    @property
    def model(self) -> nn.Module:
        return self.w.model

    def wall_s(self, st: SimState) -> float:
        return st.wall_s + time.perf_counter() - self.wall_start


def min_share(w: Workload) -> int:
    """BatchNorm cannot normalise a batch of one 1-D sample (PyTorch refuses it): to be
    safe for every BatchNorm, a device that takes part gets at least two samples."""
    return 2 if batchnorm_layers(w.model) else 1


def fresh_state(scenario: Scenario, w: Workload) -> SimState:
    t = scenario.train
    sizes = np.array([len(s) for s in w.shards], dtype=np.int64)
    strategy, adapt = build(scenario, w.model, w.task.loss_fn, w.info, sizes)
    fleet = w.fleet
    return SimState(
        strategy=strategy,
        adapt=adapt,
        sampler=ShardSampler(w.shards, scenario.run.seed),
        network=SimNetwork(fleet, t.topology, scenario.run.seed),
        schedule=FleetSchedule(scenario),
        clock=VirtualClock(),
        rec=RunRecorder(fleet.names, fleet.profile_names, fleet.link_names),
        participated=np.zeros(fleet.num_devices, dtype=bool),
    )


def run_summary(ctx: SimRun, st: SimState, status: str, security: dict[str, Any]) -> dict[str, Any]:
    """summary.json: the recorder's totals and what ran (`status`: completed or interrupted)."""
    scenario, w, t = ctx.scenario, ctx.w, ctx.scenario.train
    report = st.strategy.report()
    return st.rec.summary(
        metric=w.task.metric,
        virtual_time_s=st.clock.now_s,
        wall_time_s=ctx.wall_s(st),
        extra={
            "status": status,
            "scenario": scenario.run.name,
            "strategy": t.strategy,
            "topology": t.topology,
            "balance": t.balance,
            "task": w.task.name,
            **w.summary_entries(),
            "threads": ctx.threads,
            "num_crashes": st.schedule.num_crashes,
            "compression": {
                "compressor": scenario.compression.compressor,
                "per_device": bool(scenario.compression.groups),
                "adaptive": scenario.compression.adapt.enabled,
                **report.pop("compression", {}),
            },
            **(
                {"federated": {**dataclasses.asdict(scenario.federated), "num_rounds": st.step}}
                if t.strategy == "federated"
                else {}
            ),
            **report,
            **security,
        },
    )
