"""Envelopes: a payload between a device and the coordinator, signed by its sender.

A header (run, sender, recipient, step, sequence number, the ledger head the sender saw, the
body's SHA-256) and an Ed25519 signature over it travel with the body. Confidentiality and
forward secrecy come from the session the envelope travels in (`handshake.py`: each link's
frames are encrypted under keys of that session only). Header and signature alone (a
*receipt*, ~180 B) prove what the sender sent and which ledger head it had seen; the ledger
stores receipts.
Details (the wire format, version 3): docs/trust.md#envelope-format
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from edgeddl.security.keys import Identity, PublicIdentity, name_bytes

MAGIC = b"EDE3"
DOMAIN = b"edgeddl envelope v3\x00"
NO_LEDGER_HEAD = (-1, bytes(32))
"""(index, hash) of the ledger head before the sender has seen any entry."""
_FIXED = struct.Struct(">4sQQq32s32s")
SIG_BYTES = 64
FRAME_BYTES = 16
"""What the session's frame adds around an envelope (its AEAD tag)."""

RejectReason = Literal[
    "bad_signature",
    "tampered",
    "replayed",
    "out_of_order",
    "unknown_sender",
    "oversized",
    "malformed",
]
REJECT_REASONS: tuple[str, ...] = get_args(RejectReason)


@dataclass(frozen=True, slots=True)
class Header:
    """What the sender signs about a payload (the body itself travels encrypted)."""

    run_id: str
    sender: str
    recipient: str
    step: int
    seq: int
    """Per sender and run, increasing: the receiver refuses replays and reordering."""
    ledger_index: int
    """Index of the last ledger entry the sender saw (-1: none)."""
    ledger_head: bytes
    """That entry's hash."""
    body_digest: bytes
    """SHA-256 of the plaintext body."""

    def encode(self) -> bytes:
        fixed = _FIXED.pack(
            MAGIC, self.step, self.seq, self.ledger_index, self.ledger_head, self.body_digest
        )
        return fixed + name_bytes(self.run_id, self.sender, self.recipient)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> tuple[Header, int]:
        """(header, its length in bytes); ValueError if it is not one."""
        if len(data) < _FIXED.size:
            raise ValueError("shorter than a header")
        magic, step, seq, index, head, digest = _FIXED.unpack_from(data)
        if magic != MAGIC:
            raise ValueError(f"not an edgeddl envelope (magic {bytes(magic)!r})")
        pos, names = _FIXED.size, []
        for _ in range(3):
            if pos >= len(data):
                raise ValueError("header ends inside its names")
            n = data[pos]
            if pos + 1 + n > len(data):
                raise ValueError("header ends inside its names")
            names.append(bytes(data[pos + 1 : pos + 1 + n]).decode("utf-8"))
            pos += 1 + n
        return cls(names[0], names[1], names[2], step, seq, index, head, digest), pos


@dataclass(frozen=True, slots=True)
class Opened:
    header: Header
    body: bytes
    receipt: bytes
    """header | signature: the sender's proof, for the ledger."""


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RejectReason
    sender: str
    """The sender the envelope claims ("" when it could not be read)."""
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def overhead_bytes(run_id: str, sender: str, recipient: str) -> int:
    """Bytes an envelope and its session frame add to a body on the wire (what the simulator
    counts)."""
    names = sum(1 + len(s.encode("utf-8")) for s in (run_id, sender, recipient))
    return _FIXED.size + names + SIG_BYTES + FRAME_BYTES


def _signed_message(header: bytes | memoryview) -> bytes:
    return DOMAIN + bytes(header)


class Sender:
    """Signs one identity's payloads in one run; numbers them from `first_seq`."""

    def __init__(self, identity: Identity, run_id: str, *, first_seq: int = 0) -> None:
        self.identity, self.run_id, self.next_seq = identity, run_id, first_seq

    def seal(
        self,
        recipient: PublicIdentity,
        body: bytes,
        *,
        step: int,
        ledger_head: tuple[int, bytes] = NO_LEDGER_HEAD,
    ) -> bytes:
        header = Header(
            run_id=self.run_id,
            sender=self.identity.name,
            recipient=recipient.name,
            step=step,
            seq=self.next_seq,
            ledger_index=ledger_head[0],
            ledger_head=ledger_head[1],
            body_digest=hashlib.sha256(body).digest(),
        ).encode()
        self.next_seq += 1
        return header + body + self.identity.sign(_signed_message(header))


