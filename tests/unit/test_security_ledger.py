"""The audit ledger: append and verify, every flipped byte caught, torn tails tolerated,
rewritten history caught through the devices' signed heads, the final model's digest, and
`edgeddl ledger verify / show`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgeddl.cli.main import main
from edgeddl.security.envelope import Opened, Receiver, Rejection, Sender
from edgeddl.security.keys import Identity, PublicIdentity
from edgeddl.security.ledger import (
    LEDGER_FILE,
    Ledger,
    aggregate_payload,
    model_digest,
    reject_payload,
    update_payload,
    verify,
)

RUN = "run-1"
DEVICES = ("pi-0", "pi-1")


@pytest.fixture(scope="module")
def ids() -> dict[str, Identity]:
    return {n: Identity.generate(n) for n in (*DEVICES, "coordinator")}


def _peers(ids: dict[str, Identity]) -> dict[str, PublicIdentity]:
    return {n: i.public() for n, i in ids.items()}


def _model(step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3, 2), float(step)), "b": torch.arange(2.0)}


def _write_run(
    path: Path, ids: dict[str, Identity], *, num_steps: int = 2, devices: tuple[str, ...] = DEVICES
) -> None:
    """What a coordinator records: run, joins, each device's update with its receipt (the
    head it saw), a rejection, each aggregation, run_end."""
    coord = ids["coordinator"]
    receiver = Receiver(coord, RUN, _peers(ids), max_payload_bytes=1 << 20)
    senders = {n: Sender(ids[n], RUN) for n in devices}
    with Ledger(path, flush_every=3) as ledger:
        ledger.append(coord, "run", {"run_id": RUN}, time_s=0.0)
        for n in devices:
            ledger.append(coord, "join", {"device": n}, time_s=0.1)
        for step in range(num_steps):
            refs = []
            for n in devices:
                wire = senders[n].seal(
                    coord.public(), f"{n} {step}".encode(), step=step, ledger_head=ledger.head
                )
                opened = receiver.open(wire)
                assert isinstance(opened, Opened)
                refs.append(ledger.append(coord, "update", update_payload(opened), time_s=step))
                replay = receiver.open(wire)
                assert isinstance(replay, Rejection)
                ledger.append(coord, "reject", reject_payload(replay, step=step), time_s=step)
            payload = {"step": step, "updates": refs, "model_digest": model_digest(_model(step))}
            ledger.append(coord, "aggregate", payload, time_s=step + 0.5)
        ledger.append(coord, "run_end", {"steps": num_steps}, time_s=9.0)


def test_append_and_verify(tmp_path: Path, ids: dict[str, Identity]) -> None:
    path = tmp_path / LEDGER_FILE
    _write_run(path, ids)
    final = model_digest(_model(1))
    report = verify(path, _peers(ids), final_model_digest=final, complete=True)
    assert report.ok, report.error
    assert (report.num_entries, report.torn_tail_bytes) == (14, 0)
    # The final model's digest must be the last aggregation's.
    bad = verify(path, _peers(ids), final_model_digest=model_digest(_model(0)))
    assert "entry 12: the final model's digest" in bad.error
    # A key the verifier does not trust: refused at the first entry it signed.
    without = {n: p for n, p in _peers(ids).items() if n != "pi-1"}
    assert "receipt is not signed by device 'pi-1'" in verify(path, without).error


def test_flush_is_batched_and_reopening_continues_the_chain(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    path = tmp_path / LEDGER_FILE
    coord = ids["coordinator"]
    ledger = Ledger(path, flush_every=3)
    ledger.append(coord, "run", {"run_id": RUN})
    ledger.append(coord, "join", {"device": "pi-0"})
    assert path.read_bytes() == b""  # not yet: a batch is 3 entries
    ledger.append(coord, "join", {"device": "pi-1"})
    assert path.read_bytes().count(b"\n") == 3
    ledger.append(coord, "leave", {"device": "pi-1"})
    ledger.close()  # close flushes the rest
    with Ledger(path) as again:
        assert again.head[0] == 3
        again.append(coord, "run_end", {})
    report = verify(path, _peers(ids), complete=True)
    assert report.ok and report.num_entries == 5


def test_every_flipped_byte_is_caught(tmp_path: Path, ids: dict[str, Identity]) -> None:
    path = tmp_path / LEDGER_FILE
    _write_run(path, ids, num_steps=1, devices=("pi-0",))  # 6 entries, 1.9 kB
    data = path.read_bytes()
    peers = _peers(ids)
    num_entries = data.count(b"\n")
    assert verify(path, peers, complete=True).ok
    for pos in range(len(data)):
        for mask in (0x01, 0x20):
            flipped = bytearray(data)
            flipped[pos] ^= mask
            path.write_bytes(bytes(flipped))
            report = verify(path, peers, complete=True)
            assert not report.ok, (pos, mask)
            if pos == len(data) - 1:
                # The final newline gone looks exactly like a crash mid-write of the last
                # entry: on its own the ledger is fine up to there, torn tail reported; only
                # knowing the run ended (its run_end entry is in the torn line) catches it.
                partial = verify(path, peers)
                assert partial.ok and partial.num_entries == num_entries - 1
                assert partial.torn_tail_bytes == len(data.split(b"\n")[-2]) + 1
            else:
                # Any other byte: the entry that holds it is named, or an earlier one when
                # the flip joins two lines.
                line = data[:pos].count(b"\n")
                assert report.error.startswith(f"entry {line}:") or report.error.startswith(
                    f"entry {line - 1}:"
                ), (pos, report.error)


def test_a_torn_last_line_is_tolerated_at_every_cut(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    path = tmp_path / LEDGER_FILE
    _write_run(path, ids, num_steps=1)
    data = path.read_bytes()
    peers = _peers(ids)
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    for cut in range(last_start - 3, len(data)):
        path.write_bytes(data[:cut])
        report = verify(path, peers)
        whole = data[:cut].count(b"\n")
        assert report.ok and report.num_entries == whole, (cut, report)
        assert report.torn_tail_bytes == cut - (data[:cut].rfind(b"\n") + 1)
    # Reopening cuts the torn line off and chains the next entry after the last whole one.
    path.write_bytes(data[: len(data) - 10])
    with Ledger(path) as ledger:
        assert ledger.torn_tail_bytes > 0
        ledger.append(ids["coordinator"], "crash", {"device": "pi-0"})
    report = verify(path, peers)
    assert report.ok and report.torn_tail_bytes == 0
    assert report.num_entries == data.count(b"\n")  # the torn one replaced by the crash


def test_rewritten_history_is_caught_through_device_receipts(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    path = tmp_path / LEDGER_FILE
    _write_run(path, ids)
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    # The coordinator drops pi-1's join (entry 2) and re-signs and re-chains everything after
    # with its own key: every signature it owns is valid again.
    forged = tmp_path / "forged.jsonl"
    coord = ids["coordinator"]
    with Ledger(forged, flush_every=1) as ledger:
        for e in entries:
            if e["index"] == 2:
                e["payload"] = {"device": "pi-0", "note": "nobody else joined"}
            ledger.append(coord, e["kind"], e["payload"], time_s=e["time"])
    report = verify(forged, _peers(ids))
    assert not report.ok
    # pi-0's first update says it had seen entry 2 with the original hash.
    assert report.error.startswith("entry 3: pi-0 signed that it saw entry 2 with another hash")
    # Leaving the receipts out instead is caught too: an update must carry one.
    stripped = tmp_path / "stripped.jsonl"
    with Ledger(stripped) as ledger:
        for e in entries:
            e["payload"].pop("receipt", None)
            ledger.append(coord, e["kind"], e["payload"], time_s=e["time"])
    assert "an update without its device's receipt" in verify(stripped, _peers(ids)).error


def test_an_entry_signed_by_the_wrong_author_is_refused(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    path = tmp_path / LEDGER_FILE
    with Ledger(path) as ledger:
        ledger.append(ids["coordinator"], "run", {"run_id": RUN})
        impostor = Identity("coordinator", ids["pi-0"].sign_key, ids["pi-0"].agree_key)
        ledger.append(impostor, "crash", {"device": "pi-1"})
        ledger.append(ids["pi-1"], "leave", {"device": "pi-1"})  # a device's own entry: fine
    assert verify(path, _peers(ids)).error == "entry 1: bad signature by 'coordinator'"


def _run_dir(tmp_path: Path, ids: dict[str, Identity]) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tables = "".join(i.public().scenario_toml() for i in ids.values())
    (run_dir / "config.resolved.toml").write_text(
        '[[fleet.devices]]\nname = "pi"\nprofile = "rpi4"\ncount = 2\n'
        "[security]\nenabled = true\n" + tables
    )
    _write_run(run_dir / LEDGER_FILE, ids)
    (run_dir / "summary.json").write_text(json.dumps({"model_digest": model_digest(_model(1))}))
    return run_dir


def test_cli_ledger_verify_and_show(
    tmp_path: Path,
    ids: dict[str, Identity],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one table row per entry
    run_dir = _run_dir(tmp_path, ids)
    assert main(["ledger", "verify", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "14 entries verified (chain, signatures, receipts, final model digest)" in out
    assert main(["ledger", "show", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "aggregate" in out and "signed by pi-1 (saw #" in out and "replayed" in out
    # One flipped byte in entry 5: exit 2, one line naming it.
    path = run_dir / LEDGER_FILE
    lines = path.read_bytes().split(b"\n")
    lines[5] = lines[5].replace(b'"step":0', b'"step":1', 1)
    path.write_bytes(b"\n".join(lines))
    assert main(["ledger", "verify", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "entry 5: " in err
    # A run that ended without its run_end entry: refused unless --partial.
    path.write_bytes(b"\n".join(lines[:5]) + b"\n")
    (run_dir / "summary.json").unlink()
    assert main(["ledger", "verify", str(run_dir)]) == 2
    assert "the run ended but the ledger does not" in capsys.readouterr().err
    assert main(["ledger", "verify", str(run_dir), "--partial"]) == 0
    assert main(["ledger", "verify", str(tmp_path)]) == 2
    assert "no ledger" in capsys.readouterr().err


def test_an_aggregate_may_name_only_its_steps_updates_as_screened(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    """`screened` (updates a robust screen kept out) is checked like `updates`."""
    path = tmp_path / LEDGER_FILE
    coord = ids["coordinator"]
    receiver = Receiver(coord, RUN, _peers(ids), max_payload_bytes=1 << 20)
    with Ledger(path) as ledger:
        ledger.append(coord, "run", {"run_id": RUN})
        refs = {}
        for step in (0, 1):
            wire = Sender(ids["pi-0"], RUN, first_seq=step).seal(
                coord.public(), b"nan", step=step, ledger_head=ledger.head
            )
            opened = receiver.open(wire)
            assert isinstance(opened, Opened)
            refs[step] = ledger.append(coord, "update", update_payload(opened))
        digest = model_digest(_model(0))
        ledger.append(coord, "aggregate", aggregate_payload(0, [], digest, {refs[0]: "nan"}))
        ledger.flush()
        good = verify(path, _peers(ids))
        assert good.ok, good.error
        ledger.append(coord, "aggregate", aggregate_payload(1, [], digest, {refs[0]: "nan"}))
    bad = verify(path, _peers(ids))
    assert bad.error == f"entry 4: aggregate names entry {refs[0]}, not an update of step 1"


def test_the_ledger_is_private_to_its_owner(tmp_path: Path, ids: dict[str, Identity]) -> None:
    path = tmp_path / LEDGER_FILE
    _write_run(path, ids, num_steps=1)
    assert path.stat().st_mode & 0o777 == 0o600


def _marked_run(path: Path, ids: dict[str, Identity], kinds: list[tuple[str, dict]]) -> None:
    coord = ids["coordinator"]
    with Ledger(path, flush_every=1) as ledger:
        ledger.append(coord, "run", {"run_id": RUN}, time_s=0.0)
        for step in range(2):
            digest = model_digest(_model(step))
            ledger.append(coord, "aggregate", {"step": step, "updates": [], "model_digest": digest})
        for kind, payload in kinds:
            ledger.append(coord, kind, payload)


def test_interrupted_and_resumed_entries_must_name_the_right_model(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    now, before = model_digest(_model(1)), model_digest(_model(0))
    cases = {
        "closed": ([("interrupted", {"step": 2, "model_digest": now})], ""),
        "resumed": (
            [
                ("interrupted", {"step": 2, "model_digest": now}),
                ("resumed", {"from_step": 2, "checkpoint_entry": 3, "model_digest": now}),
                ("run_end", {"model_digest": now}),
            ],
            "",
        ),
        "stale mark": (
            [("checkpoint", {"step": 2, "model_digest": before})],
            "entry 3: a checkpoint entry's model digest is not the last aggregate's",
        ),
        "no resumed after interrupted": (
            [("interrupted", {"step": 2, "model_digest": now}), ("join", {"device": "pi-0"})],
            "entry 4: follows an interrupted entry but is not a resumed one",
        ),
        "resumed from nowhere": (
            [("resumed", {"from_step": 2, "checkpoint_entry": 2, "model_digest": now})],
            "entry 3: resumed from entry 2, which is not a checkpoint of that model",
        ),
    }
    for name, (kinds, error) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        _marked_run(path, ids, kinds)
        report = verify(path, _peers(ids), final_model_digest=now, complete=not error)
        assert report.error == error, name
