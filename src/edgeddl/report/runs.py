"""Reading a run folder back (summary.json, metrics.jsonl) for `edgeddl compare` and `export`.

metrics.jsonl stays the record; what is made from it says in one line which folder or file
is missing or damaged, rather than failing halfway with a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class ReportError(ValueError):
    """A run folder that cannot be read, or an export that cannot be made from it; the
    message is one line naming the folder or file (or what to install)."""


@dataclass(frozen=True, slots=True)
class RunFolder:
    """A finished run: its summary, its evaluation rows, and the keys that read them."""

    path: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    metric: str
    """The task's metric, as the rows name it: test_accuracy, test_auroc."""
    time_key: str
    """The rows' time on the run's clock: virtual_time_s (simulator), wall_time_s (real)."""

    def best_row(self) -> dict[str, Any]:
        """The first evaluation that reached the run's best metric."""
        return max(self.rows, key=lambda r: r[self.metric])  # max keeps the first of ties


def _folder(run_dir: Path) -> None:
    if not run_dir.exists():
        raise ReportError(f"{run_dir}: no such run folder")
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a run folder (a file)")


def _damaged(path: Path, why: str) -> ReportError:
    return ReportError(f"{path}: damaged ({why})")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The evaluation rows of `run_dir`/metrics.jsonl, each a table with a `step`."""
    _folder(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ReportError(f"{run_dir}: not a run folder (no {METRICS_FILE})")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise _damaged(path, f"line {number}: {e.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise _damaged(path, f"line {number}: not an evaluation row with a step")
        rows.append(row)
    if not rows:
        raise _damaged(path, "no rows")
    return rows


def clock_key(record: dict[str, Any]) -> str:
    """The key of the time on a run's clock, from its summary or a row: virtual_time_s for
    the simulator's (clock = "virtual"), wall_time_s for a real fleet's (its rows name no
    clock)."""
    return f"{record.get('clock', 'wall')}_time_s"


def read_run(run_dir: Path) -> RunFolder:
    """A finished run folder's summary and rows, checked for what comparing them reads."""
    rows = read_metrics(run_dir)
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        raise ReportError(f"{run_dir}: not a finished run (no {SUMMARY_FILE})")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise _damaged(path, f"line {e.lineno}: {e.msg}") from None
    if not isinstance(summary, dict):
        raise _damaged(path, "not a table")
    metric = next((k.removeprefix("best_") for k in summary if k.startswith("best_")), None)
    if metric is None:
        raise _damaged(path, "no best_ metric")
    time_key = clock_key(summary)
    for number, row in enumerate(rows, 1):
        missing = [k for k in (time_key, metric) if not isinstance(row.get(k), int | float)]
        if missing:
            raise _damaged(run_dir / METRICS_FILE, f"line {number}: no {missing[0]}")
    return RunFolder(path=run_dir, summary=summary, rows=rows, metric=metric, time_key=time_key)
