"""Auditing a run folder from outside: the trust root an auditor brings, the folder's files
held to its ledger, and signed heads.

A ledger proves nothing with keys taken from the folder under audit (a forger makes fresh
ones), so `trusted_keys` reads the public keys from a folder of the auditor's own.
`verify_run` checks the ledger, then the files it vouches for: the run's config (its `run`
entry), and the model and summary (its closing entry). `edgeddl ledger` is its front.
Details: docs/trust.md#ledger
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeddl.config.security import SECURITY_COORDINATOR
from edgeddl.security.keys import Identity, PublicIdentity, SecurityError, load_public
from edgeddl.security.ledger import (
    CONFIG_FILE,
    LEDGER_FILE,
    MODEL_FILE,
    SUMMARY_FILE,
    SignedHead,
    file_sha256,
    ledger_tip,
    model_digest,
    read_entries,
    sign_head,
)
from edgeddl.security.ledger_verify import VerifyReport, signed_by, verify


def trusted_keys(folder: Path) -> dict[str, PublicIdentity]:
    """Every NAME.pub in `folder` by NAME: the coordinator's and the devices' public keys.
    SecurityError (one line) for a missing folder, no coordinator.pub, or a damaged file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SecurityError(f"--keys {folder}: no such folder (of NAME.pub public key files)")
    peers = {p.stem: load_public(p) for p in sorted(folder.glob("*.pub"))}
    if SECURITY_COORDINATOR not in peers:
        raise SecurityError(
            f"--keys {folder}: no {SECURITY_COORDINATOR}.pub in it; the coordinator's public "
            f"key is what the ledger's entries are checked against"
        )
    return peers


def read_head(path: Path) -> SignedHead:
    """A head `edgeddl ledger head` (or a closing run) wrote; SecurityError (one line)."""
    try:
        return SignedHead.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
    except OSError as e:
        raise SecurityError(f"{path}: cannot read: {e.strerror}") from None
    except ValueError as e:  # JSON, UTF-8 or a head's fields
        raise SecurityError(f"{path}: {str(e).splitlines()[0]}") from None


def head_of(run_dir: Path, identity: Identity) -> SignedHead:
    """`identity`'s signed head of the run's ledger as it is now; SecurityError if the
    identity is not the coordinator that signed the ledger's run entry."""
    path = Path(run_dir) / LEDGER_FILE
    try:
        run_id, entries, last_hash = ledger_tip(path)
    except ValueError as e:
        raise SecurityError(str(e)) from None
    first = read_entries(path)[0][0]
    if identity.name != SECURITY_COORDINATOR or first is None:
        raise SecurityError(f"--key: a head is signed with {SECURITY_COORDINATOR}.key")
    if not signed_by(first, identity.public()):
        raise SecurityError(
            f"--key: {SECURITY_COORDINATOR}.key did not sign {path}'s run entry: it is not "
            "this run's coordinator key"
        )
    return sign_head(identity, run_id, entries, last_hash)


def verify_run(
    run_dir: Path,
    peers: Mapping[str, PublicIdentity],
    *,
    complete: bool,
    head: SignedHead | None = None,
) -> VerifyReport:
    """The ledger (`verify`), then the files it vouches for: config.resolved.toml always;
    model.pt and summary.json when it ends with a closing entry (a run that ended). Errors
    name the ledger or the file."""
    run_dir = Path(run_dir)
    ledger = run_dir / LEDGER_FILE
    report = verify(ledger, peers, complete=complete, head=head)
    if not report.ok:
        return dataclasses.replace(report, error=f"{ledger}: {report.error}")
    files = (CONFIG_FILE,) if report.closing is None else (CONFIG_FILE, MODEL_FILE, SUMMARY_FILE)
    try:
        _check_file(run_dir / CONFIG_FILE, report.config_sha256, "the run entry")
        if report.closing is not None:
            _check_closed_files(run_dir, report)
    except SecurityError as e:
        return dataclasses.replace(report, error=str(e))
    return dataclasses.replace(report, files=files)


def _check_file(path: Path, sha256: str, named_by: str) -> None:
    try:
        actual = file_sha256(path)
    except FileNotFoundError:
        raise SecurityError(
            f"{path}: missing; {named_by} names its SHA-256, so the ledger cannot vouch for "
            "the run without it"
        ) from None
    except OSError as e:
        raise SecurityError(f"{path}: cannot read: {e.strerror}") from None
    if actual != sha256:
        raise SecurityError(
            f"{path}: not the file {named_by} names (SHA-256 {actual[:16]}..., signed "
            f"{sha256[:16]}...): altered, or the ledger belongs to another run's folder"
        )


def _check_closed_files(run_dir: Path, report: VerifyReport) -> None:
    """model.pt and summary.json are the files the closing entry signed; the model in
    model.pt is the one it names, and summary.json is of the ledger's run."""
    closing: dict[str, Any] = report.closing or {}
    model, summary = run_dir / MODEL_FILE, run_dir / SUMMARY_FILE
    _check_file(model, closing["model_sha256"], "the closing entry")
    _check_file(summary, closing["summary_sha256"], "the closing entry")
    import torch  # only here: a ledger's own checks need no torch

    try:
        state = torch.load(model, weights_only=True, map_location="cpu")
        digest = model_digest(state) if isinstance(state, dict) else None
    except Exception as e:  # torch raises many kinds for a file that is not its own
        raise SecurityError(
            f"{model}: cannot be read as a model state ({type(e).__name__})"
        ) from None
    if digest != closing["model_digest"]:
        raise SecurityError(f"{model}: its model is not the one the closing entry names")
    try:
        run_id = json.loads(summary.read_text(encoding="utf-8"))["security"]["run_id"]
    except (ValueError, KeyError, TypeError):
        run_id = None
    if run_id != report.run_id:
        raise SecurityError(
            f"{summary}: its security.run_id {run_id!r} is not the ledger's run {report.run_id!r}"
        )
