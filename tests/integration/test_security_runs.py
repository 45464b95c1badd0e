"""Simulated runs with `[security]` on: sealed payloads, the run's ledger, and the faults the
coordinator must refuse (forged, tampered, replayed, oversized, from an impostor) while
training goes on."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from small_fleet import SMALL_FLEET, check_summary

import edgeddl
from edgeddl.cli.main import main
from edgeddl.config.loader import ConfigError, scenario_from_dict
from edgeddl.runtime.fleet.device_setup import check_real_fleet
from edgeddl.security.handshake import handshake_bytes
from edgeddl.security.keys import Identity, save_identity
from edgeddl.security.ledger import LEDGER_FILE, model_digest, read_entries

DEVICES = ("pc", "jetson", "pi-0", "pi-1")
STEPS = 20


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Private keys of the coordinator and every device in one folder, and the scenario's
    [security] table enrolling their public keys."""
    folder = tmp_path_factory.mktemp("keys")

    def enroll(name: str) -> dict[str, str]:
        identity = Identity.generate(name)
        save_identity(identity, folder)
        return dataclasses.asdict(identity.public().to_config())

    table = {
        "enabled": True,
        "keys_dir": str(folder),
        "max_payload_bytes": 65536,  # the 1-D CNN's dense gradient is about 20 kB
        "coordinator": enroll("coordinator"),
        "devices": {n: enroll(n) for n in DEVICES},
    }
    return folder, table


def _raw(security: dict[str, Any] | None, fault: str = "none") -> dict[str, Any]:
    raw = copy.deepcopy(SMALL_FLEET)
    raw["train"].update(num_steps=STEPS, eval_every=STEPS)
    if security is not None:
        raw["security"] = copy.deepcopy(security)
    if fault != "none":  # both Pis misbehave
        raw["fleet"]["devices"][2]["envelope_fault"] = fault
    return raw


def _run(raw: dict[str, Any], out: Path) -> dict[str, Any]:
    return edgeddl.run(scenario_from_dict(raw), out_dir=out, progress=False).summary


def test_a_secured_run_costs_its_envelopes_and_leaves_a_verifiable_ledger(
    keys: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = _run(_raw(None), tmp_path / "plain")
    out = tmp_path / "sealed"
    sealed = _run(_raw(keys[1]), out)
    check_summary(sealed)
    # Every payload up and every model down is larger by its envelope, and each device
    # made one session handshake: nothing else.
    steps = sum(d["steps"] for d in sealed["per_device"])
    run_id = sealed["security"]["run_id"]
    hellos = sum(handshake_bytes(run_id, d["name"], "coordinator")[0] for d in sealed["per_device"])
    extra_up = sealed["bytes_up"] - plain["bytes_up"] - hellos
    assert extra_up > 0 and extra_up % steps == 0 and 150 < extra_up // steps < 300
    assert sealed["bytes_down"] > plain["bytes_down"]
    # Sealing and opening is device work: more compute, and a longer run.
    assert sealed["breakdown_s"]["compute"] > plain["breakdown_s"]["compute"]
    assert sealed["virtual_time_s"] > plain["virtual_time_s"]
    # The ledger: the run, an update per device and an aggregate per step, the end.
    entries, torn = read_entries(out / LEDGER_FILE)
    kinds = [e["kind"] for e in entries if e is not None]
    assert torn == 0 and kinds[0] == "run" and kinds[-1] == "run_end"
    assert kinds.count("update") == steps and kinds.count("aggregate") == STEPS
    state = torch.load(out / "model.pt", weights_only=True)
    assert sealed["model_digest"] == model_digest(state) == entries[-1]["payload"]["model_digest"]
    assert sealed["security"]["num_rejected"] == 0
    trusted = ["--keys", str(keys[0])]  # the auditor's keys, not the run folder's
    assert main(["ledger", "verify", str(out), *trusted]) == 0
    assert f"{len(entries)} entries verified" in capsys.readouterr().out
    # A rewritten entry breaks verification, with one line.
    lines = (out / LEDGER_FILE).read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b'"step":0', b'"step":9')
    (out / LEDGER_FILE).write_bytes(b"\n".join(lines))
    assert main(["ledger", "verify", str(out), *trusted]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("forged_signature", "bad_signature"),
        ("tampered", "tampered"),
        ("replayed", "replayed"),
        ("oversized", "oversized"),
        ("impostor", "unknown_sender"),
    ],
)
def test_each_bad_payload_is_refused_recorded_and_training_goes_on(
    keys: tuple[Path, dict[str, Any]], tmp_path: Path, fault: str, reason: str
) -> None:
    s = _run(_raw(keys[1], fault), tmp_path)
    check_summary(s)
    sec = s["security"]
    # Replaying, a Pi's first payload is accepted once; every later copy is refused.
    refused = 2 * (STEPS - 1) if fault == "replayed" else 2 * STEPS
    assert sec["rejected_by_reason"] == {reason: refused}
    assert {r["device"] for r in sec["rejected_payloads"]} == {"pi-0", "pi-1"}
    by_name = {d["name"]: d for d in s["per_device"]}
    assert by_name["pc"]["steps"] == by_name["jetson"]["steps"] == STEPS
    assert by_name["pi-0"]["steps"] == (1 if fault == "replayed" else 0)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == STEPS and rows[-1]["test_loss"] < rows[0]["test_loss"]
    entries, _ = read_entries(tmp_path / LEDGER_FILE)
    rejects = [e for e in entries if e is not None and e["kind"] == "reject"]
    assert len(rejects) == refused and all(e["payload"]["reason"] == reason for e in rejects)
    assert main(["ledger", "verify", str(tmp_path)]) == 0


