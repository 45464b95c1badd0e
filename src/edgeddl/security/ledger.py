"""The audit ledger: an append-only, hash-chained, signed JSON-lines file (format 2).

Entries are chained by SHA-256 and signed by their author, whose role must be allowed to
write that kind (`ROLES`). Devices' signed receipts hold the ledger head they saw, so a
coordinator that rewrites an entry a device has seen is caught. The `run` entry binds the
run's config file, the closing entry the model and summary files, and a signed head
(`sign_head`) pins a length an outsider can hold the ledger to. Written and fsynced in
batches; a crash can only tear the last line, which is reported, ignored and cut off on
reopening. `ledger_verify.verify` checks a ledger, `audit.verify_run` a run folder.
Details (the entry format): docs/trust.md#ledger-format
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeddl.config.security import SECURITY_COORDINATOR
from edgeddl.security.envelope import Opened, Rejection
from edgeddl.security.keys import Identity, PublicIdentity

LEDGER_FILE = "ledger.jsonl"
"""The ledger's name in a run folder."""
HEAD_FILE = "ledger.head.json"
"""The signed head a closing run writes beside its ledger, for the user to publish."""
CONFIG_FILE, MODEL_FILE, SUMMARY_FILE = "config.resolved.toml", "model.pt", "summary.json"
"""The run folder's files the ledger vouches for (by SHA-256 of their bytes)."""
FORMAT = 2
"""The ledger format, in the `run` entry; format 1 (edgeddl before it) had none."""
DOMAIN = b"edgeddl ledger v2\x00"
HEAD_DOMAIN = b"edgeddl ledger head v2\x00"
GENESIS = "0" * 64
KINDS = (
    "run",
    "join",
    "leave",
    "crash",
    "update",
    "aggregate",
    "checkpoint",
    "reject",
    "run_end",
    "interrupted",
    "resumed",
)
CLOSING = ("run_end", "interrupted")
"""Entries that end a ledger; only a `resumed` entry may follow an `interrupted` one. Each
names the model's digest and the SHA-256 of the run's model and summary files."""
DIGEST_MARKS = ("checkpoint", "interrupted", "resumed", "run_end")
"""Entries that name the model's digest at a step boundary."""
FIELDS = {"author", "index", "kind", "payload", "prev", "sig", "time"}
HEAD_ORDER = ("run_id", "entries", "hash", "time", "signer", "signature")
HEAD_FIELDS = set(HEAD_ORDER)
ROLES: dict[str, frozenset[str]] = {
    "coordinator": frozenset(KINDS),
    "device": frozenset(),
}
"""Which role may write which entry kind. A device's word is its signed receipt inside the
coordinator's entries; a device key may write no entry of its own."""


def role_of(name: str) -> str:
    """An identity's role: the coordinator's name is the coordinator's, any other a device's."""
    return "coordinator" if name == SECURITY_COORDINATOR else "device"


