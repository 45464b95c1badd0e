"""`edgeddl export`: a run's metrics.jsonl as CSV (spreadsheets, pandas) or TensorBoard
scalars. metrics.jsonl stays the record; these are copies made from it on demand."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from edgeddl.io import write_text_atomic
from edgeddl.report.runs import ReportError

CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_MISSING = (
    "--tensorboard needs the tensorboard package: pip install 'edgeddl[tensorboard]'"
)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """One line per evaluation; the columns are every key of any row, in order of first
    appearance; a missing or null value (the train loss before the first step) is empty."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    write_text_atomic(path, buf.getvalue())


def scalar_tag(key: str) -> str:
    """TensorBoard's name for a row's key: test_accuracy -> test/accuracy, train_loss ->
    train/loss, anything else under run/ (run/bytes_up)."""
    for split in ("test", "train"):
        if key.startswith(f"{split}_"):
            return f"{split}/{key.removeprefix(f'{split}_')}"
    return f"run/{key}"


def summary_writer_class() -> Any:
    """torch's TensorBoard writer, or a one-line error naming the extra that provides it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ReportError(TENSORBOARD_MISSING) from None
    return SummaryWriter


def write_tensorboard(rows: list[dict[str, Any]], logdir: Path, time_key: str) -> int:
    """Every number of every row as a scalar at its step, stamped with the row's `time_key`
    (virtual_time_s: TensorBoard's "relative" axis then reads the run's own clock). Returns
    the number of scalars written."""
    written = 0
    writer = summary_writer_class()(log_dir=str(logdir))
    try:
        for row in rows:
            stamp = row.get(time_key)
            for key, value in row.items():
                if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                writer.add_scalar(scalar_tag(key), value, row["step"], walltime=stamp)
                written += 1
    finally:
        writer.close()
    return written
