"""Network-aware density: how much each device sends this step, from the link it measures.

On a mixed fleet a device on a fast LAN has time to spare while an LTE device still waits
for its first packet, so one density for all wastes the fast links. The policy aims at a
step time in which communication takes a set share, gives each device its own slack for its
upload (once the aggregate every device downloads has its part), and turns bytes into a
density.
Details: docs/compression.md#the-density-policy
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from edgeddl.config.compression import AdaptConfig
from edgeddl.fleet.link import LinkEstimate

DEFAULT_BYTES_PER_VALUE = 6.0
"""Before a device's first payload: fp32 value plus a one- or two-byte delta-coded index."""
HEADER_BYTES = 8


class DensityPolicy:
    """Chooses each device's density per step from its link (`AdaptConfig`)."""

    def __init__(self, cfg: AdaptConfig, numel: int) -> None:
        self.cfg = cfg
        self.numel = numel

    def upload_bytes(self, link: LinkEstimate, work_s: float) -> np.ndarray:
        """Bytes each device of `link` may send, given the step's slowest local work."""
        floor = 2.0 * (link.latency_s + link.jitter_s)
        target = (work_s + float(floor.max())) / (1.0 - self.cfg.target_share)
        slack = np.maximum(target - work_s - floor, 0.0)
        # The coordinator sends the aggregate to every device in turn on its own uplink.
        shared_s = len(slack) * 8.0 / link.shared_down_bps
        down_cap = float((slack / (8.0 / link.down_goodput_bps + shared_s)).min()) / 2.0
        up_s = np.maximum(slack - 8.0 * down_cap / link.down_goodput_bps, 0.0)
        up = up_s * link.up_goodput_bps / 8.0
        total = float(up.sum())
        return up * (down_cap / total) if total > down_cap else up

    def densities(
        self, link: LinkEstimate, work_s: float, bytes_per_value: np.ndarray
    ) -> np.ndarray:
        """Densities for the devices of `link`."""
        up = self.upload_bytes(link, work_s)
        density = (up - HEADER_BYTES) / (bytes_per_value * self.numel)
        return np.clip(density, self.cfg.min_density, self.cfg.max_density)


class DensityControl(Protocol):
    """What the policy steers: each device's last bytes per value, and its density."""

    bytes_per_value: np.ndarray

    def set_density(self, devices: np.ndarray, density: np.ndarray) -> None: ...


class AdaptiveDensity:
    """Before each step, each device's density from what it knows of its path and its last
    payload's bytes per value."""

    def __init__(self, policy: DensityPolicy, target: DensityControl) -> None:
        self.policy, self.target = policy, target

    def before_step(self, devices: np.ndarray, link: LinkEstimate, work_s: float) -> None:
        bpv = self.target.bytes_per_value[devices]
        bpv = np.where(np.isnan(bpv), DEFAULT_BYTES_PER_VALUE, bpv)
        self.target.set_density(devices, self.policy.densities(link, work_s, bpv))
