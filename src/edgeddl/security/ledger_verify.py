"""Checking a ledger on its own: the chain, who may write what, every signature and receipt,
what each aggregate and model mark names, and a signed head the ledger must extend.

The run folder's files are checked against the ledger by `audit.verify_run`. What the checks
prove and what they cannot: docs/trust.md#ledger
"""

from __future__ import annotations

import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeddl.security.envelope import REJECT_REASONS, verify_receipt
from edgeddl.security.keys import PublicIdentity
from edgeddl.security.ledger import (
    CLOSING,
    DIGEST_MARKS,
    DOMAIN,
    FIELDS,
    FORMAT,
    GENESIS,
    KINDS,
    ROLES,
    SignedHead,
    canonical,
    role_of,
    split_lines,
    strict_b64,
)


@dataclass(frozen=True, slots=True)
class VerifyReport:
    num_entries: int
    """Entries that verified (all of them when `ok`)."""
    torn_tail_bytes: int
    """Length of an incomplete last line (a crash mid-write), ignored; 0 if none."""
    error: str = ""
    """What is wrong with the first bad entry (or the head); "" if nothing."""
    run_id: str = ""
    config_sha256: str = ""
    """The run's config file's SHA-256, as its `run` entry (or its last `resumed` one) names it."""
    closing: dict[str, Any] | None = None
    """The payload of the `run_end` or `interrupted` entry the ledger ends with, if it does."""
    files: tuple[str, ...] = ()
    """The run folder's files checked against the ledger (`audit.verify_run`)."""

    @property
    def ok(self) -> bool:
        return not self.error


class _Bad(Exception):
    pass


@dataclass(slots=True)
class _State:
    run_id: str = ""
    config_sha256: str = ""
    last_kind: str = ""
    last_payload: dict[str, Any] = field(default_factory=dict)
    last_model_digest: str | None = None
    """What the last aggregate (or resumed entry) says the model is."""
    update_steps: dict[int, int] = field(default_factory=dict)
    """Index -> step of every update entry so far."""
    counted: dict[int, int] = field(default_factory=dict)
    """Update entry -> the aggregate entry that counted it (used or screened)."""
    receipts: dict[tuple[str, int], int] = field(default_factory=dict)
    """(device, sequence number) of every receipt so far -> the entry holding it."""
    marks: dict[int, str] = field(default_factory=dict)
    """Index -> model digest of every checkpoint, interrupted and resumed entry so far."""


