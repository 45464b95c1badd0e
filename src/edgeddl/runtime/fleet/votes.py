"""Steps a secured coordinator commits on the word of most of their senders.

Every device tells the coordinator when the engine committed a step, and with which table
(who contributed, with what). Each request comes over an authenticated session, so who tells
is proven, but not what it tells: one device, or one stolen key, could name a table of its
own choosing. So a step is committed once most of the step's senders (the devices whose
contributions the coordinator accepted for it) named the same table; a rogue cannot shrink
that count, as it cannot pick the table it is counted against. Used by the data-parallel
coordinator (`secure_coordinator.py`) and split learning's rear (`split_rear.py`).
Details: docs/real-fleet.md#the-sealed-fleet
"""

from __future__ import annotations

from collections.abc import Collection

Table = tuple[int, ...]
"""What a member says a step was committed with (each coordinator reads its own)."""


class StepVotes:
    """Who said which step was committed with which table, until the step is decided."""

    def __init__(self) -> None:
        self._voters: dict[tuple[int, Table], set[int]] = {}
        """(step, table) -> the senders that said the step was committed with it."""

    def add(
        self, step: int, table: Table, voter: int, senders: Collection[int]
    ) -> list[tuple[int, Table]]:
        """`voter` says `step` was committed with `table`; `senders` are the step's. Once
        most of them said so for this table: the (step, table) pairs to commit now, in that
        order, else []. A step committed that way proves the fleet committed the ones before
        it, so each earlier step still voted on comes first, with the table most of its
        voters named (a member died before it told, or its tell was lost). A voter that is
        not a sender is not counted."""
        if voter not in senders:
            return []
        voters = self._voters.setdefault((step, table), set())
        voters.add(voter)
        if 2 * len(voters) <= len(senders):
            return []  # most of the step's senders, not of a table the voter chose
        earlier = sorted({s for s, _ in self._voters if s < step})
        return [(s, self._most_named(s)) for s in earlier] + [(step, table)]

    def _most_named(self, step: int) -> Table:
        """The table most of `step`'s voters named (the first named, on a tie)."""
        named = [k for k in self._voters if k[0] == step]
        return max(named, key=lambda k: len(self._voters[k]))[1]

    def forget(self, step: int) -> None:
        """Step `step` is decided (committed, or given up): its votes and older ones go."""
        self._voters = {k: v for k, v in self._voters.items() if k[0] > step}
