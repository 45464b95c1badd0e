"""The fleet as arrays: each device's profile and link numbers, and its local work time.

Keeping one numpy array per quantity (not one object per device) lets a step of thousands of
simulated devices cost a few vectorized operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeddl.config.profiles import DEVICE_PROFILES, LINK_PROFILES
from edgeddl.config.schema import DeviceProfile, LinkProfile, Scenario

CRYPTO_SEAL_S = 4.6e-5
"""Sealing an empty envelope in its session's frame on the development machine (the `pc`
profile): the header, Ed25519 sign, the frame (fitted by `benchmarks/security_overhead.py`:
0.044-0.049 ms)."""
CRYPTO_OPEN_S = 1.0e-5
"""Opening an envelope's frame: a device opening the coordinator's answer (its session
authenticates it: no signature check; 0.010-0.011 ms)."""
CRYPTO_VERIFY_S = 1.1e-4
"""The coordinator checking a device's Ed25519 signature, as it must for its ledger's
receipt (0.106-0.113 ms on top of an open)."""
CRYPTO_BYTE_S = 2.2e-9
"""Per body byte, sealed once and opened once: ChaCha20-Poly1305 both ways (the session's
frame) and SHA-256 of the body on each side (fitted: 2.2 ms a MB)."""
CRYPTO_REFERENCE = "pc"


@dataclass(frozen=True, slots=True)
class Fleet:
    names: list[str]
    profile_names: list[str]
    link_names: list[str]
    flops_per_s: np.ndarray
    memory_bytes: np.ndarray
    step_overhead_s: np.ndarray
    op_overhead_s: np.ndarray
    io_bytes_per_s: np.ndarray
    up_bps: np.ndarray
    down_bps: np.ndarray
    latency_s: np.ndarray
    jitter_s: np.ndarray
    loss: np.ndarray
    coordinator: DeviceProfile
    coordinator_link: LinkProfile
    failure_detection_s: float
    step_sync_s: float

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> Fleet:
        profiles = {**DEVICE_PROFILES, **scenario.profiles}
        links = {**LINK_PROFILES, **scenario.links}
        names, pnames, lnames = [], [], []
        for group in scenario.fleet.devices:
            for name in group.device_names():
                names.append(name)
                pnames.append(group.profile)
                lnames.append(group.link)
        dev = [profiles[p] for p in pnames]
        lnk = [links[n] for n in lnames]

        def arr(values: list[float]) -> np.ndarray:
            return np.asarray(values, dtype=np.float64)

        coord = scenario.fleet.coordinator
        return cls(
            names=names,
            profile_names=pnames,
            link_names=lnames,
            flops_per_s=arr([d.flops_per_s for d in dev]),
            memory_bytes=arr([d.memory_bytes for d in dev]),
            step_overhead_s=arr([d.step_overhead_s for d in dev]),
            op_overhead_s=arr([d.op_overhead_s for d in dev]),
            io_bytes_per_s=arr([d.io_bytes_per_s for d in dev]),
            up_bps=arr([x.up_bps for x in lnk]),
            down_bps=arr([x.down_bps for x in lnk]),
            latency_s=arr([x.latency_s for x in lnk]),
            jitter_s=arr([x.jitter_s for x in lnk]),
            loss=arr([x.loss for x in lnk]),
            coordinator=profiles[coord.profile],
            coordinator_link=links[coord.link],
            failure_detection_s=scenario.fleet.failure_detection_s,
            step_sync_s=scenario.fleet.step_sync_s,
        )

    @property
    def num_devices(self) -> int:
        return len(self.names)

    def seconds_per_sample(self, flops_per_sample: float, sample_bytes: float) -> np.ndarray:
        """Marginal time of one more sample on each device: compute plus reading it."""
        return flops_per_sample / self.flops_per_s + sample_bytes / self.io_bytes_per_s

    def fixed_step_s(self, ops_per_step: int) -> np.ndarray:
        """Per-step cost that does not depend on the batch: loop overhead plus dispatching."""
        return self.step_overhead_s + ops_per_step * self.op_overhead_s

    def device_seconds(self, idx: np.ndarray, flops: np.ndarray, ops: int) -> np.ndarray:
        """Devices `idx` computing `flops` each, dispatching `ops` operators."""
        return flops / self.flops_per_s[idx] + ops * self.op_overhead_s[idx]

    def coordinator_seconds(self, flops: np.ndarray | float, ops: int = 0) -> np.ndarray:
        """The coordinator computing `flops`, dispatching `ops` operators."""
        c = self.coordinator
        return np.asarray(flops, dtype=np.float64) / c.flops_per_s + ops * c.op_overhead_s

    def crypto_seconds(self, idx: np.ndarray, num_bytes: np.ndarray) -> np.ndarray:
        """Devices `idx` in a step: each seals its update and opens what it receives,
        `num_bytes` in all. That is one seal and one open (the fixed cost once), and each
        byte either sealed or opened (half the per-byte cost of both), on the reference
        profile, scaled by each device's FLOP/s. A model, so that runs repeat;
        `benchmarks/security_overhead.py` times the real thing."""
        ref = DEVICE_PROFILES[CRYPTO_REFERENCE].flops_per_s
        seconds = (
            CRYPTO_SEAL_S
            + CRYPTO_OPEN_S
            + 0.5 * CRYPTO_BYTE_S * np.asarray(num_bytes, dtype=np.float64)
        )
        return seconds * ref / self.flops_per_s[idx]

    def coordinator_crypto_s(self, up_bytes: float, down_bytes: float) -> tuple[float, float]:
        """The coordinator's crypto per device and step, on its profile: (opening one
        update of `up_bytes`, signature checked, as it arrives; sealing one answer of
        `down_bytes`, Ed25519 signed, with the aggregation)."""
        scale = DEVICE_PROFILES[CRYPTO_REFERENCE].flops_per_s / self.coordinator.flops_per_s
        seal = CRYPTO_SEAL_S + 0.5 * CRYPTO_BYTE_S * down_bytes
        open_ = CRYPTO_OPEN_S + CRYPTO_VERIFY_S + 0.5 * CRYPTO_BYTE_S * up_bytes
        return open_ * scale, seal * scale

    def work_time_s(
        self,
        idx: np.ndarray,
        num_samples: np.ndarray,
        flops_per_sample: float,
        sample_bytes: float,
        ops_per_step: int,
        num_steps: np.ndarray | int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(data-loading seconds, compute seconds) of devices `idx` for their sample counts,
        taken in `num_steps` steps each (a federated client's local steps).

        The fixed per-step cost counts as compute, once per step; a device with no samples
        does nothing.
        """
        n = num_samples.astype(np.float64)
        busy = n > 0
        data = np.where(busy, n * sample_bytes / self.io_bytes_per_s[idx], 0.0)
        compute = np.where(
            busy,
            num_steps * self.fixed_step_s(ops_per_step)[idx]
            + n * flops_per_sample / self.flops_per_s[idx],
            0.0,
        )
        return data, compute

    def max_samples(self, fixed_bytes: float, bytes_per_sample: float) -> np.ndarray:
        """Largest batch each device can hold: memory minus the fixed state, over per-sample."""
        room = np.maximum(self.memory_bytes - fixed_bytes, 0.0)
        return np.floor(room / max(bytes_per_sample, 1e-9)).astype(np.int64)
