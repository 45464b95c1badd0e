"""The virtual clock and the fleet's membership schedule (leave, join, crash at virtual times).

The clock is discrete-event: it only moves forward, to the times at which things happen. The
schedule is an event queue ordered by time; the training loop asks it who is in the fleet at
the start of a step and which devices crash while the step is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeddl.config.schema import Scenario


class VirtualClock:
    """Monotone virtual time in seconds."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def advance_to(self, t_s: float) -> None:
        if t_s < self.now_s - 1e-12:
            raise ValueError(f"virtual time cannot go back: {t_s} < {self.now_s}")
        self.now_s = max(self.now_s, t_s)


@dataclass(frozen=True, slots=True, order=True)
class FleetEvent:
    at_s: float
    seq: int  # ties keep the scenario's order
    device: int
    action: str


class FleetSchedule:
    """Who is in the fleet when: the scenario's events as a time-ordered queue.

    Membership changes (leave, join) take effect at the next step boundary; a crash also
    removes the device's in-flight work: `next_crash_s` holds each device's next crash time.
    """

    def __init__(self, scenario: Scenario) -> None:
        names = scenario.fleet.device_names()
        index = {n: i for i, n in enumerate(names)}
        groups = {g.name: g.device_names() for g in scenario.fleet.devices}
        self.present = [True] * len(names)
        events: list[FleetEvent] = []
        for e in sorted(scenario.events, key=lambda e: e.at_s):
            for name in Scenario.event_devices(e, groups):
                events.append(FleetEvent(e.at_s, len(events), index[name], e.action))
        self._events = sorted(events)  # all known up front: a sorted list and a cursor
        self._next = 0
        for ev in reversed(self._events):  # a device whose first event is a join starts absent
            self.present[ev.device] = ev.action != "join"
        self.num_crashes = 0
        # Each device's crash times still to come, and the next of them as one array the
        # loop can index every step without scanning the events.
        self._crashes: dict[int, list[float]] = {}
        for ev in reversed(self._events):
            if ev.action == "crash":
                self._crashes.setdefault(ev.device, []).append(ev.at_s)  # latest first
        self.next_crash_s = np.full(len(names), np.inf)
        for device, times in self._crashes.items():
            self.next_crash_s[device] = times[-1]

    def advance_to(self, t_s: float) -> list[FleetEvent]:
        """Apply every event due at or before `t_s`; return them in time order."""
        applied = []
        while self._next < len(self._events) and self._events[self._next].at_s <= t_s:
            ev = self._events[self._next]
            self._next += 1
            self.present[ev.device] = ev.action == "join"
            if ev.action == "crash":
                self.num_crashes += 1
                times = self._crashes[ev.device]
                times.pop()
                self.next_crash_s[ev.device] = times[-1] if times else np.inf
            applied.append(ev)
        return applied

    def members(self) -> list[int]:
        return [i for i, p in enumerate(self.present) if p]

    def next_event_s(self) -> float | None:
        return self._events[self._next].at_s if self._next < len(self._events) else None
