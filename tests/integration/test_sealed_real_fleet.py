"""A secured real fleet: every payload sealed to the coordinator, the aggregate sealed back,
the run's ledger on the coordinator (`runtime/fleet/secure_coordinator.py`, `secure_device.py`)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgeddl.runtime.fleet.signed_store import unchecked
from edgeddl.runtime.fleet.store import KEY_RUN_ID
from edgeddl.security.keys import Identity, save_identity

torchft = pytest.importorskip("torchft")

# Real processes on localhost: 10-40 s each on an idle 2-core machine (`-m "not slow"` skips).
pytestmark = pytest.mark.slow

DEVICES = ("dev-0", "dev-1", "dev-2")

# Steps of about 0.1 s that leave the CPU free: the rogue's attacks take seconds.
PACED = """
[profiles.paced_board]
flops_per_s = 1.0e8
memory_bytes = 4.0e9
op_overhead_s = 0.0
step_overhead_s = 0.0
io_bytes_per_s = 1.0e9
"""


def _security(folder: Path, devices: tuple[str, ...] = DEVICES) -> str:
    """The [security] table enrolling fresh identities (private keys in `folder`)."""

    def enroll(name: str) -> str:
        identity = Identity.generate(name)
        save_identity(identity, folder)
        keys = dataclasses.asdict(identity.public().to_config())
        return "{ " + ", ".join(f'{k} = "{v}"' for k, v in keys.items()) + " }"

    lines = [
        "\n[security]",
        "enabled = true",
        f'keys_dir = "{folder}"',
        "max_payload_bytes = 65536",
        f"coordinator = {enroll('coordinator')}",
        "[security.devices]",
        *(f'"{n}" = {enroll(n)}' for n in devices),
    ]
    return "\n".join(lines) + "\n"


def _verify(run_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeddl", "ledger", "verify", str(run_dir)],
        capture_output=True,
        text=True,
    )


def _check(summary: dict, steps: int, run_dir: Path) -> None:  # type: ignore[type-arg]
    sec = summary["security"]
    assert sec["num_rejected"] == 0 and sec["requests_refused"] == []
    assert sec["steps_aggregated"] == steps  # the coordinator applied every committed step
    # The coordinator's replica, built from the aggregates it sealed, is the devices' model.
    assert {round(d["checksum"], 6) for d in summary["per_device"]} == {
        round(sec["coordinator_checksum"], 6)
    }
    done = _verify(run_dir)
    assert done.returncode == 0, done.stderr
    assert "final model digest" in done.stdout


@pytest.mark.parametrize(
    ("train", "extra", "steps"),
    [
        ("", "", 60),
        ("", '\n[compression]\ncompressor = "topk"\ndensity = 0.05\n', 40),
        (
            'strategy = "federated"\n',
            "\n[federated]\nlocal_steps = 10\nlocal_batch = 32\nlocal_lr = 0.1\n",
            20,
        ),
    ],
    ids=["dense", "topk", "federated"],
)
def test_sealed_payloads_on_a_real_fleet_leave_a_verifiable_ledger(
    fleet_factory, tmp_path: Path, train: str, extra: str, steps: int
) -> None:
    keys = tmp_path / "keys"
    fleet = fleet_factory(
        steps=steps,
        train=train,
        extra=extra + _security(keys),
        coordinator_args=("--min-devices", "3"),
    )
    for name in DEVICES:
        fleet.start(name)
    summary = fleet.finish()
    assert all(d["final_step"] == steps for d in summary["per_device"])
    _check(summary, steps, fleet.out)
    assert summary["final_test_accuracy"] > 0.15  # chance is 0.1
    entries = [json.loads(x) for x in (fleet.out / "ledger.jsonl").read_text().splitlines()]
    kinds = [e["kind"] for e in entries]
    assert kinds[0] == "run" and kinds[-1] == "run_end" and kinds.count("aggregate") == steps
    senders = {e["payload"]["device"] for e in entries if e["kind"] == "update"}
    assert senders == set(DEVICES)  # every device's payloads were opened and recorded


def test_bad_envelopes_on_a_real_fleet_are_refused_recorded_and_training_goes_on(
    fleet_factory, tmp_path: Path
) -> None:
    """Two more devices: one tampers with its ciphertext, one signs as an impostor. Every
    payload of theirs is refused with its reason; the honest three train on."""
    steps = 30
    bad = (
        '\n[[fleet.devices]]\nname = "tamper"\nprofile = "pc"\nenvelope_fault = "tampered"\n'
        '\n[[fleet.devices]]\nname = "fake"\nprofile = "pc"\nenvelope_fault = "impostor"\n'
    )
    names = (*DEVICES, "tamper", "fake")
    fleet = fleet_factory(
        steps=steps,
        extra=bad + _security(tmp_path / "keys", names),
        coordinator_args=("--min-devices", "5"),
    )
    for name in names:
        fleet.start(name)
    summary = fleet.finish()
    sec = summary["security"]
    assert set(sec["rejected_by_reason"]) == {"tampered", "unknown_sender"}
    assert {r["device"] for r in sec["rejected_payloads"]} == {"tamper", "fake"}
    by_name = {d["name"]: d for d in summary["per_device"]}
    assert all(by_name[n]["samples"] > 0 for n in DEVICES)
    assert by_name["tamper"]["samples"] == by_name["fake"]["samples"] == 0
    assert len(sec["requests_refused"]) == sec["num_rejected"]  # each told its sender why
    _check(
        {**summary, "security": {**sec, "num_rejected": 0, "requests_refused": []}},
        steps,
        fleet.out,
    )
    entries = [json.loads(x) for x in (fleet.out / "ledger.jsonl").read_text().splitlines()]
    assert sum(e["kind"] == "reject" for e in entries) == sec["num_rejected"] > 0


def test_split_learning_sealed_on_a_real_fleet(fleet_factory, tmp_path: Path) -> None:
    """SplitFed with every cut tensor sealed both ways, and a fourth device that tampers
    with its ciphertexts: refused each step, it sits out; the three train on."""
    steps = 40
    extra = (
        '\n[[fleet.devices]]\nname = "tamper"\nprofile = "pc"\nenvelope_fault = "tampered"\n'
        "\n[split]\ncut = 1\nsplitfed = true\n"
    )
    names = (*DEVICES, "tamper")
    fleet = fleet_factory(
        steps=steps,
        train='strategy = "split"\n',
        extra=extra + _security(tmp_path / "keys", names).replace("65536", "4194304"),
        coordinator_args=("--min-devices", "4"),
    )
    for name in names:
        fleet.start(name)
    summary = fleet.finish()
    sec, split = summary["security"], summary["split"]
    assert split["rear_steps"] == steps and sec["steps_aggregated"] == steps
    assert split["rear_steps_dropped"] == 0  # each step on most of its senders' word
    assert set(sec["rejected_by_reason"]) == {"tampered"} and sec["num_rejected"] > 0
    by_name = {d["name"]: d for d in summary["per_device"]}
    assert by_name["tamper"]["samples"] == 0 and all(by_name[n]["samples"] > 0 for n in DEVICES)
    assert summary["replicas_consistent"]  # the averaged front, the tamperer's too
    done = _verify(fleet.out)
    assert done.returncode == 0, done.stderr
    assert summary["final_test_accuracy"] > 0.15  # chance is 0.1


def test_sealed_on_elastic_survives_a_kill_9(fleet_factory, tmp_path: Path) -> None:
    """torchrun elastic restarts every worker after a loss: each opens a new link, and its
    hello tells it the sequence number to go on from, so nothing it sends looks replayed."""
    steps = 200
    fleet = fleet_factory(
        steps=steps,
        extra=_security(tmp_path / "keys"),
        coordinator_args=("--engine", "elastic", "--min-devices", "3"),
    )
    for name in DEVICES:
        fleet.start(name)
    fleet.wait_for("dev-1", 40)
    fleet.kill("dev-1")
    summary = fleet.finish()
    assert sorted(summary["devices_finished"]) == ["dev-0", "dev-2"]
    for d in summary["per_device"]:
        assert d["final_step"] == steps and d["restarts"] >= 1
    sec = summary["security"]
    assert sec["num_rejected"] == 0  # no envelope of a restarted worker was taken for a replay
    assert sec["steps_aggregated"] == steps
    assert summary["replicas_consistent"]
    assert {round(d["checksum"], 6) for d in summary["per_device"]} == {
        round(sec["coordinator_checksum"], 6)
    }
    done = _verify(fleet.out)
    assert done.returncode == 0, done.stderr


def test_a_robust_rule_on_a_sealed_real_fleet_outlasts_hostile_devices(
    fleet_factory, tmp_path: Path
) -> None:
    """Three honest devices, one sending its gradient x -10 and one sending NaN. The
    coordinator opens each payload, its screen keeps the NaN out (named in every aggregate
    entry) and the median of the other four is what every replica applies."""
    steps = 120
    bad = (
        '\n[[fleet.devices]]\nname = "flip"\nprofile = "pc"\nbehavior = "scaled"\n'
        "behavior_scale = -10.0\n"
        '\n[[fleet.devices]]\nname = "nan"\nprofile = "pc"\nbehavior = "nan"\n'
    )
    names = (*DEVICES, "flip", "nan")
    fleet = fleet_factory(
        steps=steps,
        extra=bad + '\n[robust]\nrule = "median"\n' + _security(tmp_path / "keys", names),
        coordinator_args=("--min-devices", "5"),
    )
    for name in names:
        fleet.start(name)
    summary = fleet.finish()
    robust = summary["robust"]
    assert {r["device"] for r in robust["rejected_updates"]} == {"nan"}
    assert robust["rejected_by_kind"] == {"non-finite": robust["num_rejected"]}
    assert robust["num_rejected"] > steps // 2
    _check(summary, steps, fleet.out)  # every replica is the coordinator's
    # The simulator's same fleet: 0.36 (0.45 without the two; 0.10, chance, with the mean).
    # Measured here: 0.27.
    assert summary["final_test_accuracy"] > 0.2
    entries = [json.loads(x) for x in (fleet.out / "ledger.jsonl").read_text().splitlines()]
    device = {e["index"]: e["payload"]["device"] for e in entries if e["kind"] == "update"}
    screened = [
        device[s["update"]]
        for e in entries
        if e["kind"] == "aggregate"
        for s in e["payload"].get("screened", [])
    ]
    assert set(screened) == {"nan"} and len(screened) == robust["num_rejected"]


def test_a_device_joining_a_sealed_fleet_heals_from_the_coordinator(
    fleet_factory, tmp_path: Path
) -> None:
    """torchft heals a joiner; in a sealed fleet the state comes from the coordinator's
    replica over the joiner's session (`heal.py`), never from a peer."""
    keys, steps = tmp_path / "keys", 300
    fleet = fleet_factory(
        steps=steps, extra=PACED + _security(keys), coordinator_args=("--min-devices", "2")
    )
    for name in DEVICES[:2]:
        fleet.start(name, "--profile", "paced_board")
    fleet.wait_for("dev-0", 20)
    fleet.start("dev-2", "--profile", "paced_board")
    fleet.wait_for("dev-2", 1)
    fleet.check_late_join("dev-2", steps, after_step=20)
    _check(json.loads((fleet.out / "summary.json").read_text()), steps, fleet.out)


