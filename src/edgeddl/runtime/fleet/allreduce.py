"""One device's step on a real fleet: the simulator's strategy, over a collective.

A device of a real fleet runs the same strategy object as the simulator (`build_strategy`):
the same per-device gradient, error feedback, compressor, wire codec, aggregation and
optimizer. Only the exchange differs: here it is a sum over the members of the current
quorum (`Collective.allreduce_sum`, torchft's fault-tolerant all-reduce in `torchft_quorum.py`).

Per step, every member first sums a small table: one slot per member (its device index,
samples, measured speed, loss, payload bytes, work seconds) plus its BatchNorm batch
statistics times its samples. Then, by scheme:

* dense (no compression): the gradient times its samples rides in the same sum;
* single-round compressors: each member writes its encoded payload at its own offset of a
  byte buffer, zeros elsewhere, and the sum of those buffers is every payload end to end (an
  all-gather carried by the one fault-tolerant collective). Every member decodes every
  payload with the codec and aggregates exactly as the simulator's parameter server does;
* PowerSGD: its two rounds, each a sum of the members' weighted factors;
* federated (`exchange_update`): each sampled client's round update and BatchNorm
  statistics, times its weight, in the same sum; every member applies the mean with the
  server optimizer (`Federated.apply_round`, as the simulator does).

A member that is healing (torchft zeroes its contribution) or whose share is empty sends
nothing and still applies the step. `commit` runs only if torchft says every member's
exchange succeeded, so replicas stay identical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from edgeddl.compress.codec import CodecError
from edgeddl.strategy.compressed import CompressedDataParallel
from edgeddl.strategy.data_parallel import DataParallel
from edgeddl.strategy.federated import Federated
from edgeddl.strategy.per_device import (
    DeviceGradients,
    apply_batchnorm_stats,
    tracking_batchnorms,
)

SLOT = 6
"""Values per member in the step's table: device index + 1, samples, speed (smoothed),
loss sum, payload bytes, seconds its work took this step."""


class Collective(Protocol):
    def allreduce_sum(self, t: torch.Tensor) -> bool:
        """Sum `t` in place over the members; False if the exchange failed (do not use `t`)."""
        ...


@dataclass(frozen=True, slots=True)
class ClientUpdate:
    """A federated client's round: its update, its BatchNorm statistics (float buffers,
    flat), its weight in the mean and its mean local loss."""

    delta: torch.Tensor
    buffers: list[torch.Tensor]
    weight: float
    loss: float


class ExchangeError(ValueError):
    """A member's contribution cannot be read (the step is given up everywhere)."""


@dataclass(slots=True)
class StepOutcome:
    """What the members' table said, and what this device sent and received."""

    devices: list[int]
    """The device index of each member that contributed samples, in slot order."""
    counts: list[int]
    speeds: list[float]
    work_s: list[float]
    """Seconds each member's work (data and compute) took this step."""
    total: int
    loss: float
    payload_bytes: int = 0
    """This device's payloads in wire-codec bytes (all rounds)."""
    received_bytes: dict[int, int] = field(default_factory=dict)
    """Payload bytes taken from each other contributing device (single-round compressors;
    counted only by a device that contributed itself)."""
    sent_to: list[int] = field(default_factory=list)
    """The other contributing devices this device's payload reached."""
    wire_bytes: int = 0
    """Bytes the collective moved for this device (a ring all-reduce sends twice (m-1)/m of
    the buffer)."""


Apply = Callable[[], None]


class Pending:
    """Between the exchange and the engine's verdict: what `commit` applies, and what
    `abandon` undoes of a tentative update (the step was not committed)."""

    def __init__(
        self, outcome: StepOutcome, apply: list[Apply], undo: list[Apply] | None = None
    ) -> None:
        self.outcome = outcome
        self._apply = apply
        self._undo = undo or []

    def commit(self) -> None:
        for fn in self._apply:
            fn()

    def abandon(self) -> None:
        for fn in self._undo:
            fn()


