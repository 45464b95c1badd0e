"""Simulator against the real fleet: predicted and measured time per step and in total.

One small scenario (a Jetson Nano and three Pi 4 on a LAN, the 1-D CNN on MNIST-1D, ring
all-reduce) runs simulated (`edgeddl.run`) and for real on this machine: a coordinator and
one device process per device on 127.0.0.1, each paced to its profile (`edgeddl device
--profile scenario`). Goal: the simulator within 20 % of the real fleet.

Why the profiles are slowed down (`--slowdown`, default 4: every speed divided by it, every
fixed cost multiplied): pacing can only slow a process down, so it reproduces a profile only
while the process keeps up with it. Four device processes share this machine's two cores,
and each step also burns CPU in the engine (quorum, gloo, commit). At the built-in speeds the
cores are saturated and a step takes as long as the CPU needs, not as long as the devices
would. Slowed down, the machine keeps spare capacity; the script reports how busy the cores
were during each real run (CPU seconds of its processes over two cores' wall time).

The real engine costs time on every step beyond the payloads (torchft's quorum and commit,
gloo on loopback rather than the modelled LAN, applying the step, evaluation); the simulator
models it as `fleet.step_sync_s`. A probe measures it: the same fleet, model, payload, step
count and evaluation cadence, with a global batch of 8 so that compute is small; measured
minus simulated per step is the cost. The workload is then predicted with that cost and run
for real. Probe and workload run back to back, `--repeats` times (every other pair in the
other order), so each prediction uses a cost measured under about the same load from other
processes; every pair is reported, with the medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import edgeddl
from common import free_port, machine_info, print_table, write_json
from edgeddl.config.loader import load_scenario
from edgeddl.config.profiles import DEVICE_PROFILES
from edgeddl.models.calibrate import profile_toml

SCENARIO = """
[run]
name = "calibration"
seed = 0
threads = 1

[fleet]
[[fleet.devices]]
name = "jetson"
profile = "slow_jetson_nano"

[[fleet.devices]]
name = "pi"
profile = "slow_rpi4"
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

PROBE_BATCH = 8
"""The probe's global batch: two samples a device, so its compute is mostly fixed cost."""


def slowed_profiles(slowdown: float) -> str:
    """The Jetson Nano and Pi 4 profiles, `slowdown` times slower, as scenario TOML."""
    out = []
    for name in ("jetson_nano", "rpi4"):
        p = DEVICE_PROFILES[name]
        slow = dataclasses.replace(
            p,
            flops_per_s=p.flops_per_s / slowdown,
            step_overhead_s=p.step_overhead_s * slowdown,
            op_overhead_s=p.op_overhead_s * slowdown,
            io_bytes_per_s=p.io_bytes_per_s / slowdown,
            source=f"{name}, {slowdown:g}x slower (benchmarks/calibration.py)",
        )
        out.append(profile_toml(f"slow_{name}", slow))
    return "\n".join(out)


def per_step(rows: list[dict[str, float]], time_key: str) -> float:
    """Seconds per step between the first and the last evaluation after step 0."""
    rows = [r for r in rows if r["step"] > 0]
    first, last = rows[0], rows[-1]
    return (last[time_key] - first[time_key]) / (last["step"] - first["step"])


