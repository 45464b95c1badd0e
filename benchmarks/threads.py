"""Torch threads on an idle and a busy machine: `run.threads = 0` (auto) against 1 and all.

Each cell is one `edgeddl run` in its own process (its `wall_time_s`: the run without the
interpreter's start), side by side in this one invocation. "busy" starts `--hogs` other
programs for the measurement: half of them pure-Python spinners, half two-thread torch
matrix products, as on a machine shared with other people's tests. The ratio column is each
setting's time over the best one in that row.

    python benchmarks/threads.py            # ~4 min: 1-D CNN (paper fleet) and ResNet-20
    python benchmarks/threads.py --quick    # ~1.5 min: the 1-D CNN only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine_info, print_table, warn_if_busy, write_json

WORKLOADS = {
    "cnn1d (paper_fleet)": ["train.num_steps=400", "train.eval_every=400"],
    "resnet20 (synthetic 3x32x32)": [
        "model.name=resnet20",
        "data.dataset=synthetic",
        "data.input_shape=[3,32,32]",
        "data.num_samples=2000",
        "train.num_steps=6",
        "train.eval_every=100",
    ],
}
SETTINGS = {"auto (0)": 0, "1": 1, "all cores": os.cpu_count() or 1}
HOG_SPIN = "while True: pass"
HOG_TORCH = (
    "import torch\ntorch.set_num_threads(2)\na = torch.randn(96, 96)\nwhile True:\n    a @ a"
)


def _run(sets: list[str], threads: int, folder: Path) -> tuple[float, int]:
    args = [a for s in [*sets, f"run.threads={threads}"] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "edgeddl", "run", "paper_fleet", "--quiet", "--out", str(folder)]
    subprocess.run([*cmd, *args], check=True, capture_output=True)
    summary = json.loads((folder / "summary.json").read_text())
    return float(summary["wall_time_s"]), int(summary["threads"])


def _hogs(n: int) -> list[subprocess.Popen[bytes]]:
    codes = [HOG_SPIN if i % 2 == 0 else HOG_TORCH for i in range(n)]
    return [subprocess.Popen([sys.executable, "-c", c]) for c in codes]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the 1-D CNN only")
    p.add_argument("--hogs", type=int, default=3, help="other programs when busy (default 3)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args()
    workloads = dict(list(WORKLOADS.items())[:1]) if args.quick else WORKLOADS
    warn_if_busy()
    info = machine_info(0)
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, sets in workloads.items():
            for machine in ("idle", "busy"):
                cells = _measure(sets, Path(tmp) / machine, args.hogs if machine == "busy" else 0)
                times = {k: v[0] for k, v in cells.items()}
                auto = times["auto (0)"] / min(times.values())
                chosen = cells["auto (0)"][1]
                rows.append(
                    [name, machine, *[f"{t:.1f}" for t in times.values()], f"{auto:.2f}x", chosen]
                )
                results.append(
                    {
                        "workload": name,
                        "machine": machine,
                        "wall_s": times,
                        "auto_over_best": auto,
                        "auto_threads": chosen,
                    }
                )
    columns = ["workload", "machine", *[f"{k} s" for k in SETTINGS], "auto / best", "auto threads"]
    print_table(f"run wall time by torch threads ({args.hogs} programs when busy)", columns, rows)
    print(f"load average {info['load_average_at_start']:.1f} at the start")
    if args.json:
        write_json(args.json, {"results": results, "machine": info})


def _measure(sets: list[str], folder: Path, num_hogs: int) -> dict[str, tuple[float, int]]:
    hogs = _hogs(num_hogs)
    try:
        return {k: _run(sets, t, folder / str(t)) for k, t in SETTINGS.items()}
    finally:
        for h in hogs:
            h.kill()
            h.wait()


if __name__ == "__main__":
    main()
