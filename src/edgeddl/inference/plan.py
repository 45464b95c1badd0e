"""Where to split a model across a chain of devices for inference (dynamic programming).

Each device used takes one contiguous run of layers (raw data stays on the first, where it
was measured), its part must fit its memory, and the activations at each cut cross both
devices' links. One exact DP minimises one sample's latency or the pipeline's slowest
stage; `brute_force_plan` is the reference the tests hold it to.
Details: docs/inference.md#the-planners-model
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Objective = Literal["latency", "throughput"]


@dataclass(frozen=True, slots=True)
class LayerCosts:
    """Per layer, in order: forward FLOPs and operators per sample, weight bytes, and the
    activation bytes per sample at its output; `input_bytes`: one sample's input."""

    flops: np.ndarray
    ops: np.ndarray
    param_bytes: np.ndarray
    out_bytes: np.ndarray
    input_bytes: float
    names: tuple[str, ...] = ()
    out_shapes: tuple[tuple[int, ...], ...] = ()
    """One sample's output shape per layer (what an activation codec sizes its payload by)."""
    input_shape: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.flops)


@dataclass(frozen=True, slots=True)
class ChainDevices:
    """The chain's devices, in order (the first holds the input)."""

    names: tuple[str, ...]
    flops_per_s: np.ndarray
    op_overhead_s: np.ndarray
    memory_bytes: np.ndarray
    up_bps: np.ndarray
    down_bps: np.ndarray
    latency_s: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True, slots=True)
class Plan:
    """Which layers each device runs (`segments[d] = (start, end)`, empty if start == end)."""

    segments: tuple[tuple[int, int], ...]
    compute_s: tuple[float, ...]
    """Each device's compute per sample."""
    transfer_s: tuple[float, ...]
    """Each used device's outgoing transfer per sample (0 for the last one used)."""
    out_bytes: tuple[float, ...]
    latency_s: float
    bottleneck_s: float

    @property
    def throughput(self) -> float:
        return 1.0 / self.bottleneck_s if self.bottleneck_s > 0 else math.inf


def transfer_s(dev: ChainDevices, a: int, b: int, num_bytes: float) -> float:
    """Seconds for `num_bytes` from device a to device b (their access links in series)."""
    rate = min(dev.up_bps[a], dev.down_bps[b])
    return float(dev.latency_s[a] + dev.latency_s[b] + 8.0 * num_bytes / rate)


def _segment(
    layers: LayerCosts, dev: ChainDevices, d: int, start: int, end: int, batch: int
) -> tuple[float, bool]:
    """Device d running layers [start, end): compute seconds per sample, and whether it fits."""
    if start == end:
        return 0.0, True
    flops = float(layers.flops[start:end].sum())
    ops = float(layers.ops[start:end].sum())
    compute = flops / dev.flops_per_s[d] + ops * dev.op_overhead_s[d] / batch
    peak_act = float(layers.out_bytes[start:end].max())
    memory = float(layers.param_bytes[start:end].sum()) + 2 * peak_act * batch
    return compute, memory <= dev.memory_bytes[d]


def _hop_s(dev: ChainDevices, a: int, b: int, num_bytes: float, batch: int) -> float:
    """Per sample: a batch's activations sent from a to b as one transfer, over the batch."""
    return transfer_s(dev, a, b, num_bytes * batch) / batch


