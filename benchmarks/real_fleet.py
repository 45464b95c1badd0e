"""A localhost real fleet, engine by engine: correctness, and recovery after kill -9.

Three device processes on 127.0.0.1 (mnist1d, cnn1d, global batch 96), each with its model
and data on `run.device` (cpu, or cuda: then all three share cuda:0), on each `--engines`
(torchft, elastic) and the `--backend` (gloo; nccl sums on the GPU). Runs, each a fresh
coordinator and fleet:

* dense: all three devices finish.
* kill: one device (its process and what it started: an elastic worker) is killed with
  SIGKILL once it has committed `--kill-at` steps; the two others must finish consistent.
  `--repeat N` repeats it, for the spread of the recovery time.
* two_step: `[compression] compressor = "two_step"`, density 0.05; every pair's payload
  bytes sent (`payload_bytes_to`) must equal the bytes the peer decoded (`payload_bytes_from`).

Prints one row per run: wall time (coordinator start to exit), final accuracy, consistency,
steps not committed, recovery time and the byte check, the engines side by side.
`--json PATH` writes the summaries.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from torch.distributed import TCPStore

from common import free_port
from edgeddl.runtime.fleet.store import progress_key

SCENARIO = """
[run]
name = "realfleet"
seed = 0
threads = 1
device = "{device}"

[fleet]
[[fleet.devices]]
name = "dev"
profile = "pc"
count = {count}

[data]
dataset = "mnist1d"

[model]
name = "cnn1d"

[train]
global_batch = 96
num_steps = {steps}
eval_every = 50
lr = 0.05
"""

COMPRESSED = """
[compression]
compressor = "two_step"
density = 0.05
"""

RUNS = ("dense", "kill", "two_step")


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RUST_LOG": "warn"}
    return subprocess.Popen(
        [sys.executable, "-m", "edgeddl", *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def _tail(folder: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in folder.glob("*.log")
    )


def _wait(
    coord: subprocess.Popen[bytes],
    procs: dict[str, subprocess.Popen[bytes]],
    deadline: float,
    folder: Path,
) -> int:
    """The coordinator's exit code; fails fast once every device has exited without it."""
    gone_since: float | None = None
    while (rc := coord.poll()) is None:
        now = time.perf_counter()
        if now > deadline:
            raise RuntimeError(f"the run did not finish in time\n{_tail(folder)}")
        if all(p.poll() is not None for p in procs.values()):
            gone_since = gone_since or now
            if now - gone_since > 15:  # the coordinator should have written its summary
                codes = {n: p.returncode for n, p in procs.items()}
                raise RuntimeError(f"every device exited {codes}\n{_tail(folder)}")
        time.sleep(0.1)
    return rc


def _kill_device(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL to the device's process and its children (an elastic agent's worker)."""
    kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    for pid in [proc.pid, *map(int, kids.stdout.split())]:
        os.kill(pid, signal.SIGKILL)


def run_fleet(
    folder: Path,
    kind: str,
    device: str,
    steps: int,
    count: int,
    kill_at: int,
    limit_s: float,
    engine: str = "torchft",
    backend: str = "gloo",
) -> dict[str, Any]:
    """One fleet run of `kind` in `folder`; returns the coordinator's summary plus timings."""
    folder.mkdir(parents=True, exist_ok=True)
    scenario = folder / "fleet.toml"
    text = SCENARIO.format(device=device, count=count, steps=steps)
    scenario.write_text(text + (COMPRESSED if kind == "two_step" else ""))
    port = free_port()
    out = folder / "run"
    start = time.perf_counter()
    coord = _spawn(
        ["coordinator", str(scenario), "--port", str(port), "--host", "127.0.0.1",
         "--out", str(out), "--engine", engine, "--backend", backend,
         "--min-devices", str(count)],
        folder / "coordinator.log",
    )  # fmt: skip
    procs: dict[str, subprocess.Popen[bytes]] = {}
    killed_at: int | None = None
    try:
        store = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
        for i in range(count):
            name = f"dev-{i}"
            procs[name] = _spawn(
                ["device", "--coordinator", f"127.0.0.1:{port}", "--name", name,
                 "--timeout", "2"],
                folder / f"{name}.log",
            )  # fmt: skip
        if kind == "kill":
            key = progress_key("dev-1")
            end = time.monotonic() + limit_s
            while not (store.check([key]) and int(store.get(key)) >= kill_at):
                if time.monotonic() > end or coord.poll() is not None:
                    raise RuntimeError(f"dev-1 never reached step {kill_at}\n{_tail(folder)}")
                time.sleep(0.02)
            _kill_device(procs["dev-1"])
            killed_at = int(store.get(key))
        rc = _wait(coord, procs, start + limit_s, folder)
        wall = time.perf_counter() - start
        if rc != 0:
            raise RuntimeError(f"coordinator exited {rc}\n{_tail(folder)}")
        for p in procs.values():
            p.wait(timeout=30)
    finally:
        for p in [coord, *procs.values()]:
            if p.poll() is None:
                p.kill()
                p.wait()
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    summary["bench_wall_s"] = wall
    summary["bench_killed_at_step"] = killed_at
    summary["bench_device_exit_codes"] = {n: p.returncode for n, p in procs.items()}
    return summary


