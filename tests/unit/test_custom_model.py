"""Your own model and data: what the run folder records, rerunning it, `edgeddl infer` on
it, and the one-line check of model against data before anything slow."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from custom_models import Signals, TinyNet, tiny_data
from torch import nn

import edgeddl
from edgeddl import workload
from edgeddl.cli.main import main
from edgeddl.config.custom import CustomDataRecord, CustomModelRecord
from edgeddl.config.loader import (
    ConfigError,
    load_recorded,
    recorded_from_dict,
    scenario_from_dict,
    to_toml,
)
from edgeddl.inference.deploy import load_deployment
from edgeddl.task import AnomalyDetection, Classification
from edgeddl.workload import check_model_fits

RAW: dict[str, Any] = {
    "run": {"name": "own", "seed": 3},
    "fleet": {"devices": [{"name": "pc", "profile": "pc", "count": 2}]},
    "data": {"dataset": "synthetic", "num_samples": 120, "input_shape": [1, 12], "num_classes": 3},
    "model": {"name": "mlp", "width": 8},
    "train": {"global_batch": 16, "num_steps": 4, "eval_every": 2},
}
INFER = ["--fleet", "paper_fleet", "--devices", "pi-0,pc-0", "--samples", "8"]
DATA = ["--data", "custom_models:tiny_data"]
MODEL_RECORD = CustomModelRecord(class_name="Net", module="mine", num_params=10, input_shape=[3])


def _one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgeddl: error: "), err
    return err


@pytest.fixture(scope="module")
def own_run(tmp_path_factory: pytest.TempPathFactory) -> edgeddl.RunResult:
    train, test = tiny_data()
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("runs") / "own"
    return edgeddl.run(
        scenario_from_dict(RAW), model=TinyNet(), train_set=train, test_set=test,
        out_dir=out, progress=False,
    )  # fmt: skip


def test_run_folder_records_your_own_model_and_data(own_run: edgeddl.RunResult) -> None:
    resolved = tomllib.loads((own_run.run_dir / "config.resolved.toml").read_text())
    num_params = sum(p.numel() for p in TinyNet().parameters())
    own_model = {"class_name": "TinyNet", "module": "custom_models", "input_shape": [1, 12]}
    assert resolved["model"] == {"name": "custom", **own_model, "num_params": num_params}
    own_data = {
        "class_name": "Signals",
        "module": "custom_models",
        "task": "classification",
        "num_train": 96,
        "num_test": 48,
        "input_shape": [1, 12],
        "num_classes": 3,
    }
    partition = {"partition": "iid", "alpha": 0.5, "shard_sizes": "equal"}
    assert resolved["data"] == {"dataset": "custom", **own_data, **partition}
    model, dataset = own_run.summary["model"], own_run.summary["dataset"]
    assert model.items() >= {"name": "custom", **own_model, "num_params": num_params}.items()
    assert model["train_flops_per_sample"] > 0
    assert dataset == {"name": "custom", **own_data}


def test_rerunning_the_record_says_in_one_line_what_to_pass(
    own_run: edgeddl.RunResult, capsys: pytest.CaptureFixture[str]
) -> None:
    resolved = own_run.run_dir / "config.resolved.toml"
    for command in ("run", "validate"):
        err = _one_line(capsys, [command, str(resolved)])
        assert "this run used your own model (custom_models.TinyNet, " in err
        assert "and data (custom_models.Signals, 96 training samples)" in err
        assert f"edgeddl.run('{resolved}', model=..., train_set=..., test_set=...)" in err
    with pytest.raises(ConfigError, match=r"your own data \(custom_models\.Signals") as e:
        edgeddl.run(resolved, model=TinyNet(), progress=False)
    assert "your own model" not in str(e.value)


def test_the_record_reruns_from_python_the_same(own_run: edgeddl.RunResult, tmp_path: Path) -> None:
    resolved = own_run.run_dir / "config.resolved.toml"
    train, test = tiny_data()
    torch.manual_seed(0)
    again = edgeddl.run(
        resolved, model=TinyNet(), train_set=train, test_set=test,
        out_dir=tmp_path / "again", progress=False,
    )  # fmt: skip
    assert (again.run_dir / "config.resolved.toml").read_text() == resolved.read_text()
    assert again.summary["final_test_accuracy"] == own_run.summary["final_test_accuracy"]
    for key, value in own_run.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key


def test_records_load_back_with_stand_ins_of_their_task() -> None:
    scenario = scenario_from_dict(RAW)
    data = CustomDataRecord(
        class_name="Series", module="mine", task="anomaly_detection", num_train=5,
        num_test=4, input_shape=[3], num_classes=2,
    )  # fmt: skip
    text = to_toml(scenario, MODEL_RECORD, data)
    rec = recorded_from_dict(tomllib.loads(text))
    assert (rec.model, rec.data) == (MODEL_RECORD, data)
    assert rec.scenario.task == "anomaly_detection"
    assert rec.scenario.model.name == "autoencoder1d"  # never built: a stand-in of the task
    assert to_toml(rec.scenario, rec.model, rec.data) == text
    only_model = tomllib.loads(to_toml(scenario, MODEL_RECORD))
    assert only_model["data"] == tomllib.loads(to_toml(scenario))["data"]
    with pytest.raises(ConfigError, match=r"^this run used your own model \(mine\.Net, 10 param"):
        scenario_from_dict(only_model)
    assert load_recorded("paper_fleet").model is None  # a zoo scenario: no record
    only_model["model"]["colour"] = "red"
    with pytest.raises(ConfigError, match=r"^model\.colour: unknown key"):
        scenario_from_dict(only_model)


def test_infer_takes_your_own_model_as_edgeddl_run_does(
    own_run: edgeddl.RunResult, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = own_run.run_dir
    train, test = tiny_data()
    dep = load_deployment(str(run_dir), model=TinyNet(), train_set=train, test_set=test)
    assert dep.model_name == "TinyNet" and dep.weights == run_dir / "model.pt"
    for key, value in own_run.model.state_dict().items():
        assert torch.equal(dep.model.state_dict()[key], value), key
    base = ["infer", "run", str(run_dir), *INFER]
    assert main([*base, "--model", "custom_models:tiny_net", *DATA]) == 0
    out = capsys.readouterr().out
    assert "TinyNet: trained weights from" in out and "identical to single-device" in out
    assert main([*base, *DATA]) == 0  # the recorded class, imported and built
    assert "TinyNet: trained weights from" in capsys.readouterr().out
    assert main(["infer", "plan", str(run_dir), *INFER[:4], *DATA]) == 0
    assert "TinyNet across 2 devices" in capsys.readouterr().out
    err = _one_line(capsys, base)
    assert "trained on your own data (custom_models.Signals, 96 training samples); pass it: " \
        "--data MODULE:FACTORY" in err  # fmt: skip
    err = _one_line(capsys, [*base, *DATA, "--model", "custom_models:wide_net"])
    assert "not the weights of this run's TinyNet" in err
    err = _one_line(capsys, [*base, *DATA, "--model", "custom_models:nothing"])
    assert "--model custom_models:nothing: custom_models has no nothing" in err
    err = _one_line(capsys, [*base, *DATA, "--model", "custom_models"])
    assert "expected MODULE:FACTORY" in err
    assert "takes the zoo's models" in _one_line(capsys, ["infer", "quantize", str(run_dir)])


def test_infer_says_to_pass_a_model_it_cannot_rebuild(
    own_run: edgeddl.RunResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = Path(shutil.copytree(own_run.run_dir, tmp_path / "moved"))
    resolved = run_dir / "config.resolved.toml"
    resolved.write_text(resolved.read_text().replace('"TinyNet"', '"Gone"'))
    err = _one_line(capsys, ["infer", "run", str(run_dir), *INFER, *DATA])
    assert "your own model (custom_models.Gone, " in err
    assert (
        "cannot be rebuilt here (custom_models has no Gone); pass it: --model MODULE:FACTORY" in err
    )
    assert (
        main(["infer", "run", str(run_dir), *INFER, *DATA, "--model", "custom_models:tiny_net"])
        == 0
    )


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            TinyNet(num_classes=5),
            "model: TinyNet gives outputs of shape (2, 5) for inputs of shape (2, 1, 12); "
            "expected (2, 3): one score per class of the data set",
        ),
        (
            TinyNet(length=40),
            "model: TinyNet fails on inputs of shape (2, 1, 12) (samples of shape (1, 12)): "
            "mat1 and mat2 shapes cannot be multiplied (2x12 and 40x8)",
        ),
    ],
)
def test_a_model_that_does_not_fit_the_data_is_one_line_before_anything_slow(
    model: nn.Module, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow(*args: object, **kwargs: object) -> None:
        raise AssertionError("measured the model's cost before checking it fits the data")

    monkeypatch.setattr(workload, "model_cost", slow)
    monkeypatch.setattr(workload, "cached_model_cost", slow)
    with pytest.raises(ConfigError) as e:
        edgeddl.run(scenario_from_dict(RAW), model=model, out_dir=tmp_path / "run", progress=False)
    assert str(e.value) == expected
    assert not (tmp_path / "run").exists()


def test_check_model_fits_per_task() -> None:
    x = Signals(4, seed=0).x
    check_model_fits(nn.Identity(), x, AnomalyDetection(), 2, exact=True)
    with pytest.raises(ConfigError, match=r"outputs of shape \(2, 12\) for inputs of shape "
                       r"\(2, 1, 12\); expected \(2, 1, 12\): a reconstruction"):  # fmt: skip
        check_model_fits(nn.Flatten(), x, AnomalyDetection(), 2, exact=True)
    model = TinyNet(num_classes=5).train()
    check_model_fits(model, x, Classification(), 3, exact=False)  # labels need not show all
    assert model.training  # left in the mode it was in
    with pytest.raises(ConfigError, match=r"expected \(2, >= 3\): a score per class"):
        check_model_fits(TinyNet(num_classes=2), x, Classification(), 3, exact=False)

    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x, x

    with pytest.raises(ConfigError, match=r"^model: Pair returns a tuple, not a tensor"):
        check_model_fits(Pair(), x, Classification(), 3, exact=True)
