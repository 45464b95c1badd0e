"""The real fleet on 127.0.0.1 with the torchrun-elastic engine (no torchft on the devices):
kill -9 of a whole device, a device joining mid-run."""

from __future__ import annotations

import json

import pytest

# Real processes on localhost: 10-40 s each on an idle 2-core machine (`-m "not slow"` skips).
pytestmark = pytest.mark.slow

ELASTIC = ("--engine", "elastic")
PACED = """
# Steps of about 30 ms that leave the CPU free: a join (a rendezvous and a worker start on
# every device) takes seconds, and must come well before the run ends.
[profiles.paced_board]
flops_per_s = 3.0e8
memory_bytes = 4.0e9
op_overhead_s = 0.0
step_overhead_s = 0.0
io_bytes_per_s = 1.0e9
"""


def test_elastic_kill_9_of_a_device_the_others_restart_and_finish_consistent(
    fleet_factory,
) -> None:
    steps = 400
    fleet = fleet_factory(steps=steps, coordinator_args=(*ELASTIC, "--min-devices", "3"))
    for i in range(3):
        fleet.start(f"dev-{i}")
    fleet.wait_for("dev-1", 60)
    fleet.kill("dev-1")  # its agent and its worker: the device is gone
    summary = fleet.finish()
    assert summary["engine"] == "elastic"
    assert sorted(summary["devices_finished"]) == ["dev-0", "dev-2"]
    # Each survivor ends well: the first to finish deletes its own state, not theirs.
    assert [fleet.devices[n].returncode for n in ("dev-0", "dev-2")] == [0, 0], fleet.logs()
    for d in summary["per_device"]:
        assert d["final_step"] == steps
        assert d["restarts"] >= 1  # torchrun restarted its worker after the loss
        # Every step was committed once: none lost in the restart, none applied twice (a
        # survivor may have adopted one step a peer committed just before the loss).
        assert steps - 1 <= d["steps"] <= steps
        assert d["recovery_s"]
    assert summary["replicas_consistent"]  # one model on every survivor
    assert summary["final_test_accuracy"] > 0.5  # chance is 0.1
    rows = [json.loads(x) for x in (fleet.out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == steps and rows[-1]["num_members"] == 2
    # The same per-device keys as the simulator, in wall time: the breakdown adds up.
    for d in summary["per_device"]:
        assert abs(sum(d["breakdown_s"].values()) - d["time_s"]) < 1e-6
        assert d["breakdown_s"]["compute"] > 0 and d["breakdown_s"]["communication"] > 0


def test_elastic_a_device_joining_mid_run_takes_part(fleet_factory) -> None:
    steps = 800
    fleet = fleet_factory(
        steps=steps, extra=PACED, coordinator_args=(*ELASTIC, "--min-devices", "2")
    )
    for name in ("dev-0", "dev-1"):
        fleet.start(name, "--profile", "paced_board")
    fleet.wait_for("dev-0", 60)
    fleet.start("dev-2", "--profile", "paced_board")
    fleet.wait_for("dev-2", 100)
    fleet.check_late_join("dev-2", steps, after_step=60)
    assert [p.returncode for p in fleet.devices.values()] == [0, 0, 0], fleet.logs()
