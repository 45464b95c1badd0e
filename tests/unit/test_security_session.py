"""Sessions: the signed handshake with fresh X25519 keys and the numbered frames after it.

Each property the handshake is for, tried as an attacker would: a name nobody enrolled, a
device key used to pass as the coordinator (key-compromise impersonation), a recorded
session that a stolen identity key does not open (forward secrecy), a reply of another run,
a replayed hello, altered or replayed or reordered frames."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from edgeddl.security.handshake import (
    DOMAIN,
    MAX_HANDSHAKE_BYTES,
    FrameError,
    HandshakeError,
    Initiator,
    Responder,
    Session,
    _keys,
    handshake_bytes,
)
from edgeddl.security.keys import Identity

RUN = "run-9"


@pytest.fixture(scope="module")
def ids() -> dict[str, Identity]:
    return {n: Identity.generate(n) for n in ("coordinator", "pi-0", "pi-1", "mallory")}


def _responder(ids: dict[str, Identity], run: str = RUN) -> Responder:
    devices = {n: ids[n].public() for n in ("pi-0", "pi-1")}
    return Responder(ids["coordinator"], run, devices)


def _pair(ids: dict[str, Identity], device: str = "pi-0") -> tuple[Session, Session]:
    initiator = Initiator(ids[device], ids["coordinator"].public())
    responder = _responder(ids)
    hello = initiator.hello()
    reply = responder.reply(hello)
    confirm, mine = initiator.confirm(reply)
    assert (len(hello) + len(confirm), len(reply)) == handshake_bytes(RUN, device, "coordinator")
    return mine, responder.accept(confirm)


def test_handshake_both_ways_and_frames(ids: dict[str, Identity]) -> None:
    device, coordinator = _pair(ids)
    assert (device.run_id, device.peer, coordinator.peer) == (RUN, "coordinator", "pi-0")
    assert device.session_id == coordinator.session_id
    for i in range(3):
        frame = device.seal(f"request {i}".encode())
        assert b"request" not in frame  # encrypted
        assert coordinator.open(frame) == f"request {i}".encode()
        assert device.open(coordinator.seal(b"answer")) == b"answer"
    # Two handshakes of the same parties have different keys (fresh ephemeral keys).
    other, _ = _pair(ids)
    assert other.session_id != device.session_id
    with pytest.raises(FrameError):
        coordinator.open(other.seal(b"from another session"))


def test_frames_replayed_reordered_or_altered_do_not_open(ids: dict[str, Identity]) -> None:
    device, coordinator = _pair(ids)
    first, second = device.seal(b"one"), device.seal(b"two")
    with pytest.raises(FrameError):
        coordinator.open(second)  # before the first
    assert coordinator.open(first) == b"one"
    with pytest.raises(FrameError):
        coordinator.open(first)  # again
    bad = bytearray(second)
    bad[0] ^= 1
    with pytest.raises(FrameError):
        coordinator.open(bytes(bad))
    assert coordinator.open(second) == b"two"
    with pytest.raises(FrameError):  # a device's frame does not open as the coordinator's
        device.open(device.seal(b"reflected"))


def test_unenrolled_name_is_refused_before_any_key(ids: dict[str, Identity]) -> None:
    mallory = Initiator(ids["mallory"], ids["coordinator"].public())
    with pytest.raises(HandshakeError, match="not an enrolled device"):
        _responder(ids).reply(mallory.hello())
    as_coordinator = Initiator(ids["coordinator"], ids["coordinator"].public())
    with pytest.raises(HandshakeError, match="not an enrolled device"):
        _responder(ids).reply(as_coordinator.hello())


def test_a_name_claimed_without_its_key_is_refused(ids: dict[str, Identity]) -> None:
    """mallory says she is pi-0: the coordinator answers, but her confirm is not signed by
    pi-0's key."""
    claimed = Identity("pi-0", ids["mallory"].sign_key, ids["mallory"].agree_key)
    initiator = Initiator(claimed, ids["coordinator"].public())
    responder = _responder(ids)
    confirm, _ = initiator.confirm(responder.reply(initiator.hello()))
    with pytest.raises(HandshakeError, match="not signed by 'pi-0'"):
        responder.accept(confirm)
    with pytest.raises(HandshakeError, match="before a hello"):
        responder.accept(confirm)  # one try per hello


