"""Authenticated sessions: a signed handshake with fresh X25519 keys, then numbered frames.

The SIGMA pattern (Krawczyk, CRYPTO 2003) in the form TLS 1.3 uses: each side sends a fresh
ephemeral X25519 key, signs the hash of the transcript so far with its enrolled Ed25519
identity, and proves it holds the derived keys with a MAC over its own name. Three messages:

    device -> coordinator   hello:    version, device name, ephemeral key, nonce
    coordinator -> device   reply:    run id, coordinator name, ephemeral key,
                                      signature(transcript), MAC(name)
    device -> coordinator   confirm:  signature(transcript), MAC(name)

The session keys come from the ephemeral keys alone (forward secrecy: a stolen identity key
does not open recorded traffic) and are bound to the whole transcript (run id and both
names). Both sides are authenticated by signatures only their own identity key can make, so
holding a device's key does not let anyone pass as the coordinator (no key-compromise
impersonation). After the handshake every message is a frame: ChaCha20-Poly1305 under the
direction's key, its nonce the frame's number, so a frame replayed, dropped or reordered on
the link does not open. Identities travel in the clear (they name the link anyway).
Details: docs/trust.md#sessions
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgeddl.security.keys import Identity, PublicIdentity, check_name, name_bytes

VERSION = 1
DOMAIN = b"edgeddl session v1\x00"
MAX_HANDSHAKE_BYTES = 1024
"""No handshake message is longer (three names of at most 255 bytes, keys, signatures)."""
_KEY, _NONCE, _SIG, _MAC = 32, 16, 64, 32
TAG_BYTES = 16
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class HandshakeError(ValueError):
    """A handshake message that is malformed, unsigned or from someone not enrolled."""


class FrameError(ValueError):
    """A frame that does not open: altered, replayed, reordered or from another session."""


def _readname_bytes(data: bytes, pos: int, count: int) -> tuple[list[str], int]:
    names = []
    for _ in range(count):
        if pos >= len(data) or pos + 1 + data[pos] > len(data):
            raise HandshakeError("ends inside a name")
        n = data[pos]
        try:
            names.append(check_name(data[pos + 1 : pos + 1 + n].decode("utf-8")))
        except (UnicodeDecodeError, ValueError):
            raise HandshakeError("a name that is not a plain identity name") from None
        pos += 1 + n
    return names, pos


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*_RAW)


def _keys(secret: bytes, transcript: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(device->coordinator, coordinator->device, device MAC, coordinator MAC) keys."""
    okm = HKDF(
        algorithm=hashes.SHA256(), length=4 * 32, salt=transcript, info=DOMAIN + b"keys"
    ).derive(secret)
    return okm[:32], okm[32:64], okm[64:96], okm[96:]


def _exchange(own: X25519PrivateKey, peer: bytes) -> bytes:
    try:
        return own.exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError:  # a low-order point: no shared secret
        raise HandshakeError("an ephemeral key that is not a usable X25519 key") from None


def _mac(key: bytes, transcript: bytes, name: str) -> bytes:
    return hmac.new(key, transcript + name_bytes(name), hashlib.sha256).digest()


def _signed(role: bytes, transcript: bytes) -> bytes:
    return DOMAIN + role + transcript


@dataclass(slots=True)
class Session:
    """One side of an established session: frames out and in, each numbered."""

    run_id: str
    own: str
    peer: str
    session_id: bytes
    """Names the session (a hash of its transcript): bound into every frame."""
    _out: ChaCha20Poly1305
    _in: ChaCha20Poly1305
    sent: int = 0
    received: int = 0

    def seal(self, body: bytes) -> bytes:
        """The next frame: `body` encrypted and authenticated (16 bytes longer)."""
        nonce = struct.pack(">4xQ", self.sent)
        frame = self._out.encrypt(nonce, body, self.session_id)
        self.sent += 1
        return frame

    def open(self, frame: bytes) -> bytes:
        """The next frame's body; FrameError if it is not the next frame of this session."""
        nonce = struct.pack(">4xQ", self.received)
        try:
            body = self._in.decrypt(nonce, frame, self.session_id)
        except InvalidTag:
            raise FrameError(
                f"frame {self.received} from {self.peer} does not open (altered, replayed "
                "or out of order)"
            ) from None
        self.received += 1
        return body


def _session(
    run_id: str, own: str, peer: str, transcript: bytes, out_key: bytes, in_key: bytes
) -> Session:
    sid = hashlib.sha256(DOMAIN + b"id" + transcript).digest()[:16]
    return Session(run_id, own, peer, sid, ChaCha20Poly1305(out_key), ChaCha20Poly1305(in_key))


