"""Live progress display: step, virtual time, loss and the test metric, drawn by `rich`."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeddl.report.files import metric_label


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
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("virtual {task.fields[vt]:>9}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn(f"{metric_label(metric)} {{task.fields[metric]}}"),
            TimeElapsedColumn(),
            console=self.console,
        )
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
        value = summary.get(f"final_{self.metric}")
        rows = [
            (
                f"final test {metric_label(self.metric)}",
                f"{value:.4f}" if value is not None else "-",
            ),
            ("virtual time", f"{summary['virtual_time_s']:.1f} s"),
            ("wall time", f"{summary['wall_time_s']:.1f} s"),
            ("devices", str(summary["num_devices"])),
            ("throughput", f"{summary['samples_per_virtual_s']:.1f} samples/virtual s"),
            ("bytes up / down", f"{summary['bytes_up']:,} / {summary['bytes_down']:,}"),
        ]
        total = sum(summary["breakdown_s"].values()) or 1.0
        rows += [(f"  {k}", f"{v / total:6.1%}") for k, v in summary["breakdown_s"].items()]
        for k, v in rows:
            table.add_row(k, v)
        self.console.print(table)
