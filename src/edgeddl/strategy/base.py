"""The step protocol: what a device computes and sends, and what the aggregator does with it.

Every way of training is the same conversation, carried differently (docs/architecture.md):

    device:      batch -> prepare -> Update (values or payload bytes) --.
                                                                         | an exchange carries
    aggregator:  commit(arrived) -> aggregate -> apply  <----------------'  it (and says who
                                                                            arrived, at what cost)

A runtime is typed against `Strategy` only: it never imports a concrete strategy or reads its
attributes. What a step sends is a `StepPayloads`: one typed `Update` per device, the bytes on
the wire, and for split learning the chain of legs each device walks through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from edgeddl.compress.base import Payload, PhasedResult
from edgeddl.compress.codec import dense_body

LegKind = Literal["device", "coordinator", "up", "down"]
Combine = Literal["sum", "payloads", "phases"]


@dataclass(frozen=True, slots=True)
class Leg:
    """One piece of a device's step when the step is a conversation (split learning): FLOPs
    on the device or the coordinator (with the operators dispatched once per batch), or
    bytes up or down its path."""

    kind: LegKind
    amount: np.ndarray
    ops: int = 0


@dataclass(slots=True)
class Update:
    """One device's contribution to a step, as its device made it.

    `values` is what the device sends before any wire encoding (its gradient, momentum or
    federated delta, after its behaviour); `payload` its encoded bytes when it compresses;
    `stats` what travels dense beside it (a federated client's float buffers). A runtime
    reads only `device`, `weight`, `loss` and `body()`.
    """

    device: int
    weight: float
    """Its unnormalised weight in the mean: samples, or a federated client's weight."""
    loss: torch.Tensor
    """Its mean training loss (detached, 0-d)."""
    values: torch.Tensor | None = None
    stats: list[torch.Tensor] = field(default_factory=list)
    batch_stats: torch.Tensor | None = None
    """A data-parallel device's BatchNorm batch statistics (`per_device.DeviceGradients`).
    The simulator folds them in without charging their bytes (a few per channel); a real
    fleet's all-reduce carries them in its table."""
    payload: bytes | None = None
    """The encoded compressed payload (None: `values` travel dense)."""
    own: torch.Tensor | None = None
    """Error feedback: the device's own update before its memory was added."""
    compensated: torch.Tensor | None = None
    """Error feedback: what the device compressed (its update plus its memory)."""
    bodies: list[bytes] = field(default_factory=list)
    """A conversation's messages up, in order (split learning)."""
    sent_bytes: int = 0
    """A conversation on a real fleet: the encoded bytes the device sent in it."""

    def extras(self) -> torch.Tensor:
        """What travels dense beside the values: `stats`, then `batch_stats`."""
        parts = [t.reshape(-1) for t in self.stats]
        if self.batch_stats is not None:
            parts.append(self.batch_stats.reshape(-1))
        return torch.cat(parts) if parts else torch.zeros(0)

    def packed(self) -> torch.Tensor:
        """The values, then the extras: the one dense packing of an update (what a sum
        carries, and a dense body holds); `unpack` splits it again."""
        assert self.values is not None
        return torch.cat([self.values.reshape(-1), self.extras().to(self.values.dtype)])

    def body(self) -> bytes:
        """What crosses the wire for this update (and what `[security]` seals): the
        conversation's messages, or the payload with the extras dense beside it, or the
        packed update dense."""
        if self.bodies:
            return b"".join(self.bodies)
        if self.payload is not None:
            extras = self.extras()
            return self.payload + (dense_body(extras) if extras.numel() else b"")
        return dense_body(self.packed())


def unpack(flat: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, extras) of a packed update (or of a mean of packed updates)."""
    return flat[:numel], flat[numel:]


@dataclass(frozen=True, slots=True)
class Aggregate:
    """What the aggregator made of a step's updates: the values every replica applies,
    the mean of their extras, and per arrived update what its payload carried (for its
    device's error-feedback memory)."""

    values: torch.Tensor
    extras: torch.Tensor
    sent: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def of_packed(cls, flat: torch.Tensor, numel: int) -> Aggregate:
        """The aggregate a mean of packed updates (`Update.packed`) stands for."""
        values, extras = unpack(flat, numel)
        return cls(values=values, extras=extras)


@dataclass(slots=True)
class StepPayloads:
    """One step between `prepare` and `commit`: every device's update and its bytes."""

    devices: np.ndarray
    counts: list[int]
    step: int
    up_bytes: np.ndarray
    """Encoded bytes each device sends, phases x devices."""
    updates: list[Update] = field(default_factory=list)
    mid_down_bytes: tuple[int, ...] = ()
    """Bytes every device receives between phases (multi-phase schemes)."""
    legs: list[Leg] = field(default_factory=list)
    """A conversation's chain of work and transfers per device (empty: send, then apply)."""
    phased: PhasedResult | None = None
    """A multi-phase scheme's phases among all devices (PowerSGD)."""
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    """The step's batch, when the aggregate is computed from it in one fused pass."""

    def bodies(self) -> list[bytes]:
        """Each device's bytes on the wire, in order (what `[security]` seals)."""
        if not self.updates:
            raise ValueError(
                "the fused data-parallel pass has no per-device payload to seal; security "
                "uses the per-device strategy"
            )
        if self.phased is not None:
            raise ValueError("a multi-phase compressor's payloads are summed on the way")
        return [u.body() for u in self.updates]

    def add_envelopes(self, envelope: np.ndarray) -> None:
        """`[security]` on a conversation: every message each way is sealed on its own, so
        each up and down leg of device i grows by `envelope[i]` bytes."""
        self.legs = [
            Leg(leg.kind, leg.amount + envelope, leg.ops) if leg.kind in ("up", "down") else leg
            for leg in self.legs
        ]


@dataclass(frozen=True, slots=True)
class Plan:
    """Who trains in a step, on how many samples, in how many local steps (a federated
    round samples its clients; data-parallel steps are balanced by the runtime)."""

    devices: np.ndarray
    samples: np.ndarray
    local_steps: np.ndarray


@dataclass(frozen=True, slots=True)
class StepCost:
    """What a device's step costs, in FLOPs and bytes, for balancing (the runtime turns them
    into seconds with the fleet's profiles and links)."""

    up_bytes: np.ndarray
    """Bytes each device sends per step (per sample with `per_sample_bytes`)."""
    down_bytes: np.ndarray
    flops_per_sample: float | None = None
    """The device's own FLOPs per sample (None: the whole model's)."""
    ops: int | None = None
    """Operators dispatched per step on the device (None: the whole model's)."""
    per_sample_bytes: bool = False
    """The bytes grow with the samples (a cut's activations); False: per step."""
    round_trips: int = 1
    """Conversations: exchanges with the coordinator per step."""
    fixed_bytes: float = 0.0
    """Conversations: bytes each way per step beside the per-sample ones (SplitFed)."""


class StepCosts(Protocol):
    """What a step costs, in FLOPs and bytes (the runtime turns them into seconds)."""

    def step_cost(self, idx: np.ndarray) -> StepCost:
        """What a step costs devices `idx`, for balancing."""
        ...

    def down_bytes(self, needs_model: np.ndarray) -> np.ndarray:
        """Bytes each device receives at a step's start; `needs_model`: it missed a step."""
        ...

    def aggregation_flops(self) -> float:
        """FLOPs for the aggregator to take in one device's contribution."""
        ...

    def update_flops(self) -> float:
        """FLOPs the aggregator spends once per step after the last arrival."""
        ...


class Replicas(Protocol):
    """What a real fleet copies between replicas, and what only one device holds."""

    def replica_state(self) -> dict[str, Any]:
        """What a replica joining a real fleet copies from a peer."""
        ...

    def load_replica_state(self, state: dict[str, Any]) -> None: ...

    def device_state(self, device: int) -> dict[str, Any]:
        """What only device `device` holds beyond the replica state."""
        ...

    def load_device_state(self, device: int, state: dict[str, Any]) -> None: ...


class Strategy(StepCosts, Replicas, Protocol):
    """What every runtime asks of a strategy (see the module docstring).

    `prepare` is the devices' side of a step (each device's update from its rows of the
    batch), `commit` the aggregator's (aggregate the updates that arrived, apply, and let
    each device's memory keep what it did not send).
    """

    name: str
    model: nn.Module

    def plan(self, members: np.ndarray, step: int) -> Plan | None:
        """Who trains this step (a federated round's sample); None: every member, with the
        runtime's balanced shares."""
        ...

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], devices: np.ndarray, step: int
    ) -> StepPayloads:
        """Each device's work on its batch (consecutive `counts` rows): what it sends."""
        ...

    def commit(self, sent: StepPayloads, arrived: np.ndarray) -> torch.Tensor | None:
        """Aggregate and apply the updates that arrived; the step's detached loss (None if
        nothing arrived)."""
        ...

    def forget(self, device: int) -> None:
        """A device crashed: whatever it kept (error-feedback memory, its front) is gone."""
        ...

    def screened_at(self, step: int) -> dict[int, str]:
        """Device -> reason for the updates a robust screen refused at `step`."""
        ...

    def evaluation_models(self) -> list[nn.Module]:
        """The models the run is scored on (the metric is their mean)."""
        ...

    def report(self) -> dict[str, Any]:
        """The strategy's entries in summary.json (compression, robust, split)."""
        ...


