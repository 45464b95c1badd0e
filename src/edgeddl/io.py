"""Atomic file writes: a reader never sees a half-written file, and a failed write loses
nothing that was there before.

Each write goes to a temporary file in the same folder, is flushed to disk, then renamed over
the target (rename is atomic on POSIX file systems).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_problem(path: Path, *, folder: bool) -> str | None:
    """Why `path` cannot be written, as a folder (a run folder) or as a file (a plot); None
    when it can. Nothing is created: a mistake is refused before the work that would write."""
    try:
        if path.exists() and path.is_dir() != folder:
            return "is a file, not a folder" if folder else "is a folder, not a file"
        nearest = path if folder else path.parent  # an atomic write renames in the parent
        while not nearest.exists() and nearest != nearest.parent:
            nearest = nearest.parent
        if not nearest.is_dir():
            return f"{nearest} is a file, not a folder"
    except OSError as e:
        return e.strerror or str(e)
    if not os.access(nearest, os.W_OK | os.X_OK):
        return f"no permission to write in {nearest}"
    return None


def write_bytes_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write `data` to `path` atomically; `mode` sets the file's permissions before any byte
    is written (a private key is never readable by others, even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_model_atomic(path: Path, state: dict[str, Any]) -> None:
    """A model's state_dict as a torch file (tensors only: loads with weights_only=True)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getvalue())


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