def test_security_settings_are_checked_with_one_line(
    keys: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"envelope_fault: tampered needs sealed payloads"):
        scenario_from_dict(_raw(None, "tampered"))
    no_dir = {**keys[1], "keys_dir": ""}
    with pytest.raises(ConfigError, match=r"^security\.keys_dir: the simulator plays every"):
        _run(_raw(no_dir), tmp_path)
    swapped = copy.deepcopy(keys[1])
    swapped["devices"]["pc"], swapped["devices"]["jetson"] = (
        swapped["devices"]["jetson"],
        swapped["devices"]["pc"],
    )
    with pytest.raises(ConfigError, match=r"is not the identity the scenario enrolls as 'pc'"):
        _run(_raw(swapped), tmp_path)
    ring = _raw(keys[1])
    ring["train"]["topology"] = "ring"
    with pytest.raises(ConfigError, match=r'^security\.enabled: .*topology = "star"'):
        _run(ring, tmp_path)
    check_real_fleet(scenario_from_dict(_raw(keys[1])))  # a real fleet seals too
    with pytest.raises(ConfigError, match=r"^security\.keys_dir: each party of a real fleet"):
        check_real_fleet(scenario_from_dict(_raw(no_dir)))
    with pytest.raises(ConfigError, match=r'^security\.enabled: .*topology = "star"'):
        check_real_fleet(scenario_from_dict(ring))


@pytest.mark.parametrize(
    "split",
    [{"cut": 1, "splitfed": True}, {"cut": 1, "labels": "u_shaped", "head_cut": "5"}],
    ids=["splitfed", "u_shaped"],
)
def test_split_learnings_cut_tensors_are_sealed_and_recorded(
    keys: tuple[Path, dict[str, Any]], tmp_path: Path, split: dict[str, Any]
) -> None:
    """Every message of a device's chain travels in its own envelope; a tampering Pi's
    share is left out like a lost device's; the ledger verifies."""

    def raw(security: dict[str, Any] | None, fault: str = "none") -> dict[str, Any]:
        r = _raw(security, fault)
        r["train"]["strategy"] = "split"
        r["split"] = split
        return r

    security = {**keys[1], "max_payload_bytes": 1 << 22}  # activations: 16x a sample
    plain = _run(raw(None), tmp_path / "plain")
    sealed = _run(raw(security), tmp_path / "sealed")
    check_summary(sealed)
    assert sealed["security"]["num_rejected"] == 0
    device_steps = sum(d["steps"] for d in sealed["per_device"])
    extra = sealed["split"]["cut_bytes_up"] + sealed["split"]["cut_bytes_down"]
    assert extra == plain["split"]["cut_bytes_up"] + plain["split"]["cut_bytes_down"]
    assert sealed["virtual_time_s"] > plain["virtual_time_s"]  # envelopes and crypto
    # Two messages up a step (activations and labels, then the front: SplitFed; or the
    # activations, then the head's gradient: U-shaped), each in an envelope of ~200 bytes.
    extra_up = (sealed["bytes_up"] - plain["bytes_up"]) / device_steps
    assert 2 * 150 < extra_up < 2 * 300
    assert main(["ledger", "verify", str(tmp_path / "sealed")]) == 0
    bad = _run(raw(security, "tampered"), tmp_path / "bad")
    assert bad["security"]["rejected_by_reason"] == {"tampered": 2 * STEPS}
    by_name = {d["name"]: d for d in bad["per_device"]}
    assert by_name["pi-0"]["steps"] == 0 and by_name["pc"]["steps"] == STEPS
    assert main(["ledger", "verify", str(tmp_path / "bad")]) == 0


def test_updates_a_robust_screen_refuses_are_named_in_the_ledger(
    keys: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Pi sends NaN every step: its envelope is genuine, so it is opened and recorded,
    then the screen keeps it out. Each aggregate entry names it as screened, with the
    reason, and lists only the updates it used; the ledger verifies."""
    raw = _raw(keys[1])
    raw["fleet"]["devices"][2]["behavior"] = "nan"  # both Pis
    raw["robust"] = {"rule": "median"}
    out = tmp_path / "screened"
    summary = _run(raw, out)
    assert summary["robust"]["rejected_by_kind"] == {"non-finite": 2 * STEPS}
    entries = [e for e in read_entries(out / LEDGER_FILE)[0] if e is not None]
    updates = {e["index"]: e["payload"]["device"] for e in entries if e["kind"] == "update"}
    aggregates = [e["payload"] for e in entries if e["kind"] == "aggregate"]
    assert len(aggregates) == STEPS
    for a in aggregates:
        assert {updates[u] for u in a["updates"]} == {"pc", "jetson"}
        assert {updates[s["update"]] for s in a["screened"]} == {"pi-0", "pi-1"}
        assert {s["reason"] for s in a["screened"]} == {"non-finite values"}
    assert main(["ledger", "verify", str(out)]) == 0
    assert main(["ledger", "show", str(out)]) == 0
    assert "(non-finite values)" in capsys.readouterr().out
    # A real fleet screens only what reaches the coordinator on its own: the secured path.
    check_real_fleet(scenario_from_dict(raw))
    with pytest.raises(ConfigError, match=r"^robust: without \[security\] a real fleet"):
        check_real_fleet(scenario_from_dict({k: v for k, v in raw.items() if k != "security"}))
    raw["robust"]["device_momentum"] = True
    with pytest.raises(ConfigError, match=r"^robust\.device_momentum: runs on the simulated"):
        check_real_fleet(scenario_from_dict(raw))
