"""Live progress display: step, virtual time, loss and the test metric, drawn by `rich`."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column, Table
from rich.text import Text

from edgeddl.report.files import metric_label


class _TitleColumn(ProgressColumn):
    """The run's name, cut with an ellipsis (never wrapped) when the line is short of room."""

    def render(self, task: Task) -> Text:
        return Text(task.description, style="bold", no_wrap=True, overflow="ellipsis")


def _columns(metric: str) -> list[ProgressColumn]:
    """The title and the bar give way on a narrow terminal; the step counter and the numbers
    never do: rich narrows only columns that may wrap, and these are marked no_wrap. At 80
    columns the numbers take about 65 (112345/120000 steps, 1234567.8 virtual seconds)."""

    def fixed() -> Column:
        return Column(no_wrap=True)

    return [
        _TitleColumn(),
        BarColumn(),
        MofNCompleteColumn(table_column=fixed()),
        TextColumn("virtual {task.fields[vt]:>9}", table_column=fixed()),
        TextColumn("loss {task.fields[loss]}", table_column=fixed()),
        TextColumn(f"{metric_label(metric)} {{task.fields[metric]}}", table_column=fixed()),
        TimeElapsedColumn(table_column=fixed()),
    ]


class ProgressDisplay:
    """A progress bar over steps with the latest virtual time, loss and test `metric`
    (an evaluation row's key, such as test_accuracy).

    Disabled (prints nothing) when `enabled` is false; on a terminal that is not interactive
    rich draws only the final state.
    """

    def __init__(
        self, num_steps: int, title: str, enabled: bool = True, metric: str = "test_accuracy"
    ) -> None:
        self.enabled = enabled
        self.metric = metric
        self.console = Console(stderr=True, quiet=not enabled)
        self.progress = Progress(*_columns(metric), console=self.console)
        self.task = self.progress.add_task(title, total=num_steps, vt="0.0 s", loss="-", metric="-")

    def __enter__(self) -> ProgressDisplay:
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def update(
        self,
        step: int,
        virtual_time_s: float,
        loss: float | None = None,
        metric: float | None = None,
    ) -> None:
        if not self.enabled:
            return
        fields: dict[str, Any] = {"vt": f"{virtual_time_s:.1f} s"}
        if loss is not None:
            fields["loss"] = f"{loss:.3f}"
        if metric is not None:
            fields["metric"] = f"{metric:.3f}"
        self.progress.update(self.task, completed=step, **fields)

    def print_summary(self, summary: dict[str, Any], run_dir: str) -> None:
        table = Table(title=f"edgeddl run: {run_dir}", show_header=False)
        for k, v in summary_rows(summary, self.metric):
            table.add_row(k, v)
        self.console.print(table)


def summary_rows(summary: dict[str, Any], metric: str) -> list[tuple[str, str]]:
    """The end-of-run table: what a run reached, what it cost, and, when they were on, its
    compression and its sealing and ledger."""
    value = summary.get(f"final_{metric}")
    return [
        (f"final test {metric_label(metric)}", f"{value:.4f}" if value is not None else "-"),
        ("virtual time", f"{summary['virtual_time_s']:.1f} s"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("devices", str(summary["num_devices"])),
        ("throughput", f"{summary['samples_per_virtual_s']:.1f} samples/virtual s"),
        ("bytes up / down", f"{summary['bytes_up']:,} / {summary['bytes_down']:,}"),
        *compression_rows(summary.get("compression") or {}),
        *security_rows(summary.get("security")),
        *breakdown_rows(summary["breakdown_s"]),
    ]


def breakdown_rows(breakdown_s: dict[str, float]) -> list[tuple[str, str]]:
    """Each state's share of the devices' time: compute, data loading, communication, idle."""
    total = sum(breakdown_s.values()) or 1.0
    return [(f"  {k}", f"{v / total:6.1%}") for k, v in breakdown_s.items()]


def compression_rows(compression: dict[str, Any]) -> list[tuple[str, str]]:
    """Compressor and ratio (dense gradient bytes / bytes sent), when one compressed."""
    name = compression.get("compressor", "none")
    per_device = bool(compression.get("per_device"))
    if (name == "none" and not per_device) or "compression_ratio" not in compression:
        return []
    how = [name] if name != "none" else []
    if per_device:
        how.append("per device")
    if compression.get("adaptive"):
        how.append("adaptive")
    ratio = compression["compression_ratio"]
    return [("compression", f"{', '.join(how)}: ratio {ratio:.1f}x")]


def security_rows(security: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Sealed payloads and the ledger: its entries and the payloads the coordinator refused."""
    if not security:
        return []
    reasons = security.get("rejected_by_reason") or {}
    why = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
    rejected = f"{security.get('num_rejected', 0)} payloads rejected" + (f" ({why})" if why else "")
    entries = security["ledger_entries"]
    return [("security", f"sealed; ledger: {entries} entries; {rejected}")]
