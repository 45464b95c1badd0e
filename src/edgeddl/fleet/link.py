"""Time for a payload of real bytes to cross a link: latency, bandwidth, jitter, loss.

One transfer costs the latency, exponential jitter and the bytes over the bandwidth; each
lost packet costs a round trip, and long transfers are bounded by the Mathis TCP throughput.
With no jitter and no loss it is exactly ``L + 8 B / bw``. Left out: slow start, queueing
inside the network, and correlated (bursty) loss.
Details (the formula): docs/architecture.md#the-link-model
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MSS_BYTES = 1448
"""TCP payload of one packet on a 1500-byte MTU path with timestamps."""
MATHIS_C = 1.22


def transfer_time_s(
    num_bytes: np.ndarray | float,
    bandwidth_bps: np.ndarray | float,
    latency_s: np.ndarray | float,
    jitter_s: np.ndarray | float = 0.0,
    loss: np.ndarray | float = 0.0,
    rng: np.random.Generator | None = None,
    size: tuple[int, ...] = (),
) -> np.ndarray:
    """Seconds for each transfer; all arguments broadcast together (one entry per device),
    and to `size` when given (e.g. phases x hops)."""
    b = np.asarray(num_bytes, dtype=np.float64)
    bw = np.asarray(bandwidth_bps, dtype=np.float64)
    lat = np.asarray(latency_s, dtype=np.float64)
    jit = np.asarray(jitter_s, dtype=np.float64)
    p = np.asarray(loss, dtype=np.float64)
    shape = np.broadcast_shapes(b.shape, bw.shape, lat.shape, jit.shape, p.shape, size)
    serial = 8.0 * b / bw
    t = np.broadcast_to(lat + serial, shape).astype(np.float64)
    if rng is None or (not np.any(jit > 0) and not np.any(p > 0)):
        return t
    if np.any(jit > 0):
        t = t + rng.exponential(1.0, size=shape) * jit
    if np.any(p > 0):
        rtt = 2.0 * lat
        packets = np.broadcast_to(np.ceil(b / MSS_BYTES), shape).astype(np.int64)
        lost = rng.binomial(packets, np.broadcast_to(p, shape))
        mathis_bps = goodput_bps(np.inf, lat, p)
        t = t - serial + np.maximum(serial + lost * rtt, 8.0 * b / mathis_bps)
    return t


def fifo_finish_s(ready_s: np.ndarray, service_s: np.ndarray) -> np.ndarray:
    """Finish times of jobs served one at a time in the given order, FIFO.

    Job k finishes at ``max(ready_k, finish_{k-1} + service_k)``: the later of its own path and
    the shared server (e.g. the coordinator's link) having carried everything before it.
    Vectorized as a running maximum, so thousands of devices cost one numpy pass.
    """
    cum = np.cumsum(service_s)
    return np.maximum.accumulate(ready_s - cum) + cum


def goodput_bps(
    bandwidth_bps: np.ndarray | float, latency_s: np.ndarray | float, loss: np.ndarray | float
) -> np.ndarray:
    """Steady throughput of a long transfer: the bandwidth, or less under loss (Mathis)."""
    rtt = 2.0 * np.asarray(latency_s, dtype=np.float64)
    p = np.asarray(loss, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mathis = np.where(
            (p > 0) & (rtt > 0), MATHIS_C * MSS_BYTES * 8.0 / (rtt * np.sqrt(p)), np.inf
        )
    return np.minimum(np.asarray(bandwidth_bps, dtype=np.float64), mathis)


@dataclass(slots=True)
class LinkEstimate:
    """What devices know of their paths to the others (measured, or probed)."""

    up_goodput_bps: np.ndarray
    down_goodput_bps: np.ndarray
    latency_s: np.ndarray
    """One-way latency of each path."""
    jitter_s: np.ndarray
    """Mean extra one-way delay of each path."""
    shared_down_bps: float = float("inf")
    """A link every device's download crosses in turn (the star coordinator's uplink)."""