def ring_bytes(buffer_bytes: int, members: int) -> int:
    """Bytes one member sends in a ring all-reduce of a buffer (reduce-scatter + all-gather)."""
    return round(2 * (members - 1) / members * buffer_bytes) if members > 1 else 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class AllReduceStep:
    """Runs the strategy's step for device `device` among the members of a quorum.

    `comm`: where the collective's buffers live (the CPU for gloo, the GPU for NCCL).
    """

    def __init__(
        self, strategy: DataParallel, device: int, comm: torch.device | str = "cpu"
    ) -> None:
        self.strategy = strategy
        self.device = device
        self.comm = torch.device(comm)
        bns = tracking_batchnorms(strategy.batchnorms)
        self._bn_sizes = [int(m.num_features) for m in bns]
        self._bn_len = 2 * sum(self._bn_sizes)

    def exchange(
        self,
        g: DeviceGradients | None,
        share: int,
        speed: float,
        slot: int | None,
        members: int,
        step: int,
        collective: Collective,
        work_s: float = 0.0,
    ) -> Pending | None:
        """Sum this device's contribution (`g` on `share` samples; None: it sends nothing)
        with the members'. None if the exchange failed or nobody had samples; raises
        `ExchangeError` if a member's contribution cannot be read."""
        s = self.strategy
        grad = g.grads[0] if g is not None and slot is not None else None
        inputs: torch.Tensor | None = None
        data = b""
        if grad is not None and isinstance(s, CompressedDataParallel):
            s.add_weight_decay([grad])
            inputs = s.compensate([self.device], [grad], step)[0]
            if s.phased is None:
                data = s.encode(self.device, inputs, step)
        table = torch.zeros(members * SLOT + self._bn_len, device=self.comm)
        if g is not None and slot is not None:
            loss = float(g.losses[0]) * share
            table[slot * SLOT : (slot + 1) * SLOT] = torch.tensor(
                [self.device + 1, share, speed, loss, len(data), work_s], device=self.comm
            )
            if self._bn_len:
                flat = [v.reshape(-1) for layer in g.bn_stats for v in layer[0]]
                table[members * SLOT :] = torch.cat(flat).to(self.comm) * share
        if not isinstance(s, CompressedDataParallel):
            return self._dense(table, grad, share, members, collective)
        if not collective.allreduce_sum(table):
            return None
        outcome = read_table(table, members)
        if outcome.total <= 0:
            return None
        outcome.wire_bytes = ring_bytes(_nbytes(table), members)
        apply = self._bn_update(table, members, outcome.total)
        if s.phased is not None:
            return self._phased(s, outcome, apply, grad, inputs, share, members, step, collective)
        return self._gathered(
            s, outcome, apply, table, grad, inputs, data, slot, members, step, collective
        )

    def _dense(
        self,
        table: torch.Tensor,
        grad: torch.Tensor | None,
        share: int,
        members: int,
        collective: Collective,
    ) -> Pending | None:
        """The gradient times its samples rides in the table's sum."""
        s = self.strategy
        own = grad * share if grad is not None else torch.zeros(s.numel)
        buf = torch.cat([table, own.to(self.comm, table.dtype)])
        if not collective.allreduce_sum(buf):
            return None
        head = buf[: table.numel()]
        outcome = read_table(head, members)
        if outcome.total <= 0:
            return None
        outcome.wire_bytes = ring_bytes(_nbytes(buf), members)
        outcome.payload_bytes = s.dense_up_bytes if grad is not None else 0
        agg = buf[table.numel() :] / outcome.total
        apply = self._bn_update(head, members, outcome.total)
        apply.append(lambda: s.apply(agg.to(s.params[0].device)))
        return Pending(outcome, apply)

    def _phased(
        self,
        s: CompressedDataParallel,
        outcome: StepOutcome,
        apply: list[Apply],
        grad: torch.Tensor | None,
        inputs: torch.Tensor | None,
        share: int,
        members: int,
        step: int,
        collective: Collective,
    ) -> Pending | None:
        """PowerSGD: each round's factors, weighted by samples, summed over the members."""
        assert s.phased is not None
        phased = s.phased
        x = inputs if inputs is not None else torch.zeros(s.numel, device=s.params[0].device)
        weight = torch.tensor([share / outcome.total if inputs is not None else 0.0])
        failed: list[bool] = []

        def reduce(v: torch.Tensor) -> torch.Tensor:
            buf = v.to(self.comm).contiguous()
            failed.append(not collective.allreduce_sum(buf))
            outcome.wire_bytes += ring_bytes(_nbytes(buf), members)
            return buf.to(v.device)

        result = phased.run([x], weight.to(x.device), step, reduce=reduce)
        if any(failed):
            return None
        if inputs is not None:
            codec = s.codecs[self.device]
            outcome.payload_bytes = sum(len(codec.encode(p[0])) for p in result.payloads)

        def finish() -> None:
            phased.commit(result)
            if grad is not None and inputs is not None:
                s.remember(self.device, grad, inputs, result.sent[0])
            s.apply(result.aggregate)

        return Pending(outcome, [*apply, finish])

    def _gathered(
        self,
        s: CompressedDataParallel,
        outcome: StepOutcome,
        apply: list[Apply],
        table: torch.Tensor,
        grad: torch.Tensor | None,
        inputs: torch.Tensor | None,
        data: bytes,
        slot: int | None,
        members: int,
        step: int,
        collective: Collective,
    ) -> Pending | None:
        """Single-round compressors: every member's encoded payload, end to end."""
        rows = table[: members * SLOT].view(members, SLOT).tolist()
        sizes = [int(r[4]) for r in rows]
        limit = 2 * s.dense_up_bytes + 64
        if any(n < 0 or n > limit for n in sizes):
            raise ExchangeError(
                f"step {step}: a member announced a payload of {max(sizes)} bytes (at most {limit})"
            )
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tolist()
        buf = torch.zeros(offsets[-1], dtype=torch.uint8, device=self.comm)
        if data and slot is not None:
            own = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            buf[offsets[slot] : offsets[slot + 1]] = own.to(self.comm)
        if not collective.allreduce_sum(buf):
            return None
        outcome.wire_bytes += ring_bytes(_nbytes(buf), members)
        raw = buf.cpu().numpy().tobytes()
        senders: list[int] = []
        weights: list[float] = []
        received = []
        for k, r in enumerate(rows):
            d, n = int(r[0]) - 1, round(r[1])
            if d < 0 or n <= 0:
                continue
            if d >= len(s.settings):
                raise ExchangeError(f"step {step}: a member claims to be device {d}")
            try:
                received.append(s.decode(d, raw[offsets[k] : offsets[k + 1]]))
            except CodecError as e:
                raise ExchangeError(f"step {step}: device {d}'s payload: {e}") from None
            senders.append(d)
            weights.append(n / outcome.total)
        if data:
            outcome.payload_bytes = len(data)
            outcome.sent_to = [d for d in senders if d != self.device]
            outcome.received_bytes = {
                d: sizes[k]
                for k, d in enumerate(int(r[0]) - 1 for r in rows)
                if d in senders and d != self.device
            }

        def finish() -> None:
            sent, agg = s.aggregate(senders, weights, received, step)
            assert agg is not None  # None only from a robust screen, which a real fleet refuses
            if grad is not None and inputs is not None:
                s.remember(self.device, grad, inputs, sent[senders.index(self.device)])
            s.apply(agg)

        return Pending(outcome, [*apply, finish])

    def exchange_update(
        self,
        update: ClientUpdate | None,
        slot: int | None,
        members: int,
        collective: Collective,
        work_s: float = 0.0,
    ) -> Pending | None:
        """Federated: sum this client's weighted update (None: it was not sampled, or is
        healing) with the members'. The table's samples slot carries the client's weight
        (its shard size, or 1); the mean update and BatchNorm statistics follow from the sum.
        A round nobody was sampled for commits as a round without an update."""
        s = self.strategy
        assert isinstance(s, Federated)
        floats = [b for b in s.buffers if b.is_floating_point()]
        size = s.numel + sum(b.numel() for b in floats)
        mine = None
        if update is not None:
            flat = torch.cat([update.delta, *update.buffers])
            mine = Contribution(flat, update.weight, update.loss, s.dense_up_bytes, work_s)
        summed = sum_weighted(mine, size, self.device, slot, members, collective, self.comm)
        if summed is None:
            return None
        outcome, mean_flat = summed
        if outcome.total <= 0:
            return Pending(outcome, [])
        flat = mean_flat.to(s.params[0].device)
        mean, rest = flat[: s.numel], flat[s.numel :]
        means = list(rest.split([b.numel() for b in floats]))
        means = [m.view_as(b) for m, b in zip(means, floats, strict=True)]
        return Pending(outcome, [lambda: s.apply_round(mean, means, outcome.devices)])

    def _bn_update(self, table: torch.Tensor, members: int, total: int) -> list[Apply]:
        """Running statistics from the members' sample-weighted batch statistics."""
        if not self._bn_len:
            return []
        flat = table[members * SLOT :] / total
        stats, at = [], 0
        for n in self._bn_sizes:
            stats.append([(flat[at : at + n], flat[at + n : at + 2 * n])])
            at += 2 * n
        model, layers = self.strategy.model, self.strategy.batchnorms
        target = self.strategy.params[0].device
        stats = [[(m.to(target), v.to(target)) for m, v in layer] for layer in stats]
        return [lambda: apply_batchnorm_stats(model, stats, [0], torch.ones(1), layers)]


