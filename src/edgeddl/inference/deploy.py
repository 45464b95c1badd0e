"""What `edgeddl infer` deploys: a run folder's trained model, or a scenario's seeded one.

A run folder holds `config.resolved.toml` (which model, which data) and `model.pt` (the
trained `state_dict`, read with `weights_only=True`: a model file runs no code). A scenario
without weights gives the model a run would start from (seeded by `run.seed`, untrained).
A run of your own model or data set (`edgeddl.run(model=..., train_set=...)`) needs them
again: passed as to `edgeddl.run`, or `MODULE:FACTORY` names of importable code; without
one, the recorded class is imported and built without arguments where it can be. Every
problem is one `ConfigError` line.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from edgeddl.config.custom import CustomModelRecord
from edgeddl.config.loader import ConfigError, first_line, load_recorded
from edgeddl.config.schema import Scenario
from edgeddl.data import DatasetInfo
from edgeddl.task import Task, build_task
from edgeddl.workload import check_model_fits, scenario_model, workload_data

MODEL_FILE = "model.pt"
RESOLVED_FILE = "config.resolved.toml"


@dataclass(frozen=True, slots=True)
class Deployment:
    scenario: Scenario
    """Under a record of your own model or data set, its [model] or [data] only stands in
    (config/custom.py)."""
    model: nn.Module
    """In eval mode."""
    model_name: str
    """The zoo model's name, or your own model's class."""
    info: DatasetInfo
    task: Task
    x_test: torch.Tensor
    y_test: torch.Tensor
    weights: Path | None
    """The model file the weights came from; None: the seeded, untrained model."""
    train: TensorDataset
    test: TensorDataset


def run_config(run_dir: Path) -> Path:
    """`run_dir`'s config.resolved.toml, or one line saying it is not a run folder."""
    resolved = run_dir / RESOLVED_FILE
    if not resolved.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no {RESOLVED_FILE})")
    return resolved


def load_deployment(
    target: str,
    *,
    weights_needed: bool = True,
    model: nn.Module | None = None,
    train_set: Dataset | None = None,
    test_set: Dataset | None = None,
) -> Deployment:
    """The model and test set of `target`: a run folder, a scenario file or a bundled name
    (`weights_needed=False`: a run folder's model stays untrained, for shapes only). Your
    own `model` and `train_set`/`test_set` replace the scenario's, as in `edgeddl.run`."""
    path = Path(target)
    weights: Path | None = None
    if path.is_dir():
        rec = load_recorded(run_config(path))
        weights = path / MODEL_FILE if weights_needed else None
        if weights is not None and not weights.is_file():
            raise ConfigError(f"{weights}: missing; this run folder holds no trained model")
    else:
        rec = load_recorded(target)
    if rec.data is not None and train_set is None:
        raise ConfigError(
            f"{target}: this run trained on your own data ({rec.data.describe()}); pass it: "
            "--data MODULE:FACTORY (Python: train_set=..., test_set=...)"
        )
    scenario = rec.scenario
    torch.manual_seed(scenario.run.seed)
    train, test, info, data_record = workload_data(scenario, train_set, test_set)
    if model is None and rec.model is not None:
        model = rebuild_model(rec.model, target)
    name = scenario.model.name if model is None else type(model).__qualname__
    model = scenario_model(scenario, info) if model is None else model.cpu()
    task = build_task(scenario.task)
    x, y = test.tensors
    exact = data_record is None  # a built-in data set knows all its classes
    check_model_fits(model, train.tensors[0][:2].float(), task, info.num_classes, exact=exact)
    if weights is not None:
        load_weights(model, weights, name)
    return Deployment(
        scenario=scenario,
        model=model.eval(),
        model_name=name,
        info=info,
        task=task,
        x_test=x.float(),
        y_test=y.long(),
        weights=weights,
        train=train,
        test=test,
    )


def rebuild_model(record: CustomModelRecord, where: str) -> nn.Module:
    """Your own model's recorded class, imported and built without arguments; else one line
    saying to pass the model."""
    try:
        return factory_model(f"{record.module}:{record.class_name}")
    except ValueError as e:
        raise ConfigError(
            f"{where}: this run trained your own model ({record.describe()}), which cannot be "
            f"rebuilt here ({e}); pass it: --model MODULE:FACTORY (Python: model=...)"
        ) from None


def call_factory(spec: str) -> object:
    """What `MODULE:NAME` gives: NAME (a function or class in the importable MODULE)
    called without arguments; ValueError saying why not."""
    module_name, sep, name = spec.partition(":")
    if not (sep and module_name and name):
        raise ValueError("expected MODULE:FACTORY, e.g. mypackage.models:make_net")
    if module_name == "__main__" or "<locals>" in name:
        where = "a script's __main__" if module_name == "__main__" else "a function"
        raise ValueError(f"{name} is defined inside {where}, not an importable module")
    try:
        found: object = importlib.import_module(module_name)
    except Exception as e:  # a module can fail to import in many ways
        raise ValueError(f"cannot import {module_name}: {first_line(e)}") from None
    for part in name.split("."):
        if not hasattr(found, part):
            raise ValueError(f"{module_name} has no {name}")
        found = getattr(found, part)
    if not callable(found):
        raise ValueError(f"{module_name}.{name} is not a function or class")
    try:
        return found()
    except Exception as e:  # a user's factory can raise anything
        raise ValueError(f"{name}() failed: {first_line(e)}") from None


def factory_model(spec: str) -> nn.Module:
    """The nn.Module `MODULE:FACTORY` gives (see `call_factory`)."""
    model = call_factory(spec)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} gave a {type(model).__name__}, not an nn.Module")
    return model


def factory_data(spec: str) -> tuple[Dataset, Dataset]:
    """The (train_set, test_set) pair `MODULE:FACTORY` gives (see `call_factory`)."""
    pair = call_factory(spec)
    if not (isinstance(pair, tuple) and len(pair) == 2):
        raise ValueError(f"{spec} gave a {type(pair).__name__}, not (train_set, test_set)")
    return pair[0], pair[1]


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in `path`, or one line saying why it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn, foreign or code-carrying file: torch raises many kinds
        raise ConfigError(f"{path}: not a readable model file ({first_line(e, 120)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: not a state_dict (a mapping of names to tensors)")
    return state


def load_weights(model: nn.Module, path: Path, name: str) -> None:
    """Load `path` (a state_dict) into `model`, or say in one line why it does not fit."""
    state = read_weights(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        raise ConfigError(
            f"{path}: not the weights of this run's {name} ({len(missing)} missing, "
            f"{len(extra)} unexpected, {len(wrong)} of another shape, e.g. {first!r})"
        )
    model.load_state_dict(state)
