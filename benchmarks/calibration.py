"""Simulator against the real fleet: predicted and measured time per step, side by side.

One small scenario (a Jetson Nano and three Pi 4 on a LAN, the 1-D CNN on MNIST-1D) runs
simulated (`edgeddl.run`) and for real on this machine: a coordinator and one device process
per device on 127.0.0.1, each paced to its profile (`edgeddl device --profile scenario`), so
the processes behave like the mixed fleet. Pacing can only slow a process down: the profiles
must be slower than what one process gets of this machine (four processes share its two
cores), which is why the fleet has no PC. The table compares the simulator's virtual time
per step with the measured wall time per step (from the first to the last evaluation row,
so start-up is not counted). Goal: within 20 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import edgeddl
from common import free_port, machine_info, print_table, write_json
from edgeddl.config.loader import load_scenario

SCENARIO = """
[run]
name = "calibration"
seed = 0
threads = 1

[fleet]
[[fleet.devices]]
name = "jetson"
profile = "jetson_nano"

[[fleet.devices]]
name = "pi"
profile = "rpi4"
count = 3

[data]
dataset = "mnist1d"
shard_sizes = "capability"

[model]
name = "cnn1d"
width = {width}

[train]
topology = "ring"  # the real fleet all-reduces among the devices
global_batch = {batch}
num_steps = {steps}
eval_every = {eval_every}
"""


def per_step(rows: list[dict[str, float]], time_key: str) -> float:
    """Seconds per step between the first and the last evaluation after step 0."""
    rows = [r for r in rows if r["step"] > 0]
    first, last = rows[0], rows[-1]
    return (last[time_key] - first[time_key]) / (last["step"] - first["step"])


def run_real(scenario_file: Path, names: list[str], out: Path) -> list[dict[str, float]]:
    port = free_port()
    env = {**os.environ, "RUST_LOG": "warn"}
    edge = [sys.executable, "-m", "edgeddl"]
    logs = out.parent
    coord = subprocess.Popen(
        [*edge, "coordinator", str(scenario_file), "--host", "127.0.0.1", "--port", str(port),
         "--out", str(out)],
        stdout=(logs / "coordinator.log").open("wb"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    time.sleep(0.5)  # the store must be up before devices connect (they retry anyway)
    devices = [
        subprocess.Popen(
            [
                *edge,
                "device",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--name",
                n,
                "--profile",
                "scenario",
                "--timeout",
                "30",
            ],
            stdout=(logs / f"{n}.log").open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        for n in names
    ]
    try:
        if coord.wait(timeout=1800) != 0:
            raise RuntimeError((logs / "coordinator.log").read_text()[-2000:])
    finally:
        for p in [coord, *devices]:
            if p.poll() is None:
                p.kill()
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def measure(
    tmp: Path, label: str, width: int, batch: int, steps: int, model: str, sync_s: float
) -> dict[str, float]:
    """One scenario simulated (with `sync_s` as the engine's step cost) and for real."""
    folder = tmp / label
    folder.mkdir()
    scenario_file = folder / "calibration.toml"
    text = SCENARIO.format(width=width, batch=batch, steps=steps, eval_every=max(steps // 10, 1))
    scenario_file.write_text(text.replace('name = "cnn1d"', f'name = "{model}"'))
    scenario = load_scenario(scenario_file, [f"fleet.step_sync_s={sync_s}"])
    sim = edgeddl.run(scenario, out_dir=folder / "sim", progress=False)
    sim_rows = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    real_rows = run_real(scenario_file, scenario.fleet.device_names(), folder / "real")
    return {
        "predicted_s": per_step(sim_rows, "virtual_time_s"),
        "measured_s": per_step(real_rows, "wall_time_s"),
        "sim_accuracy": sim.summary["final_test_accuracy"],
        "real_accuracy": real_rows[-1]["test_accuracy"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--json", default="benchmarks/results/calibration.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="edgeddl-calibration-"))
    # 1. The engine's own cost per step: a model too small to take any time, not paced.
    probe = measure(tmp, "probe", 4, 8, args.steps, "mlp", 0.0)
    sync_s = max(probe["measured_s"] - probe["predicted_s"], 0.0)
    # 2. The workload, predicted without and with that cost, against the paced real fleet.
    ideal = measure(tmp, "ideal", args.width, args.batch, args.steps, "cnn1d", 0.0)
    synced = measure(tmp, "synced", args.width, args.batch, args.steps, "cnn1d", sync_s)
    rows = []
    for label, m in (("ideal engine", ideal), (f"step_sync_s = {sync_s * 1000:.1f} ms", synced)):
        ratio = m["measured_s"] / m["predicted_s"]
        rows.append([
            label,
            f"{1000 * m['predicted_s']:.1f}",
            f"{1000 * m['measured_s']:.1f}",
            f"{ratio:.2f}",
            "met" if abs(ratio - 1) <= 0.2 else "missed",
        ])  # fmt: skip
    print_table(
        f"Jetson + 3 Pi, cnn1d w{args.width}, batch {args.batch}: ms per step",
        ["simulator", "predicted", "measured (real)", "measured / predicted", "within 20 %"],
        rows,
    )
    write_json(
        args.json,
        {
            "machine": machine_info(1),
            "steps": args.steps,
            "probe": probe,
            "step_sync_s": sync_s,
            "ideal": ideal,
            "synced": synced,
        },
    )


if __name__ == "__main__":
    main()
