"""A plan executed on the simulated fleet: real outputs, virtual time, re-plan on leave.

Micro-batches stream through the chain; each device is two FIFO servers (its compute and its
uplink, charged as the planner charges). A leave is a barrier: the rest are re-planned and
each unfinished micro-batch resumes from the deepest activation a remaining device holds.
Activations are the tensors actually computed, so fp32 outputs equal single-device ones.
Details: docs/inference.md#the-simulated-executor
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from edgeddl.fleet.fleet import Fleet
from edgeddl.fleet.link import transfer_time_s
from edgeddl.inference.activations import ActivationCodec, nbytes, wire_costs
from edgeddl.inference.plan import (
    ChainDevices,
    LayerCosts,
    Objective,
    Plan,
    evaluate_cuts,
    plan_split,
)
from edgeddl.inference.profile import chain_devices
from edgeddl.inference.stages import Hop, StageRunner, route


@dataclass(frozen=True, slots=True)
class Leave:
    """`device` leaves when the first device is about to start the micro-batch holding
    sample `at_sample`, or at virtual time `at_s` (exactly one of them)."""

    device: str
    at_sample: int | None = None
    at_s: float | None = None

    def __post_init__(self) -> None:
        if (self.at_sample is None) == (self.at_s is None):
            raise ValueError(f"leave of {self.device}: give a sample or a time, not both")
        if (self.at_sample or 0) < 0 or (self.at_s or 0.0) < 0:
            raise ValueError(f"leave of {self.device}: the sample or time must be >= 0")


@dataclass(kw_only=True, slots=True)
class PipelineConfig:
    objective: Objective = "latency"
    micro_batch: int = 1
    """Samples per micro-batch: one forward call per stage, one transfer per hop."""
    activations: str = "fp32"
    """How activations cross links: fp32, fp16 or int8 (see `inference.activations`)."""
    link_noise: bool = True
    """Draw the links' jitter and loss (seeded); off, transfers take what the planner says."""
    leaves: tuple[Leave, ...] = ()
    cuts: tuple[int, ...] = ()
    """A fixed first plan (`evaluate_cuts`: one entry more than the chain) instead of the
    planner's best, e.g. to compare against a baseline; a re-plan uses the planner."""

    def __post_init__(self) -> None:
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch: must be >= 1, got {self.micro_batch}")
        ActivationCodec(self.activations)  # checks the name


@dataclass(frozen=True, slots=True)
class Step:
    """One compute or one transfer of one micro-batch (seconds are virtual)."""

    kind: str  # "compute" | "send"
    device: str
    to: str
    micro_batch: int
    start_s: float
    end_s: float
    layers_done: int
    num_bytes: int = 0


@dataclass(frozen=True, slots=True)
class PlanUse:
    plan: Plan
    devices: tuple[str, ...]
    from_s: float
    reason: str


@dataclass(slots=True)
class DeviceStats:
    compute_s: float = 0.0
    send_s: float = 0.0
    wasted_s: float = 0.0
    """Compute and sending dropped at a re-plan barrier."""
    bytes_sent: int = 0
    bytes_received: int = 0
    left_at_s: float | None = None


@dataclass(slots=True)
class SimResult:
    outputs: torch.Tensor
    plans: list[PlanUse]
    devices: dict[str, DeviceStats]
    steps: list[Step]
    micro_batch_s: list[tuple[float, float]]
    """Each micro-batch's (first start, last layer done)."""
    resumed: list[tuple[int, int, str]] = field(default_factory=list)
    """(micro-batch, layers done, holder) of each micro-batch resumed after a leave."""

    @property
    def makespan_s(self) -> float:
        return max(end for _, end in self.micro_batch_s)

    @property
    def throughput(self) -> float:
        return len(self.outputs) / self.makespan_s

    @property
    def latency_s(self) -> list[float]:
        """Each micro-batch's time from its first start to its output (all its samples')."""
        return [end - start for start, end in self.micro_batch_s]


def choose_plan(wire: LayerCosts, chain: ChainDevices, cfg: PipelineConfig, first: bool) -> Plan:
    """The fixed cuts for the first plan if `cfg` gives them, else the planner's best;
    `wire`: the layer costs as the activations cross the links (`wire_costs`)."""
    if cfg.cuts and first:
        fixed = evaluate_cuts(wire, chain, list(cfg.cuts), cfg.micro_batch)
        if fixed is None:
            raise ValueError(f"the fixed cuts {cfg.cuts} do not fit the devices' memory")
        return fixed
    return plan_split(wire, chain, cfg.objective, cfg.micro_batch)