def evaluate_cuts(
    layers: LayerCosts, dev: ChainDevices, cuts: list[int], batch: int = 1
) -> Plan | None:
    """The plan in which device d runs layers [cuts[d], cuts[d + 1]) (`cuts` has one entry
    more than the chain, from 0 to the number of layers); None if a part does not fit."""
    segments = tuple(itertools.pairwise(cuts))
    compute, out, transfer = [], [], []
    used = [d for d, (s, e) in enumerate(segments) if e > s]
    for d, (s, e) in enumerate(segments):
        c, fits = _segment(layers, dev, d, s, e, batch)
        if not fits:
            return None
        compute.append(c)
    latency, stages = sum(compute), list(compute)
    # The input starts on device 0: if device 0 runs nothing, the raw input travels.
    hops = ([0] if used and used[0] != 0 else []) + used
    for a, b in itertools.pairwise(hops):
        at = segments[a][1] if a in used else 0
        nbytes = float(layers.out_bytes[at - 1]) if at > 0 else layers.input_bytes
        t = _hop_s(dev, a, b, nbytes, batch)
        latency += t
        stages.append(t)
    for d, (_s, e) in enumerate(segments):
        nxt = next((b for b in used if b > d), None)
        if d in used and nxt is not None:
            transfer.append(_hop_s(dev, d, nxt, float(layers.out_bytes[e - 1]), batch))
            out.append(float(layers.out_bytes[e - 1]))
        elif d == 0 and used and used[0] != 0:
            transfer.append(_hop_s(dev, 0, used[0], layers.input_bytes, batch))
            out.append(layers.input_bytes)
        else:
            transfer.append(0.0)
            out.append(0.0)
    return Plan(segments, tuple(compute), tuple(transfer), tuple(out), latency, max(stages))


def plan_split(
    layers: LayerCosts, dev: ChainDevices, objective: Objective = "latency", batch: int = 1
) -> Plan:
    """The best plan for `objective` (a ValueError if no split fits the devices' memory)."""
    n, m = len(layers), len(dev)
    inf = math.inf
    # best[j][d]: the best cost with layers [0, j) done and device d the last one used
    # (d = 0 with j = 0: nothing done yet, the input on device 0).
    best = [[inf] * m for _ in range(n + 1)]
    back: list[list[tuple[int, int] | None]] = [[None] * m for _ in range(n + 1)]
    best[0][0] = 0.0

    def combine(acc: float, *parts: float) -> float:
        return acc + sum(parts) if objective == "latency" else max(acc, *parts)

    for j in range(n + 1):
        for d in range(m):
            if best[j][d] == inf:
                continue
            # The data sits on device d after layer j: the next used device e > d runs
            # layers [j, k) (device 0 may also run the first layers itself: e == d == 0).
            for e in range(d, m):
                if e == d and not (d == 0 and j == 0):
                    continue
                for k in range(j + 1, n + 1):
                    compute, fits = _segment(layers, dev, e, j, k, batch)
                    if not fits:
                        break  # more layers only need more memory
                    hop = 0.0
                    if e != d:
                        nbytes = float(layers.out_bytes[j - 1]) if j > 0 else layers.input_bytes
                        hop = _hop_s(dev, d, e, nbytes, batch)
                    cost = combine(best[j][d], hop, compute)
                    if cost < best[k][e]:
                        best[k][e], back[k][e] = cost, (j, d)
    finals = [(best[n][d], d) for d in range(m)]
    cost, last = min(finals)
    if cost == inf:
        raise ValueError(
            "no split of the model fits the devices' memory; use devices with more memory, "
            "a smaller batch, or a smaller model"
        )
    cuts = [n] * (m + 1)
    k, e = n, last
    while True:
        step = back[k][e]
        if step is None:
            break
        j, d = step
        cuts[e] = j
        if j == 0 and d == e:  # device 0 started from the input
            break
        k, e = j, d
        if k == 0:
            break
    for i in range(m - 1, -1, -1):  # devices not used take an empty run where they sit
        if cuts[i] > cuts[i + 1]:
            cuts[i] = cuts[i + 1]
    cuts[0] = 0
    plan = evaluate_cuts(layers, dev, cuts, batch)
    assert plan is not None
    return plan


def brute_force_plan(
    layers: LayerCosts, dev: ChainDevices, objective: Objective = "latency", batch: int = 1
) -> Plan:
    """Every way to cut the layers into the chain's devices in order: the reference."""
    n, m = len(layers), len(dev)
    best: Plan | None = None
    for inner in itertools.combinations_with_replacement(range(n + 1), m - 1):
        plan = evaluate_cuts(layers, dev, [0, *inner, n], batch)
        if plan is None:
            continue
        key = plan.latency_s if objective == "latency" else plan.bottleneck_s
        if best is None or key < (best.latency_s if objective == "latency" else best.bottleneck_s):
            best = plan
    if best is None:
        raise ValueError("no split of the model fits the devices' memory")
    return best
