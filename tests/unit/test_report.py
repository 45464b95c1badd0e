"""What a run reports and what is made from its folder: the progress line, the end-of-run
table, the plots, `edgeddl scenarios`, `compare` and `export`."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from rich.console import Console
from test_cli import TINY

from edgeddl.cli.main import main
from edgeddl.config.loader import BUNDLED_DIR, bundled_names, load_scenario, scenario_description
from edgeddl.report import plots
from edgeddl.report.progress import ProgressDisplay, summary_rows
from edgeddl.security.keys import Identity, save_identity

PNG = b"\x89PNG\r\n\x1a\n"


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def _sealed_topk(folder: Path) -> Path:
    """TINY with every party enrolled ([security]) and top-k compression."""
    scenario = folder / "sealed.toml"
    scenario.write_text(TINY, encoding="utf-8")
    keys = folder / "keys"

    def enroll(name: str) -> dict[str, str]:
        identity = Identity.generate(name)
        save_identity(identity, keys)
        return dataclasses.asdict(identity.public().to_config())

    names = load_scenario(scenario).fleet.device_names()
    security = {
        "enabled": True,
        "keys_dir": str(keys),
        "coordinator": enroll("coordinator"),
        "devices": {n: enroll(n) for n in names},
    }
    extra = {"security": security, "compression": {"compressor": "topk", "density": 0.1}}
    scenario.write_text(TINY + "\n" + tomli_w.dumps(extra), encoding="utf-8")
    return scenario


def _copy(run_dir: Path, to: Path) -> Path:
    to.mkdir()
    for f in run_dir.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two finished tiny runs: plain, and sealed with top-k compression."""
    folder = tmp_path_factory.mktemp("runs")
    plain_toml = folder / "tiny.toml"
    plain_toml.write_text(TINY, encoding="utf-8")
    plain, sealed = folder / "plain", folder / "sealed"
    assert main(["run", str(plain_toml), "--quiet", "--out", str(plain)]) == 0
    assert main(["run", str(_sealed_topk(folder)), "--quiet", "--out", str(sealed)]) == 0
    return plain, sealed


# --- the progress line and the end-of-run table ------------------------------------------------


@pytest.mark.parametrize("title", ["paper_fleet", "a_scenario_name_longer_than_the_terminal" * 2])
def test_progress_line_keeps_the_step_counter_at_80_columns(title: str) -> None:
    display = ProgressDisplay(120000, title, metric="test_auroc")
    display.update(112345, 1234567.8, loss=2.345, metric=0.912)
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(display.progress.get_renderable())
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and len(lines[0]) <= 80, lines
    for shown in ("112345/120000", "virtual 1234567.8 s", "loss 2.345", "AUROC 0.912"):
        assert shown in lines[0]


def test_summary_table_shows_compression_and_ledger_when_on(runs: tuple[Path, Path]) -> None:
    plain, sealed = (dict(summary_rows(_summary(d), "test_accuracy")) for d in runs)
    assert "compression" not in plain and "security" not in plain
    summary = _summary(runs[1])
    ratio = summary["compression"]["compression_ratio"]
    assert ratio > 2  # top-k at 10 % density: far fewer bytes than the dense gradient
    assert sealed["compression"] == f"topk: ratio {ratio:.1f}x"
    entries = summary["security"]["ledger_entries"]
    assert entries > 20  # at least one entry per step
    assert sealed["security"] == f"sealed; ledger: {entries} entries; 0 payloads rejected"


def test_summary_table_counts_rejections_by_reason() -> None:
    security = {"ledger_entries": 9, "num_rejected": 3,
                "rejected_by_reason": {"tampered": 1, "bad_signature": 2}}  # fmt: skip
    summary = {**_summary_stub(), "security": security}
    assert dict(summary_rows(summary, "test_accuracy"))["security"] == (
        "sealed; ledger: 9 entries; 3 payloads rejected (bad_signature 2, tampered 1)"
    )


def _summary_stub() -> dict[str, Any]:
    return {
        "final_test_accuracy": 0.5,
        "virtual_time_s": 1.0,
        "wall_time_s": 1.0,
        "num_devices": 2,
        "samples_per_virtual_s": 10.0,
        "bytes_up": 1,
        "bytes_down": 1,
        "breakdown_s": {"compute": 1.0},
    }