def canonical(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def strict_b64(text: str) -> bytes:
    """Decode base64 that is exactly what `b64` writes (no stray or non-canonical bits)."""
    raw = base64.b64decode(text, validate=True)
    if b64(raw) != text:
        raise ValueError("not canonical base64")
    return raw


def model_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a model's state: names, dtypes, shapes and values, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        array = state[name].detach().cpu().contiguous().numpy()
        h.update(canonical([name, str(array.dtype), list(array.shape)]))
        h.update(array.tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes; OSError if it cannot be read."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_payload(run_id: str, scenario: str, devices: list[str], run_dir: Path) -> dict[str, Any]:
    """The `run` entry: the format, the run, and the SHA-256 of the run's config file (written
    before the ledger's first entry, so the ledger belongs to this folder's run)."""
    return {
        "format": FORMAT,
        "run_id": run_id,
        "scenario": scenario,
        "devices": devices,
        "config_sha256": file_sha256(Path(run_dir) / CONFIG_FILE),
    }


def update_payload(opened: Opened) -> dict[str, Any]:
    """The `update` entry for a device's payload the coordinator accepted."""
    h = opened.header
    return {
        "device": h.sender,
        "step": h.step,
        "seq": h.seq,
        "digest": h.body_digest.hex(),
        "size": len(opened.body),
        "receipt": b64(opened.receipt),
    }


def reject_payload(rejection: Rejection, *, step: int) -> dict[str, Any]:
    """The `reject` entry for a payload the coordinator refused."""
    return {
        "device": rejection.sender,
        "step": step,
        "reason": rejection.reason,
        "detail": rejection.detail,
    }


def aggregate_payload(
    step: int, updates: list[int], model_digest: str, screened: dict[int, str] | None = None
) -> dict[str, Any]:
    """The `aggregate` entry: the `update` entries the step's aggregate used, the model's
    digest after it, and the accepted updates a robust screen kept out (entry -> reason)."""
    payload: dict[str, Any] = {"step": step, "updates": updates, "model_digest": model_digest}
    if screened:
        payload["screened"] = [{"update": e, "reason": r} for e, r in sorted(screened.items())]
    return payload


def closing_payload(run_dir: Path, digest: str) -> dict[str, Any]:
    """What a `run_end` or `interrupted` entry vouches for: the model's digest and the
    SHA-256 of the model and summary files (written before it)."""
    return {
        "model_digest": digest,
        "model_sha256": file_sha256(Path(run_dir) / MODEL_FILE),
        "summary_sha256": file_sha256(Path(run_dir) / SUMMARY_FILE),
    }


def split_lines(data: bytes) -> tuple[list[bytes], int]:
    """Complete lines, and the length of a torn last line (no newline) if there is one."""
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    return lines, len(torn)


class Ledger:
    """Appends signed, chained entries to `path`; reopening continues the chain."""

    def __init__(self, path: Path, *, flush_every: int = 32) -> None:
        self.path, self.flush_every = Path(path), flush_every
        self._pending: list[bytes] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self.path.read_bytes() if self.path.exists() else b""
        lines, self.torn_tail_bytes = split_lines(data)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        if self.torn_tail_bytes:  # a crash mid-write: cut the partial line, chain on
            os.ftruncate(self._fd, len(data) - self.torn_tail_bytes)
            os.fsync(self._fd)
        os.lseek(self._fd, 0, os.SEEK_END)
        self.index = len(lines) - 1
        self.head_hash = hashlib.sha256(lines[-1]).hexdigest() if lines else GENESIS
        if not data:
            _fsync_dir(self.path.parent)

    @property
    def head(self) -> tuple[int, bytes]:
        """(index, hash) of the last entry: what a sender puts in its envelope header."""
        return self.index, bytes.fromhex(self.head_hash)

    def append(
        self,
        author: Identity,
        kind: str,
        payload: Mapping[str, Any],
        *,
        time_s: float | None = None,
    ) -> int:
        """Sign and chain one entry; returns its index. Written at the next flush."""
        if self._fd < 0:
            raise ValueError(f"{self.path}: the ledger is closed; nothing may follow its end")
        if kind not in KINDS:
            raise ValueError(f"ledger entry kind {kind!r}: allowed: {', '.join(KINDS)}")
        entry: dict[str, Any] = {
            "author": author.name,
            "index": self.index + 1,
            "kind": kind,
            "payload": dict(payload),
            "prev": self.head_hash,
            "time": time.time() if time_s is None else float(time_s),
        }
        entry["sig"] = b64(author.sign(DOMAIN + canonical(entry)))
        line = canonical(entry)
        self._pending.append(line + b"\n")
        self.index += 1
        self.head_hash = hashlib.sha256(line).hexdigest()
        if len(self._pending) >= self.flush_every:
            self.flush()
        return self.index

    def flush(self) -> None:
        """Write the pending entries and fsync: they survive a crash from now on."""
        if self._pending:
            data = b"".join(self._pending)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            self._pending.clear()
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            self.flush()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _fsync_dir(folder: Path) -> None:
    """Make a new file's name durable too (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_entries(path: Path) -> tuple[list[dict[str, Any] | None], int]:
    """The entries as written, None for a line that is not a JSON table (unchecked:
    `verify` checks), and the torn tail's length."""
    lines, torn = split_lines(Path(path).read_bytes())
    entries: list[dict[str, Any] | None] = []
    for line in lines:
        try:
            entry = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            entry = None
        entries.append(entry if isinstance(entry, dict) else None)
    return entries, torn


@dataclass(frozen=True, slots=True)
class SignedHead:
    """The coordinator's signed word on a ledger's length and last entry (like a Certificate
    Transparency signed tree head): published, it holds the ledger to at least that much."""

    run_id: str
    entries: int
    """How many entries the ledger held."""
    hash: str
    """SHA-256 (hex) of entry `entries - 1`'s line."""
    time: float
    signer: str
    signature: str
    """Ed25519 (base64) by `signer` over `HEAD_DOMAIN` and the other fields."""

    def message(self) -> bytes:
        fields = {"entries": self.entries, "hash": self.hash, "run_id": self.run_id}
        return HEAD_DOMAIN + canonical({**fields, "signer": self.signer, "time": self.time})

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in HEAD_ORDER}

    @classmethod
    def from_json(cls, obj: Any) -> SignedHead:
        """ValueError (one line) for anything but a head `to_json` wrote."""
        if not isinstance(obj, dict) or set(obj) != HEAD_FIELDS:
            raise ValueError(f"not a ledger head: its fields are not {', '.join(HEAD_ORDER)}")
        types = {"run_id": str, "entries": int, "hash": str, "signer": str, "signature": str}
        bad = [k for k, t in types.items() if not isinstance(obj[k], t) or isinstance(obj[k], bool)]
        if bad or not isinstance(obj["time"], int | float) or obj["entries"] < 1:
            raise ValueError(f"not a ledger head: {', '.join(bad) or 'time or entries'} malformed")
        return cls(**{**obj, "time": float(obj["time"])})

    def signed_by(self, signer: PublicIdentity) -> bool:
        try:
            signature = strict_b64(self.signature)
        except ValueError:
            return False
        return signer.name == self.signer and signer.verify(signature, self.message())


def sign_head(
    identity: Identity, run_id: str, entries: int, last_hash: str, time_s: float | None = None
) -> SignedHead:
    """`identity`'s signed head of a ledger of `entries` entries ending in `last_hash`."""
    unsigned = SignedHead(
        run_id, entries, last_hash, time.time() if time_s is None else time_s, identity.name, ""
    )
    signature = b64(identity.sign(unsigned.message()))
    return SignedHead(run_id, entries, last_hash, unsigned.time, identity.name, signature)


def ledger_tip(path: Path) -> tuple[str, int, str]:
    """(run id of its `run` entry, number of complete entries, hash of the last one) of a
    ledger file, unchecked (`verify` checks); ValueError if it holds no run entry."""
    lines, _ = split_lines(Path(path).read_bytes())
    try:
        payload = json.loads(lines[0]).get("payload") if lines else None
    except (ValueError, AttributeError):
        payload = None
    if not isinstance(payload, dict) or not isinstance(payload.get("run_id"), str):
        raise ValueError(f"{path}: its first entry is not a run entry with a run_id")
    return payload["run_id"], len(lines), hashlib.sha256(lines[-1]).hexdigest()