class Initiator:
    """The device's side: `hello()`, then `confirm(reply)` gives the confirm and the session."""

    def __init__(self, identity: Identity, coordinator: PublicIdentity) -> None:
        self.identity, self.coordinator = identity, coordinator
        self._eph = X25519PrivateKey.generate()
        self._hello = (
            b"EDH1" + bytes([VERSION]) + name_bytes(identity.name) + _public(self._eph)
        ) + os.urandom(_NONCE)

    def hello(self) -> bytes:
        return self._hello

    def confirm(self, reply: bytes, *, run_id: str | None = None) -> tuple[bytes, Session]:
        """(confirm message, session) once `reply` proves the coordinator; HandshakeError if
        it does not (or names another run than `run_id`, when given)."""
        if len(reply) > MAX_HANDSHAKE_BYTES:
            raise HandshakeError("the coordinator's reply is too long")
        (got_run, name), pos = _readname_bytes(reply, 0, 2)
        if name != self.coordinator.name:
            raise HandshakeError(f"the reply names {name!r}, not {self.coordinator.name!r}")
        if run_id is not None and got_run != run_id:
            raise HandshakeError(f"the coordinator is in run {got_run!r}, not {run_id!r}")
        if len(reply) != pos + _KEY + _SIG + _MAC:
            raise HandshakeError("the coordinator's reply has the wrong length")
        peer_eph = reply[pos : pos + _KEY]
        sig = reply[pos + _KEY : pos + _KEY + _SIG]
        mac = reply[pos + _KEY + _SIG :]
        th2 = hashlib.sha256(DOMAIN + self._hello + reply[: pos + _KEY]).digest()
        if not self.coordinator.verify(sig, _signed(b"coordinator", th2)):
            raise HandshakeError("the reply is not signed by the enrolled coordinator")
        secret = _exchange(self._eph, peer_eph)
        up, down, mac_dev, mac_coord = _keys(secret, th2)
        if not hmac.compare_digest(mac, _mac(mac_coord, th2, name)):
            raise HandshakeError("the reply's key confirmation does not match")
        th3 = hashlib.sha256(th2 + sig + mac).digest()
        own = self.identity.name
        confirm = self.identity.sign(_signed(b"device", th3)) + _mac(mac_dev, th3, own)
        return confirm, _session(got_run, own, name, th3, up, down)


@dataclass(slots=True)
class _Pending:
    device: PublicIdentity
    th3: bytes
    up: bytes
    down: bytes
    mac_dev: bytes


class Responder:
    """The coordinator's side: `reply(hello)`, then `accept(confirm)` gives the session.

    A hello from a name that is not enrolled is refused before any key is made."""

    def __init__(self, identity: Identity, run_id: str, peers: Mapping[str, PublicIdentity]):
        self.identity, self.run_id, self.peers = identity, run_id, peers
        self._pending: _Pending | None = None

    def reply(self, hello: bytes) -> bytes:
        if not hello.startswith(b"EDH1") or not 5 < len(hello) <= MAX_HANDSHAKE_BYTES:
            raise HandshakeError("not an edgeddl session hello")
        if hello[4] != VERSION:
            raise HandshakeError(f"session version {hello[4]}, this coordinator speaks {VERSION}")
        (name,), pos = _readname_bytes(hello, 5, 1)
        device = self.peers.get(name)
        if device is None or name == self.identity.name:
            raise HandshakeError(f"{name!r} is not an enrolled device")
        if len(hello) != pos + _KEY + _NONCE:
            raise HandshakeError("the hello has the wrong length")
        peer_eph = hello[pos : pos + _KEY]
        eph = X25519PrivateKey.generate()
        head = name_bytes(self.run_id, self.identity.name) + _public(eph)
        th2 = hashlib.sha256(DOMAIN + hello + head).digest()
        up, down, mac_dev, mac_coord = _keys(_exchange(eph, peer_eph), th2)
        sig = self.identity.sign(_signed(b"coordinator", th2))
        mac = _mac(mac_coord, th2, self.identity.name)
        self._pending = _Pending(
            device, hashlib.sha256(th2 + sig + mac).digest(), up, down, mac_dev
        )
        return head + sig + mac

    def accept(self, confirm: bytes) -> Session:
        """The session once `confirm` proves the device named in the hello."""
        p = self._pending
        if p is None:
            raise HandshakeError("a confirm before a hello")
        self._pending = None  # one try
        if len(confirm) != _SIG + _MAC:
            raise HandshakeError("the confirm has the wrong length")
        if not p.device.verify(confirm[:_SIG], _signed(b"device", p.th3)):
            raise HandshakeError(f"the confirm is not signed by {p.device.name!r}")
        if not hmac.compare_digest(confirm[_SIG:], _mac(p.mac_dev, p.th3, p.device.name)):
            raise HandshakeError("the confirm's key confirmation does not match")
        return _session(self.run_id, self.identity.name, p.device.name, p.th3, p.down, p.up)


def handshake_bytes(run_id: str, device: str, coordinator: str) -> tuple[int, int]:
    """(bytes the device sends, bytes it receives) in a handshake: what a simulator charges."""
    hello = 5 + len(name_bytes(device)) + _KEY + _NONCE
    reply = len(name_bytes(run_id, coordinator)) + _KEY + _SIG + _MAC
    return hello + _SIG + _MAC, reply
