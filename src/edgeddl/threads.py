"""How many torch CPU threads a run uses when `run.threads = 0` (auto).

Intra-op threads pay only when each operator has enough work to share, and only when the
cores are free. A 1-D CNN's step is a few MFLOP: on an idle 2-core machine two threads save
about a quarter of its time, on a busy one (other programs holding the cores) they cost 5x
(15x seen at load 3-16), because each operator waits for a descheduled partner. A ResNet's
step is tens of GFLOP: two threads make it about 1.5x faster on an idle 2-core machine and
1.2x slower on a busy one. So: one thread below `PARALLEL_MIN_FLOPS` a pass, the cores above.
The choice depends on the model's work and the cores this process may use, never on the
load: torch's sums, and so a run's bits, change with the thread count, and a scenario must
give the same result on an idle and a busy machine.
"""

from __future__ import annotations

import os

from edgeddl.config.schema import Scenario

PARALLEL_MIN_FLOPS = 1e9
"""Training FLOPs of one forward/backward pass from which threads are worth their risk
(benchmarks/threads.py: a 1-D CNN's few MFLOP lose up to 5x on a busy machine, a
ResNet-20's GFLOPs gain 1.5x on an idle one and lose 1.2x on a busy one)."""
MAX_AUTO_THREADS = 8
"""Beyond this, a simulator's small batches scale poorly; set run.threads to go higher."""


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_threads(flops_per_pass: float, cores: int | None = None) -> int:
    """Threads for a run whose largest forward/backward pass costs `flops_per_pass`."""
    cores = usable_cores() if cores is None else cores
    if flops_per_pass < PARALLEL_MIN_FLOPS:
        return 1
    return max(1, min(cores, MAX_AUTO_THREADS))


def pass_samples(scenario: Scenario) -> int:
    """Samples in one device's forward/backward pass: a federated client's local batch, or
    about a device's share of the global batch (the simulator fuses some passes into one
    larger one, which only makes threads pay sooner)."""
    t = scenario.train
    if t.strategy == "federated":
        return scenario.federated.local_batch
    return max(1, -(-t.global_batch // len(scenario.fleet.device_names())))


def scenario_threads(scenario: Scenario, train_flops_per_sample: float) -> int:
    """`run.threads`, or when it is 0 the automatic choice for this scenario's model."""
    if scenario.run.threads:
        return scenario.run.threads
    return auto_threads(train_flops_per_sample * pass_samples(scenario))