class FleetStrategy(Strategy, Protocol):
    """What a real fleet's runtimes ask beyond `Strategy`: one device's side of a step,
    and the aggregator's (every replica's, or the coordinator's)."""

    combine: Combine
    """How the members' updates combine: `sum` (a weighted mean of `Update.packed()`),
    `payloads` (each decoded, then aggregated) or `phases` (a multi-phase scheme)."""
    sampled: bool
    """A step's devices are a sample (federated rounds): a step may have no update."""
    numel: int
    dense_up_bytes: int
    """One uncompressed update on the wire."""

    def local_update(self, device: int, x: torch.Tensor, y: torch.Tensor, step: int) -> Update:
        """Device `device`'s update on its batch, ready for the wire."""
        ...

    def extras_size(self) -> int:
        """Values an update's extras take (`Update.extras`)."""
        ...

    def decode_body(self, device: int, body: bytes) -> torch.Tensor | Payload:
        """An update's body as the aggregator reads it (`CodecError` if it cannot be)."""
        ...

    def aggregate(
        self, step: int, devices: list[int], weights: list[float], decoded: list[Any]
    ) -> Aggregate | None:
        """The step's aggregate of the arrived updates (None: nothing usable)."""
        ...

    def apply_aggregate(self, agg: Aggregate, devices: list[int]) -> None:
        """Every replica's step with the aggregate."""
        ...

    def on_commit(self, update: Update, sent: torch.Tensor | None) -> None:
        """The step committed: the device's memory keeps what it did not send."""
        ...

    def reconstruct(self, update: Update, step: int) -> torch.Tensor:
        """What `update`'s payload carries, as the aggregator reads it (payloads)."""
        ...

    def run_phases(
        self,
        update: Update | None,
        weight: float,
        step: int,
        reduce: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[PhasedResult, int]:
        """A multi-phase scheme's rounds for one member, summed by `reduce` (phases)."""
        ...

    def commit_phases(self, result: PhasedResult) -> None:
        """What carries over to the next step of a multi-phase scheme (phases)."""
        ...


Call = Callable[[str, list[bytes]], tuple[bytes, float]]
"""One request of a conversation and its answer: (kind, tensors) -> (reply, loss)."""


class ConversationDevice(Strategy, Protocol):
    """A device's side of a step that is a conversation with the coordinator (split
    learning: its front against the coordinator's rear), across a wire."""

    @property
    def averages_fronts(self) -> bool:
        """The devices' own parts are averaged after every step (SplitFed)."""
        ...

    def converse(
        self, device: int, x: torch.Tensor, y: torch.Tensor, step: int, call: Call
    ) -> tuple[float, int]:
        """The device's step, each request answered by `call`: (mean loss, bytes sent)."""
        ...

    def step_device(self, device: int) -> None:
        """The device's own optimizer step (once its step is committed)."""
        ...

    def device_tensors(self, device: int) -> list[torch.Tensor]:
        """The device's own part, tensor by tensor (what SplitFed averages)."""
        ...

    def load_average(self, device: int, mean: torch.Tensor) -> None:
        """SplitFed: the fleet's weighted mean of `device_tensors`, flat."""
        ...

    def front_bytes(self, device: int) -> bytes:
        """The device's own part as an evaluation request carries it."""
        ...


class ConversationRear(Strategy, Protocol):
    """The coordinator's side of a conversation: it answers each request, takes its own
    step once per committed step, and is checkpointed and tested on its own."""

    def answer(
        self, kind: str, device: int, step: int, count: int, payloads: list[bytes]
    ) -> tuple[bytes, float]:
        """The answer to one request (`CodecError` if refused)."""
        ...

    def check_step(self, step: int) -> None:
        """`CodecError` if step `step` was taken already (a stale request)."""
        ...

    def commit_rear(self, step: int, devices: list[int], counts: list[int]) -> bool:
        """The coordinator's step, once (False: taken already, or incomplete)."""
        ...

    def rear_state(self) -> dict[str, Any]:
        """The coordinator's part (`rear`) and its optimizer (`optimizer`)."""
        ...

    def load_rear_state(self, state: dict[str, Any]) -> None: ...

    def whole_model(self, front: bytes) -> nn.Module:
        """The whole model from a device's `front_bytes` and the coordinator's part."""
        ...

    def request_limits(self, global_batch: int) -> tuple[int, int]:
        """(most bytes a request of a step can take, most a `front_bytes` can take)."""
        ...

    def dense_request_bytes(self, kind: str, count: int, num_parts: int) -> int:
        """What a request's tensors take uncompressed (for the compression ratio)."""
        ...

    def rear_summary(self, received: int, received_dense: int) -> dict[str, object]:
        """summary.json's entry for the conversation, with the coordinator's byte counts."""
        ...
