"""`edgeddl compare`: runs side by side (what each reached, when, and at what cost) and their
metric curves on one plot, read from their run folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeddl.report.files import metric_label
from edgeddl.report.plots import plot_curves
from edgeddl.report.progress import breakdown_rows, compression_rows, security_rows
from edgeddl.report.runs import RunFolder


def _seconds(t: float) -> str:
    return f"{t:,.1f} s" if t >= 1 else f"{t:.3f} s"


def _score(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def run_rows(run: RunFolder) -> list[tuple[str, str]]:
    """One run's column: the metric reached (final, best, and when on its clock), the time,
    the traffic, compression and sealing when they were on, and where the time went."""
    s, best = run.summary, run.best_row()
    clock = run.time_key.removesuffix("_time_s")
    rows = [
        ("scenario", str(s.get("scenario", "-"))),
        ("metric", f"test {metric_label(run.metric)}"),
        ("final", _score(s.get(f"final_{run.metric}"))),
        ("best", _score(best[run.metric])),
        (f"{clock} time to best", f"{_seconds(best[run.time_key])} (step {best['step']})"),
        (f"{clock} time", _seconds(s.get(run.time_key, run.rows[-1][run.time_key]))),
        ("steps", str(s.get("num_steps", run.rows[-1]["step"]))),
        ("devices", str(s.get("num_devices", "-"))),
        ("bytes up", f"{s['bytes_up']:,}" if "bytes_up" in s else "-"),
        ("bytes down", f"{s['bytes_down']:,}" if "bytes_down" in s else "-"),
        *(compression_rows(s.get("compression") or {}) or [("compression", "-")]),
        *(security_rows(s.get("security")) or [("security", "-")]),
    ]
    return rows + breakdown_rows(s.get("breakdown_s") or {})


def side_by_side(runs: list[RunFolder]) -> list[tuple[str, list[str]]]:
    """Each label any run has, in order, with every run's value ("-" where a run has none,
    e.g. no compression); a label no run has a value for is left out."""
    columns = [dict(run_rows(run)) for run in runs]
    labels = list(dict.fromkeys(label for column in columns for label in column))
    table = [(label, [column.get(label, "-") for column in columns]) for label in labels]
    return [(label, values) for label, values in table if any(v != "-" for v in values)]


def plot_comparison(runs: list[RunFolder], path: Path) -> None:
    """Every run's metric against its clock on one plot, written atomically to `path`."""
    clocks = {run.time_key for run in runs}
    metrics = {run.metric for run in runs}
    # A simulated run beside a real one, or accuracy beside AUROC: neutral axis names.
    x = f"{clocks.pop().removesuffix('_time_s')} time (s)" if len(clocks) == 1 else "time (s)"
    y = f"test {metric_label(metrics.pop())}" if len(metrics) == 1 else "test metric"
    lines = [
        (str(run.path), [r[run.time_key] for r in run.rows], [r[run.metric] for r in run.rows])
        for run in runs
    ]
    plot_curves(lines, path, xlabel=x, ylabel=y, title=f"{y} of {len(runs)} runs")
