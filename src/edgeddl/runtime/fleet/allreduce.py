"""One device's step on a real fleet: the simulator's strategy, over a collective.

Only the exchange differs from the simulator: a sum over the current quorum's members
(torchft's fault-tolerant all-reduce). Per step the members sum a small table, then their
updates as the strategy combines them (`sum`; `payloads`, an all-gather carried by the one
sum; or `phases`). `commit` runs only if every member's exchange succeeded, so replicas stay
identical.
Details: docs/real-fleet.md#the-all-reduce-step
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from edgeddl.compress.codec import CodecError
from edgeddl.runtime.fleet.exchange import (
    Collective,
    Contribution,
    ExchangeError,
    Pending,
    StepOutcome,
    nbytes,
    ring_bytes,
    sum_weighted,
)
from edgeddl.strategy.base import Aggregate, FleetStrategy, Update


class AllReduceStep:
    """Runs the strategy's step for device `device` among the members of a quorum.

    `comm`: where the collective's buffers live (the CPU for gloo, the GPU for NCCL).
    """

    def __init__(
        self, strategy: FleetStrategy, device: int, comm: torch.device | str = "cpu"
    ) -> None:
        self.strategy = strategy
        self.device = device
        self.comm = torch.device(comm)

    def local_step(
        self, store: Any, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[Update, float]:
        """The device's own update on its batch (no requests)."""
        return self.strategy.local_update(self.device, x, y, step), 0.0

    def exchange(
        self,
        store: Any,
        update: Update | None,
        speed: float,
        slot: int | None,
        members: int,
        step: int,
        collective: Collective,
        work_s: float = 0.0,
    ) -> Pending | None:
        """Sum this device's `update` (None: it sends nothing: not sampled, healing, or no
        share) with the members'. None if the exchange failed or nobody had samples (a
        federated round nobody was sampled for commits without an update); raises
        `ExchangeError` if a member's contribution cannot be read."""
        s = self.strategy
        mine = update if slot is not None else None
        dense = s.combine == "sum"
        contribution = None
        if mine is not None:
            flat = mine.packed() if dense else mine.extras()
            size = s.dense_up_bytes if dense else len(mine.payload or b"")
            weight = mine.weight
            contribution = Contribution(flat, weight, float(mine.loss), size, work_s, speed)
        size = s.numel * dense + s.extras_size()
        summed = sum_weighted(contribution, size, self.device, slot, members, collective, self.comm)
        if summed is None:
            return None
        outcome, mean, rows = summed
        if outcome.total <= 0:
            return Pending(outcome, []) if s.sampled else None
        if dense:
            agg = Aggregate.of_packed(mean, s.numel)
            return Pending(outcome, [lambda: s.apply_aggregate(agg, outcome.devices)])
        if s.combine == "phases":
            return self._phases(outcome, mean, mine, members, step, collective)
        return self._gathered(outcome, mean, rows, mine, slot, members, step, collective)

    def _phases(
        self,
        outcome: StepOutcome,
        extras: torch.Tensor,
        mine: Update | None,
        members: int,
        step: int,
        collective: Collective,
    ) -> Pending | None:
        """A multi-phase scheme (PowerSGD): each phase's weighted factors summed over the
        members."""
        s = self.strategy
        failed: list[bool] = []

        def reduce(v: torch.Tensor) -> torch.Tensor:
            buf = v.to(self.comm).contiguous()
            failed.append(not collective.allreduce_sum(buf))
            outcome.wire_bytes += ring_bytes(nbytes(buf), members)
            return buf.to(v.device)

        weight = mine.weight / outcome.total if mine is not None else 0.0
        result, sent_bytes = s.run_phases(mine, weight, step, reduce)
        if any(failed):
            return None
        outcome.payload_bytes = sent_bytes

        def finish() -> None:
            s.commit_phases(result)
            if mine is not None:
                s.on_commit(mine, result.sent[0])
            agg = Aggregate(values=result.aggregate, extras=extras)
            s.apply_aggregate(agg, outcome.devices)

        return Pending(outcome, [finish])

    def _gathered(
        self,
        outcome: StepOutcome,
        extras: torch.Tensor,
        rows: list[list[float]],
        mine: Update | None,
        slot: int | None,
        members: int,
        step: int,
        collective: Collective,
    ) -> Pending | None:
        """Single-phase payloads: every member's encoded payload, end to end."""
        s = self.strategy
        data = mine.payload or b"" if mine is not None else b""
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
        outcome.wire_bytes += ring_bytes(nbytes(buf), members)
        raw = buf.cpu().numpy().tobytes()
        senders: list[int] = []
        weights: list[float] = []
        received = []
        for k, r in enumerate(rows):
            d, n = int(r[0]) - 1, round(r[1])
            if d < 0 or n <= 0:
                continue
            try:
                received.append(s.decode_body(d, raw[offsets[k] : offsets[k + 1]]))
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
            agg = s.aggregate(step, senders, weights, received)
            assert agg is not None  # None only from a robust screen, which a real fleet refuses
            if mine is not None and data:
                s.on_commit(mine, agg.sent[senders.index(self.device)])
            s.apply_aggregate(Aggregate(agg.values, extras, agg.sent), outcome.devices)

        return Pending(outcome, [finish])


def checksum(model: torch.nn.Module) -> float:
    """One number that differs if any parameter differs (to compare replicas)."""
    return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.parameters())))