def bytes_agree(summary: dict[str, Any]) -> tuple[bool, int]:
    """Whether every pair's bytes sent equal the bytes its peer decoded; and the pair count."""
    by_name = {d["name"]: d for d in summary["per_device"]}
    pairs = [(a, b) for a in by_name for b in by_name if a != b]
    ok = all(
        by_name[a]["payload_bytes_to"].get(b, 0) == by_name[b]["payload_bytes_from"].get(a, 0) > 0
        for a, b in pairs
    )
    return ok, len(pairs)


def row(kind: str, engine: str, device: str, s: dict[str, Any]) -> list[str]:
    acc = s.get("final_test_accuracy")
    agree = "-"
    if kind == "two_step":
        ok, n = bytes_agree(s)
        agree = f"{'yes' if ok else 'NO'} ({n} pairs)"
    train_s = max((d["time_s"] for d in s["per_device"]), default=0.0)
    return [
        kind,
        engine,
        device,
        f"{s['bench_wall_s']:.1f}",
        f"{train_s:.1f}",
        "-" if acc is None else f"{acc:.3f}",
        str(s["replicas_consistent"]),
        str(s["steps_not_committed"]),
        f"{s['max_recovery_s']:.2f}",
        ",".join(sorted(s["devices_finished"])),
        agree,
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cpu")
    ap.add_argument("--engines", default="torchft,elastic", help="comma-separated engines")
    ap.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    ap.add_argument("--repeat", type=int, default=1, help="kill runs per engine (default: 1)")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of %(default)s")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--count", type=int, default=3, help="device processes (default: 3)")
    ap.add_argument("--kill-at", type=int, default=60, help="dev-1's step when it is killed")
    ap.add_argument("--limit", type=float, default=300.0, help="seconds one run may take")
    ap.add_argument("--logs", type=Path, default=None, help="folder for logs and run folders")
    ap.add_argument("--json", type=Path, default=None, help="write the summaries here")
    args = ap.parse_args()
    kinds = [k for k in args.runs.split(",") if k]
    unknown = sorted(set(kinds) - set(RUNS))
    if unknown:
        ap.error(f"--runs: unknown {unknown}; allowed: {', '.join(RUNS)}")
    engines = [e for e in args.engines.split(",") if e]
    if sorted(set(engines) - {"torchft", "elastic"}):
        ap.error(f"--engines: allowed are torchft, elastic; got {args.engines}")
    if args.device == "cuda" or args.backend == "nccl":
        import torch

        if not torch.cuda.is_available():
            print(f"--device cuda / --backend nccl: torch {torch.__version__} sees no CUDA device",
                  file=sys.stderr)  # fmt: skip
            return 2
    logs = args.logs or Path(tempfile.mkdtemp(prefix="edgeddl-realfleet-"))
    cols = ["run", "engine", "device", "wall s", "train s", "accuracy", "consistent",
            "not committed", "max recovery s", "finished", "bytes agree"]  # fmt: skip
    rows: list[list[str]] = []
    results: dict[str, Any] = {}
    failed = False
    plan = [
        (kind, engine, k)
        for engine in engines
        for kind in kinds
        for k in range(args.repeat if kind == "kill" else 1)
    ]
    for kind, engine, k in plan:
        label = f"{kind}-{engine}-{args.device}-{k}"
        try:
            s = run_fleet(
                logs / label,
                kind,
                args.device,
                args.steps,
                args.count,
                args.kill_at,
                args.limit,
                engine,
                args.backend,
            )
        except Exception as e:  # report and go on with the next run
            failed = True
            msg = str(e).strip()
            print(f"{label} FAILED: {msg[:4000]}", file=sys.stderr, flush=True)
            results[label] = {"error": msg}
            rows.append([kind, engine, args.device, "FAILED", *["-"] * (len(cols) - 4)])
            continue
        results[label] = s
        rows.append(row(kind, engine, args.device, s))
        print(" | ".join(rows[-1]), flush=True)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("\n" + "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
