"""`[security]`: the coordinator's store with every value signed by whoever may write it.

The store (torch's `TCPStore`) is open to anyone who reaches the coordinator's port: it is
not a trust boundary. A secured fleet writes its values through `SignedStore`: each value
carries its author's name and an Ed25519 signature over (the run id, the key, the author,
the value), and a read returns it only if an author who may write that key signed it for
this run (`fleet_authors`): the coordinator its announcements (scenario, engine, the
checkpoint to resume from), a device the keys named after it (its progress, final report,
joins), any enrolled party the shared ones (evaluation rows, the fleet's checkpoint and
final state). A forged value, one moved to another key, or one recorded in another run and
replayed here raises `ForgedValue`: a device refuses to go on (one line), the coordinator
reads it as absent. The run id itself is the one value signed unbound (it is what a reader
binds to); a device trusts it once the coordinator's handshake proves it
(`device_setup.prove_run`). Counters (`add`) and the engines' own keys are not values:
nothing trusts them for more than a hint.
Details: docs/trust.md#the-store
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from edgeddl.config.loader import ConfigError
from edgeddl.config.security import SECURITY_COORDINATOR
from edgeddl.runtime.fleet import checkpoint as ck
from edgeddl.runtime.fleet import store as keys
from edgeddl.security.keys import Identity, PublicIdentity, name_bytes

DOMAIN = b"edgeddl store v2\x00"
SIG_BYTES = 64


class ForgedValue(ConfigError):
    """A store value that no author allowed for its key signed."""


AuthorOf = Callable[[str], frozenset[str] | None]
"""Who may write a key: the names allowed, or None for a key that is not signed."""


def _message(key: str, who: bytes, value: bytes, run_id: str) -> bytes:
    """What an author signs: the value bound to its key and to run `run_id`, except the run
    id itself (KEY_RUN_ID, signed with an empty run: what a reader binds to)."""
    run = b"\x00" if key == keys.KEY_RUN_ID else name_bytes(run_id)
    return DOMAIN + run + key.encode() + b"\x00" + who + value


def open_value(
    key: str,
    data: bytes,
    peers: Mapping[str, PublicIdentity],
    allowed: frozenset[str],
    run_id: str,
) -> bytes:
    """The value `data` holds for `key`; ForgedValue unless one of `allowed` signed it for
    run `run_id`."""
    n = data[0] if data else 0
    if len(data) < 1 + n + SIG_BYTES:
        raise ForgedValue(f"the store's {key}: not a signed value (someone else wrote it)")
    who, sig, value = data[: 1 + n], data[1 + n : 1 + n + SIG_BYTES], data[1 + n + SIG_BYTES :]
    author = who[1:].decode("utf-8", errors="replace")
    signer = peers.get(author)
    if signer is None or author not in allowed:
        raise ForgedValue(f"the store's {key}: written by {author!r}, who may not write it")
    if not signer.verify(sig, _message(key, who, value, run_id)):
        raise ForgedValue(
            f"the store's {key}: not signed by {author!r} (someone else wrote it)"
            if key == keys.KEY_RUN_ID
            else f"the store's {key}: not signed by {author!r} in run {run_id!r} (it belongs "
            "to another run, or someone else wrote it)"
        )
    return value


def run_id_of(raw: Any, peers: Mapping[str, PublicIdentity]) -> str:
    """The run id in store `raw`, once the coordinator of `peers` signed it (ForgedValue if
    not). Only the store's word: an earlier run's, replayed, checks too; a device binds to it
    and then has the coordinator's handshake prove it (`device_setup.prove_run`)."""
    data = bytes(raw.get(keys.KEY_RUN_ID))
    return open_value(keys.KEY_RUN_ID, data, peers, frozenset({SECURITY_COORDINATOR}), "").decode()


def unchecked(data: bytes) -> bytes:
    """A signed value's bytes without checking who signed it: for a reader that only
    watches (a progress display, a test), never one that acts on it."""
    n = data[0] if data else 0
    return data[1 + n + SIG_BYTES :] if 0 < n < 32 and len(data) >= 1 + n + SIG_BYTES else data