def verify(
    path: Path,
    peers: Mapping[str, PublicIdentity],
    *,
    complete: bool = False,
    head: SignedHead | None = None,
) -> VerifyReport:
    """Check the chain, roles, every signature and receipt, aggregates and model marks.

    `peers`: the trusted public identities by name (devices and the coordinator).
    `complete`: the run ended, so the ledger must end with `run_end` (or `interrupted`,
    for a run stopped cleanly) and have no torn tail. `head`: a signed head the ledger must
    hold and extend (what catches a ledger cut short when `complete` is off).
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return VerifyReport(0, 0, f"{path}: cannot read: {e.strerror}")
    lines, torn = split_lines(data)
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
    error = _check_head(head, hashes, peers, state.run_id) if head is not None else ""
    if not error and complete and (torn or state.last_kind not in CLOSING):
        why = f"a torn last line of {torn} bytes" if torn else f"its last is {state.last_kind!r}"
        error = f"entry {n}: the run ended but the ledger does not: {why}"
    closing = state.last_payload if state.last_kind in CLOSING else None
    return VerifyReport(n, torn, error, state.run_id, state.config_sha256, closing)


def _check_head(
    head: SignedHead, hashes: list[str], peers: Mapping[str, PublicIdentity], run_id: str
) -> str:
    """What is wrong with the ledger against a signed head; "" if it holds and extends it."""
    signer = peers.get(head.signer)
    if role_of(head.signer) != "coordinator" or signer is None:
        return f"head: signed by {head.signer!r}, not by the coordinator"
    if not head.signed_by(signer):
        return "head: its signature is not the trusted coordinator key's (forged or altered)"
    if head.run_id != run_id:
        return f"head: it is of run {head.run_id!r}, this ledger of run {run_id!r}"
    if len(hashes) < head.entries:
        return (
            f"head: it names {head.entries} entries, the ledger holds {len(hashes)}: "
            "it was cut short"
        )
    if hashes[head.entries - 1] != head.hash:
        return f"entry {head.entries - 1}: not the one the signed head names: history was rewritten"
    return ""


def _check_entry(
    i: int, line: bytes, hashes: list[str], peers: Mapping[str, PublicIdentity], state: _State
) -> None:
    entry = _parse(line)
    if entry["index"] != i or entry["prev"] != (hashes[-1] if hashes else GENESIS):
        raise _Bad("breaks the hash chain (index or prev hash)")
    if state.last_kind == "run_end":
        raise _Bad("follows the run_end entry")
    if state.last_kind == "interrupted" and entry["kind"] != "resumed":
        raise _Bad("follows an interrupted entry but is not a resumed one")
    kind, payload = entry["kind"], entry["payload"]
    if kind not in KINDS or not isinstance(payload, dict):
        raise _Bad(f"unknown kind {kind!r} or payload not a table")
    if i == 0:  # before the signature: an older format's cannot verify under this one's
        _check_format(kind, payload)
    _check_author(entry, peers)
    if i == 0:
        _start(entry["author"], payload, state)
    elif kind == "run":
        raise _Bad("a second run entry")
    if "receipt" in payload:
        _check_receipt(i, payload, kind, hashes, peers, state)
    elif kind == "update":
        raise _Bad("an update without its device's receipt")
    if kind == "reject" and payload.get("reason") not in REJECT_REASONS:
        raise _Bad(f"rejection reason {payload.get('reason')!r} is not one of {REJECT_REASONS}")
    if kind == "aggregate":
        _check_aggregate(i, payload, state)
    if kind in DIGEST_MARKS:
        _check_mark(kind, payload, state)
        state.marks[i] = payload["model_digest"]
    if kind == "update":
        state.update_steps[i] = payload["step"]
    state.last_kind, state.last_payload = kind, payload


def _parse(line: bytes) -> dict[str, Any]:
    try:
        entry = json.loads(line)
        if not isinstance(entry, dict) or set(entry) != FIELDS:
            raise _Bad(f"fields are not {', '.join(sorted(FIELDS))}")
        if canonical(entry) != line:
            raise _Bad("not in canonical form (altered)")
    except (ValueError, UnicodeDecodeError) as e:
        raise _Bad(f"not a JSON entry ({e})") from None
    return entry


def _check_format(kind: str, payload: dict[str, Any]) -> None:
    if kind != "run":
        raise _Bad("the first entry must be the coordinator's run entry")
    fmt = payload.get("format", 1)
    if fmt != FORMAT:
        who = "a newer" if isinstance(fmt, int) and fmt > FORMAT else "an older"
        raise _Bad(
            f"ledger format {fmt!r}, written by {who} edgeddl: this one verifies format "
            f"{FORMAT} only (verify it with the edgeddl that wrote it)"
        )


def _check_author(entry: dict[str, Any], peers: Mapping[str, PublicIdentity]) -> None:
    """An enrolled author's genuine signature, on a kind its role may write."""
    author, kind = entry["author"], entry["kind"]
    signer = peers.get(author) if isinstance(author, str) else None
    if signer is None:
        raise _Bad(f"author {author!r} is not enrolled")
    if not signed_by(entry, signer):
        raise _Bad(f"bad signature by {author!r}")
    role = role_of(author)
    if kind not in ROLES[role]:
        allowed = " or ".join(f"the {r}" for r, kinds in ROLES.items() if kind in kinds)
        raise _Bad(
            f"{author!r} is a {role} and signed an entry of kind {kind}, which only "
            f"{allowed or 'nobody'} may write"
        )


