"""`[security]`: the coordinator's store with every value signed by whoever may write it.

The store (torch's `TCPStore`) is open to anyone who reaches the coordinator's port: it is
not a trust boundary. A secured fleet writes its values through `SignedStore`: each value
carries its author's name and an Ed25519 signature over (the coordinator's epoch, the key,
the value), and a read returns it only if its author may write that key (`author_of`): the
coordinator its announcements (scenario, engine, the checkpoint to resume from), a device
the keys named after it (its progress, final report, joins), any enrolled party the shared
ones (evaluation rows, the fleet's checkpoint and final state). A forged, moved or replayed
value raises `ForgedValue`, which the reader treats as if the value were not there.
Counters (`add`) are not values: nothing trusts them for more than a hint.
Details: docs/real-fleet.md#the-store
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from edgeddl.security.keys import Identity, PublicIdentity, name_bytes

DOMAIN = b"edgeddl store v1\x00"
SIG_BYTES = 64


class ForgedValue(ValueError):
    """A store value that its key's author did not sign (or that names no author)."""


AuthorOf = Callable[[str], frozenset[str] | None]
"""Who may write a key: the names allowed, or None for a key that is not signed (counters,
the engines' own keys)."""


class SignedStore:
    """A store whose values `identity` signs and whose reads are checked against `peers`."""

    def __init__(
        self,
        raw: Any,
        identity: Identity,
        peers: Mapping[str, PublicIdentity],
        author_of: AuthorOf,
        epoch: bytes = b"",
    ) -> None:
        self.raw, self.identity, self.peers = raw, identity, peers
        self.author_of, self.epoch = author_of, epoch

    def sign(self, key: str, value: bytes) -> bytes:
        who = name_bytes(self.identity.name)
        message = DOMAIN + self.epoch + key.encode() + b"\x00" + who + value
        return who + self.identity.sign(message) + value

    def open(self, key: str, data: bytes) -> bytes:
        """The value of `data` read at `key`; ForgedValue unless an allowed author signed it
        for this key and epoch."""
        allowed = self.author_of(key)
        if allowed is None:
            return data
        if not data or len(data) < 1 + data[0] + SIG_BYTES:
            raise ForgedValue(f"{key}: not a signed value")
        n = data[0]
        try:
            author = data[1 : 1 + n].decode("utf-8")
        except UnicodeDecodeError:
            raise ForgedValue(f"{key}: an author name that is not UTF-8") from None
        signer = self.peers.get(author)
        if signer is None or author not in allowed:
            raise ForgedValue(f"{key}: written by {author!r}, who may not write it")
        who, sig, value = data[: 1 + n], data[1 + n : 1 + n + SIG_BYTES], data[1 + n + SIG_BYTES :]
        if not signer.verify(sig, DOMAIN + self.epoch + key.encode() + b"\x00" + who + value):
            raise ForgedValue(f"{key}: the signature of {author!r} does not check")
        return value

    def set(self, key: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        if self.author_of(key) is not None:
            data = self.sign(key, data)
        self.raw.set(key, data)

    def get(self, key: str) -> bytes:
        return self.open(key, bytes(self.raw.get(key)))

    def check(self, keys: list[str]) -> bool:
        return bool(self.raw.check(keys))

    def add(self, key: str, amount: int) -> int:
        return int(self.raw.add(key, amount))

    def __getattr__(self, name: str) -> Any:  # what else the engines ask of a store
        return getattr(self.raw, name)


def fleet_authors(devices: list[str], coordinator: str, store_keys: Any) -> AuthorOf:
    """Who may write each of the fleet's keys (`store_keys`: the `store` module, whose key
    names and key functions this reads)."""
    k = store_keys
    mine = frozenset({coordinator})
    everyone = frozenset(devices) | mine
    announced = {
        k.KEY_SCENARIO, k.KEY_ENGINE, k.KEY_BACKEND, k.KEY_RUN_ID, k.KEY_MIN_DEVICES,
        k.KEY_LIGHTHOUSE, k.KEY_ROWS_KNOWN,
    }
    per_device = [f("") for f in (k.final_key, k.progress_key, k.joined_key, k.engine_key, k.stopped_key)]

    def author_of(key: str) -> frozenset[str] | None:
        if key in announced:
            return mine
        for prefix in per_device:
            if key.startswith(prefix):
                name = key[len(prefix) :]
                return frozenset({name}) if name in devices else frozenset()
        if key.startswith(k.row_key(0)[:-1]) or key == k.KEY_DONE:
            return everyone
        return None

    return author_of
