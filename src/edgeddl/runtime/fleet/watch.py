"""What the coordinator reads of its devices at each poll, without ever blocking.

Who is in (each of the scenario's devices once, however often it connected), who stopped on
an error, who still makes progress, who has reported its end, and the evaluation rows they
leave. A key a device announced but has not written yet (or never will: it died, or another
client inflated a counter) is read at a later poll, never waited for.
"""

from __future__ import annotations

import json
from typing import Any

from edgeddl.runtime.fleet.store import (
    KEY_FAILED,
    KEY_ROWS,
    devices_in,
    final_key,
    progress_key,
    row_key,
)

MAX_PENDING_ROWS = 1024
"""Rows announced but not yet written that the coordinator keeps looking for (far more than a
fleet announces between two polls; past it a counter was inflated: the oldest are dropped)."""


class DeviceWatch:
    """The scenario's devices as the coordinator sees them, on its own clock (`now`)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.alive: set[str] = set()
        """Joined and not stopped on an error since."""
        self.finished: set[str] = set()
        """Reported their end (their final report is in the store)."""
        self.num_failures = 0
        """Stops on an error reported so far (any device, listed or not)."""
        self._seen: dict[str, tuple[bytes | None, float]] = {}
        """Device -> (its last progress, when it joined or last made progress)."""

    def poll(self, store: Any, now: float) -> str | None:
        """Read every device's keys; the message of an error reported since the last poll."""
        self.finished |= {n for n in self.names if store.check([final_key(n)])}
        alive = set(devices_in(store, self.names))
        for n in alive:
            key = progress_key(n)
            progress = store.get(key) if store.check([key]) else None
            if n not in self.alive or self._seen[n][0] != progress:
                self._seen[n] = (progress, now)
        self.alive = alive
        failures = store.add(KEY_FAILED, 0)
        if failures <= self.num_failures or not store.check([KEY_FAILED + "/last"]):
            return None  # the message comes at a later poll
        self.num_failures = failures
        return str(store.get(KEY_FAILED + "/last").decode(errors="replace"))

    def awaited(self, now: float, recent_s: float) -> list[str]:
        """The devices the end of the run waits for: alive, not yet finished, and seen to
        join or make progress within the last `recent_s` (one killed without a word is not
        waited for)."""
        return sorted(n for n in self.alive - self.finished if now - self._seen[n][1] <= recent_s)


class RowReader:
    """The devices' evaluation rows: `KEY_ROWS` counts those announced, `row_key(i)` holds
    row i once written. Wall times go on from an earlier coordinator's rows (a restart)."""

    def __init__(self, started_at: float, earlier: list[dict[str, Any]]) -> None:
        self.started_at = started_at
        """This coordinator's start (seconds since the epoch, as rows' `at`)."""
        self.offset_s = max((float(r.get("wall_time_s", 0.0)) for r in earlier), default=0.0)
        """The earlier coordinator's last wall time: this one's rows go on from it."""
        self.announced = 0
        self.pending: list[int] = []
        """Rows announced, not yet written."""

    def poll(self, store: Any) -> list[dict[str, Any]]:
        """The rows written since the last poll (each once; what is not a row is skipped)."""
        announced = int(store.add(KEY_ROWS, 0))
        if announced > self.announced:
            first = max(self.announced + 1, announced - MAX_PENDING_ROWS + 1)
            self.pending = [*self.pending, *range(first, announced + 1)][-MAX_PENDING_ROWS:]
            self.announced = announced
        written = {i for i in self.pending if store.check([row_key(i)])}
        self.pending = [i for i in self.pending if i not in written]
        rows = [_row(store.get(row_key(i))) for i in sorted(written)]
        return [self.wall_row(r) for r in rows if r is not None]

    def wall_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """A device's row, its time stamp made seconds since the run began: since this
        coordinator began, after the earlier one's last row (the lead device that evaluates
        can change; the coordinator's clock does not). A row evaluated before this
        coordinator began (handed in after a restart) takes the earlier one's last time."""
        at = row.pop("at", None)
        if isinstance(at, int | float):
            row["wall_time_s"] = self.offset_s + max(0.0, float(at) - self.started_at)
        return row


def _row(data: bytes) -> dict[str, Any] | None:
    """A device's row as JSON, or None if it is not one (no client can stop the run folder
    being written with a bad row)."""
    try:
        row = json.loads(data)
    except ValueError:
        return None
    ok = isinstance(row, dict) and type(row.get("step")) is int
    return row if ok else None
