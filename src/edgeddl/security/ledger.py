"""The audit ledger: an append-only, hash-chained, signed JSON-lines file.

Entries are chained by SHA-256 and signed by their author. Devices' signed receipts hold the
ledger head they saw, so a coordinator that rewrites an entry a device has seen is caught
(it can re-sign its own entries, not the devices'). Written and fsynced in batches; a crash
can only tear the last line, which is reported, ignored and cut off on reopening.
Details (the entry format): docs/trust.md#ledger-format
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeddl.config.security import SECURITY_COORDINATOR
from edgeddl.security.envelope import REJECT_REASONS, Opened, Rejection, verify_receipt
from edgeddl.security.keys import Identity, PublicIdentity

LEDGER_FILE = "ledger.jsonl"
"""The ledger's name in a run folder."""
DOMAIN = b"edgeddl ledger v1\x00"
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
"""Entries that end a ledger; only a `resumed` entry may follow an `interrupted` one."""
DIGEST_MARKS = ("checkpoint", "interrupted", "resumed")
"""Entries that name the model's digest at a step boundary (simulated runs)."""
FIELDS = {"author", "index", "kind", "payload", "prev", "sig", "time"}


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


def _split(data: bytes) -> tuple[list[bytes], int]:
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
        lines, self.torn_tail_bytes = _split(data)
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
    lines, torn = _split(Path(path).read_bytes())
    entries: list[dict[str, Any] | None] = []
    for line in lines:
        try:
            entry = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            entry = None
        entries.append(entry if isinstance(entry, dict) else None)
    return entries, torn


@dataclass(frozen=True, slots=True)
class VerifyReport:
    num_entries: int
    """Entries that verified (all of them when `ok`)."""
    torn_tail_bytes: int
    """Length of an incomplete last line (a crash mid-write), ignored; 0 if none."""
    error: str = ""
    """What is wrong with the first bad entry; "" if nothing."""

    @property
    def ok(self) -> bool:
        return not self.error


class _Bad(Exception):
    pass