def rows_of(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cpu_children_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_real(scenario_file: Path, names: list[str], out: Path) -> dict[str, Any]:
    """The real fleet on 127.0.0.1; its rows, and how busy the machine's cores were."""
    port = free_port()
    env = {**os.environ, "RUST_LOG": "warn"}
    edge = [sys.executable, "-m", "edgeddl"]
    logs = out.parent
    load = os.getloadavg()[0]
    cpu0, t0 = cpu_children_s(), time.perf_counter()
    coord = subprocess.Popen(
        [*edge, "coordinator", str(scenario_file), "--host", "127.0.0.1", "--port", str(port),
         "--out", str(out), "--min-devices", str(len(names))],
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
        for p in devices:
            p.wait(timeout=60)
    finally:
        for p in [coord, *devices]:
            if p.poll() is None:
                p.kill()
                p.wait()
    wall = time.perf_counter() - t0
    busy = (cpu_children_s() - cpu0) / (wall * (os.cpu_count() or 1))
    summary = json.loads((out / "summary.json").read_text())
    return {"rows": rows_of(out), "summary": summary, "load_average": load, "cpu_busy": busy}


class Bench:
    """Writes scenario files and runs them simulated and for real, in `tmp`."""

    def __init__(self, tmp: Path, args: argparse.Namespace) -> None:
        self.tmp, self.args, self.count = tmp, args, 0
        self.profiles = slowed_profiles(args.slowdown)

    def _scenario(self, batch: int, sync_s: float) -> tuple[Path, Any]:
        self.count += 1
        folder = self.tmp / f"run{self.count}"
        folder.mkdir()
        a = self.args
        text = SCENARIO.format(
            width=a.width, batch=batch, steps=a.steps, eval_every=max(a.steps // 10, 1)
        )
        path = folder / "calibration.toml"
        path.write_text(text + "\n" + self.profiles)
        return path, load_scenario(path, [f"fleet.step_sync_s={sync_s}"])

    def simulate(self, batch: int, sync_s: float) -> dict[str, float]:
        path, scenario = self._scenario(batch, sync_s)
        sim = edgeddl.run(scenario, out_dir=path.parent / "sim", progress=False)
        return {
            "per_step_s": per_step(rows_of(sim.run_dir), "virtual_time_s"),
            "total_s": sim.summary["time_s"],  # virtual time of the run
            "accuracy": sim.summary["final_test_accuracy"],
        }

    def real(self, batch: int) -> dict[str, float]:
        path, scenario = self._scenario(batch, 0.0)
        r = run_real(path, scenario.fleet.device_names(), path.parent / "real")
        rows = r["rows"]
        return {
            "per_step_s": per_step(rows, "wall_time_s"),
            # The longest any device spent in steps (start-up and evaluations are not
            # counted, as the simulator's virtual time does not count them).
            "total_s": r["summary"]["time_s"],
            "accuracy": rows[-1]["test_accuracy"],
            "load_average": r["load_average"],
            "cpu_busy": r["cpu_busy"],
            # Steps whose real work outran the paced profile: pacing did not hold there.
            "over_budget": sum(d["pacing_overruns"] for d in r["summary"]["per_device"])
            / max(sum(d["steps"] for d in r["summary"]["per_device"]), 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--slowdown", type=float, default=4.0, help="profiles this many times slower")
    ap.add_argument("--repeats", type=int, default=3, help="probe + workload pairs")
    ap.add_argument("--json", default="benchmarks/results/calibration.json")
    args = ap.parse_args()
    bench = Bench(Path(tempfile.mkdtemp(prefix="edgeddl-calibration-")), args)
    info = machine_info(1)
    probe_sim = bench.simulate(PROBE_BATCH, 0.0)
    ideal = bench.simulate(args.batch, 0.0)
    pairs = []
    for i in range(args.repeats):
        # The engine's own cost per step: the same fleet and payload, little compute. Every
        # other pair runs the workload first, so a drift in load favours neither side.
        measured = bench.real(args.batch) if i % 2 else None
        probe = bench.real(PROBE_BATCH)
        sync_s = max(probe["per_step_s"] - probe_sim["per_step_s"], 0.0)
        # The workload predicted with that cost (the simulator never sees its real run).
        predicted = bench.simulate(args.batch, sync_s)
        measured = measured or bench.real(args.batch)
        pairs.append(
            {"probe": probe, "step_sync_s": sync_s, "predicted": predicted, "measured": measured}
        )
        print(
            f"repeat {i + 1}: engine cost {1000 * sync_s:.1f} ms, "
            f"{1000 * predicted['per_step_s']:.1f} ms predicted, "
            f"{1000 * measured['per_step_s']:.1f} ms measured per step",
            flush=True,
        )
    rows = []
    for i, p in enumerate(pairs):
        pr, me = p["predicted"], p["measured"]
        step_ratio = me["per_step_s"] / pr["per_step_s"]
        total_ratio = me["total_s"] / pr["total_s"]
        p["ratio_per_step"], p["ratio_total"] = step_ratio, total_ratio
        p["ratio_ideal"] = me["per_step_s"] / ideal["per_step_s"]
        rows.append([
            str(i + 1),
            f"{p['probe']['load_average']:.1f} / {me['load_average']:.1f}",
            f"{100 * p['probe']['cpu_busy']:.0f} / {100 * me['cpu_busy']:.0f}",
            f"{100 * me['over_budget']:.1f}",
            f"{1000 * p['step_sync_s']:.1f}",
            f"{1000 * pr['per_step_s']:.1f}",
            f"{1000 * me['per_step_s']:.1f}",
            f"{step_ratio:.2f} ({p['ratio_ideal']:.2f})",
            f"{pr['total_s']:.1f} / {me['total_s']:.1f} ({total_ratio:.2f})",
            "met" if abs(step_ratio - 1) <= 0.2 else "missed",
        ])  # fmt: skip
    median = statistics.median(p["ratio_per_step"] for p in pairs)
    median_total = statistics.median(p["ratio_total"] for p in pairs)
    print_table(
        f"Jetson + 3 Pi ({args.slowdown:g}x slower), cnn1d w{args.width}, batch {args.batch}, "
        f"{args.steps} steps; ideal engine {1000 * ideal['per_step_s']:.1f} ms per step",
        ["repeat", "load avg probe / run", "CPU busy % probe / run", "steps over budget %",
         "engine ms", "predicted ms", "measured ms", "measured / predicted (ideal)",
         "total s predicted / measured", "within 20 %"],
        rows,
    )  # fmt: skip
    print(f"median measured / predicted: per step {median:.2f}, in total {median_total:.2f}")
    write_json(
        args.json,
        {
            "machine": info,
            "args": vars(args),
            "probe_batch": PROBE_BATCH,
            "probe_simulated": probe_sim,
            "ideal": ideal,
            "pairs": pairs,
            "median_ratio_per_step": median,
            "median_ratio_total": median_total,
        },
    )


if __name__ == "__main__":
    main()
