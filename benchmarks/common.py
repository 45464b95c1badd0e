"""What both benchmarks share: scenarios built from the paper fleet, data, tables and JSON.

Scenarios are the bundled ``paper_fleet`` with ``--set``-style overrides, so the benchmarks
follow that file (and its validation) rather than a copy of it.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import TensorDataset

from edgeddl import Scenario, load_scenario
from edgeddl.config.schema import RunConfig
from edgeddl.workload import scenario_data

console = Console(width=None if sys.stdout.isatty() else 180)
"""Wide when piped (logs, README excerpts), so tables are not squeezed to 80 columns."""

PAPER_FLEET = "paper_fleet"
PAPER_FLEET_SIZE = 11
MIX_FRACTIONS = (("pc", 0.1), ("jetson", 0.3), ("pi", 0.6))
"""Shares of the paper fleet's groups (pc, jetson_nano, rpi4) in a fleet of another size."""


def fleet_counts(num_devices: int) -> list[int]:
    """Devices per paper-fleet group: the paper's 2/3/6 for 11, else a 10/30/60 % mix."""
    if num_devices == PAPER_FLEET_SIZE:
        return [2, 3, 6]
    if num_devices < len(MIX_FRACTIONS):
        raise ValueError(f"a mixed fleet needs at least {len(MIX_FRACTIONS)} devices")
    ideal = [num_devices * f for _, f in MIX_FRACTIONS]
    counts = [max(1, int(x)) for x in ideal]
    order = sorted(range(len(ideal)), key=lambda i: ideal[i] - int(ideal[i]), reverse=True)
    for i in order[: num_devices - sum(counts)]:
        counts[i] += 1
    return counts


def input_shape_for(model: str, dataset: str) -> tuple[int, ...]:
    if dataset == "mnist1d":
        return (1, 40)
    return (3, 32, 32) if model.startswith("resnet") else (1, 40)


def make_scenario(
    *,
    num_devices: int = PAPER_FLEET_SIZE,
    model: str = "cnn1d",
    dataset: str = "mnist1d",
    global_batch: int = 256,
    num_steps: int = 100,
    topology: str = "star",
    balance: str = "capability",
    threads: int = 0,
    device: str = "cpu",
    extra: tuple[str, ...] = (),
) -> Scenario:
    """The paper fleet (or a mix of its device kinds) with the given workload, evaluating
    only after the last step; `device` is where the maths runs (`run.device`)."""
    shape = input_shape_for(model, dataset)
    overrides = [
        f"model.name={model}",
        f"data.dataset={dataset}",
        f"train.global_batch={global_batch}",
        f"train.num_steps={num_steps}",
        f"train.eval_every={num_steps}",
        f"train.topology={topology}",
        f"train.balance={balance}",
        f"run.threads={threads}",
    ]
    if device != "cpu":
        if "device" not in RunConfig.__dataclass_fields__:
            raise ValueError(f"this edgeddl has no run.device option: cannot run on {device}")
        overrides.append(f"run.device={device}")
    if dataset == "synthetic":
        overrides.append(f"data.input_shape=[{', '.join(map(str, shape))}]")
    for i, n in enumerate(fleet_counts(num_devices)):
        overrides.append(f"fleet.devices.{i}.count={n}")
    return load_scenario(PAPER_FLEET, [*overrides, *extra])


def load_data(scenario: Scenario) -> tuple[TensorDataset, TensorDataset]:
    """The scenario's train and test sets, generated once, held in memory."""
    train, test, _ = scenario_data(scenario)
    return train, test


def source_version() -> str:
    """The edgeddl commit measured, marked dirty when the working tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{' + uncommitted src changes' if dirty else ''}" if head else "unknown"


def machine_info(threads: int) -> dict[str, Any]:
    return {
        "edgeddl_source": source_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": threads,
        "load_average_at_start": os.getloadavg()[0],
    }


def warn_if_busy() -> None:
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load > 0.5 * cpus:
        console.print(
            f"[yellow]warning: load average {load:.1f} on {cpus} CPUs: other processes "
            "compete for the cores, so wall-clock timings will be noisy[/yellow]"
        )


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[str(v) for v in r])
    console.print(table)


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2) + "\n")
    console.print(f"results written to {p}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (for a localhost real fleet)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
