"""Ctrl-C on `edgeddl run` as a user presses it: a real SIGINT to the process, a complete run
folder marked interrupted, exit code 130, and `edgeddl run --resume` finishing it to the bits
of a run that was never stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import edgeddl
from edgeddl.runtime.sim.resume import CHECKPOINT_FILE

SETTINGS = ["train.num_steps=1500", "train.eval_every=50", "run.checkpoint_every=0"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeddl", *args]


def _wait_for_rows(path: Path, rows: int, proc: subprocess.Popen[str]) -> None:
    """Until the run has written `rows` evaluations (training is under way)."""
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run ended or stalled before {rows} evaluations")


def test_ctrl_c_leaves_a_complete_run_folder_that_resumes_to_the_same_bits(
    tmp_path: Path,
) -> None:
    out = tmp_path / "stopped"
    sets = [a for s in SETTINGS for a in ("--set", s)]
    proc = subprocess.Popen(
        _cli("run", "paper_fleet", "--quiet", "--out", str(out), *sets),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_rows(out / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert f"edgeddl run --resume {out}" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 50 <= summary["num_steps"] < 1500
    assert (out / "model.pt").is_file() and (out / CHECKPOINT_FILE).is_file()
    done = subprocess.run(
        _cli("run", "--resume", str(out), "--quiet"), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    straight = edgeddl.run("paper_fleet", overrides=SETTINGS, out_dir=tmp_path / "straight")
    a, b = torch.load(out / "model.pt"), torch.load(straight.run_dir / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
