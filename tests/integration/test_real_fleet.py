"""The real fleet on 127.0.0.1: a coordinator and device processes on torchft + gloo.

Progress is read from the coordinator's store (each device publishes its last committed
step), so a test waits for a condition with a deadline, never for a fixed time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

torchft = pytest.importorskip("torchft")

from torch.distributed import TCPStore  # noqa: E402

from edgeddl.transport.torchdist import progress_key  # noqa: E402

SCENARIO = """
[run]
name = "localfleet"
seed = 0
threads = 1

[fleet]
[[fleet.devices]]
name = "dev"
profile = "pc"
count = 3

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _edgeddl(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RUST_LOG": "warn"}
    return subprocess.Popen(
        [sys.executable, "-m", "edgeddl", *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )


class Fleet:
    def __init__(self, tmp_path: Path, steps: int, extra: str = "") -> None:
        self.tmp = tmp_path
        self.port = _free_port()
        scenario = tmp_path / "fleet.toml"
        scenario.write_text(SCENARIO.format(steps=steps) + extra)
        self.out = tmp_path / "run"
        self.scenario = scenario
        self.devices: dict[str, subprocess.Popen[bytes]] = {}
        self.starts = 0
        self.start_coordinator()

    def start_coordinator(self, *extra: str) -> None:
        self.starts += 1
        self.coordinator = _edgeddl(
            "coordinator",
            str(self.scenario),
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            "--out",
            str(self.out),
            *extra,
            log=self.tmp / f"coordinator-{self.starts}.log",
        )
        self.store = TCPStore(
            "127.0.0.1", self.port, is_master=False, timeout=timedelta(seconds=60)
        )

    def start(self, name: str, *extra: str) -> None:
        self.devices[name] = _edgeddl(
            "device",
            "--coordinator",
            f"127.0.0.1:{self.port}",
            "--name",
            name,
            # A peer killed just as a quorum forms is noticed when the collective times
            # out: the timeout bounds the recovery (see the README).
            "--timeout",
            "2",
            *extra,
            log=self.tmp / f"{name}.log",
        )

    def progress(self, name: str) -> int:
        key = progress_key(name)
        return int(self.store.get(key)) if self.store.check([key]) else 0

    def wait_for(self, name: str, step: int, deadline_s: float = 120.0) -> None:
        end = time.monotonic() + deadline_s
        while self.progress(name) < step:
            assert time.monotonic() < end, f"{name} did not reach step {step}: {self.logs()}"
            assert self.coordinator.poll() is None, self.logs()
            time.sleep(0.05)

    def finish(self, timeout_s: float = 180.0) -> dict[str, Any]:
        assert self.coordinator.wait(timeout=timeout_s) == 0, self.logs()
        for p in self.devices.values():
            p.wait(timeout=30)
        return json.loads((self.out / "summary.json").read_text())

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in self.tmp.glob("*.log")
        )

    def close(self) -> None:
        for p in [self.coordinator, *self.devices.values()]:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def fleet_factory(tmp_path: Path):
    made: list[Fleet] = []

    def make(steps: int, extra: str = "") -> Fleet:
        made.append(Fleet(tmp_path, steps, extra))
        return made[-1]

    yield make
    for f in made:
        f.close()


def test_kill_9_of_a_device_the_others_finish_consistent_and_learned(fleet_factory) -> None:
    fleet = fleet_factory(steps=300)
    for i in range(3):
        fleet.start(f"dev-{i}")
    fleet.wait_for("dev-1", 60)
    os.kill(fleet.devices["dev-1"].pid, signal.SIGKILL)
    summary = fleet.finish()
    assert sorted(summary["devices_finished"]) == ["dev-0", "dev-2"]
    survivors = summary["per_device"]
    assert all(d["final_step"] == 300 for d in survivors)
    assert summary["replicas_consistent"]  # one model on every survivor
    assert summary["final_test_accuracy"] > 0.5  # chance is 0.1
    # The kill cost at most the step it interrupted: nothing committed was lost.
    assert summary["steps_not_committed"] <= 2 * len(survivors)
    assert summary["recovery_s"] and summary["max_recovery_s"] < 3.0
    rows = [json.loads(x) for x in (fleet.out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 300 and rows[-1]["num_members"] == 2
    for name in ("config.resolved.toml", "accuracy.png"):
        assert (fleet.out / name).exists()


def test_a_device_joining_mid_run_heals_and_takes_part(fleet_factory) -> None:
    steps = 2000  # long enough for a third process to start (data and torch: seconds)
    fleet = fleet_factory(steps=steps)
    fleet.start("dev-0")
    fleet.start("dev-1")
    fleet.wait_for("dev-0", 60)
    fleet.start("dev-2")
    fleet.wait_for("dev-2", 1)
    summary = fleet.finish()
    by_name = {d["name"]: d for d in summary["per_device"]}
    assert set(by_name) == {"dev-0", "dev-1", "dev-2"}
    late = by_name["dev-2"]
    # It healed from a peer at a later step, then committed every step with the others.
    assert 0 < late["steps"] <= steps - 60 and late["final_step"] == steps
    assert late["samples"] > 0
    assert summary["replicas_consistent"]
    rows = [json.loads(x) for x in (fleet.out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["num_members"] == 3


COMPRESSED = """
[compression]
compressor = "two_step"
density = 0.05
"""


def test_compressed_payloads_and_shares_from_measured_speed(fleet_factory) -> None:
    """Two-step payloads cross the real transport byte for byte, and a device paced to a
    Raspberry Pi gets a smaller share than two paced to a PC (measured, not assumed)."""
    steps = 150
    fleet = fleet_factory(steps=steps, extra=COMPRESSED)
    fleet.start("dev-0", "--profile", "pc")
    fleet.start("dev-1", "--profile", "pc")
    fleet.start("dev-2", "--profile", "rpi4")
    summary = fleet.finish()
    by_name = {d["name"]: d for d in summary["per_device"]}
    assert set(by_name) == {"dev-0", "dev-1", "dev-2"}
    assert summary["replicas_consistent"] and summary["steps_not_committed"] == 0
    for a, b in [(a, b) for a in by_name for b in by_name if a != b]:
        # What b decoded from a is what a encoded for the steps they shared, to the byte.
        assert by_name[a]["payload_bytes_to"][b] == by_name[b]["payload_bytes_from"][a] > 0
    dense = 4 * sum(p.numel() for p in _cnn1d().parameters())
    assert 0 < by_name["dev-0"]["payload_bytes"] < steps * dense / 5
    # Shares follow the speed each device measured: the Pi gets far fewer samples.
    assert by_name["dev-2"]["samples"] < 0.5 * by_name["dev-0"]["samples"]
    assert summary["final_test_accuracy"] > 0.3  # chance is 0.1


def _cnn1d() -> Any:
    from edgeddl.models import build_model

    return build_model("cnn1d", input_shape=(1, 40), num_classes=10)


def test_a_restarted_coordinator_resumes_and_the_devices_carry_on(fleet_factory) -> None:
    steps = 400
    fleet = fleet_factory(steps=steps)
    fleet.coordinator.kill()  # start again with a short checkpoint interval
    fleet.coordinator.wait()
    fleet.start_coordinator("--checkpoint-every", "20")
    fleet.start("dev-0")
    fleet.start("dev-1")
    fleet.wait_for("dev-0", 70)
    checkpoint, metrics = fleet.out / "checkpoint.pt", fleet.out / "metrics.jsonl"
    end = time.monotonic() + 60
    # Kill it once it holds a checkpoint and the row of step 50 (rows it had not yet written
    # die with it).
    while not (checkpoint.exists() and metrics.exists() and '"step": 50' in metrics.read_text()):
        assert time.monotonic() < end, fleet.logs()
        time.sleep(0.05)
    os.kill(fleet.coordinator.pid, signal.SIGKILL)
    fleet.coordinator.wait()
    fleet.start_coordinator("--checkpoint-every", "20")
    summary = fleet.finish()
    resumed = summary["resumed_from_step"]
    assert resumed is not None and resumed >= 20 and resumed % 20 == 0
    by_name = {d["name"]: d for d in summary["per_device"]}
    assert set(by_name) == {"dev-0", "dev-1"}
    for d in by_name.values():  # they outlived the coordinator and went on from where they were
        assert d["final_step"] == steps and d["coordinator_reconnects"] == 1
    assert summary["replicas_consistent"] and summary["final_test_accuracy"] > 0.5
    rows = [json.loads(x) for x in (fleet.out / "metrics.jsonl").read_text().splitlines()]
    steps_seen = [r["step"] for r in rows]
    assert steps_seen == sorted(set(steps_seen)) and 50 in steps_seen and steps in steps_seen
    assert summary["checkpoint_step"] > resumed  # the new coordinator checkpoints too


def test_a_torchrun_launch_of_the_same_entry_point(fleet_factory) -> None:
    """`torchrun ... -m edgeddl device --coordinator H:P`: each worker is the device whose
    position in the scenario is its RANK; torchft still carries membership and the steps."""
    steps = 200
    fleet = fleet_factory(steps=steps)
    log = fleet.tmp / "torchrun.log"
    env = {**os.environ, "RUST_LOG": "warn", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "3",
            "-m",
            "edgeddl",
            "device",
            "--coordinator",
            f"127.0.0.1:{fleet.port}",
            "--timeout",
            "2",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    fleet.devices["torchrun"] = launcher
    summary = fleet.finish()
    assert launcher.wait(timeout=60) == 0, fleet.logs()
    assert sorted(summary["devices_finished"]) == ["dev-0", "dev-1", "dev-2"]
    assert all(d["final_step"] == steps for d in summary["per_device"])
    assert summary["replicas_consistent"] and summary["final_test_accuracy"] > 0.5


def test_the_coordinator_reports_devices_that_stop_on_an_error(fleet_factory) -> None:
    fleet = fleet_factory(steps=50)
    fleet.start("nope")  # not a device of the scenario: it stops at once
    assert fleet.devices["nope"].wait(timeout=60) == 2
    assert fleet.coordinator.wait(timeout=60) == 2  # it does not wait for ever
    log = fleet.logs()
    assert "device stopped on an error: nope: --name: 'nope' is not a device" in log
    assert "edgeddl: error: every device stopped on an error" in log
