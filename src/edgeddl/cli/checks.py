"""Checks of the command line's own arguments, shared by its commands."""

from __future__ import annotations

from pathlib import Path

from edgeddl.config.loader import ConfigError
from edgeddl.io import write_problem


def require_writable(option: str, path: Path, *, folder: bool) -> None:
    """Refuse an output `path` that cannot be written, in one line naming `option`, before
    any work (a run's training) that would write it."""
    problem = write_problem(path, folder=folder)
    if problem is not None:
        raise ConfigError(f"{option} {path}: {problem}")
