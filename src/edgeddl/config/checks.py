"""The one check every config section uses: a one-line ValueError naming what is wrong."""

from __future__ import annotations


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