class SignedStore:
    """A store whose values `identity` signs for run `run_id` and whose reads are checked
    against `peers` and that run (`raw`: the store itself, for what the engines build on it)."""

    def __init__(
        self,
        raw: Any,
        identity: Identity,
        peers: Mapping[str, PublicIdentity],
        author_of: AuthorOf,
        run_id: str,
    ) -> None:
        self.raw, self.identity, self.peers, self.author_of = raw, identity, peers, author_of
        self.run_id = run_id
        """The run every value read or written is bound to."""
        name_bytes(run_id)  # a run id that cannot be signed fails here, not at the first set

    def set(self, key: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else bytes(value)
        if self.author_of(key) is not None:
            who = name_bytes(self.identity.name)
            data = who + self.identity.sign(_message(key, who, data, self.run_id)) + data
        self.raw.set(key, data)

    def get(self, key: str) -> bytes:
        data = bytes(self.raw.get(key))
        allowed = self.author_of(key)
        return data if allowed is None else open_value(key, data, self.peers, allowed, self.run_id)

    def check(self, keys_: list[str]) -> bool:
        """Whether every key holds a value (for a signed key: one its author signed)."""
        if not self.raw.check(keys_):
            return False
        for key in keys_:
            if self.author_of(key) is not None:
                try:
                    self.get(key)
                except ForgedValue:
                    return False
        return True

    def add(self, key: str, amount: int) -> int:
        return int(self.raw.add(key, amount))

    def __getattr__(self, name: str) -> Any:  # anything else the engines ask of a store
        return getattr(self.raw, name)


def raw_store(store: Any) -> Any:
    """The store itself under a `SignedStore` (what torch's own stores are built on)."""
    return getattr(store, "raw", store)


def fleet_authors(devices: list[str]) -> AuthorOf:
    """Who may write each of the fleet's keys."""
    coordinator = frozenset({SECURITY_COORDINATOR})
    everyone = frozenset(devices) | coordinator
    announced = {
        keys.KEY_SCENARIO,
        keys.KEY_ENGINE,
        keys.KEY_BACKEND,
        keys.KEY_RUN_ID,
        keys.KEY_MIN_DEVICES,
        keys.KEY_LIGHTHOUSE,
        keys.KEY_ROWS_KNOWN,
        ck.KEY_RESUME,
        ck.KEY_CHECKPOINT_EVERY,
    }
    shared = {keys.KEY_DONE, ck.KEY_CHECKPOINT, ck.KEY_CHECKPOINT_STEP, ck.KEY_FINAL_STATE}
    per_device = [
        f("")
        for f in (
            keys.final_key,
            keys.progress_key,
            keys.joined_key,
            keys.stopped_key,
            keys.engine_key,
        )
    ]
    rows = keys.row_key(0)[:-1]

    def author_of(key: str) -> frozenset[str] | None:
        if key in announced:
            return coordinator
        if key in shared or key.startswith(rows):
            return everyone
        for prefix in per_device:
            if key.startswith(prefix):
                name = key[len(prefix) :]
                return frozenset({name}) if name in devices else frozenset()
        return None

    return author_of


def fleet_store(
    raw: Any, scenario: Any, name: str, keys_dir: str = "", run_id: str = ""
) -> SignedStore:
    """`raw` with the values of party `name` (a device, or the coordinator) signed with its
    key from `keys_dir` (default: the scenario's), and every read checked against the
    scenario's enrolled identities; all bound to run `run_id` (the coordinator's own, or by
    default the one the store names: a device's, until its handshake proves it)."""
    from pathlib import Path

    from edgeddl.security.keys import enrolled
    from edgeddl.security.session import enrolled_identity

    peers = enrolled(scenario.security)
    identity = enrolled_identity(Path(keys_dir or scenario.security.keys_dir), name, peers)
    authors = fleet_authors(scenario.fleet.device_names())
    return SignedStore(raw, identity, peers, authors, run_id or run_id_of(raw, peers))
