"""How the simulator carries a step: an `Exchange` says when each device's payload arrived
and whose work counts, given what the step's devices send and their local work.

`NetworkExchange` (the default, `run.exchange = "network"`) lays the step out on the
simulated links (`network.py`: star or ring; `chains.py` for a conversation such as split
learning). `SealedExchange` wraps any exchange with `[security]`: every payload sealed,
opened and recorded in the ledger, its envelope and crypto time charged. A new way to carry
steps is one class registered with `register_exchange`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from torch import nn

from edgeddl.fleet.fleet import Fleet
from edgeddl.fleet.link import LinkEstimate
from edgeddl.fleet.timeline import PipelineRequest, StepRequest, StepTimeline
from edgeddl.runtime.sim.network import SimNetwork
from edgeddl.security.session import SealedStep, SecureRun
from edgeddl.strategy.base import StepCost, StepPayloads, Strategy


@dataclass(frozen=True, slots=True)
class StepCarry:
    """One step handed to an exchange: what every device sends, and its local work."""

    start_s: float
    sent: StepPayloads
    data_s: np.ndarray
    """Each device's data-loading seconds."""
    compute_s: np.ndarray
    """Each device's compute seconds (a conversation's legs carry their own)."""
    down_bytes: np.ndarray
    """Bytes each device receives at the step's start."""
    needs_model: np.ndarray
    crash_at_s: np.ndarray
    agg_flops: float
    """The aggregator's FLOPs to take in one contribution."""
    update_flops: float
    """The aggregator's FLOPs once per step after the last arrival."""
    deadline_s: float = 0.0
    """Seconds from the step's start by which an upload must arrive (0: none)."""
    device_extra_s: np.ndarray | None = None
    """Seconds each device spends beside its compute (sealing and opening)."""
    open_s: float = 0.0
    """The coordinator's seconds to open one sealed update."""


