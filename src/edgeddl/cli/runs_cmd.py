"""`edgeddl compare` and `edgeddl export`: read finished run folders (report/compare.py,
report/export.py do the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeddl.cli.checks import require_writable
from edgeddl.config.loader import ConfigError

BESIDE_RUN = object()
"""An option given without its path (`--csv`): the file goes in the run folder. Not a str,
which argparse would pass through `type`."""


def add_runs_parsers(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="runs side by side, and their metric curves on one plot")
    c.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders")
    c.add_argument(
        "--plot",
        type=Path,
        default=Path("compare.png"),
        metavar="PATH",
        help="PNG of every run's test metric against its clock (default: %(default)s)",
    )
    e = sub.add_parser(
        "export", help="a run's metrics.jsonl as CSV or TensorBoard scalars (it stays the record)"
    )
    e.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder")
    e.add_argument(
        "--csv",
        type=Path,
        nargs="?",
        const=BESIDE_RUN,
        metavar="PATH",
        help="write a CSV file, one line per evaluation (default PATH: RUN_DIR/metrics.csv)",
    )
    e.add_argument(
        "--tensorboard",
        type=Path,
        nargs="?",
        const=BESIDE_RUN,
        metavar="LOGDIR",
        help="write TensorBoard scalars at each step, stamped with the run's clock (needs "
        "pip install 'edgeddl[tensorboard]'; default LOGDIR: RUN_DIR/tensorboard)",
    )


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgeddl.report.compare import plot_comparison, side_by_side
    from edgeddl.report.runs import read_run

    require_writable("--plot", args.plot, folder=False)
    runs = [read_run(d) for d in args.run_dirs]
    table = Table("", *(str(d) for d in args.run_dirs), title="edgeddl compare")
    for label, values in side_by_side(runs):
        table.add_row(label, *values)
    console = Console()
    console.print(table)
    plot_comparison(runs, args.plot)
    console.print(f"wrote {args.plot}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from edgeddl.report.export import (
        CSV_FILE,
        TENSORBOARD_DIR,
        summary_writer_class,
        write_csv,
        write_tensorboard,
    )
    from edgeddl.report.runs import clock_key, read_metrics

    if args.csv is None and args.tensorboard is None:
        raise ConfigError("export: nothing to write; add --csv [PATH] and/or --tensorboard "
                          "[LOGDIR]")  # fmt: skip
    csv_path = args.run_dir / CSV_FILE if args.csv is BESIDE_RUN else args.csv
    logdir = args.run_dir / TENSORBOARD_DIR if args.tensorboard is BESIDE_RUN else args.tensorboard
    if csv_path is not None:
        require_writable("--csv", csv_path, folder=False)
    if logdir is not None:
        summary_writer_class()  # refused now, not after the CSV is written
        require_writable("--tensorboard", logdir, folder=True)
    rows = read_metrics(args.run_dir)
    if csv_path is not None:
        write_csv(rows, csv_path)
        print(f"wrote {csv_path} ({len(rows)} rows)")
    if logdir is not None:
        num_scalars = write_tensorboard(rows, logdir, clock_key(rows[0]))
        print(f"wrote {num_scalars} scalars to {logdir} (tensorboard --logdir {logdir})")
    return 0


RUNS_COMMANDS = {"compare": cmd_compare, "export": cmd_export}