def verify(
    path: Path,
    peers: Mapping[str, PublicIdentity],
    *,
    final_model_digest: str | None = None,
    complete: bool = False,
) -> VerifyReport:
    """Check the chain, every signature and receipt, and the final model's digest.

    `peers`: the trusted public identities by name (devices and the coordinator).
    `complete`: the run ended, so the ledger must end with `run_end` (or `interrupted`,
    for a run stopped cleanly) and have no torn tail.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return VerifyReport(0, 0, f"{path}: cannot read: {e.strerror}")
    lines, torn = _split(data)
    hashes: list[str] = []
    state = _State()
    for i, line in enumerate(lines):
        try:
            _check_entry(i, line, hashes, peers, state)
        except _Bad as e:
            return VerifyReport(i, torn, f"entry {i}: {e}")
        hashes.append(hashlib.sha256(line).hexdigest())
    n = len(lines)
    if not lines:
        return VerifyReport(0, torn, "the ledger holds no complete entry")
    if final_model_digest is not None and state.last_model_digest != final_model_digest:
        where = f"entry {state.last_aggregate}" if state.last_aggregate >= 0 else "no aggregate"
        return VerifyReport(
            n,
            torn,
            f"{where}: the final model's digest {final_model_digest[:16]}... does not match "
            f"the last aggregation's {str(state.last_model_digest)[:16]}...",
        )
    if complete and (torn or state.last_kind not in CLOSING):
        why = f"a torn last line of {torn} bytes" if torn else f"its last is {state.last_kind!r}"
        return VerifyReport(n, torn, f"entry {n}: the run ended but the ledger does not: {why}")
    return VerifyReport(n, torn)


@dataclass(slots=True)
class _State:
    run_id: str = ""
    last_kind: str = ""
    last_aggregate: int = -1
    last_model_digest: str | None = None
    update_steps: dict[int, int] = field(default_factory=dict)
    """Index -> step of every update entry so far."""
    marks: dict[int, str] = field(default_factory=dict)
    """Index -> model digest of every checkpoint and interrupted entry so far."""


def _check_entry(
    i: int, line: bytes, hashes: list[str], peers: Mapping[str, PublicIdentity], state: _State
) -> None:
    try:
        entry = json.loads(line)
        if not isinstance(entry, dict) or set(entry) != FIELDS:
            raise _Bad(f"fields are not {', '.join(sorted(FIELDS))}")
        if canonical(entry) != line:
            raise _Bad("not in canonical form (altered)")
    except (ValueError, UnicodeDecodeError) as e:
        raise _Bad(f"not a JSON entry ({e})") from None
    if entry["index"] != i or entry["prev"] != (hashes[-1] if hashes else GENESIS):
        raise _Bad("breaks the hash chain (index or prev hash)")
    if state.last_kind == "run_end":
        raise _Bad("follows the run_end entry")
    if state.last_kind == "interrupted" and entry["kind"] != "resumed":
        raise _Bad("follows an interrupted entry but is not a resumed one")
    author, kind, payload = entry["author"], entry["kind"], entry["payload"]
    if kind not in KINDS or not isinstance(payload, dict):
        raise _Bad(f"unknown kind {kind!r} or payload not a table")
    signer = peers.get(author) if isinstance(author, str) else None
    if signer is None:
        raise _Bad(f"author {author!r} is not enrolled")
    unsigned = {k: v for k, v in entry.items() if k != "sig"}
    try:
        signature = strict_b64(entry["sig"])
    except (TypeError, ValueError, binascii.Error):
        raise _Bad("signature is not base64") from None
    if not signer.verify(signature, DOMAIN + canonical(unsigned)):
        raise _Bad(f"bad signature by {author!r}")
    if i == 0:
        if kind != "run" or author != SECURITY_COORDINATOR or not payload.get("run_id"):
            raise _Bad("the first entry must be the coordinator's run entry with a run_id")
        state.run_id = str(payload["run_id"])
    if "receipt" in payload:
        _check_receipt(payload, kind, hashes, peers, state)
    elif kind == "update":
        raise _Bad("an update without its device's receipt")
    if kind == "reject" and payload.get("reason") not in REJECT_REASONS:
        raise _Bad(f"rejection reason {payload.get('reason')!r} is not one of {REJECT_REASONS}")
    if kind == "aggregate":
        _check_aggregate(payload, hashes, state)
        state.last_aggregate, state.last_model_digest = i, payload.get("model_digest")
    if kind in DIGEST_MARKS:
        _check_mark(kind, payload, state)
        state.marks[i] = payload["model_digest"]
    if kind == "update":
        state.update_steps[i] = payload["step"]
    state.last_kind = kind


def _check_receipt(
    payload: dict[str, Any],
    kind: str,
    hashes: list[str],
    peers: Mapping[str, PublicIdentity],
    state: _State,
) -> None:
    try:
        receipt = strict_b64(payload["receipt"])
    except (TypeError, ValueError, binascii.Error):
        raise _Bad("receipt is not base64") from None
    device = payload.get("device")
    signer = peers.get(device) if isinstance(device, str) else None
    header = verify_receipt(receipt, signer) if signer is not None else None
    if header is None:
        raise _Bad(f"receipt is not signed by device {device!r}")
    if header.run_id != state.run_id:
        raise _Bad(f"receipt is from run {header.run_id!r}, not {state.run_id!r}")
    if header.ledger_index >= 0:
        if header.ledger_index >= len(hashes):
            raise _Bad(f"{device} saw entry {header.ledger_index}, which comes later")
        if hashes[header.ledger_index] != header.ledger_head.hex():
            raise _Bad(
                f"{device} signed that it saw entry {header.ledger_index} with another hash: "
                "history was rewritten"
            )
    if kind == "update":
        claimed = (payload.get("step"), payload.get("seq"), payload.get("digest"))
        signed = (header.step, header.seq, header.body_digest.hex())
        if claimed != signed:
            raise _Bad(f"update (step, seq, digest) {claimed} differs from what {device} signed")


def _check_aggregate(payload: dict[str, Any], hashes: list[str], state: _State) -> None:
    if not isinstance(payload.get("model_digest"), str):
        raise _Bad("an aggregate without model_digest")
    screened = payload.get("screened", [])
    if not isinstance(screened, list) or not all(
        isinstance(s, dict) and set(s) == {"update", "reason"} for s in screened
    ):
        raise _Bad("an aggregate's screened list is malformed")
    for ref in [*payload.get("updates", []), *(s["update"] for s in screened)]:
        if state.update_steps.get(ref) != payload.get("step"):
            raise _Bad(f"aggregate names entry {ref}, not an update of step {payload.get('step')}")


def _check_mark(kind: str, payload: dict[str, Any], state: _State) -> None:
    """A checkpoint or interrupted entry names the model the last aggregate made; a resumed
    entry names a checkpoint before it and goes on from that model (entries after that
    checkpoint were lost with the process that wrote them)."""
    digest = payload.get("model_digest")
    if not isinstance(digest, str):
        raise _Bad(f"a {kind} entry without model_digest")
    if kind != "resumed":
        if state.last_aggregate >= 0 and digest != state.last_model_digest:
            raise _Bad(f"a {kind} entry's model digest is not the last aggregate's")
        return
    ref = payload.get("checkpoint_entry")
    if not isinstance(ref, int) or state.marks.get(ref) != digest:
        raise _Bad(f"resumed from entry {ref!r}, which is not a checkpoint of that model")
    state.last_model_digest = digest
