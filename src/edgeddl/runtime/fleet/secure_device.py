"""A device of a secured real fleet: its payload sealed to the coordinator, the aggregate back.

The device seals what it computes on any fleet, with the ledger head it last saw, and sends
it over its link; a refused payload is not retried. It uses the coordinator's sealed
aggregate only once it opens for this step with a body of the right size (the pair's AEAD
key authenticates the coordinator), and the quorum's verdict applies it everywhere or nowhere.
Details: docs/real-fleet.md#the-sealed-fleet
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import torch

from edgeddl.compress.bitpack import CodecError
from edgeddl.compress.codec import dense_values
from edgeddl.config.schema import Scenario
from edgeddl.runtime.fleet.coordinator_link import CoordinatorLink, LinkError
from edgeddl.runtime.fleet.exchange import (
    Collective,
    Contribution,
    ExchangeError,
    Pending,
    sum_weighted,
)
from edgeddl.runtime.fleet.secure_coordinator import NOTHING_USABLE
from edgeddl.runtime.fleet.split_device import Connect, Link, open_link
from edgeddl.security.parties import DeviceParty
from edgeddl.strategy.base import Aggregate, FleetStrategy, Update


class SecureDevice:
    """Device `idx`'s side of a secured real fleet."""

    def __init__(
        self,
        scenario: Scenario,
        strategy: FleetStrategy,
        idx: int,
        name: str,
        comm: torch.device,
        timeout_s: float,
        connect: Connect = CoordinatorLink,
        keys_dir: str = "",
    ) -> None:
        self.seal = DeviceParty(scenario, idx, name, keys_dir)
        self.s, self.idx, self.name, self.comm = strategy, idx, name, comm
        self.timeout_s, self.connect = timeout_s, connect
        self._link: Link | None = None
        self._store: Any = None
        self.refused = 0

    def link(self, store: Any) -> Link:
        """The link to the coordinator; a new one starts with "hello"."""
        if self._link is None or self._store is not store:
            self._link = open_link(
                self.connect, store, self.name, self.idx, self.timeout_s, self.seal
            )
            self._store = store
        return self._link

    def local_step(
        self, store: Any, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[Update, float]:
        """The device's own update (it goes sealed to the coordinator in `exchange`)."""
        return self.s.local_update(self.idx, x, y, step), 0.0

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
        """This step over the coordinator: `update` (None: nothing to send) sealed up, the
        table summed, the aggregate fetched and checked. None if the sum failed or nobody's
        payload was accepted; ExchangeError if the aggregate cannot be had."""
        s, k = self.s, self.idx
        mine = None
        if update is not None and slot is not None:
            sent = self._send(store, update.body(), round(update.weight), step)
            if sent:
                mine = Contribution(
                    torch.zeros(0), update.weight, float(update.loss), sent, work_s, speed
                )
        summed = sum_weighted(mine, 0, k, slot, members, collective, self.comm)
        if summed is None or summed[0].total <= 0:
            return None
        outcome = summed[0]
        outcome.wire_bytes += outcome.payload_bytes
        table = np.array(outcome.devices, dtype=np.int64).tobytes()  # the weights: each its own
        agg = self._aggregate(store, step, table)
        apply = []
        if mine is not None and update is not None:  # its memory keeps what it did not send
            carried = s.reconstruct(update, step) if s.combine == "payloads" else None
            apply.append(lambda: s.on_commit(update, carried))
        if agg is not None:  # None: a robust screen left nothing usable, the model stays
            apply.append(lambda: s.apply_aggregate(agg, outcome.devices))
        apply.append(lambda: self._tell(store, step, table))
        return Pending(outcome, apply)

    def _send(self, store: Any, body: bytes, share: int, step: int) -> int:
        """Seal and send; the bytes sent if the coordinator accepted it, else 0."""
        try:
            link = self.link(store)
            wire = self.seal.seal(body, step)
            reply, _ = link.call("update", step, self.idx, share, [wire])
        except LinkError as e:  # refused, or the link failed: this step goes on without it
            self.refused += 1
            self._link = None
            print(f"edgeddl device {self.name}: {e}", file=sys.stderr)
            return 0
        self.seal.saw(json.loads(reply))
        return len(wire)

    def _aggregate(self, store: Any, step: int, table: bytes) -> Aggregate | None:
        """The coordinator's aggregate of the step's senders, checked (None: a robust
        screen left nothing usable)."""
        try:
            wire, _ = self.link(store).call("aggregate", step, self.idx, 0, [table])
        except LinkError as e:
            self._link = None
            raise ExchangeError(f"step {step}: no aggregate ({e})") from None
        s = self.s
        extras = s.extras_size() if s.combine == "sum" else 0
        try:
            body = self.seal.open(wire, step)
            if body == NOTHING_USABLE:
                return None
            values = dense_values(body, s.numel + extras)
        except CodecError as e:
            raise ExchangeError(f"step {step}: the coordinator's aggregate: {e}") from None
        return Aggregate.of_packed(values, s.numel)

    def coordinator_state(self, store: Any, step: int) -> bytes | None:
        """The coordinator's replica at `step` (negative: wherever it is), packed, for
        torchft to heal this device with (`heal.CoordinatorTransport`); None while the
        coordinator is not there yet."""
        try:
            data, _ = self.link(store).call("state", step, self.idx, 0, [])
        except LinkError:
            self._link = None
            raise
        return data or None

    def _tell(self, store: Any, step: int, table: bytes) -> None:
        """The step is committed: the coordinator applies and records it (a failure is
        reported; the other members tell it too)."""
        try:
            self.link(store).call("commit", step, self.idx, 0, [table])
        except LinkError as e:
            self._link = None
            print(f"edgeddl device {self.name}: {e}", file=sys.stderr)