def test_metric_plot_has_the_losses_beside_the_metric(
    runs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures: list[Any] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    rows = _rows(runs[0])
    plots.plot_metric(rows, tmp_path / "accuracy.png", "test_accuracy", "tiny")
    metric_ax, loss_ax = figures[0].axes
    (metric_line,) = metric_ax.get_lines()
    assert list(metric_line.get_ydata()) == [r["test_accuracy"] for r in rows]
    train, test = loss_ax.get_lines()
    assert list(train.get_ydata()) == [r["train_loss"] for r in rows[1:]]  # none before step 1
    assert list(train.get_xdata()) == [r["virtual_time_s"] for r in rows[1:]]
    assert list(test.get_ydata()) == [r["test_loss"] for r in rows]


# --- edgeddl scenarios -------------------------------------------------------------------------


def test_scenario_description_is_the_first_sentence_of_the_leading_comment(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("# A fleet (Smith et al. 2020) of\n# Pis.  More here.\n#\n[run]\n# not this\n")
    assert scenario_description(path) == "A fleet (Smith et al. 2020) of Pis."
    path.write_text("[run]\n")
    assert scenario_description(path) == ""


def test_scenarios_lists_every_bundled_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["scenarios"]) == 0
    out = capsys.readouterr().out
    assert {p.stem for p in BUNDLED_DIR.glob("*.toml")} == set(bundled_names()) >= {"paper_fleet"}
    for name in bundled_names():
        line = next(x for x in out.splitlines() if f" {name} " in x)
        assert scenario_description(BUNDLED_DIR / f"{name}.toml") in line
        assert f" {len(load_scenario(name).fleet.device_names())} " in line


# --- edgeddl compare ---------------------------------------------------------------------------


def test_compare_prints_runs_side_by_side_and_plots_them(
    runs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    plot = tmp_path / "out" / "both.png"
    assert main(["compare", *map(str, runs), "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()

    def row(label: str) -> list[str]:
        line = next(x for x in lines if x.startswith(f"│ {label} "))
        return [cell.strip() for cell in line.strip("│").split("│")][1:]

    for column, run_dir in enumerate(runs):
        rows, summary = _rows(run_dir), _summary(run_dir)
        best = max(r["test_accuracy"] for r in rows)
        first = next(r for r in rows if r["test_accuracy"] == best)
        assert row("best")[column] == f"{best:.4f}"
        assert row("final")[column] == f"{rows[-1]['test_accuracy']:.4f}"
        assert row("virtual time to best")[column].endswith(f"(step {first['step']})")
        assert row("bytes up")[column] == f"{summary['bytes_up']:,}"
        assert row("bytes down")[column] == f"{summary['bytes_down']:,}"
    assert row("compression")[0] == "-" and row("compression")[1].startswith("topk: ratio")
    assert row("security")[0] == "-" and row("security")[1].startswith("sealed; ledger: ")
    assert plot.read_bytes()[:8] == PNG
    assert lines[-1] == f"wrote {plot}"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: d.rename(d.with_name("gone")), "{d}: no such run folder"),
        (lambda d: (d / "summary.json").unlink(), "{d}: not a finished run (no summary.json)"),
        (lambda d: (d / "summary.json").write_text("{"), "{d}/summary.json: damaged (line 1: "),
        (
            lambda d: (d / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "test'),
            "{d}/metrics.jsonl: damaged (line 2: ",
        ),
        (
            lambda d: (d / "metrics.jsonl").write_text('{"step": 0}\n'),
            "{d}/metrics.jsonl: damaged (line 1: no virtual_time_s)",
        ),
    ],
)
def test_compare_names_a_missing_or_damaged_run_folder(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], damage, message
) -> None:
    broken = _copy(runs[0], tmp_path / "broken")
    damage(broken)
    plot = tmp_path / "compare.png"
    assert main(["compare", str(runs[1]), str(broken), "--plot", str(plot)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith(f"edgeddl: error: {message.format(d=broken)}"), err
    assert not plot.exists()


# --- edgeddl export ----------------------------------------------------------------------------


def test_export_csv_holds_every_row_of_metrics_jsonl(
    runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _copy(runs[0], tmp_path / "run")  # the shared run folder stays as it is
    assert main(["export", str(run_dir), "--csv"]) == 0  # default: RUN_DIR/metrics.csv
    assert capsys.readouterr().out.strip() == f"wrote {run_dir / 'metrics.csv'} (3 rows)"
    with (run_dir / "metrics.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    rows = _rows(run_dir)
    assert len(table) == len(rows)
    for line, row in zip(table, rows, strict=True):
        assert list(line) == list(row)
        for key, value in row.items():
            assert line[key] == ("" if value is None else str(value))


def test_export_tensorboard_writes_each_number_at_its_step(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    assert main(["export", str(runs[0]), "--tensorboard", str(logdir)]) == 0
    events = EventAccumulator(str(logdir))
    events.Reload()
    rows = _rows(runs[0])
    accuracy = events.Scalars("test/accuracy")
    assert [e.step for e in accuracy] == [r["step"] for r in rows]
    assert [e.value for e in accuracy] == pytest.approx([r["test_accuracy"] for r in rows])
    assert [e.wall_time for e in accuracy] == pytest.approx([r["virtual_time_s"] for r in rows])
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in rows[1:]]
    assert "run/bytes_up" in events.Tags()["scalars"]


def test_export_without_tensorboard_names_the_extra_and_writes_nothing(
    runs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    out = tmp_path / "m.csv"
    argv = ["export", str(runs[0]), "--csv", str(out), "--tensorboard", str(tmp_path / "tb")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        "edgeddl: error: --tensorboard needs the tensorboard package: "
        "pip install 'edgeddl[tensorboard]'\n"
    )
    assert not out.exists() and not (tmp_path / "tb").exists()


def test_export_needs_something_to_write(
    runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(runs[0])]) == 2
    assert "add --csv [PATH] and/or --tensorboard [LOGDIR]" in capsys.readouterr().err
