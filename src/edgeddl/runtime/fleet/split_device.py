"""A real device's split-learning step: its front against the coordinator's rear, then the
fleet's commit-or-nothing sum.

The device runs the simulator's own conversation (`converse`) with requests going over its
`CoordinatorLink` instead of into a local rear. The engine's sum (`sum_weighted`) then
carries the step's table (who contributed, samples, loss, speed), and with SplitFed each
member's front (and head) after its own optimizer step, times its samples: the weighted
mean every member loads is the simulator's SplitFed average. That optimizer step is
tentative until the engine's verdict: a step that is not committed puts the front and its
optimizer back as they were. Once a step is committed every member tells the rear, which
steps once (whichever member told it first; with `[security]`, once most of the step's
senders told it the same table), so a lost lead cannot leave the rear behind.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from edgeddl.compress.bitpack import CodecError
from edgeddl.runtime.fleet.coordinator_link import CoordinatorLink, LinkError
from edgeddl.runtime.fleet.exchange import Collective, Contribution, Pending, sum_weighted
from edgeddl.security.handshake import Initiator, Session
from edgeddl.security.parties import DeviceParty
from edgeddl.strategy.base import ConversationDevice, Update


class Link(Protocol):
    """A device's link to the coordinator (`CoordinatorLink`)."""

    seconds: float
    session: Session | None
    """With `[security]`: the link's authenticated session."""

    def call(
        self,
        op: str,
        step: int,
        device: int,
        count: int,
        parts: list[bytes],
        loss: float = 0.0,
        members: int = 0,
    ) -> tuple[bytes, float]: ...


Connect = Callable[[Any, str, float, Initiator | None], Link]
"""Opens a link to the coordinator: (its store, device name, timeout, the device's side of
the session handshake, None without `[security]`)."""


def open_link(
    connect: Connect, store: Any, name: str, idx: int, timeout_s: float, seal: DeviceParty | None
) -> Link:
    """A new link; with `seal`, its session started with `hello` (LinkError if refused)."""
    link = connect(store, name, timeout_s, seal.initiator() if seal is not None else None)
    if seal is not None:
        if link.session is None:
            raise LinkError("the link to the coordinator has no session")
        try:
            seal.start(link.call("hello", 0, idx, 0, [])[0], link.session.run_id)
        except CodecError as e:
            raise LinkError(str(e)) from None
    return link


class SplitDevice:
    """Device `idx`'s side of split learning on a real fleet."""

    def __init__(
        self,
        strategy: ConversationDevice,
        idx: int,
        name: str,
        comm: torch.device,
        timeout_s: float,
        connect: Connect = CoordinatorLink,
        seal: DeviceParty | None = None,
    ) -> None:
        self.s, self.idx, self.name, self.comm = strategy, idx, name, comm
        self.timeout_s = timeout_s
        self.connect = connect
        self.seal = seal
        """`[security]`: every tensor each way sealed."""
        """Opens a link to the rear: (the coordinator's store, device name, timeout)."""
        self._link: Link | None = None
        self._store: Any = None
        self.size = (
            sum(t.numel() for t in strategy.device_tensors(idx)) if strategy.averages_fronts else 0
        )

    def link(self, store: Any) -> Link:
        """The link to the rear, opened again after a failure or a new coordinator store."""
        if self._link is None or self._store is not store:
            self._link = open_link(
                self.connect, store, self.name, self.idx, self.timeout_s, self.seal
            )
            self._store = store
        return self._link

    def drop_link(self) -> None:
        self._link = None

    def local_step(
        self, store: Any, x: torch.Tensor, y: torch.Tensor, step: int
    ) -> tuple[Update, float]:
        """The device's step through the cut, against the rear on the coordinator: its
        update (weight: samples; `payload_bytes`: the cut bytes it sent) and the seconds in
        requests. LinkError if the rear cannot be reached or refused a request."""
        s, k, n = self.s, self.idx, len(x)
        link = self.link(store)
        seconds = link.seconds

        def call(kind: str, payloads: list[bytes]) -> tuple[bytes, float]:
            if self.seal is None:
                return link.call(kind, step, k, n, payloads)
            sealed = [self.seal.seal(p, step) for p in payloads]
            reply, loss = link.call(kind, step, k, n, sealed)
            try:
                return self.seal.open(reply, step), loss
            except CodecError as e:
                raise LinkError(str(e)) from None

        try:
            loss, sent = s.converse(k, x, y, step, call)
        except LinkError:
            self.drop_link()
            raise
        update = Update(device=k, weight=float(n), loss=torch.tensor(loss), sent_bytes=sent)
        return update, link.seconds - seconds

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
        """The fleet's sum for this step with this device's `update` (None: it did not
        take part). None if the sum failed or carried no samples."""
        s, k = self.s, self.idx
        before: dict[str, Any] | None = None
        mine = None
        if update is not None and slot is not None:
            flat = torch.zeros(0)
            if s.averages_fronts:  # tentative: the mean is of the fronts after their own step
                before = copy.deepcopy(s.device_state(k))
                s.step_device(k)
                flat = torch.cat([t.reshape(-1).float() for t in s.device_tensors(k)])
            mine = Contribution(
                flat, update.weight, float(update.loss), update.sent_bytes, work_s, speed
            )

        def undo() -> None:
            if before is not None:
                s.load_device_state(k, before)

        summed = sum_weighted(mine, self.size, k, slot, members, collective, self.comm)
        if summed is None or summed[0].total <= 0:
            undo()
            return None
        outcome, mean, _ = summed
        outcome.wire_bytes += outcome.payload_bytes  # the cut tensors went up too

        def apply() -> None:
            if s.averages_fronts:
                s.load_average(k, mean)
            elif update is not None:
                s.step_device(k)
            table = np.array([*outcome.devices, *outcome.counts], dtype=np.int64).tobytes()
            self._tell(store, "commit", step, [table])

        return Pending(outcome, [apply], undo=[undo])

    def evaluate(self, store: Any, step: int, loss: float, members: int) -> None:
        """The lead's front (and head) to the coordinator, which tests the whole model."""
        state = self.s.front_bytes(self.idx)
        if self.seal is not None:
            try:
                self.link(store)  # a new link first: its hello starts the envelopes
            except LinkError as e:
                self.drop_link()
                print(f"edgeddl device {self.name}: {e}", file=sys.stderr)
                return
            state = self.seal.seal(state, step)
        self._tell(store, "evaluate", step, [state], loss, members)

    def _tell(
        self,
        store: Any,
        op: str,
        step: int,
        parts: list[bytes],
        loss: float = 0.0,
        members: int = 0,
    ) -> None:
        """A request after the step is committed: a failure is reported, not raised (the
        other members tell the rear too; the next step opens a new link)."""
        try:
            self.link(store).call(op, step, self.idx, 0, parts, loss, members)
        except LinkError as e:
            self.drop_link()
            print(f"edgeddl device {self.name}: {e}", file=sys.stderr)

    def checksum(self) -> float | None:
        """SplitFed: one number for the shared front (equal on every member); else None
        (each front is its device's own)."""
        if not self.s.averages_fronts:
            return None
        return float(
            sum(
                t.detach().double().sum() * (i + 1)
                for i, t in enumerate(self.s.device_tensors(self.idx))
                if t.is_floating_point()
            )
        )