class Exchange(Protocol):
    """How one step's payloads move, and what that cost each device."""

    def balance_inputs(self, cost: StepCost, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(seconds per sample, fixed seconds per step) of devices `idx`, for balancing."""
        ...

    def link_estimate(self, idx: np.ndarray) -> LinkEstimate:
        """What each device knows of its path (for network-aware compression)."""
        ...

    def carry(self, c: StepCarry) -> StepTimeline:
        """Carry one step: what it cost each device, and whose work arrived."""
        ...

    def committed(self, c: StepCarry, tl: StepTimeline, strategy: Strategy) -> None:
        """The strategy applied the step from the devices in `tl.contributed`."""
        ...


@dataclass(frozen=True, slots=True)
class WorkModel:
    """What the exchange needs of the run's model and data to turn work into seconds."""

    fleet: Fleet
    train_flops_per_sample: float
    ops_per_step: int
    sample_bytes: float


class NetworkExchange:
    """The simulated links: a step laid out on the virtual clock (`SimNetwork`)."""

    def __init__(self, network: SimNetwork, work: WorkModel) -> None:
        self.network, self.work = network, work

    def balance_inputs(self, cost: StepCost, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f, net = self.work.fleet, self.network
        flops = (
            self.work.train_flops_per_sample
            if cost.flops_per_sample is None
            else cost.flops_per_sample
        )
        ops = self.work.ops_per_step if cost.ops is None else cost.ops
        per_sample = f.seconds_per_sample(flops, self.work.sample_bytes)[idx]
        if not cost.per_sample_bytes:  # a payload per step: its transfer is fixed
            return per_sample, f.fixed_step_s(ops)[idx] + net.expected_link_s(
                idx, cost.up_bytes, cost.down_bytes
            )
        # A conversation: the cut's bytes grow with the samples; each round trip's latency
        no_bytes = net.expected_link_s(idx, 0.0, 0.0)
        per_sample = per_sample + (
            net.expected_link_s(idx, cost.up_bytes, cost.down_bytes) - no_bytes
        )
        fixed = f.fixed_step_s(ops)[idx] + cost.round_trips * no_bytes
        if cost.fixed_bytes:
            b = cost.fixed_bytes
            fixed = fixed + net.expected_link_s(idx, b, b) - no_bytes
        return per_sample, fixed

    def link_estimate(self, idx: np.ndarray) -> LinkEstimate:
        return self.network.link_estimate(idx)

    def carry(self, c: StepCarry) -> StepTimeline:
        sent = c.sent
        if sent.legs:
            return self.network.pipeline(self._chain(c))
        compute_s = c.compute_s if c.device_extra_s is None else c.compute_s + c.device_extra_s
        return self.network.step(
            StepRequest(
                start_s=c.start_s,
                devices=sent.devices,
                data_s=c.data_s,
                compute_s=compute_s,
                up_bytes=sent.up_bytes,
                down_bytes=c.down_bytes,
                crash_at_s=c.crash_at_s,
                needs_model=c.needs_model,
                agg_flops=c.agg_flops,
                open_s=c.open_s,
                mid_down_bytes=sent.mid_down_bytes,
                deadline_s=c.deadline_s,
            )
        )

    def _chain(self, c: StepCarry) -> PipelineRequest:
        """A conversation's legs in time: the averaged front down (SplitFed), the data, then
        the chain with the devices' and the coordinator's FLOPs in seconds."""
        f, idx = self.work.fleet, c.sent.devices
        legs: list[tuple[str, np.ndarray]] = [
            ("down", c.down_bytes.astype(np.float64)),
            ("data", c.data_s),
        ]
        first = True
        for leg in c.sent.legs:
            if leg.kind == "device":
                seconds = f.device_seconds(idx, leg.amount, leg.ops)
                if first:  # the step's fixed cost (and sealing's), once
                    seconds = seconds + f.step_overhead_s[idx]
                    if c.device_extra_s is not None:
                        seconds = seconds + c.device_extra_s
                    first = False
                legs.append(("device", seconds))
            elif leg.kind == "coordinator":
                legs.append(("coordinator", f.coordinator_seconds(leg.amount, leg.ops)))
            else:
                legs.append((leg.kind, leg.amount))
        return PipelineRequest(
            start_s=c.start_s,
            devices=idx,
            legs=legs,
            crash_at_s=c.crash_at_s,
            end_work_s=float(f.coordinator_seconds(c.update_flops)),
            end_work_each_s=float(f.coordinator_seconds(c.agg_flops)),
        )

    def committed(self, c: StepCarry, tl: StepTimeline, strategy: Strategy) -> None:
        return None


class SealedExchange:
    """`[security]` around any exchange: each device's payload sealed to the coordinator and
    opened there (a refused one is left out, like a lost one), the envelopes' bytes and the
    crypto's seconds charged, every update and aggregate recorded in the ledger."""

    def __init__(self, inner: Exchange, secure: SecureRun, fleet: Fleet, model: nn.Module) -> None:
        self.inner, self.secure, self.fleet, self.model = inner, secure, fleet, model
        self._sealed: SealedStep | None = None

    def balance_inputs(self, cost: StepCost, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.balance_inputs(cost, idx)

    def link_estimate(self, idx: np.ndarray) -> LinkEstimate:
        return self.inner.link_estimate(idx)

    def carry(self, c: StepCarry) -> StepTimeline:
        sent, f = c.sent, self.fleet
        bodies = sent.bodies()
        sealed = self.secure.seal_step(
            sent.step, c.start_s, sent.devices, bodies, sent.up_bytes, c.down_bytes
        )
        self._sealed = sealed
        open_s, seal_s, crypto_bytes = 0.0, 0.0, sealed.crypto_bytes
        if sent.legs:  # each message of a conversation in an envelope of its own
            legs = [g.amount for g in sent.legs if g.kind in ("up", "down")]
            crypto_bytes = sum(legs) + c.down_bytes
            sent.add_envelopes(sealed.up_bytes[0] - sent.up_bytes[0])
        else:  # the coordinator opens every update and seals each answer
            open_s, seal_s = f.coordinator_crypto_s(
                float(np.mean([len(b) for b in bodies])), float(np.mean(c.down_bytes))
            )
        sent.up_bytes = sealed.up_bytes
        tl = self.inner.carry(
            dataclasses.replace(
                c,
                down_bytes=sealed.down_bytes,
                device_extra_s=f.crypto_seconds(sent.devices, crypto_bytes),
                agg_flops=c.agg_flops + seal_s * f.coordinator.flops_per_s,
                open_s=open_s,
            )
        )
        tl.contributed = tl.contributed & sealed.accepted
        return tl

    def committed(self, c: StepCarry, tl: StepTimeline, strategy: Strategy) -> None:
        sealed, devices = self._sealed, c.sent.devices
        assert sealed is not None
        entry = {int(devices[i]): sealed.entries[i] for i in np.flatnonzero(tl.contributed)}
        out = strategy.screened_at(c.sent.step)
        screened = {entry[d]: why for d, why in out.items() if d in entry}
        kept = [e for d, e in entry.items() if d not in out]
        self.secure.aggregate(c.sent.step, tl.end_s, self.model, kept, screened)
        self.inner.committed(c, tl, strategy)


ExchangeFactory = Callable[[SimNetwork, WorkModel], Exchange]
EXCHANGES: dict[str, ExchangeFactory] = {"network": NetworkExchange}
"""`run.exchange` -> how the simulator carries steps."""


def register_exchange(name: str, factory: ExchangeFactory) -> None:
    """Make `run.exchange = name` carry steps with `factory(network, workload)`."""
    EXCHANGES[name] = factory