class Receiver:
    """Opens envelopes addressed to one identity in one run, from enrolled peers only.

    Per sender it keeps the highest sequence number accepted and which of the `window` below
    it were accepted, so it tells a replay (seen before) from a late arrival (out of order);
    both are refused, as is anything older than the window.

    `check_signatures=False` leaves the senders' signatures unchecked (the receipt is kept as
    it came). For a party that keeps no receipts for others and receives only inside a
    session whose handshake the sender signed, that is enough: the session's keys are the
    two of theirs alone, so only that sender could have framed what opens. A device opening
    its coordinator's answers does so (an Ed25519 verify, ~0.13 ms here, is most of a small
    payload's crypto). The coordinator, whose ledger holds the devices' receipts, always
    checks.
    """

    def __init__(
        self,
        identity: Identity,
        run_id: str,
        peers: Mapping[str, PublicIdentity],
        *,
        max_payload_bytes: int,
        window: int = 64,
        check_signatures: bool = True,
    ) -> None:
        self.identity, self.run_id, self.peers = identity, run_id, peers
        self.max_payload_bytes, self.window = max_payload_bytes, window
        self.check_signatures = check_signatures
        self._seen: dict[str, tuple[int, int]] = {}  # sender -> (highest seq, bitmap below)

    def open(self, wire: bytes) -> Opened | Rejection:
        if len(wire) > self.max_payload_bytes:  # before any parsing or crypto is spent on it
            return Rejection(
                "oversized", "", f"{len(wire)} bytes > max_payload_bytes {self.max_payload_bytes}"
            )
        view = memoryview(wire)
        try:
            header, pos = Header.decode(view)
        except (ValueError, UnicodeDecodeError) as e:
            return Rejection("malformed", "", str(e))
        who = header.sender
        if len(wire) < pos + SIG_BYTES:
            return Rejection("malformed", who, "shorter than its header and signature")
        if header.recipient != self.identity.name:
            return Rejection("malformed", who, f"addressed to {header.recipient!r}")
        if header.run_id != self.run_id:
            return Rejection("replayed", who, f"from run {header.run_id!r}")
        peer = self.peers.get(who)
        if peer is None:
            return Rejection("unknown_sender", who, f"{who!r} is not enrolled")
        head, signature = view[:pos], bytes(view[-SIG_BYTES:])
        if self.check_signatures and not peer.verify(signature, _signed_message(head)):
            return Rejection("bad_signature", who, f"not signed by {who!r}")
        body = bytes(view[pos:-SIG_BYTES])
        if hashlib.sha256(body).digest() != header.body_digest:
            return Rejection("tampered", who, "the body does not match its signed digest")
        verdict = self._check_sequence(who, header.seq)
        if verdict is not None:
            return verdict
        return Opened(header, body, bytes(head) + signature)

    def windows(self) -> dict[str, tuple[int, int]]:
        """Per sender, (highest seq accepted, bitmap of the window below it): what a
        receiver resumed from a checkpoint needs to keep refusing replays."""
        return dict(self._seen)

    def restore_windows(self, windows: Mapping[str, tuple[int, int]]) -> None:
        self._seen = dict(windows)

    def last_seq(self, who: str) -> int:
        """The highest sequence number accepted from `who` (-1: none yet)."""
        return self._seen.get(who, (-1, 0))[0]

    def _check_sequence(self, who: str, seq: int) -> Rejection | None:
        mask = (1 << self.window) - 1
        last, bits = self._seen.get(who, (-1, 0))
        if seq > last:
            self._seen[who] = (seq, ((bits << (seq - last)) | 1) & mask)
            return None
        back = last - seq
        if back >= self.window:
            return Rejection("replayed", who, f"seq {seq} is older than the last {self.window}")
        if bits >> back & 1:
            return Rejection("replayed", who, f"seq {seq} was accepted before")
        return Rejection("out_of_order", who, f"seq {seq} arrived after seq {last}")


def verify_receipt(receipt: bytes, signer: PublicIdentity) -> Header | None:
    """The header a receipt proves `signer` signed, or None if it does not."""
    try:
        header, pos = Header.decode(receipt)
    except (ValueError, UnicodeDecodeError):
        return None
    if len(receipt) != pos + SIG_BYTES or header.sender != signer.name:
        return None
    return header if signer.verify(receipt[pos:], _signed_message(receipt[:pos])) else None
