"""`edgeddl ledger show`: a run's ledger as a readable timeline (rich table)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from rich.console import Console
from rich.table import Table

from edgeddl.security.envelope import Header

FIRST_KEYS = (
    "format",
    "device",
    "step",
    "reason",
    "detail",
    "seq",
    "size",
    "digest",
    "model_digest",
    "model_sha256",
    "summary_sha256",
    "config_sha256",
)
"""Payload keys shown first, in this order (the rest follow, then the receipt)."""
FILE_KEYS = {
    "config_sha256": "config",
    "model_sha256": "model.pt",
    "summary_sha256": "summary.json",
}
"""Digests of the run folder's files the ledger vouches for, shown by the file's name."""
DIGEST_CHARS = 12
"""Digests and hashes are shown cut to this many hex digits."""


def _receipt_text(text: Any) -> str:
    try:
        header, _ = Header.decode(base64.b64decode(text, validate=True))
    except (TypeError, ValueError, binascii.Error, UnicodeDecodeError):
        return "receipt: unreadable"
    seen = f"saw #{header.ledger_index}" if header.ledger_index >= 0 else "saw nothing yet"
    return f"signed by {header.sender} ({seen})"


def _value(key: str, value: Any) -> str:
    if key == "receipt":
        return _receipt_text(value)
    key = FILE_KEYS.get(key, key)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"{key} {value[:DIGEST_CHARS]}"
    if key == "screened" and isinstance(value, list):
        kept_out = (v for v in value if isinstance(v, dict))
        return "screened " + ", ".join(f"#{v.get('update')} ({v.get('reason')})" for v in kept_out)
    if isinstance(value, list):
        return f"{key} " + ",".join(f"#{v}" if key == "updates" else str(v) for v in value)
    return f"{key} {value}"


def _key_order(key: str) -> tuple[int, str]:
    if key in FIRST_KEYS:
        return FIRST_KEYS.index(key), ""
    return len(FIRST_KEYS) + (key == "receipt"), key


def print_timeline(
    entries: list[dict[str, Any] | None], torn_tail_bytes: int, head: str = ""
) -> None:
    """The entries as a table; `head`: a line about the signed head beside the ledger."""
    table = Table("#", "time s", "author", "kind", "what", title="ledger")
    times = [e.get("time") for e in entries if e is not None]
    start = next((t for t in times if isinstance(t, int | float)), None)
    for i, entry in enumerate(entries):
        if entry is None:
            table.add_row(str(i), "", "", "[red]unreadable[/red]", "")
            continue
        t = entry.get("time")
        when = f"+{t - start:.3f}" if isinstance(t, int | float) and start is not None else "?"
        payload = entry.get("payload")
        what = (
            "; ".join(_value(k, payload[k]) for k in sorted(payload, key=_key_order))
            if isinstance(payload, dict)
            else repr(payload)
        )
        table.add_row(
            str(entry.get("index")), when, str(entry.get("author")), str(entry.get("kind")), what
        )
    console = Console()
    console.print(table)
    if torn_tail_bytes:
        console.print(f"a torn last line of {torn_tail_bytes} bytes (a crash mid-write)")
    if head:
        console.print(head)
    console.print("[dim]shown as written; `edgeddl ledger verify` checks it[/dim]")
