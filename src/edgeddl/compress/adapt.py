"""Network-aware density: how much each device sends this round, from the link it measures.

Communication should take at most a share ``s`` of a step. A synchronous step lasts about
``W + C``: the slowest device's local work ``W``, then communication ``C``. Asking for
``C <= s (W + C)`` gives each device the budget ``C_i <= s / (1 - s) * W``. From it, the time
to receive the last aggregate is taken off, and what remains buys bytes on the device's
uplink at its measured goodput after one latency:

    bytes_i = (budget_i - down_i - latency_i) * goodput_i / 8
    density_i = (bytes_i - header) / (bytes_per_value_i * numel)

clamped to ``[min_density, max_density]``. ``bytes_per_value_i`` is measured from the
device's last payload (value plus encoded index), so it follows the codec. A device on a good
LAN ends up sending much more than one on LTE, and no device holds up the step for long.
"""

from __future__ import annotations

import numpy as np

from edgeddl.config.schema import AdaptConfig
from edgeddl.fleet.link import LinkEstimate

DEFAULT_BYTES_PER_VALUE = 6.0
"""Before a device's first payload: fp32 value plus a one- or two-byte delta-coded index."""
HEADER_BYTES = 8


class DensityPolicy:
    """Chooses each device's density per round from its link (`AdaptConfig`)."""

    def __init__(self, cfg: AdaptConfig, numel: int) -> None:
        self.cfg = cfg
        self.numel = numel

    def densities(
        self,
        link: LinkEstimate,
        work_s: float,
        down_bytes: np.ndarray,
        bytes_per_value: np.ndarray,
    ) -> np.ndarray:
        """Densities for the devices of `link`, given the step's slowest local work."""
        s = self.cfg.target_share
        budget = s / (1 - s) * work_s
        down_s = link.latency_s + 8.0 * down_bytes / link.down_goodput_bps
        up_bytes = (budget - down_s - link.latency_s) * link.up_goodput_bps / 8.0
        density = (up_bytes - HEADER_BYTES) / (bytes_per_value * self.numel)
        return np.clip(density, self.cfg.min_density, self.cfg.max_density)
