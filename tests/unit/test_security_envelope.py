"""Envelopes: round trip, the exact byte overhead, and each rejection with its reason; a
rejected payload never stops the next genuine one from being accepted. (Their encryption is
the session's: tests/unit/test_security_session.py.)"""

from __future__ import annotations

import hashlib

import pytest

from edgeddl.security.envelope import (
    FRAME_BYTES,
    REJECT_REASONS,
    SIG_BYTES,
    Header,
    Opened,
    Receiver,
    Rejection,
    Sender,
    overhead_bytes,
    verify_receipt,
)
from edgeddl.security.keys import Identity

RUN = "run-7"
MAX = 1 << 20


@pytest.fixture(scope="module")
def ids() -> dict[str, Identity]:
    return {n: Identity.generate(n) for n in ("pi-0", "pi-1", "coordinator", "mallory")}


def _receiver(ids: dict[str, Identity], **kw: int) -> Receiver:
    peers = {n: ids[n].public() for n in ("pi-0", "pi-1")}
    return Receiver(ids["coordinator"], RUN, peers, max_payload_bytes=kw.get("max", MAX))


def _seal(ids: dict[str, Identity], body: bytes, sender: str = "pi-0", **kw: int) -> bytes:
    return Sender(ids[sender], RUN, first_seq=kw.get("seq", 0)).seal(
        ids["coordinator"].public(), body, step=kw.get("step", 3), ledger_head=(4, b"h" * 32)
    )


def _rejected(result: Opened | Rejection, reason: str) -> Rejection:
    assert isinstance(result, Rejection), result
    assert result.reason == reason, result
    assert reason in REJECT_REASONS
    return result


def test_round_trip_header_body_and_overhead(ids: dict[str, Identity]) -> None:
    body = bytes(range(256)) * 80
    wire = _seal(ids, body, step=11)
    assert len(wire) - len(body) + FRAME_BYTES == overhead_bytes(RUN, "pi-0", "coordinator")
    opened = _receiver(ids).open(wire)
    assert isinstance(opened, Opened)
    assert opened.body == body
    h = opened.header
    assert (h.run_id, h.sender, h.recipient, h.step, h.seq) == (RUN, "pi-0", "coordinator", 11, 0)
    assert (h.ledger_index, h.ledger_head) == (4, b"h" * 32)
    assert h.body_digest == hashlib.sha256(body).digest()
    # The receipt alone proves what pi-0 signed, to anyone holding its public key only.
    assert verify_receipt(opened.receipt, ids["pi-0"].public()) == h
    assert verify_receipt(opened.receipt, ids["pi-1"].public()) is None


def test_empty_body_and_both_directions(ids: dict[str, Identity]) -> None:
    assert isinstance(_receiver(ids).open(_seal(ids, b"")), Opened)
    down = Sender(ids["coordinator"], RUN).seal(ids["pi-0"].public(), b"aggregate", step=1)
    device = Receiver(
        ids["pi-0"], RUN, {"coordinator": ids["coordinator"].public()}, max_payload_bytes=MAX
    )
    opened = device.open(down)
    assert isinstance(opened, Opened) and opened.body == b"aggregate"


def test_forged_signature(ids: dict[str, Identity]) -> None:
    wire = bytearray(_seal(ids, b"gradient"))
    wire[-1] ^= 0x01
    _rejected(_receiver(ids).open(bytes(wire)), "bad_signature")
    # Signed by someone else under pi-0's name
    forger = Identity("pi-0", ids["mallory"].sign_key, ids["pi-0"].agree_key)
    forged = Sender(forger, RUN).seal(ids["coordinator"].public(), b"evil", step=3)
    _rejected(_receiver(ids).open(forged), "bad_signature")


