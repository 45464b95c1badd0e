"""Stand-ins for a real-fleet device's surroundings: the coordinator's store in a dict, an
engine with one member, and a device of a small scenario (shared by the device-loop and the
fleet-recovery tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edgeddl.config.loader import load_scenario
from edgeddl.runtime.fleet.device import DeviceRun
from edgeddl.runtime.fleet.device_setup import DeviceOptions

SCENARIO = """
[run]
name = "loop"
threads = 1

[[fleet.devices]]
name = "dev"
profile = "pc"
count = 2

[data]
dataset = "mnist1d"
num_samples = 600

[model]
name = "cnn1d"

[train]
global_batch = 32
num_steps = {steps}
eval_every = 5
"""


class DictStore:
    """The coordinator's store, in a dict."""

    def __init__(self) -> None:
        self.kv: dict[str, bytes] = {}

    def get(self, key: str) -> bytes:
        return self.kv[key]

    def set(self, key: str, value: str | bytes) -> None:
        self.kv[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys: list[str]) -> bool:
        return all(k in self.kv for k in keys)

    def add(self, key: str, n: int) -> int:
        v = int(self.kv.get(key, b"0")) + n
        self.kv[key] = str(v).encode()
        return v

    def delete_key(self, key: str) -> bool:
        return self.kv.pop(key, None) is not None


class Alone:
    """An engine with one member: the sum is the contribution itself."""

    def __init__(self, fail_at: set[int] = frozenset(), on_commit: Any = None) -> None:
        self.step, self.fail_at, self.on_commit = 0, fail_at, on_commit
        self.error: Exception | None = None

    def start_step(self) -> tuple[int, int | None]:
        self.error = None
        return 1, 0

    def current_step(self) -> int:
        return self.step

    def allreduce_sum(self, t: torch.Tensor) -> bool:
        return self.step not in self.fail_at

    def report_error(self, e: Exception) -> None:
        self.error = e

    def should_commit(self) -> bool:
        if self.error is not None or self.step in self.fail_at:
            return False
        self.step += 1
        if self.on_commit is not None:
            self.on_commit()
        return True

    def is_lead(self) -> bool:
        return True

    def batches_committed(self) -> int:
        return self.step

    def catch_up(self, step: int, batches_committed: int) -> None:
        self.step = step


def device_run(tmp_path: Path, steps: int, extra: str = "", name: str = "dev-0") -> DeviceRun:
    """Device `name` of the two-device scenario (with `extra` TOML appended)."""
    path = tmp_path / "loop.toml"
    path.write_text(SCENARIO.format(steps=steps) + extra)
    scenario = load_scenario(path)
    idx = scenario.fleet.device_names().index(name)
    return DeviceRun(DeviceOptions(coordinator="127.0.0.1:1", name=name), scenario, idx)


def params(run: DeviceRun) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.strategy.params]