class _Pipeline:
    """The mutable state of one simulated run; `simulate` is its only user."""

    def __init__(
        self,
        runner: StageRunner,
        costs: LayerCosts,
        fleet: Fleet,
        names: list[str],
        cfg: PipelineConfig,
        seed: int,
    ) -> None:
        self.run, self.costs, self.fleet, self.cfg = runner, costs, fleet, cfg
        self.codec = ActivationCodec(cfg.activations)
        self.present = list(names)
        self.index = {n: fleet.names.index(n) for n in names}
        self.rng = np.random.default_rng(seed) if cfg.link_noise else None
        self.compute_free = dict.fromkeys(names, 0.0)
        self.link_free = dict.fromkeys(names, 0.0)
        self.stats = {n: DeviceStats() for n in names}
        self.steps: list[list[Step]] = []
        self.held: list[list[tuple[int, str, torch.Tensor]]] = []  # after each step
        self.done: dict[int, torch.Tensor] = {}
        self.first_start: dict[int, float] = {}
        self.plans: list[PlanUse] = []

    def replan(self, at_s: float, reason: str) -> None:
        chain = chain_devices(self.fleet, self.present)
        wire = wire_costs(self.costs, self.codec, self.cfg.micro_batch)
        plan = choose_plan(wire, chain, self.cfg, first=not self.plans)
        self.plans.append(PlanUse(plan, chain.names, at_s, reason))

    def _compute_s(self, device: str, start: int, end: int, batch: int) -> float:
        i = self.index[device]
        flops = float(self.costs.flops[start:end].sum()) * batch
        ops = float(self.costs.ops[start:end].sum())
        return flops / self.fleet.flops_per_s[i] + ops * self.fleet.op_overhead_s[i]

    def _send_s(self, a: str, b: str, num_bytes: int) -> float:
        f, i, j = self.fleet, self.index[a], self.index[b]
        return float(
            transfer_time_s(
                num_bytes,
                min(f.up_bps[i], f.down_bps[j]),
                f.latency_s[i] + f.latency_s[j],
                f.jitter_s[i] + f.jitter_s[j],
                1.0 - (1.0 - f.loss[i]) * (1.0 - f.loss[j]),
                self.rng,
            )
        )

    def first_start_s(self, hops: list[Hop], ready_s: float) -> float:
        h = hops[0]
        return max(
            ready_s, self.compute_free[h.device] if h.end > h.start else self.link_free[h.device]
        )

    def dispatch(self, b: int, hops: list[Hop], x: torch.Tensor, ready_s: float) -> None:
        """Run micro-batch b along `hops` from activation `x` (real maths, virtual time)."""
        steps, held = self.steps[b], self.held[b]
        t, act, batch = ready_s, x, len(x)
        for i, hop in enumerate(hops):
            if i > 0:
                prev = hops[i - 1].device
                parts = self.codec.encode(act)
                size = nbytes(parts)
                act = self.codec.decode(parts)
                start = max(t, self.link_free[prev])
                t = self.link_free[prev] = start + self._send_s(prev, hop.device, size)
                steps.append(Step("send", prev, hop.device, b, start, t, hop.start, size))
                held.append((hop.start, hop.device, act))
            if hop.end > hop.start:
                act = self.run(hop.start, hop.end, act)
                start = max(t, self.compute_free[hop.device])
                dur = self._compute_s(hop.device, hop.start, hop.end, batch)
                t = self.compute_free[hop.device] = start + dur
                steps.append(Step("compute", hop.device, hop.device, b, start, t, hop.end))
                held.append((hop.end, hop.device, act))
        self.first_start.setdefault(b, steps[0].start_s if steps else ready_s)
        if hops[-1].end == len(self.costs):
            self.done[b] = act

    def leave(self, device: str, at_s: float) -> list[tuple[int, int, str, torch.Tensor | None]]:
        """The barrier: drop work after `at_s`, re-plan without `device`; returns what each
        unfinished micro-batch resumes from (micro-batch, layers done, holder, activation)."""
        if device == self.present[0]:
            raise ValueError(
                f"{device} holds the input (the chain's first device); it cannot leave"
            )
        if device not in self.present:
            raise ValueError(f"{device} is not in the chain (or has left already)")
        self.present.remove(device)
        self.stats[device].left_at_s = float(at_s)
        resume: list[tuple[int, int, str, torch.Tensor | None]] = []
        for b, steps in enumerate(self.steps):
            if not steps or steps[-1].end_s <= at_s:
                continue  # finished before the leave, or not started
            keep = sum(1 for s in steps if s.end_s <= at_s)  # steps of a micro-batch are in order
            for s in steps[keep:]:
                if s.start_s < at_s:
                    self.stats[s.device].wasted_s += at_s - s.start_s
            del steps[keep:]
            self.done.pop(b, None)
            # The deepest activation still held; on a tie the later holder (it was sent on).
            k, holder, act = 0, self.present[0], None
            for depth, dev, a in self.held[b][:keep]:
                if dev in self.present and depth >= k:
                    k, holder, act = depth, dev, a
            resume.append((b, k, holder, act))
            del self.held[b][keep:]
        for n in self.present:
            self.compute_free[n] = at_s
            self.link_free[n] = at_s
        self.replan(at_s, f"{device} left")
        return resume

    def account(self) -> list[Step]:
        flat = [s for steps in self.steps for s in steps]
        for s in flat:
            if s.kind == "compute":
                self.stats[s.device].compute_s += s.end_s - s.start_s
            else:
                self.stats[s.device].send_s += s.end_s - s.start_s
                self.stats[s.device].bytes_sent += s.num_bytes
                self.stats[s.to].bytes_received += s.num_bytes
        return sorted(flat, key=lambda s: (s.start_s, s.micro_batch))


