"""`edgeddl ledger verify | head | show` on run folders: the attacks a folder's own keys let
through, each now refused with one line against keys the auditor brings (`--keys`,
`--scenario`), signed heads (`--head`), and a small secured run checked end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from ledger_folder import (
    RUN,
    cut,
    entries,
    identities,
    model,
    save_public_keys,
    write_files,
    write_run,
)

import edgeddl
from edgeddl.cli.main import main
from edgeddl.config.loader import scenario_from_dict
from edgeddl.io import write_model_atomic
from edgeddl.security.keys import Identity
from edgeddl.security.ledger import (
    CONFIG_FILE,
    HEAD_FILE,
    LEDGER_FILE,
    MODEL_FILE,
    SUMMARY_FILE,
    closing_payload,
    file_sha256,
    model_digest,
)

WARNING = "edgeddl: warning: trusting the keys in"


@pytest.fixture(scope="module")
def ids() -> dict[str, Identity]:
    return identities()


@pytest.fixture
def keys(tmp_path: Path, ids: dict[str, Identity]) -> Path:
    """The auditor's own copy of the public keys (NAME.pub; the .key files beside them are
    what `ledger head` signs with)."""
    return save_public_keys(tmp_path / "keys", ids)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    rc = main(["ledger", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _refused(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> str:
    """The one line `ledger verify` refuses with (exit 2)."""
    rc, _, err = _cli(capsys, "verify", *argv)
    lines = [x for x in err.strip().splitlines() if not x.startswith(WARNING)]
    assert rc == 2 and len(lines) == 1, err
    return lines[0]


def test_a_clean_run_verifies_against_keys_scenario_and_head(
    tmp_path: Path, ids: dict[str, Identity], keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "run", ids)
    rc, out, err = _cli(capsys, "verify", run, "--keys", keys)
    assert rc == 0 and err == ""
    assert "14 entries verified (chain, roles, signatures, receipts, final model digest)" in out
    assert "config.resolved.toml, model.pt, summary.json match the ledger" in out
    assert f"keys from --keys {keys}" in out
    scenario = shutil.copy(run / CONFIG_FILE, tmp_path / "mine.toml")  # the auditor's copy
    rc, out, err = _cli(capsys, "verify", run, "--scenario", scenario)
    assert rc == 0 and err == "" and f"keys from {scenario}" in out
    # The run's own head, and one signed now with the coordinator's key file.
    rc, out, _ = _cli(capsys, "verify", run, "--keys", keys, "--head", run / HEAD_FILE)
    assert rc == 0 and "the signed head's 14 entries" in out
    published = tmp_path / "published" / "head.json"
    rc, out, _ = _cli(capsys, "head", run, "--key", keys / "coordinator.key", "--out", published)
    assert rc == 0 and f"wrote {published}: the signed head of 14 entries of run {RUN}" in out
    assert _cli(capsys, "verify", run, "--keys", keys, "--head", published)[0] == 0
    # `show` names the files the ledger vouches for, and the head beside it.
    rc, out, _ = _cli(capsys, "show", run)
    assert rc == 0 and "format 2" in out and "config " in out
    assert "model.pt " in out and "summary.json " in out
    assert f"{HEAD_FILE}: coordinator signed a head of 14 entries" in out


def test_without_a_trust_root_it_warns_and_a_forged_history_verifies_only_then(
    tmp_path: Path, ids: dict[str, Identity], keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A forger writes a whole run with fresh keys, config.resolved.toml enrolling them."""
    forged = write_run(tmp_path / "forged", identities())
    rc, out, err = _cli(capsys, "verify", forged)
    assert rc == 0 and "14 entries verified" in out
    assert len(err.strip().splitlines()) == 1 and err.startswith(WARNING)
    assert "--keys DIR" in err and "--scenario FILE" in err
    assert _refused(capsys, forged, "--keys", keys).endswith(
        "ledger.jsonl: entry 0: bad signature by 'coordinator'"
    )


