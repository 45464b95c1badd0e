"""The run folder's file names (atomic writes live in `edgeddl.io`)."""

from __future__ import annotations

RUN_FILES = (
    "config.resolved.toml",
    "metrics.jsonl",
    "model.pt",
    "summary.json",
    "timeline.png",
)
"""What every run folder holds (the loop writes each; tests check all of them), beside the
plot of its task's metric (`metric_plot`)."""


def metric_label(metric: str) -> str:
    """How a metric's key reads: test_accuracy -> accuracy, test_auroc -> AUROC."""
    name = metric.removeprefix("test_")
    return name.upper() if name == "auroc" else name.replace("_", " ")


def metric_plot(metric: str) -> str:
    """The run folder's plot of `metric`: accuracy.png, auroc.png."""
    return f"{metric.removeprefix('test_')}.png"
