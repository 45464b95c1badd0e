"""The simulator's Transport interface: how one step's payloads move, and what that cost
each device.

`sim` lays a whole step out on the virtual clock, for every device at once. A real fleet has
no such global view: each device process runs the same strategy over an `Engine`
(`transport/device.py`: who takes part, a sum, commit or not), measures its own wall time
and reports it with the same keys (compute, data loading, communication, idle).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgeddl.fleet.link import LinkEstimate
from edgeddl.fleet.timeline import StepRequest, StepTimeline


class Transport(Protocol):
    topology: str

    def expected_link_s(
        self, idx: np.ndarray, up_bytes: np.ndarray | float, down_bytes: np.ndarray | float
    ) -> np.ndarray:
        """Each device's own transfer time on the step's critical path, for balancing."""
        ...

    def link_estimate(self, idx: np.ndarray) -> LinkEstimate:
        """What each device knows of its path (for network-aware compression)."""
        ...

    def step(self, req: StepRequest) -> StepTimeline:
        """Carry one step's exchange; say what it cost each device and whose work arrived."""
        ...