def test_a_restarted_coordinator_of_a_sealed_fleet_resumes_its_replica(
    fleet_factory, tmp_path: Path
) -> None:
    """kill -9 of the coordinator: the new one resumes its replica from the checkpoint, and
    the devices go on from the coordinator's state (not their own, newer one), so every
    replica is the coordinator's at the end. The new coordinator is a new run: the devices
    bind to its run id and prove it with its handshake."""
    keys, steps = tmp_path / "keys", 300
    fleet = fleet_factory(steps=steps, extra=PACED + _security(keys))
    fleet.coordinator.kill()  # start again with a short checkpoint interval
    fleet.coordinator.wait()
    fleet.start_coordinator("--checkpoint-every", "20", "--min-devices", "2")
    for name in DEVICES[:2]:
        fleet.start(name, "--profile", "paced_board", "--keys", str(keys))
    fleet.wait_for("dev-0", 45)
    fleet.wait_for("dev-1", 45)
    assert (fleet.out / "checkpoint.pt").exists()
    first_run = unchecked(fleet.store.get(KEY_RUN_ID)).decode()
    os.kill(fleet.coordinator.pid, signal.SIGKILL)
    fleet.coordinator.wait()
    fleet.start_coordinator("--checkpoint-every", "20", "--min-devices", "2")
    summary = fleet.finish()
    resumed = summary["resumed_from_step"]
    assert resumed is not None and resumed >= 20
    for d in summary["per_device"]:
        assert d["final_step"] == steps and d["coordinator_reconnects"] == 1
    sec = summary["security"]
    assert {round(d["checksum"], 6) for d in summary["per_device"]} == {
        round(sec["coordinator_checksum"], 6)
    }
    assert summary["replicas_consistent"] and summary["final_test_accuracy"] > 0.3
    assert sec["run_id"] not in ("", first_run)
    assert "another run" not in fleet.logs()
