"""A real fleet on 127.0.0.1 for the tests: a coordinator and device processes.

Progress is read from the coordinator's store (each device publishes its last committed
step), so a test waits for a condition, never for a fixed time, and gives up only when the
fleet stops making progress (`STALL_S`): a loaded machine is slow, not stuck.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from torch.distributed import TCPStore

from edgeddl.config.loader import load_scenario
from edgeddl.runtime.fleet.signed_store import unchecked
from edgeddl.runtime.fleet.store import progress_key

STALL_S = 120.0
"""A fleet in which no device committed a step for this long has hung: the test fails."""

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
{train}global_batch = 96
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


def _children(pid: int) -> list[int]:
    """The processes `pid` started (an elastic agent's worker runs in a session of its own)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


class Fleet:
    def __init__(
        self,
        tmp_path: Path,
        steps: int,
        extra: str = "",
        coordinator_args: tuple[str, ...] = (),
        train: str = "",
    ) -> None:
        self.tmp = tmp_path
        self.coordinator_args = coordinator_args
        self.port = _free_port()
        scenario = tmp_path / "fleet.toml"
        scenario.write_text(SCENARIO.format(steps=steps, train=train) + extra)
        self.out = tmp_path / "run"
        self.scenario = scenario
        self.names = load_scenario(scenario).fleet.device_names()
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
            *self.coordinator_args,
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

    def kill(self, name: str) -> None:
        """kill -9 of the device: its process and whatever it started (an elastic worker)."""
        pid = self.devices[name].pid
        for p in [pid, *_children(pid)]:
            os.kill(p, signal.SIGKILL)
        self.devices[name].wait()

    def progress(self, name: str) -> int:
        key = progress_key(name)
        return int(unchecked(self.store.get(key))) if self.store.check([key]) else 0

    def wait_for(self, name: str, step: int) -> None:
        def reached() -> bool:
            assert self.coordinator.poll() is None, self.logs()
            return self.progress(name) >= step

        self._until(reached, f"{name} did not reach step {step}")

    def finish(self) -> dict[str, Any]:
        self._until(lambda: self.coordinator.poll() is not None, "the run did not end")
        assert self.coordinator.returncode == 0, self.logs()
        for p in self.devices.values():
            p.wait(timeout=STALL_S)  # they end once the coordinator has
        return json.loads((self.out / "summary.json").read_text())

    def _until(self, done: Callable[[], bool], what: str) -> None:
        """Poll `done`; fail only if no device commits a step for `STALL_S`."""
        seen, since = self._steps(), time.monotonic()
        while not done():
            now = self._steps()
            if now != seen:
                seen, since = now, time.monotonic()
            assert time.monotonic() - since < STALL_S, f"{what} (stalled): {self.logs()}"
            time.sleep(0.05)

    def _steps(self) -> tuple[int, ...]:
        try:
            return tuple(self.progress(n) for n in self.names)
        except (RuntimeError, OSError):  # the coordinator has ended (or is restarting)
            return ()

    def check_late_join(self, late: str, steps: int, after_step: int) -> None:
        """The run ends; `late`, started once the others were past `after_step`, caught up
        with them (took their state), then committed every step with them."""
        summary = self.finish()
        by_name = {d["name"]: d for d in summary["per_device"]}
        assert set(by_name) == {"dev-0", "dev-1", "dev-2"}
        d = by_name[late]
        assert 0 < d["steps"] <= steps - after_step and d["final_step"] == steps
        assert d["samples"] > 0
        assert summary["replicas_consistent"]
        rows = [json.loads(x) for x in (self.out / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["num_members"] == 3

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

    def make(
        steps: int,
        extra: str = "",
        coordinator_args: tuple[str, ...] = (),
        train: str = "",
        folder: Path | None = None,
    ) -> Fleet:
        """A fleet in `tmp_path` (or `folder`, for a second fleet beside the first)."""
        made.append(Fleet(folder or tmp_path, steps, extra, coordinator_args, train))
        return made[-1]

    yield make
    for f in made:
        f.close()