def test_a_device_key_does_not_pass_as_the_coordinator(ids: dict[str, Identity]) -> None:
    """Key-compromise impersonation: with pi-0's private key, mallory answers pi-0's hello
    as 'coordinator'. pi-0 refuses: the reply must be signed by the coordinator's key."""
    victim = Initiator(ids["pi-0"], ids["coordinator"].public())
    stolen = Identity("coordinator", ids["pi-0"].sign_key, ids["pi-0"].agree_key)
    fake = Responder(stolen, RUN, {"pi-0": ids["pi-0"].public()})
    with pytest.raises(HandshakeError, match="not signed by the enrolled coordinator"):
        victim.confirm(fake.reply(victim.hello()))


def test_a_reply_of_another_run_or_altered_is_refused(ids: dict[str, Identity]) -> None:
    initiator = Initiator(ids["pi-0"], ids["coordinator"].public())
    reply = _responder(ids, run="run-old").reply(initiator.hello())
    with pytest.raises(HandshakeError, match="run-old"):
        initiator.confirm(reply, run_id=RUN)
    initiator = Initiator(ids["pi-0"], ids["coordinator"].public())
    reply = bytearray(_responder(ids).reply(initiator.hello()))
    reply[-40] ^= 1  # inside the signature
    with pytest.raises(HandshakeError):
        initiator.confirm(bytes(reply))


def test_a_replayed_hello_gets_nowhere(ids: dict[str, Identity]) -> None:
    """An eavesdropper replays pi-0's hello and confirm to open a session of its own: the
    coordinator's new ephemeral key makes the old confirm worthless."""
    initiator = Initiator(ids["pi-0"], ids["coordinator"].public())
    hello = initiator.hello()
    confirm, _ = initiator.confirm(_responder(ids).reply(hello))
    again = _responder(ids)
    again.reply(hello)
    with pytest.raises(HandshakeError):
        again.accept(confirm)


def test_forward_secrecy_stolen_keys_do_not_open_recorded_frames(
    ids: dict[str, Identity],
) -> None:
    """Everything an eavesdropper recorded, plus both parties' identity keys stolen later:
    the keys of the session came from its ephemeral keys (gone), so the key schedule run
    with what the identity keys give (their X25519 agreement, as static-static envelopes
    used) does not open a recorded frame, and neither does a replay of the handshake."""
    initiator = Initiator(ids["pi-0"], ids["coordinator"].public())
    responder = _responder(ids)
    hello = initiator.hello()
    reply = responder.reply(hello)
    confirm, device = initiator.confirm(reply)
    coordinator = responder.accept(confirm)
    recorded = device.seal(b"secret gradient")
    static = ids["pi-0"].agree_key.exchange(ids["coordinator"].public().agree_key)
    th2 = hashlib.sha256(DOMAIN + hello + reply[:-96]).digest()
    up = _keys(static, th2)[0]
    sid = hashlib.sha256(DOMAIN + b"id" + hashlib.sha256(th2 + reply[-96:]).digest()).digest()
    assert sid[:16] == coordinator.session_id  # the schedule as the parties ran it
    with pytest.raises(InvalidTag):
        ChaCha20Poly1305(up).decrypt(bytes(12), recorded, sid[:16])
    thief = _responder(ids)
    thief.reply(hello)
    with pytest.raises(HandshakeError):
        thief.accept(confirm)
    assert coordinator.open(recorded) == b"secret gradient"


@pytest.mark.parametrize(
    "hello",
    [b"", b"EDH1", b"EDH1\x02" + bytes(60), b"EDH1\x01\x05pi", b"EDH1" + bytes(2000)],
    ids=["empty", "magic only", "version 2", "name cut", "too long"],
)
def test_malformed_hellos(ids: dict[str, Identity], hello: bytes) -> None:
    assert len(hello) <= MAX_HANDSHAKE_BYTES or hello.startswith(b"EDH1")
    with pytest.raises(HandshakeError):
        _responder(ids).reply(hello)
