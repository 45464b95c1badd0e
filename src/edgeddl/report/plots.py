"""PNG plots of a run: the test metric and the losses against time, and each device's busy/idle
timeline."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt

from edgeddl.io import write_bytes_atomic
from edgeddl.report.files import metric_label
from edgeddl.report.recorder import TIMELINE_STEPS, RunRecorder

COLORS = {
    "compute": "#2b8a3e",
    "data_loading": "#f08c00",
    "communication": "#1c7ed6",
    "idle": "#ced4da",
}


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def plot_metric(
    evals: list[dict[str, Any]],
    path: Path,
    metric: str,
    title: str,
    time_key: str = "virtual_time_s",
) -> None:
    """Two panels against `time_key` (virtual time, or wall time for a real fleet): test
    `metric` (in [0, 1]) on the left, the train and test losses on the right."""
    fig, (ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.0))
    ax.plot(
        [r[time_key] for r in evals],
        [r[metric] for r in evals],
        marker="o",
        markersize=3,
    )
    ax.set_ylabel(f"test {metric_label(metric)}")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    _plot_losses(loss_ax, evals, time_key)
    for a in (ax, loss_ax):
        a.set_xlabel("virtual time (s)" if time_key == "virtual_time_s" else "wall time (s)")
        a.grid(alpha=0.3)
    _save(fig, path)


def _plot_losses(ax: Any, evals: list[dict[str, Any]], time_key: str) -> None:
    """Train loss (the mean since the previous evaluation; none before the first step) and
    test loss, from the evaluation rows of metrics.jsonl."""
    for key, label in (("train_loss", "train"), ("test_loss", "test")):
        rows = [r for r in evals if r.get(key) is not None]
        ax.plot([r[time_key] for r in rows], [r[key] for r in rows], marker="o", markersize=3,
                label=label)  # fmt: skip
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.legend(fontsize=8)


def plot_curves(
    lines: list[tuple[str, list[float], list[float]]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
) -> None:
    """Several runs' metric (in [0, 1]) on one axes: (label, times, values) each."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, times, values in lines:
        ax.plot(times, values, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, path)


def plot_timeline(rec: RunRecorder, path: Path, max_devices: int = 40) -> None:
    """Horizontal bars per device over the first steps, coloured by what it was doing."""
    devices = sorted({s.device for s in rec.timeline})[:max_devices]
    row = {d: i for i, d in enumerate(devices)}
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(devices) + 1.6))
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for span in rec.timeline:  # one pass, grouped by device and state
        if span.device in row:
            bars.setdefault((span.device, span.state), []).append((span.start_s, span.seconds))
    for (d, state), spans in bars.items():  # one collection per device and state
        ax.broken_barh(spans, (row[d] - 0.4, 0.8), facecolors=COLORS[state], linewidth=0)
    ax.set_yticks(range(len(devices)), [rec.names[d] for d in devices], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("virtual time (s)")
    ax.set_title(f"device timeline, first {min(rec.num_steps, TIMELINE_STEPS)} steps", pad=22)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(
        handles,
        list(COLORS),
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=4,
        fontsize=8,
        frameon=False,
    )
    _save(fig, path)
