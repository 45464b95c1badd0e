"""The user's cache of things that are slow to make and the same every time (generated data
sets, measured model costs): every process of a real fleet, and every restart, would
otherwise pay for them again. Entries are written atomically; a damaged one is made again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """$EDGEDDL_CACHE_DIR, else the user's cache folder."""
    env = os.environ.get("EDGEDDL_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeddl"


def cache_path(kind: str, *parts: object, suffix: str) -> Path:
    """Where the entry of `kind` for `parts` (anything whose str() identifies it) lives."""
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:24]
    return cache_dir() / f"{kind}-{digest}{suffix}"