@dataclass(frozen=True, slots=True)
class Contribution:
    """One member's part of a weighted sum: its values, its weight (samples, or a client's
    weight), mean loss, payload bytes and work seconds."""

    flat: torch.Tensor
    weight: float
    loss: float
    payload_bytes: int
    work_s: float
    speed: float = 0.0


def sum_weighted(
    mine: Contribution | None,
    size: int,
    device: int,
    slot: int | None,
    members: int,
    collective: Collective,
    comm: torch.device,
) -> tuple[StepOutcome, torch.Tensor] | None:
    """Sum `mine` (None, or no slot: this member sends nothing) times its weight with the
    members' in one collective: the step's table and the weighted mean of the `size` values
    (zeros if nobody contributed). None if the exchange failed."""
    own = torch.zeros(members * SLOT + size)
    if mine is not None and slot is not None:
        w = mine.weight
        own[slot * SLOT : (slot + 1) * SLOT] = torch.tensor(
            [device + 1, w, mine.speed, mine.loss * w, mine.payload_bytes, mine.work_s]
        )
        if size:
            own[members * SLOT :] = mine.flat.reshape(-1).to(own.dtype) * w
    buf = own.to(comm)
    if not collective.allreduce_sum(buf):
        return None
    outcome = read_table(buf, members)
    outcome.wire_bytes = ring_bytes(_nbytes(buf), members)
    outcome.payload_bytes = mine.payload_bytes if mine is not None and slot is not None else 0
    return outcome, buf[members * SLOT :] / max(outcome.total, 1)


def read_table(table: torch.Tensor, members: int) -> StepOutcome:
    """The members' rows of a summed table (rows without a device or samples left out)."""
    rows = table[: members * SLOT].view(members, SLOT).tolist()
    used = [r for r in rows if r[0] >= 1 and r[1] > 0]
    total = round(sum(r[1] for r in used))
    return StepOutcome(
        devices=[int(r[0]) - 1 for r in used],
        counts=[round(r[1]) for r in used],
        speeds=[float(r[2]) for r in used],
        work_s=[float(r[5]) for r in used],
        total=total,
        loss=sum(r[3] for r in used) / max(total, 1),
    )


def checksum(model: torch.nn.Module) -> float:
    """One number that differs if any parameter differs (to compare replicas)."""
    return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.parameters())))
