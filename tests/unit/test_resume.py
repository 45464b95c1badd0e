"""Interrupted and resumed simulated runs end bit for bit where an uninterrupted run ends.

Each case trains a small fleet straight through, then again with a real SIGINT raised after
step 11, then resumes that folder; the model, every metrics row and the summary (wall-clock
fields aside) must be identical. A run killed without warning resumes from its last periodic
checkpoint to the same result, and a secured run's ledger verifies at every stage.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

import edgeddl
from edgeddl.cli.main import main
from edgeddl.config.loader import ConfigError, scenario_from_dict
from edgeddl.report.recorder import RunRecorder
from edgeddl.runtime.sim.resume import CHECKPOINT_FILE
from edgeddl.security.keys import Identity, save_identity
from edgeddl.security.ledger import LEDGER_FILE, read_entries

STEPS = 24
STOP_AT = 11
DEVICES = ("pc", "jetson", "pi-0", "pi-1")
BASE: dict[str, Any] = {
    "run": {"name": "resume", "seed": 5, "checkpoint_every": 8},
    "fleet": {
        "coordinator": {"profile": "pc", "link": "lan"},
        "devices": [
            {"name": "pc", "profile": "pc", "link": "lan"},
            {"name": "jetson", "profile": "jetson_nano", "link": "wifi"},
            {"name": "pi", "profile": "rpi4", "link": "wan_lossy", "count": 2},
        ],
    },
    "data": {"dataset": "mnist1d", "num_samples": 1200},
    "model": {"name": "cnn1d"},
    "train": {"global_batch": 64, "num_steps": STEPS, "eval_every": 5, "lr": 0.05},
}
CHURN = [
    {"at_s": 0.4, "device": "pi-1", "action": "crash"},
    {"at_s": 0.9, "device": "pi-1", "action": "join"},
    {"at_s": 1.2, "device": "jetson", "action": "leave"},
]
CASES: dict[str, dict[str, Any]] = {
    "data_parallel_with_churn": {"events": CHURN},
    "two_step_adaptive": {
        "compression": {"compressor": "two_step", "density": 0.05, "adapt": {"enabled": True}}
    },
    "qsgd": {"compression": {"compressor": "qsgd"}},
    "randomk_ring": {
        "compression": {"compressor": "randomk", "density": 0.1},
        "train": {"topology": "ring"},
    },
    "powersgd": {"compression": {"compressor": "powersgd"}},
    "federated_sampled_adam": {
        "train": {"strategy": "federated", "lr": 0.02},
        "federated": {
            "fraction": 0.5,
            "local_steps": 3,
            "local_batch": 16,
            "server_optimizer": "adam",
            "server_lr": 0.05,
            "deadline_s": 2.0,
        },
        "events": CHURN,
    },
    "split_u_shaped_splitfed": {
        "train": {"strategy": "split"},
        "split": {"labels": "u_shaped", "splitfed": True, "compression": {"compressor": "int8"}},
    },
    "robust_median_with_a_sign_flipper": {
        "robust": {"rule": "median", "num_byzantine": 1, "device_momentum": True},
        "extra_devices": [
            {"name": "bad", "profile": "rpi4", "link": "wifi", "behavior": "sign_flip"}
        ],
    },
}


def _raw(case: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    for section, values in copy.deepcopy(case).items():
        if section == "extra_devices":
            raw["fleet"]["devices"] += values
        elif isinstance(values, list):
            raw[section] = values
        else:
            raw.setdefault(section, {}).update(values)
    return raw


def _stop_after(monkeypatch: pytest.MonkeyPatch, step: int, how: str) -> None:
    """After `step` steps: a real SIGINT (`interrupt`), or a crash of the process (`kill`:
    an exception nothing catches, so nothing is written on the way out)."""
    add_step = RunRecorder.add_step

    def stopping(self: RunRecorder, *args: Any, **kwargs: Any) -> None:
        add_step(self, *args, **kwargs)
        if self.num_steps == step:
            if how == "interrupt":
                signal.raise_signal(signal.SIGINT)
            else:
                raise SystemExit("killed")

    monkeypatch.setattr(RunRecorder, "add_step", stopping)


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in rows]


def _same_run(a: Path, b: Path) -> None:
    ma, mb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert ma.keys() == mb.keys()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert _rows(a) == _rows(b)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for s in (sa, sb):
        s.pop("wall_time_s")
        s.pop("model_digest", None)  # the same model, but only the secured runs have it
        s.pop("security", None)  # run ids differ
    assert sa == sb


def _train(raw: dict[str, Any], out: Path) -> edgeddl.RunResult:
    return edgeddl.run(scenario_from_dict(raw), out_dir=out, progress=False)


@pytest.mark.parametrize("name", list(CASES))
def test_an_interrupted_run_resumes_to_the_same_bits(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _raw(CASES[name])
    _train(raw, tmp_path / "straight")
    with monkeypatch.context() as m:
        _stop_after(m, STOP_AT, "interrupt")
        stopped = _train(raw, tmp_path / "resumed")
    assert stopped.interrupted and stopped.summary["num_steps"] == STOP_AT
    # What was done is a complete run folder: model, summary, an evaluation at the stop.
    assert (tmp_path / "resumed" / "model.pt").is_file()
    assert _rows(tmp_path / "resumed")[-1]["step"] == STOP_AT
    done = edgeddl.run(resume=tmp_path / "resumed", progress=False)
    assert not done.interrupted and done.summary["status"] == "completed"
    assert not (tmp_path / "resumed" / CHECKPOINT_FILE).exists()
    _same_run(tmp_path / "straight", tmp_path / "resumed")


@pytest.fixture(scope="module")
def security(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("keys")

    def enroll(name: str) -> dict[str, str]:
        identity = Identity.generate(name)
        save_identity(identity, folder)
        return dataclasses.asdict(identity.public().to_config())

    return {
        "enabled": True,
        "keys_dir": str(folder),
        "max_payload_bytes": 65536,
        "ledger_flush_every": 1,  # every entry on disk at once, as after a long run
        "coordinator": enroll("coordinator"),
        "devices": {n: enroll(n) for n in DEVICES},
    }


def _verify(run_dir: Path, *extra: str) -> None:
    assert main(["ledger", "verify", str(run_dir), *extra]) == 0


def test_a_secured_run_interrupted_then_killed_resumes_with_a_ledger_that_verifies(
    security: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = _raw({"security": security})
    raw["fleet"]["devices"][1]["envelope_fault"] = "replayed"  # refused, step after step
    _train(raw, tmp_path / "straight")
    out = tmp_path / "resumed"
    with monkeypatch.context() as m:
        _stop_after(m, STOP_AT, "interrupt")
        _train(raw, out)
    _verify(out)  # closed by its interrupted entry: no --partial needed
    kinds = [e["kind"] for e in read_entries(out / LEDGER_FILE)[0] if e is not None]
    assert kinds[-1] == "interrupted" and "checkpoint" in kinds
    # Resumed, then killed after step 19: the last checkpoint (step 16) is behind the
    # ledger, whose entries for steps 17-19 stay.
    with monkeypatch.context() as m:
        _stop_after(m, 19, "kill")
        with pytest.raises(SystemExit):
            edgeddl.run(resume=out, progress=False)
    _verify(out, "--partial")
    edgeddl.run(resume=out, progress=False)
    _verify(out)
    _same_run(tmp_path / "straight", out)
    entries = [e for e in read_entries(out / LEDGER_FILE)[0] if e is not None]
    kinds = [e["kind"] for e in entries]
    assert kinds.count("resumed") == 2 and kinds[-1] == "run_end"
    # No device's sequence number is used twice, across the lost steps too.
    updates = [e["payload"] for e in entries if e["kind"] == "update"]
    receipts = [(u["device"], u["seq"]) for u in updates]
    assert len(receipts) == len(set(receipts))


def test_a_finished_run_has_nothing_to_resume(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no checkpoint\.pkl"):
        edgeddl.run(resume=tmp_path, progress=False)
    raw = _raw({})
    raw["run"]["checkpoint_every"] = 2
    raw["train"]["num_steps"] = 5
    out = tmp_path / "run"
    _train(raw, out)
    assert not (out / CHECKPOINT_FILE).exists()  # removed once the run finished
    with pytest.raises(ConfigError, match=r"no checkpoint\.pkl"):
        edgeddl.run(resume=out, progress=False)


def test_resume_keeps_the_scenario_and_checks_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _raw({})
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _stop_after(m, 5, "interrupt")
        _train(raw, out)
    assert main(["run", "--resume", str(out), "--set", "train.lr=0.1"]) == 2
    assert "only train.num_steps" in capsys.readouterr().err
    other = copy.deepcopy(raw)
    other["train"]["lr"] = 0.1
    with pytest.raises(ConfigError, match="another scenario"):
        edgeddl.run(scenario_from_dict(other), resume=out, progress=False)
    ck = out / CHECKPOINT_FILE
    data = ck.read_bytes()
    ck.write_bytes(data[:-100])  # torn
    assert main(["run", "--resume", str(out)]) == 2
    assert "checkpoint.pkl: damaged" in capsys.readouterr().err
    ck.write_bytes(data.replace(b'"code": "', b'"code": "0', 1))  # other code
    assert main(["run", "--resume", str(out)]) == 2
    assert "another version" in capsys.readouterr().err
    ck.write_bytes(data)
    assert oct(ck.stat().st_mode & 0o777) == "0o600"
    assert main(["run", "--resume", str(out), "--quiet", "--set", "train.num_steps=12"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["num_steps"] == 12


def _own(seed: int) -> tuple[torch.nn.Module, Any, Any]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(600, 1, 40, generator=g), torch.randint(0, 10, (600,), generator=g)
    data = torch.utils.data.TensorDataset
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(40, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )
    return model, data(x[:500], y[:500]), data(x[500:], y[500:])


def test_your_own_model_and_data_resume_too_and_other_data_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario = scenario_from_dict(_raw({}))
    model, train, test = _own(1)
    edgeddl.run(scenario, model=model, train_set=train, test_set=test, out_dir=tmp_path / "a")
    model, train, test = _own(1)
    with monkeypatch.context() as m:
        _stop_after(m, STOP_AT, "interrupt")
        edgeddl.run(scenario, model=model, train_set=train, test_set=test, out_dir=tmp_path / "b")
    model, train, test = _own(2)  # another draw of the data
    with pytest.raises(ConfigError, match="other data"):
        edgeddl.run(resume=tmp_path / "b", model=model, train_set=train, test_set=test)
    model, train, test = _own(1)
    edgeddl.run(resume=tmp_path / "b", model=model, train_set=train, test_set=test)
    _same_run(tmp_path / "a", tmp_path / "b")