def test_tampered_body_and_header(ids: dict[str, Identity]) -> None:
    body = b"gradient" * 100
    wire = _seal(ids, body)
    header_len = Header.decode(wire)[1]
    receiver = _receiver(ids)
    for pos in (header_len, header_len + 5, len(wire) - SIG_BYTES - 1):
        bad = bytearray(wire)
        bad[pos] ^= 0x01
        _rejected(receiver.open(bytes(bad)), "tampered")  # the body against its signed digest
    bad = bytearray(wire)
    bad[12] ^= 0x01  # the step number in the signed header
    _rejected(receiver.open(bytes(bad)), "bad_signature")
    assert isinstance(receiver.open(wire), Opened)  # the genuine one still goes through


def test_replayed_and_out_of_order(ids: dict[str, Identity]) -> None:
    sender = Sender(ids["pi-0"], RUN)
    coord = ids["coordinator"].public()
    wires = [sender.seal(coord, f"step {i}".encode(), step=i) for i in range(4)]
    receiver = _receiver(ids)
    assert isinstance(receiver.open(wires[0]), Opened)
    r = _rejected(receiver.open(wires[0]), "replayed")
    assert r.sender == "pi-0" and "seq 0" in r.detail
    assert isinstance(receiver.open(wires[2]), Opened)  # a gap (seq 1 lost) is fine
    _rejected(receiver.open(wires[1]), "out_of_order")  # seq 1 arrives after seq 2
    _rejected(receiver.open(wires[2]), "replayed")
    assert isinstance(receiver.open(wires[3]), Opened)
    # Far older than the window: refused as a replay.
    late = Sender(ids["pi-0"], RUN, first_seq=500).seal(coord, b"x", step=9)
    assert isinstance(receiver.open(late), Opened)
    _rejected(receiver.open(wires[3]), "replayed")
    # Sequence numbers are per sender: pi-1 starts at 0 undisturbed.
    assert isinstance(receiver.open(_seal(ids, b"x", sender="pi-1")), Opened)


def test_payload_of_another_run_is_a_replay(ids: dict[str, Identity]) -> None:
    other = Sender(ids["pi-0"], "run-6").seal(ids["coordinator"].public(), b"old", step=1)
    assert "run-6" in _rejected(_receiver(ids).open(other), "replayed").detail


def test_unknown_sender(ids: dict[str, Identity]) -> None:
    wire = Sender(ids["mallory"], RUN).seal(ids["coordinator"].public(), b"hi", step=1)
    r = _rejected(_receiver(ids).open(wire), "unknown_sender")
    assert r.sender == "mallory"


def test_oversized_is_refused_before_parsing(ids: dict[str, Identity]) -> None:
    receiver = _receiver(ids, max=4096)
    fits = 4096 - overhead_bytes(RUN, "pi-0", "coordinator") + FRAME_BYTES
    assert isinstance(receiver.open(_seal(ids, bytes(fits))), Opened)
    _rejected(receiver.open(_seal(ids, bytes(fits + 1), seq=1)), "oversized")
    _rejected(receiver.open(b"\xff" * 5000), "oversized")  # garbage: no parse attempted


@pytest.mark.parametrize(
    "wire",
    [b"", b"EDE3", b"XXXX" + bytes(200), b"EDE3" + bytes(112) + b"\x05ab", b"EDE1" + bytes(200)],
    ids=["empty", "magic only", "wrong magic", "names cut", "version 1"],
)
def test_malformed(ids: dict[str, Identity], wire: bytes) -> None:
    _rejected(_receiver(ids).open(wire), "malformed")


def test_misaddressed_and_truncated_are_malformed(ids: dict[str, Identity]) -> None:
    to_pi1 = Sender(ids["pi-0"], RUN).seal(ids["pi-1"].public(), b"hi", step=1)
    assert "pi-1" in _rejected(_receiver(ids).open(to_pi1), "malformed").detail
    wire = _seal(ids, b"body")
    pos = Header.decode(wire)[1]
    _rejected(_receiver(ids).open(wire[: pos + 20]), "malformed")