def simulate(
    model_layers: list[tuple[str, torch.nn.Module]],
    costs: LayerCosts,
    fleet: Fleet,
    names: list[str],
    x: torch.Tensor,
    cfg: PipelineConfig,
    seed: int = 0,
) -> SimResult:
    """Stream `x` through the chain `names` of `fleet` as `cfg` says (see the module doc).

    `costs` are the model's measured fp32 layer costs (`layer_costs`); the planner weighs
    the activations as `cfg.activations` encodes them. Raises ValueError for a leave the
    chain cannot take, or a chain no plan fits.
    """
    unknown = [n for n in names if n not in fleet.names]
    if unknown or len(set(names)) != len(names) or not names:
        raise ValueError(f"the chain must name distinct devices of the fleet (got {names})")
    for lv in cfg.leaves:
        if lv.device not in names:
            raise ValueError(f"leave: {lv.device} is not one of the chain's devices")
    for mod in (m for _, m in model_layers):
        mod.eval()
    pipe = _Pipeline(StageRunner(model_layers), costs, fleet, list(names), cfg, seed)
    pipe.replan(0.0, "start")
    mb = cfg.micro_batch
    num_mb = -(-len(x) // mb)
    pipe.steps = [[] for _ in range(num_mb)]
    pipe.held = [[] for _ in range(num_mb)]
    by_sample = sorted((lv for lv in cfg.leaves if lv.at_sample is not None), key=_sample_key)
    by_time = sorted((lv for lv in cfg.leaves if lv.at_s is not None), key=_time_key)
    in_flight: set[int] = set()
    resumed: list[tuple[int, int, str]] = []

    def fire(lv: Leave, at_s: float) -> None:
        for b, k, holder, act in pipe.leave(lv.device, at_s):
            resumed.append((b, k, holder))
            plan_now = pipe.plans[-1]
            start = act if act is not None else x[b * mb : (b + 1) * mb]
            pipe.dispatch(b, route(plan_now.plan, plan_now.devices, k, holder), start, at_s)

    for b in range(num_mb):
        while True:  # leaves due before this micro-batch starts
            hops = route(pipe.plans[-1].plan, pipe.plans[-1].devices)
            t0 = pipe.first_start_s(hops, 0.0)
            if by_sample and _sample_key(by_sample[0]) < (b + 1) * mb:
                fire(by_sample.pop(0), t0)
            elif by_time and _time_key(by_time[0]) <= t0:
                lv = by_time.pop(0)
                fire(lv, _time_key(lv))
            else:
                break
        for old in [o for o in in_flight if pipe.steps[o][-1].end_s <= t0]:
            pipe.held[old] = []  # finished before this start: no later leave can reach it
            in_flight.discard(old)
        pipe.dispatch(b, hops, x[b * mb : (b + 1) * mb], 0.0)
        in_flight.add(b)
    for lv in by_time:  # after the last micro-batch started: may still catch some in flight
        fire(lv, _time_key(lv))
    for lv in by_sample:
        raise ValueError(f"leave of {lv.device} at sample {lv.at_sample}: only {len(x)} samples")
    steps = pipe.account()
    return SimResult(
        outputs=torch.cat([pipe.done[b] for b in range(num_mb)]),
        plans=pipe.plans,
        devices=pipe.stats,
        steps=steps,
        micro_batch_s=[(pipe.first_start[b], pipe.steps[b][-1].end_s) for b in range(num_mb)],
        resumed=resumed,
    )


def _sample_key(lv: Leave) -> int:
    assert lv.at_sample is not None
    return lv.at_sample


def _time_key(lv: Leave) -> float:
    assert lv.at_s is not None
    return lv.at_s
