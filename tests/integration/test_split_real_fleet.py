"""Split learning on a real fleet: device processes hold the fronts, the coordinator the
rear (`runtime/fleet/split_rear.py`), on torchft and on torchrun elastic, with a kill -9."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

torchft = pytest.importorskip("torchft")

# Real processes on localhost: 10-40 s each on an idle 2-core machine (`-m "not slow"` skips).
pytestmark = pytest.mark.slow

SPLIT = 'strategy = "split"\n'


def _rows(fleet) -> list[dict]:  # type: ignore[no-untyped-def]
    return [json.loads(x) for x in (fleet.out / "metrics.jsonl").read_text().splitlines()]


def test_splitfed_on_torchft_survives_a_kill_9_with_one_rear_step_per_step(fleet_factory) -> None:
    steps = 150
    fleet = fleet_factory(
        steps=steps,
        train=SPLIT,
        extra="\n[split]\ncut = 1\nsplitfed = true\n",
        coordinator_args=("--min-devices", "3"),
    )
    for i in range(3):
        fleet.start(f"dev-{i}")
    fleet.wait_for("dev-1", 30)
    fleet.kill("dev-1")
    summary = fleet.finish()
    assert sorted(summary["devices_finished"]) == ["dev-0", "dev-2"]
    assert all(d["final_step"] == steps for d in summary["per_device"])
    assert summary["replicas_consistent"]  # one averaged front on every survivor
    split = summary["split"]
    # The rear stepped once for every committed step, whichever member told it first.
    assert split["rear_steps"] == steps and split["requests_refused"] == []
    assert split["splitfed"] and split["cut_bytes_up"] > 0 and split["cut_bytes_down"] > 0
    rows = _rows(fleet)  # the coordinator tested the lead's front with its rear
    assert rows[-1]["step"] == steps and rows[-1]["num_members"] == 2
    assert summary["final_test_accuracy"] > 0.3  # chance is 0.1; 0.45 measured at 150 steps


def test_u_shaped_split_with_int8_cut_on_elastic(fleet_factory) -> None:
    """Labels stay on the devices, each keeps its own front and head, the cut travels as
    int8: two devices on the elastic engine."""
    steps = 60
    fleet = fleet_factory(
        steps=steps,
        train=SPLIT,
        extra=(
            '\n[split]\ncut = 1\nlabels = "u_shaped"\nhead_cut = "5"\n'
            '[split.compression]\ncompressor = "int8"\n'
        ),
        coordinator_args=("--engine", "elastic", "--min-devices", "2"),
    )
    for i in range(2):
        fleet.start(f"dev-{i}")
    summary = fleet.finish()
    assert summary["engine"] == "elastic"
    assert sorted(summary["devices_finished"]) == ["dev-0", "dev-1"]
    assert all(d["checksum"] is None for d in summary["per_device"])  # fronts are their own
    split = summary["split"]
    assert split["rear_steps"] == steps and split["labels"] == "u_shaped"
    assert split["cut_compression_ratio"] > 3  # a byte a value and a scale a sample
    assert summary["samples"] == steps * 96
    assert summary["final_test_accuracy"] > 0.15  # chance is 0.1


def test_a_restarted_coordinator_resumes_the_rear_and_the_devices_carry_on(fleet_factory) -> None:
    steps = 300
    fleet = fleet_factory(steps=steps, train=SPLIT, extra="\n[split]\ncut = 1\nsplitfed = true\n")
    fleet.coordinator.kill()  # start again with a short checkpoint interval
    fleet.coordinator.wait()
    fleet.start_coordinator("--checkpoint-every", "20", "--min-devices", "2")
    fleet.start("dev-0")
    fleet.start("dev-1")
    fleet.wait_for("dev-0", 50)
    fleet.wait_for("dev-1", 50)
    rear = fleet.out / "rear.pt"
    end = time.monotonic() + 60
    while not rear.exists():
        assert time.monotonic() < end, fleet.logs()
        time.sleep(0.05)
    os.kill(fleet.coordinator.pid, signal.SIGKILL)
    fleet.coordinator.wait()
    fleet.start_coordinator("--checkpoint-every", "20", "--min-devices", "2")
    summary = fleet.finish()
    split = summary["split"]
    resumed = split["rear_resumed_from_step"]
    assert resumed is not None and resumed >= 20 and resumed % 20 == 0
    for d in summary["per_device"]:  # they outlived the coordinator and went on
        assert d["final_step"] == steps and d["coordinator_reconnects"] == 1
    # The new rear stepped for every step after the restart; the steps between its
    # checkpoint and the crash are the ones the rear lost.
    assert 0 < split["rear_steps"] <= steps - resumed
    assert summary["replicas_consistent"] and summary["final_test_accuracy"] > 0.3
