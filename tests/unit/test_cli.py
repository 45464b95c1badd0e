"""The `edgeddl` command: one-line errors with exit code 2, `validate`, and a tiny `run`."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from edgeddl.cli.main import main
from edgeddl.config.loader import load_scenario, scenario_from_dict
from edgeddl.report.files import RUN_FILES

TINY = """
[run]
name = "tiny"
seed = 1

[[fleet.devices]]
name = "pc"
profile = "pc"
count = 2

[[fleet.devices]]
name = "pi"
profile = "rpi4"
link = "wifi"

[data]
dataset = "synthetic"
num_samples = 240
input_shape = [1, 12]
num_classes = 3

[model]
name = "mlp"
width = 16

[train]
global_batch = 24
num_steps = 20
eval_every = 10
lr = 0.05
"""


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("edgeddl: error: ")
    assert err.endswith("\n")
    return lines[0].removeprefix("edgeddl: error: ")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY, encoding="utf-8")
    return path


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        (["train.lrr=0.1"], "train.lrr: unknown key; did you mean 'lr'?"),
        (["train.lr=fast"], "train.lr: expected a number, got 'fast'"),
        (["fleet.devices.0.count=0"], "fleet.devices[0].count"),
        (["train.lr"], "--set 'train.lr': expected KEY=VALUE"),
    ],
)
def test_bad_override_is_one_line_and_exit_code_2(
    tiny: Path, capsys: pytest.CaptureFixture[str], command, overrides, start
) -> None:
    argv = [command, str(tiny)]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 2
    assert _one_error_line(capsys).startswith(start)
    assert capsys.readouterr().out == ""


def test_missing_scenario_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.toml")]) == 2
    message = _one_error_line(capsys)
    assert "nope.toml" in message and "no such file" in message


def test_invalid_toml_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[train\nlr = = 0.1\n", encoding="utf-8")
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert _one_error_line(capsys).startswith(f"{path}: invalid TOML")
    assert not (tmp_path / "run").exists()


def test_batch_that_does_not_fit_is_a_user_error(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 10 bytes of memory cannot hold the model: the balancer's error, not a traceback.
    overrides = [
        "profiles.tiny_mem.flops_per_s=1e9",
        "profiles.tiny_mem.memory_bytes=10",
        "fleet.devices.0.profile=tiny_mem",
        "fleet.devices.1.profile=tiny_mem",
    ]
    argv = ["run", str(tiny), "--quiet", "--out", str(tmp_path / "run")]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 2
    assert "global batch 24" in _one_error_line(capsys)


def test_validate_prints_toml_that_loads_back(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "validate",
                str(tiny),
                "--set",
                "train.topology=ring",
                "--set",
                "fleet.devices.0.count=3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    expected = load_scenario(tiny, ["train.topology=ring", "fleet.devices.0.count=3"])
    assert scenario_from_dict(tomllib.loads(out)) == expected
    assert expected.train.topology == "ring" and len(expected.fleet.device_names()) == 4
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(out, encoding="utf-8")
    assert load_scenario(resolved) == expected


def test_validate_refuses_a_compressor_the_topology_cannot_carry(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = ["--set", "train.topology=ring", "--set", "compression.compressor=topk"]
    assert main(["validate", str(tiny), *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeddl: error: compression.compressor: topk payloads cannot ride")
    assert "\n" not in err


def test_a_diverging_compressed_run_stops_with_one_line(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = ["--set", "compression.compressor=topk", "--set", "train.lr=1e12"]
    assert main(["run", str(tiny), "--out", str(tmp_path / "r"), "--quiet", *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeddl: error: training diverged at step ")
    assert "is not finite; lower train.lr" in err and "\n" not in err


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["--coordinator", "nonsense", "--name", "pi-0"], "--coordinator: expected HOST:PORT"),
        (
            ["--coordinator", "127.0.0.1:1", "--name", "pi-0", "--connect-timeout", "0.5"],
            "--coordinator: no coordinator answered at 127.0.0.1:1",
        ),
        (["--coordinator", "h:1", "--name", "x", "--timeout", "0"], "--timeout and"),
    ],
)
def test_device_errors_are_one_line(
    args: list[str], start: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["device", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"edgeddl: error: {start}") and "\n" not in err


def test_coordinator_on_a_taken_port_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torchft")
    from torch.distributed import TCPStore

    taken = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    argv = ["coordinator", "--host", "127.0.0.1", "--port", str(taken.port)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"edgeddl: error: --port: cannot listen on 127.0.0.1:{taken.port}")
    assert "\n" not in err


def test_validate_default_scenario_is_the_paper_fleet(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate"]) == 0
    scenario = scenario_from_dict(tomllib.loads(capsys.readouterr().out))
    assert scenario == load_scenario("paper_fleet")
    assert len(scenario.fleet.device_names()) == 11


def test_run_tiny_scenario_writes_the_run_folder(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "run"
    assert main(["run", str(tiny), "--out", str(out_dir), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(out_dir)
    for name in RUN_FILES:
        assert (out_dir / name).is_file() and (out_dir / name).stat().st_size > 0, name
    resolved = load_scenario(out_dir / "config.resolved.toml")
    assert resolved == load_scenario(tiny)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    # Before training, then every eval_every steps, the last included.
    assert [r["step"] for r in rows] == [0, 10, 20]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    times = [r["virtual_time_s"] for r in rows]
    assert 0.0 == times[0] < times[1] < times[2]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["scenario"] == "tiny"
    assert summary["model"]["name"] == "mlp"
    assert summary["num_steps"] == 20 and summary["num_crashes"] == 0
    assert summary["samples"] == 20 * 24  # the whole global batch every step
    # Star topology: each step, every participating device uploads its fp32 gradient, as the
    # codec encodes it (a few header bytes beside the values).
    steps = sum(d["steps"] for d in summary["per_device"])
    dense = summary["compression"]["dense_gradient_bytes"]
    assert 4 * summary["model"]["num_params"] < dense <= 4 * summary["model"]["num_params"] + 8
    assert summary["bytes_up"] == steps * dense
    assert summary["compression"]["compression_ratio"] == 1.0
    for name in ("accuracy.png", "timeline.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("overrides", "start"),
    [
        # The data layer refuses (more devices than samples): still one line.
        (["data.num_samples=2", "train.global_batch=1"], "data.partition: "),
        (["model.name=resnet20"], "model: resnet20 needs a 3-D"),
        (["run.seed=-1"], "run.seed must be in"),
        (["train.global_batch=100000"], "train.global_batch: 100000 is more than"),
        (["run.name=a/../b"], "run.name must be a plain folder name"),
        (["fleet.devices.1.name=pc-0"], "fleet.devices: duplicate device or group name"),
        (["train.lr=nan"], "train.lr: expected a finite number"),
    ],
)
def test_run_refuses_what_the_scenario_cannot_have(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides, start
) -> None:
    argv = ["run", str(tiny), "--quiet", "--out", str(tmp_path / "out")]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 2
    assert _one_error_line(capsys).startswith(start)


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """`edgeddl run` fails the test if it gets as far as training."""

    def train(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started")

    monkeypatch.setattr("edgeddl.runtime.sim.loop.run", train)


@pytest.mark.parametrize(
    ("out", "problem"),
    [
        ("file", "is a file, not a folder"),  # an existing file
        ("file/run", "{tmp}/file is a file, not a folder"),  # a folder under a file
    ],
)
def test_out_that_cannot_be_a_folder_is_refused_before_training(
    tiny: Path, tmp_path: Path, capsys, no_training, out: str, problem: str
) -> None:
    (tmp_path / "file").write_text("not a folder")
    path = tmp_path / out
    assert main(["run", str(tiny), "--quiet", "--out", str(path)]) == 2
    assert _one_error_line(capsys) == f"--out {path}: {problem.format(tmp=tmp_path)}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_out_without_write_permission_is_refused_before_training(
    tiny: Path, tmp_path: Path, capsys, no_training
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    out = locked / "runs" / "r"
    assert main(["run", str(tiny), "--quiet", "--out", str(out)]) == 2
    assert _one_error_line(capsys) == f"--out {out}: no permission to write in {locked}"


def test_a_folder_as_scenario_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path)]) == 2
    message = _one_error_line(capsys)
    assert message.startswith(f"scenario {str(tmp_path)!r}: is a directory; expected a scenario")
    assert "paper_fleet" in message  # the bundled names it could have meant


@pytest.mark.parametrize(
    ("root", "start"),
    [
        (None, "dataset 'cifar10' needs data.root"),
        ("empty", "CIFAR-10 not found in {tmp}/empty"),
    ],
)
def test_validate_refuses_missing_cifar10_files_as_run_does(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], root, start
) -> None:
    sets = ["--set", "data.dataset=cifar10", "--set", "model.name=resnet20"]
    if root is not None:
        (tmp_path / root).mkdir()
        sets += ["--set", f"data.root={tmp_path / root}"]
    assert main(["validate", str(tiny), *sets]) == 2
    validated = _one_error_line(capsys)
    assert main(["run", str(tiny), "--quiet", "--out", str(tmp_path / "run"), *sets]) == 2
    assert _one_error_line(capsys) == validated
    assert validated.startswith(start.format(tmp=tmp_path))


def test_non_utf8_scenario_is_one_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[run]\nname = "caf\xe9"\n')
    assert main(["validate", str(path)]) == 2
    assert _one_error_line(capsys).startswith(f"{path}: invalid TOML")


def test_infer_plan_prints_the_split_and_refuses_unknown_devices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["infer", "plan", "paper_fleet", "--fleet", "paper_fleet",
                 "--devices", "pi-0,pc-0", "--objective", "throughput"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "pi-0" in out and "predicted per sample: latency" in out
    assert main(["infer", "plan", "paper_fleet", "--fleet", "paper_fleet",
                 "--devices", "pi-0,toaster"]) == 2  # fmt: skip
    assert "edgeddl: error: --devices: toaster not in the fleet" in capsys.readouterr().err
