"""Envelopes: a payload between a device and the coordinator, signed and encrypted.

ChaCha20-Poly1305 under a key per run, pair and direction (X25519 and HKDF), with random
nonces (a restarted device cannot reuse one), and an Ed25519 signature over header, nonce
and tag. Header, nonce, tag and signature alone (a *receipt*, ~190 B) prove what the sender
sent and which ledger head it had seen; the ledger stores receipts.
Details (the wire format, why random nonces, version 1): docs/trust.md#envelope-format
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgeddl.security.keys import Identity, PublicIdentity, check_name

MAGIC = b"EDE1"
DOMAIN = b"edgeddl envelope v2\x00"
NO_LEDGER_HEAD = (-1, bytes(32))
"""(index, hash) of the ledger head before the sender has seen any entry."""
_FIXED = struct.Struct(">4sQQq32s32s")
NONCE_BYTES, TAG_BYTES, SIG_BYTES = 12, 16, 64

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
        names = b"".join(_short(s) for s in (self.run_id, self.sender, self.recipient))
        return fixed + names

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


def _short(text: str) -> bytes:
    raw = check_name(text).encode("utf-8")
    return bytes([len(raw)]) + raw


@dataclass(frozen=True, slots=True)
class Opened:
    header: Header
    body: bytes
    receipt: bytes
    """header | SHA-256(nonce | ciphertext) | signature: the sender's proof, for the ledger."""


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: RejectReason
    sender: str
    """The sender the envelope claims ("" when it could not be read)."""
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def overhead_bytes(run_id: str, sender: str, recipient: str) -> int:
    """Bytes an envelope adds to its body on the wire (what the simulator counts)."""
    names = sum(1 + len(s.encode("utf-8")) for s in (run_id, sender, recipient))
    return _FIXED.size + names + NONCE_BYTES + TAG_BYTES + SIG_BYTES


def _pair_key(
    own: Identity, peer: PublicIdentity, run_id: str, *, outgoing: bool
) -> ChaCha20Poly1305:
    """The AEAD of one direction between `own` and `peer` in one run."""
    sender, recipient = (own.name, peer.name) if outgoing else (peer.name, own.name)
    shared = own.agree_key.exchange(peer.agree_key)
    info = DOMAIN + b"".join(_short(s) for s in (run_id, sender, recipient))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
    return ChaCha20Poly1305(key)


def _nonce_tag(sealed: bytes | memoryview) -> bytes:
    """What the signature binds of the ciphertext: its nonce and its AEAD tag."""
    return bytes(sealed[:NONCE_BYTES]) + bytes(sealed[-TAG_BYTES:])


def _signed_message(header: bytes, nonce_tag: bytes) -> bytes:
    return DOMAIN + header + nonce_tag


class Sender:
    """Seals one identity's payloads in one run; numbers them from `first_seq`."""

    def __init__(self, identity: Identity, run_id: str, *, first_seq: int = 0) -> None:
        self.identity, self.run_id, self.next_seq = identity, run_id, first_seq
        self._keys: dict[str, ChaCha20Poly1305] = {}

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
        aead = self._keys.get(recipient.name)
        if aead is None:
            aead = _pair_key(self.identity, recipient, self.run_id, outgoing=True)
            self._keys[recipient.name] = aead
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + aead.encrypt(nonce, body, header)
        signature = self.identity.sign(_signed_message(header, _nonce_tag(sealed)))
        return header + sealed + signature


class Receiver:
    """Opens envelopes addressed to one identity in one run, from enrolled peers only.

    Per sender it keeps the highest sequence number accepted and which of the `window` below
    it were accepted, so it tells a replay (seen before) from a late arrival (out of order);
    both are refused, as is anything older than the window.

    `check_signatures=False` leaves the senders' Ed25519 signatures unchecked (the receipt
    is kept as it came). Authenticity then rests on the AEAD: its key comes from the static
    X25519 keys of this receiver and the sender, bound to run and direction, so only that
    sender could have sealed what opens, header included. That is enough for a party that
    keeps no receipts for others to check: a device opening its coordinator's answers
    (an Ed25519 verify, ~0.13 ms here, is most of a small payload's crypto). The
    coordinator, whose ledger holds the devices' receipts, always checks.
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
        self._keys: dict[str, ChaCha20Poly1305] = {}
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
        if len(wire) < pos + NONCE_BYTES + TAG_BYTES + SIG_BYTES:
            return Rejection("malformed", who, "shorter than its header, nonce, tag and signature")
        if header.recipient != self.identity.name:
            return Rejection("malformed", who, f"addressed to {header.recipient!r}")
        if header.run_id != self.run_id:
            return Rejection("replayed", who, f"from run {header.run_id!r}")
        peer = self.peers.get(who)
        if peer is None:
            return Rejection("unknown_sender", who, f"{who!r} is not enrolled")
        head, sealed, signature = view[:pos], view[pos:-SIG_BYTES], view[-SIG_BYTES:]
        aead = self._keys.get(who)
        if aead is None:
            aead = self._keys[who] = _pair_key(self.identity, peer, self.run_id, outgoing=False)
        try:
            nonce = bytes(sealed[:NONCE_BYTES])
            body = aead.decrypt(nonce, bytes(sealed[NONCE_BYTES:]), bytes(head))
        except InvalidTag:
            return Rejection("tampered", who, "ciphertext or header altered (AEAD tag mismatch)")
        receipt = bytes(head) + _nonce_tag(sealed) + bytes(signature)
        if self.check_signatures and verify_receipt(receipt, peer) is None:
            return Rejection("bad_signature", who, f"not signed by {who!r}")
        if hashlib.sha256(body).digest() != header.body_digest:
            return Rejection("malformed", who, "body digest does not match the signed header")
        verdict = self._check_sequence(who, header.seq)
        if verdict is not None:
            return verdict
        return Opened(header, body, receipt)

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
    signed = pos + NONCE_BYTES + TAG_BYTES
    if len(receipt) != signed + SIG_BYTES or header.sender != signer.name:
        return None
    message = _signed_message(receipt[:pos], receipt[pos:signed])
    return header if signer.verify(receipt[signed:], message) else None