def test_a_stolen_device_key_cannot_replace_the_end_even_with_files_to_match(
    tmp_path: Path, ids: dict[str, Identity], keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With pi-0's private key: the last aggregate and run_end replaced, model.pt and
    summary.json swapped to match them. Refused with the scenario pinned too."""
    run = write_run(tmp_path / "run", ids)
    scenario = shutil.copy(run / CONFIG_FILE, tmp_path / "mine.toml")
    thief, evil = ids["pi-0"], model(99)
    (run / HEAD_FILE).unlink()
    with cut(run, 12) as ledger:
        digest = model_digest(evil)
        ledger.append(thief, "aggregate", {"step": 1, "updates": [8, 10], "model_digest": digest})
        write_files(run, evil, RUN, 14)
        ledger.append(thief, "run_end", closing_payload(run, digest))
    error = "entry 12: 'pi-0' is a device and signed an entry of kind aggregate"
    assert error in _refused(capsys, run, "--scenario", scenario)
    assert error in _refused(capsys, run, "--keys", keys)


def test_the_files_are_the_ones_the_closing_entry_signed(
    tmp_path: Path, ids: dict[str, Identity], keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "run", ids)
    model_pt, summary = run / MODEL_FILE, run / SUMMARY_FILE
    good_model, good_summary = model_pt.read_bytes(), summary.read_bytes()
    # model.pt swapped for another model (its digest in summary.json edited to match).
    write_model_atomic(model_pt, model(99))
    text = json.loads(good_summary)
    summary.write_text(json.dumps({**text, "model_digest": model_digest(model(99))}))
    line = _refused(capsys, run, "--keys", keys)
    assert line.startswith(f"edgeddl: error: {model_pt}: not the file the closing entry names")
    # summary.json edited (its model digest back, one other number changed).
    model_pt.write_bytes(good_model)
    summary.write_text(json.dumps({**text, "status": "completed!"}))
    line = _refused(capsys, run, "--keys", keys)
    assert line.startswith(f"edgeddl: error: {summary}: not the file the closing entry names")
    summary.write_bytes(good_summary)
    assert _cli(capsys, "verify", run, "--keys", keys)[0] == 0
    for missing in (model_pt, summary, run / CONFIG_FILE):
        saved = missing.read_bytes()
        missing.unlink()
        line = _refused(capsys, run, "--keys", keys)
        assert line.startswith(f"edgeddl: error: {missing}: missing; ")
        missing.write_bytes(saved)


def test_a_closing_entry_without_the_files_digests_is_refused(
    tmp_path: Path, ids: dict[str, Identity], keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The coordinator's own run_end naming only the model's digest, as format 1 did."""
    run = write_run(tmp_path / "run", ids)
    with cut(run, 13) as ledger:
        ledger.append(ids["coordinator"], "run_end", {"model_digest": model_digest(model(1))})
    assert _refused(capsys, run, "--keys", keys).endswith(
        "entry 13: a run_end entry without model_sha256 (a SHA-256 in hex)"
    )


def test_a_run_copied_into_another_runs_folder_is_refused(
    tmp_path: Path, ids: dict[str, Identity], keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ledger, summary and model of run A over run B's: B's config is not A's. Two runs of
    the same config differ only by their run id: B's published head catches that."""
    a = write_run(tmp_path / "a", ids, run_id="run-a", name="a")
    b = write_run(tmp_path / "b", ids, run_id="run-b", name="b")
    same = write_run(tmp_path / "same", ids, run_id="run-same", name="a")
    head_b, head_same = tmp_path / "b.head.json", tmp_path / "same.head.json"
    shutil.copy(b / HEAD_FILE, head_b)
    shutil.copy(same / HEAD_FILE, head_same)
    for target in (b, same):
        for name in (LEDGER_FILE, MODEL_FILE, SUMMARY_FILE, HEAD_FILE):
            shutil.copy(a / name, target / name)
    line = _refused(capsys, b, "--keys", keys)
    assert f"{b / CONFIG_FILE}: not the file the run entry names" in line
    assert "or the ledger belongs to another run's folder" in line
    assert _refused(capsys, b, "--keys", keys, "--head", head_b).endswith(
        "head: it is of run 'run-b', this ledger of run 'run-a'"
    )
    assert _cli(capsys, "verify", same, "--keys", keys)[0] == 0  # identical configs
    assert _refused(capsys, same, "--keys", keys, "--head", head_same).endswith(
        "head: it is of run 'run-same', this ledger of run 'run-a'"
    )


def test_truncation_under_partial_is_caught_by_a_head(
    tmp_path: Path, ids: dict[str, Identity], keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "run", ids, close=False)  # a crash: no closing entry
    head = tmp_path / "head.json"
    assert _cli(capsys, "head", run, "--key", keys / "coordinator.key", "--out", head)[0] == 0
    assert "the run ended but the ledger does not" in _refused(capsys, run, "--keys", keys)
    rc, out, _ = _cli(capsys, "verify", run, "--keys", keys, "--partial", "--head", head)
    assert rc == 0 and "no closing entry: model.pt, summary.json unchecked" in out
    cut(run, 8).close()  # the last step and a half gone
    assert _cli(capsys, "verify", run, "--keys", keys, "--partial")[0] == 0
    assert _refused(capsys, run, "--keys", keys, "--partial", "--head", head).endswith(
        "head: it names 13 entries, the ledger holds 8: it was cut short"
    )


def test_a_head_with_a_bad_signature_is_refused(
    tmp_path: Path, ids: dict[str, Identity], keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "run", ids)
    head = json.loads((run / HEAD_FILE).read_text())
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({**head, "entries": 12}))  # a shorter ledger, "vouched for"
    assert _refused(capsys, run, "--keys", keys, "--head", forged).endswith(
        "head: its signature is not the trusted coordinator key's (forged or altered)"
    )
    forged.write_text("{not json")
    assert f"{forged}: " in _refused(capsys, run, "--keys", keys, "--head", forged)


def test_an_older_format_ledger_is_refused_in_one_line(
    tmp_path: Path, ids: dict[str, Identity], keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "run", ids)
    lines = (run / LEDGER_FILE).read_bytes().split(b"\n")
    first = json.loads(lines[0])
    del first["payload"]["format"]  # as format 1 wrote it (its signatures differ too)
    lines[0] = json.dumps(first, sort_keys=True, separators=(",", ":")).encode()
    (run / LEDGER_FILE).write_bytes(b"\n".join(lines))
    assert _refused(capsys, run, "--keys", keys).endswith(
        "entry 0: ledger format 1, written by an older edgeddl: this one verifies format 2 "
        "only (verify it with the edgeddl that wrote it)"
    )


def test_trust_root_and_head_arguments_are_checked_with_one_line(
    tmp_path: Path, ids: dict[str, Identity], keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = write_run(tmp_path / "run", ids)
    with pytest.raises(SystemExit):  # argparse: the two trust roots exclude each other
        main(["ledger", "verify", str(run), "--keys", str(keys), "--scenario", "x.toml"])
    assert "not allowed with argument" in capsys.readouterr().err
    assert "no such folder" in _refused(capsys, run, "--keys", tmp_path / "nowhere")
    (keys / "pi-1.pub").write_text("garbage")
    assert "pi-1.pub: damaged: not a PEM key file" in _refused(capsys, run, "--keys", keys)
    (keys / "pi-1.pub").unlink()
    (keys / "coordinator.pub").unlink()
    assert "no coordinator.pub in it" in _refused(capsys, run, "--keys", keys)
    # A head is the coordinator's to sign: another key, or none the config names, is refused.
    rc, _, err = _cli(capsys, "head", run, "--key", keys / "pi-0.key")
    assert rc == 2 and "a head is signed with coordinator.key" in err
    stranger = tmp_path / "stranger"
    save_public_keys(stranger, {"coordinator": Identity.generate("coordinator")})
    rc, _, err = _cli(capsys, "head", run, "--key", stranger / "coordinator.key")
    assert rc == 2 and "it is not this run's coordinator key" in err
    rc, _, err = _cli(capsys, "head", run)  # the hand-written config names no keys_dir
    assert rc == 2 and "names no security.keys_dir; pass --key FILE" in err


def test_a_secured_simulated_run_closes_with_files_and_a_head_an_outsider_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The closing order of a real (small) run: model.pt, then summary.json counting the
    closing entry, then the closing entry naming both, and ledger.head.json."""
    ids = identities()
    keys = save_public_keys(tmp_path / "keys", ids)
    raw = {
        "run": {"name": "closing"},
        "fleet": {"devices": [{"name": "pi", "profile": "rpi4", "count": 2}]},
        "data": {"num_samples": 600},
        "train": {"global_batch": 32, "num_steps": 2},
        "security": {
            "enabled": True,
            "keys_dir": str(keys),
            "coordinator": _keys_table(ids["coordinator"]),
            "devices": {n: _keys_table(i) for n, i in ids.items() if n != "coordinator"},
        },
    }
    run = edgeddl.run(scenario_from_dict(raw), out_dir=tmp_path / "run", progress=False).run_dir
    ledger = entries(run)
    summary = json.loads((run / SUMMARY_FILE).read_text())
    assert summary["security"]["ledger_entries"] == len(ledger)
    end = ledger[-1]["payload"]
    assert ledger[-1]["kind"] == "run_end"
    assert end["model_sha256"] == file_sha256(run / MODEL_FILE)
    assert end["summary_sha256"] == file_sha256(run / SUMMARY_FILE)
    assert end["model_digest"] == model_digest(torch.load(run / MODEL_FILE, weights_only=True))
    assert ledger[0]["payload"]["config_sha256"] == file_sha256(run / CONFIG_FILE)
    rc, out, err = _cli(capsys, "verify", run, "--keys", keys, "--head", run / HEAD_FILE)
    assert rc == 0 and err == "" and f"{len(ledger)} entries verified" in out
    # The default key of `ledger head`: coordinator.key in the run's security.keys_dir.
    rc, out, _ = _cli(capsys, "head", run)
    assert rc == 0 and json.loads(out)["entries"] == len(ledger)


def _keys_table(identity: Identity) -> dict[str, str]:
    keys = identity.public().to_config()
    return {"sign": keys.sign, "agree": keys.agree}