def signed_by(entry: dict[str, Any], signer: PublicIdentity) -> bool:
    """Whether `signer` signed this entry (as parsed from its line)."""
    unsigned = {k: v for k, v in entry.items() if k != "sig"}
    try:
        signature = strict_b64(entry["sig"])
    except (TypeError, ValueError, binascii.Error):
        return False
    return signer.verify(signature, DOMAIN + canonical(unsigned))


def _start(author: str, payload: dict[str, Any], state: _State) -> None:
    if role_of(author) != "coordinator" or not isinstance(payload.get("run_id"), str):
        raise _Bad("the first entry must be the coordinator's run entry with a run_id")
    state.run_id = payload["run_id"]
    state.config_sha256 = _sha256_field(payload, "config_sha256", "run")


def _sha256_field(payload: dict[str, Any], key: str, kind: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or len(value) != 64 or value.strip("0123456789abcdef"):
        raise _Bad(f"a {kind} entry without {key} (a SHA-256 in hex)")
    return value


def _check_receipt(
    i: int,
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
    earlier = state.receipts.setdefault((header.sender, header.seq), i)
    if earlier != i:
        raise _Bad(f"{device}'s receipt of seq {header.seq} is entry {earlier}'s: counted twice")
    if payload.get("step") != header.step:
        raise _Bad(f"step {payload.get('step')!r}, but {device} signed step {header.step}")
    if kind == "update":
        claimed = (payload.get("step"), payload.get("seq"), payload.get("digest"))
        signed = (header.step, header.seq, header.body_digest.hex())
        if claimed != signed:
            raise _Bad(f"update (step, seq, digest) {claimed} differs from what {device} signed")


def _check_aggregate(i: int, payload: dict[str, Any], state: _State) -> None:
    """An aggregate names at least one update of its step, each counted by no other."""
    if not isinstance(payload.get("model_digest"), str):
        raise _Bad("an aggregate without model_digest")
    screened = payload.get("screened", [])
    if not isinstance(screened, list) or not all(
        isinstance(s, dict) and set(s) == {"update", "reason"} for s in screened
    ):
        raise _Bad("an aggregate's screened list is malformed")
    used = payload.get("updates", [])
    refs: list[int] = [*used, *(s["update"] for s in screened)] if isinstance(used, list) else []
    if not isinstance(used, list) or any(type(r) is not int for r in refs):
        raise _Bad("an aggregate's updates are not entry numbers")
    if not refs:
        raise _Bad("an aggregate that names no update (used or screened)")
    for ref in refs:
        if state.update_steps.get(ref) != payload.get("step"):
            raise _Bad(f"aggregate names entry {ref}, not an update of step {payload.get('step')}")
        earlier = state.counted.setdefault(ref, i)
        if earlier != i or refs.count(ref) > 1:
            where = f"aggregate entry {earlier}" if earlier != i else "this aggregate"
            raise _Bad(f"update entry {ref} is counted twice (already by {where})")
    state.last_model_digest = payload["model_digest"]


def _check_mark(kind: str, payload: dict[str, Any], state: _State) -> None:
    """A checkpoint, interrupted or run_end entry names the model the last aggregate made
    (a closing one also the files it vouches for); a resumed entry names a mark before it and
    goes on from that model with the config it was resumed with (entries after that mark
    were lost with the process that wrote them)."""
    digest = payload.get("model_digest")
    if not isinstance(digest, str):
        raise _Bad(f"a {kind} entry without model_digest")
    if kind in CLOSING:
        for key in ("model_sha256", "summary_sha256"):
            _sha256_field(payload, key, kind)
    if kind != "resumed":
        if state.last_model_digest is not None and digest != state.last_model_digest:
            raise _Bad(f"a {kind} entry's model digest is not the last aggregate's")
        return
    ref = payload.get("checkpoint_entry")
    if not isinstance(ref, int) or state.marks.get(ref) != digest:
        raise _Bad(f"resumed from entry {ref!r}, which is not a checkpoint of that model")
    state.config_sha256 = _sha256_field(payload, "config_sha256", kind)
    state.last_model_digest = digest
