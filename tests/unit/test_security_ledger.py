"""The audit ledger on its own: append and verify, every flipped byte caught, torn tails
tolerated, rewritten history caught through the devices' signed receipts, who may write
what, receipts and updates counted once, model marks, signed heads, and older formats.
(A run folder against its ledger, and `edgeddl ledger`: test_ledger_cli.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ledger_folder import (
    RUN,
    cut,
    entries,
    identities,
    model,
    peers,
    record_steps,
    write_config,
    write_run,
)

from edgeddl.security import ledger as ledger_module
from edgeddl.security.envelope import Opened, Receiver, Sender
from edgeddl.security.keys import Identity
from edgeddl.security.ledger import (
    HEAD_FILE,
    LEDGER_FILE,
    Ledger,
    SignedHead,
    aggregate_payload,
    ledger_tip,
    model_digest,
    run_payload,
    sign_head,
    update_payload,
)
from edgeddl.security.ledger_verify import verify

SHA = "ab" * 32  # a well-formed SHA-256 where only the form is checked


@pytest.fixture(scope="module")
def ids() -> dict[str, Identity]:
    return identities()


def _started(path: Path, ids: dict[str, Identity]) -> Ledger:
    """A ledger in `path`'s folder with its run entry (the folder's config written first)."""
    write_config(path.parent, ids)
    ledger = Ledger(path, flush_every=1)
    ledger.append(ids["coordinator"], "run", run_payload(RUN, "s", ["pi-0", "pi-1"], path.parent))
    return ledger


def test_append_and_verify(tmp_path: Path, ids: dict[str, Identity]) -> None:
    path = write_run(tmp_path, ids) / LEDGER_FILE
    report = verify(path, peers(ids), complete=True)
    assert report.ok, report.error
    assert (report.num_entries, report.torn_tail_bytes, report.run_id) == (14, 0, RUN)
    assert report.closing is not None
    assert report.closing["model_digest"] == model_digest(model(1))
    assert set(report.closing) == {"model_digest", "model_sha256", "summary_sha256"}
    assert len(report.config_sha256) == 64
    # A key the verifier does not trust: refused at the first entry it signed.
    without = {n: p for n, p in peers(ids).items() if n != "pi-1"}
    assert "receipt is not signed by device 'pi-1'" in verify(path, without).error


def test_flush_is_batched_and_reopening_continues_the_chain(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    path = tmp_path / LEDGER_FILE
    write_config(tmp_path, ids)
    coord = ids["coordinator"]
    ledger = Ledger(path, flush_every=3)
    ledger.append(coord, "run", run_payload(RUN, "s", ["pi-0", "pi-1"], tmp_path))
    ledger.append(coord, "join", {"device": "pi-0"})
    assert path.read_bytes() == b""  # not yet: a batch is 3 entries
    ledger.append(coord, "join", {"device": "pi-1"})
    assert path.read_bytes().count(b"\n") == 3
    ledger.append(coord, "leave", {"device": "pi-1"})
    ledger.close()  # close flushes the rest
    with pytest.raises(ValueError, match="the ledger is closed"):
        ledger.append(coord, "crash", {"device": "pi-0"})
    with Ledger(path) as again:
        assert again.head[0] == 3
        again.append(coord, "crash", {"device": "pi-0"})
    report = verify(path, peers(ids))
    assert report.ok and report.num_entries == 5 and report.closing is None


def test_every_flipped_byte_is_caught(tmp_path: Path, ids: dict[str, Identity]) -> None:
    path = write_run(tmp_path, ids, num_steps=1, devices=("pi-0",)) / LEDGER_FILE  # 6 entries
    data = path.read_bytes()
    trusted = peers(ids)
    num_entries = data.count(b"\n")
    assert verify(path, trusted, complete=True).ok
    for pos in range(len(data)):
        for mask in (0x01, 0x20):
            flipped = bytearray(data)
            flipped[pos] ^= mask
            path.write_bytes(bytes(flipped))
            report = verify(path, trusted, complete=True)
            assert not report.ok, (pos, mask)
            if pos == len(data) - 1:
                # The final newline gone looks exactly like a crash mid-write of the last
                # entry: on its own the ledger is fine up to there, torn tail reported; only
                # knowing the run ended (its run_end entry is in the torn line) catches it.
                partial = verify(path, trusted)
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
    path = write_run(tmp_path, ids, num_steps=1) / LEDGER_FILE
    data = path.read_bytes()
    trusted = peers(ids)
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    for end in range(last_start - 3, len(data)):
        path.write_bytes(data[:end])
        report = verify(path, trusted)
        whole = data[:end].count(b"\n")
        assert report.ok and report.num_entries == whole, (end, report)
        assert report.torn_tail_bytes == end - (data[:end].rfind(b"\n") + 1)
    # Reopening cuts the torn line off and chains the next entry after the last whole one.
    path.write_bytes(data[: len(data) - 10])
    with Ledger(path) as ledger:
        assert ledger.torn_tail_bytes > 0
        ledger.append(ids["coordinator"], "crash", {"device": "pi-0"})
    report = verify(path, trusted)
    assert report.ok and report.torn_tail_bytes == 0
    assert report.num_entries == data.count(b"\n")  # the torn one replaced by the crash


def test_rewritten_history_is_caught_through_device_receipts(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    original = entries(write_run(tmp_path / "run", ids))
    # The coordinator drops pi-1's join (entry 2) and re-signs and re-chains everything after
    # with its own key: every signature it owns is valid again.
    forged = tmp_path / "forged.jsonl"
    coord = ids["coordinator"]
    with Ledger(forged, flush_every=1) as ledger:
        for e in original:
            if e["index"] == 2:
                e["payload"] = {"device": "pi-0", "note": "nobody else joined"}
            ledger.append(coord, e["kind"], e["payload"], time_s=e["time"])
    report = verify(forged, peers(ids))
    # pi-0's first update says it had seen entry 2 with the original hash.
    assert report.error.startswith("entry 3: pi-0 signed that it saw entry 2 with another hash")
    # Leaving the receipts out instead is caught too: an update must carry one.
    stripped = tmp_path / "stripped.jsonl"
    with Ledger(stripped) as ledger:
        for e in original:
            e["payload"].pop("receipt", None)
            ledger.append(coord, e["kind"], e["payload"], time_s=e["time"])
    assert "an update without its device's receipt" in verify(stripped, peers(ids)).error


def test_a_stolen_device_key_writes_no_entry(tmp_path: Path, ids: dict[str, Identity]) -> None:
    """With pi-0's private key an attacker replaces the last aggregate and run_end: each is
    genuinely signed by pi-0, and refused because a device may write no entry at all."""
    run_dir = write_run(tmp_path, ids)
    path = run_dir / LEDGER_FILE
    forged = model_digest(model(99))
    closing = {"model_digest": forged, "model_sha256": SHA, "summary_sha256": SHA}
    for kind, payload in [
        ("aggregate", {"step": 1, "updates": [8], "model_digest": forged}),
        ("run_end", closing),
        ("leave", {"device": "pi-0"}),  # not even about itself
    ]:
        with cut(run_dir, 12) as ledger:  # the last aggregate and run_end gone
            ledger.append(ids["pi-0"], kind, payload)
        assert verify(path, peers(ids)).error == (
            f"entry 12: 'pi-0' is a device and signed an entry of kind {kind}, which only "
            "the coordinator may write"
        )
    # Signing as the coordinator with pi-0's key: a bad signature.
    with cut(run_dir, 12) as ledger:
        impostor = Identity("coordinator", ids["pi-0"].sign_key, ids["pi-0"].agree_key)
        ledger.append(impostor, "run_end", closing)
    assert verify(path, peers(ids)).error == "entry 12: bad signature by 'coordinator'"


def test_an_aggregate_names_its_updates_and_counts_each_once(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    run_dir = write_run(tmp_path, ids, close=False)  # 13 entries; updates 3, 5 (step 0), 8, 10
    path, coord = run_dir / LEDGER_FILE, ids["coordinator"]
    digest = model_digest(model(1))
    cases = {
        "names nothing": (
            13,
            aggregate_payload(1, [], digest),
            "an aggregate that names no update (used or screened)",
        ),
        "counted again": (
            13,
            aggregate_payload(1, [8, 10], digest),
            "update entry 8 is counted twice (already by aggregate entry 12)",
        ),
        "not an update": (
            13,
            aggregate_payload(1, [9], digest),
            "aggregate names entry 9, not an update of step 1",
        ),
        "counted twice in one": (  # last: it replaces entry 12
            12,
            aggregate_payload(1, [8], digest, {8: "non-finite values"}),
            "update entry 8 is counted twice (already by this aggregate)",
        ),
    }
    for name, (kept, payload, error) in cases.items():
        with cut(run_dir, kept) as ledger:
            ledger.append(coord, "aggregate", payload)
        assert verify(path, peers(ids)).error == f"entry {kept}: {error}", name


def test_a_receipt_is_counted_once_and_only_for_its_step(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    run_dir = write_run(tmp_path, ids, close=False)
    path, coord = run_dir / LEDGER_FILE, ids["coordinator"]
    # The same receipt (pi-0, seq 1) recorded again as a second update.
    again = entries(run_dir)[8]["payload"]
    with cut(run_dir, 13) as ledger:
        ledger.append(coord, "update", again)
    assert verify(path, peers(ids)).error == (
        "entry 13: pi-0's receipt of seq 1 is entry 8's: counted twice"
    )
    # A payload pi-0 sealed for step 2, recorded as step 3's.
    receiver = Receiver(coord, RUN, peers(ids), max_payload_bytes=1 << 20)
    with cut(run_dir, 13) as ledger:
        wire = Sender(ids["pi-0"], RUN, first_seq=2).seal(
            coord.public(), b"late", step=2, ledger_head=ledger.head
        )
        opened = receiver.open(wire)
        assert isinstance(opened, Opened)
        ledger.append(coord, "update", {**update_payload(opened), "step": 3})
    assert verify(path, peers(ids)).error == "entry 13: step 3, but pi-0 signed step 2"


def test_an_aggregate_may_name_only_its_steps_updates_as_screened(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    """`screened` (updates a robust screen kept out) is checked like `updates`."""
    coord = ids["coordinator"]
    receiver = Receiver(coord, RUN, peers(ids), max_payload_bytes=1 << 20)
    path = tmp_path / LEDGER_FILE
    with _started(path, ids) as ledger:
        refs = {}
        for step in (0, 1):
            wire = Sender(ids["pi-0"], RUN, first_seq=step).seal(
                coord.public(), b"nan", step=step, ledger_head=ledger.head
            )
            opened = receiver.open(wire)
            assert isinstance(opened, Opened)
            refs[step] = ledger.append(coord, "update", update_payload(opened))
        digest = model_digest(model(0))
        ledger.append(coord, "aggregate", aggregate_payload(0, [], digest, {refs[0]: "nan"}))
        good = verify(path, peers(ids))
        assert good.ok, good.error
        ledger.append(coord, "aggregate", aggregate_payload(1, [], digest, {refs[0]: "nan"}))
    bad = verify(path, peers(ids))
    assert bad.error == f"entry 4: aggregate names entry {refs[0]}, not an update of step 1"


def test_the_ledger_is_private_to_its_owner(tmp_path: Path, ids: dict[str, Identity]) -> None:
    path = write_run(tmp_path, ids, num_steps=1) / LEDGER_FILE
    assert path.stat().st_mode & 0o777 == 0o600


def test_marks_and_closing_entries_must_name_the_right_model_and_files(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    now, before = model_digest(model(1)), model_digest(model(0))
    closing = {"model_sha256": SHA, "summary_sha256": SHA}
    cases: dict[str, tuple[list[tuple[str, dict]], str]] = {  # type: ignore[type-arg]
        "closed": ([("interrupted", {"step": 2, "model_digest": now, **closing})], ""),
        "resumed": (
            [
                ("checkpoint", {"step": 2, "model_digest": now}),
                ("interrupted", {"step": 2, "model_digest": now, **closing}),
                ("resumed", {"checkpoint_entry": 7, "model_digest": now, "config_sha256": SHA}),
                ("run_end", {"model_digest": now, **closing}),
            ],
            "",
        ),
        "stale mark": (
            [("checkpoint", {"step": 2, "model_digest": before})],
            "entry 7: a checkpoint entry's model digest is not the last aggregate's",
        ),
        "stale end": (
            [("run_end", {"model_digest": before, **closing})],
            "entry 7: a run_end entry's model digest is not the last aggregate's",
        ),
        "end without files": (
            [("run_end", {"model_digest": now})],
            "entry 7: a run_end entry without model_sha256 (a SHA-256 in hex)",
        ),
        "no resumed after interrupted": (
            [
                ("interrupted", {"step": 2, "model_digest": now, **closing}),
                ("join", {"device": "pi-0"}),
            ],
            "entry 8: follows an interrupted entry but is not a resumed one",
        ),
        "resumed from nowhere": (
            [("resumed", {"checkpoint_entry": 2, "model_digest": now, "config_sha256": SHA})],
            "entry 7: resumed from entry 2, which is not a checkpoint of that model",
        ),
        "resumed without its config": (
            [
                ("checkpoint", {"step": 2, "model_digest": now}),
                ("resumed", {"checkpoint_entry": 7, "model_digest": now}),
            ],
            "entry 8: a resumed entry without config_sha256 (a SHA-256 in hex)",
        ),
    }
    for name, (kinds, error) in cases.items():
        path = tmp_path / name / LEDGER_FILE
        path.parent.mkdir()
        with _started(path, ids) as ledger:
            record_steps(ledger, ids, range(2), devices=("pi-0",))  # entries 1-6
            for kind, payload in kinds:
                ledger.append(ids["coordinator"], kind, payload)
        report = verify(path, peers(ids), complete=not error)
        assert report.error == error, name


def test_a_signed_head_holds_the_ledger_to_its_length(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    run_dir = write_run(tmp_path, ids, close=False)  # 13 entries, a run that crashed
    path, coord, trusted = run_dir / LEDGER_FILE, ids["coordinator"], peers(ids)
    run_id, num, last = ledger_tip(path)
    assert (run_id, num) == (RUN, 13)
    head = sign_head(coord, run_id, num, last)
    assert SignedHead.from_json(json.loads(json.dumps(head.to_json()))) == head
    assert verify(path, trusted, head=head).ok
    # A later, longer ledger extends it.
    with Ledger(path) as ledger:
        record_steps(ledger, ids, range(2, 3))
    assert verify(path, trusted, head=head).ok
    # Cut short: verifies on its own (a crash looks the same), not against the head.
    cut(run_dir, 10).close()
    assert verify(path, trusted).ok
    assert verify(path, trusted, head=head).error == (
        "head: it names 13 entries, the ledger holds 10: it was cut short"
    )
    # The same length, another history: the head's last entry differs.
    with Ledger(path) as ledger:
        for device in ("pi-0", "pi-1", "pi-0"):
            ledger.append(coord, "leave", {"device": device})
    assert verify(path, trusted, head=head).error == (
        "entry 12: not the one the signed head names: history was rewritten"
    )


def test_a_head_must_be_the_trusted_coordinators_of_this_run(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    run_dir = write_run(tmp_path, ids)
    path, trusted = run_dir / LEDGER_FILE, peers(ids)
    head = SignedHead.from_json(json.loads((run_dir / HEAD_FILE).read_text()))
    assert head.entries == 14 and verify(path, trusted, head=head).ok  # the run's own
    fields = head.to_json()
    bad = {
        "altered": (
            {**fields, "entries": 3},
            "head: its signature is not the trusted coordinator key's (forged or altered)",
        ),
        "a stranger's": (
            sign_head(Identity.generate("coordinator"), RUN, 14, head.hash).to_json(),
            "head: its signature is not the trusted coordinator key's (forged or altered)",
        ),
        "a device's": (
            sign_head(ids["pi-0"], RUN, 14, head.hash).to_json(),
            "head: signed by 'pi-0', not by the coordinator",
        ),
        "another run's": (
            sign_head(ids["coordinator"], "run-2", 14, head.hash).to_json(),
            "head: it is of run 'run-2', this ledger of run 'run-1'",
        ),
    }
    for name, (obj, error) in bad.items():
        assert verify(path, trusted, head=SignedHead.from_json(obj)).error == error, name
    with pytest.raises(ValueError, match="not a ledger head: its fields are not run_id"):
        SignedHead.from_json({**fields, "extra": 1})
    with pytest.raises(ValueError, match="entries malformed"):
        SignedHead.from_json({**fields, "entries": "14"})


def test_an_older_format_is_refused_in_one_line(
    tmp_path: Path, ids: dict[str, Identity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Format 1 (edgeddl before it): v1 signatures and a run entry without a format."""
    path = tmp_path / LEDGER_FILE
    with monkeypatch.context() as m:
        m.setattr(ledger_module, "DOMAIN", b"edgeddl ledger v1\x00")
        with Ledger(path) as ledger:
            ledger.append(ids["coordinator"], "run", {"run_id": RUN})
            ledger.append(ids["coordinator"], "join", {"device": "pi-0"})
    assert verify(path, peers(ids)).error == (
        "entry 0: ledger format 1, written by an older edgeddl: this one verifies format 2 "
        "only (verify it with the edgeddl that wrote it)"
    )
    newer = tmp_path / "newer.jsonl"
    with Ledger(newer) as ledger:
        ledger.append(ids["coordinator"], "run", {"run_id": RUN, "format": 3})
    assert "ledger format 3, written by a newer edgeddl" in verify(newer, peers(ids)).error
