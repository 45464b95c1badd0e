"""What `edgeddl infer` deploys: a run folder's trained model, or a scenario's seeded one.

A run folder holds `config.resolved.toml` (which model, which data) and `model.pt` (the
trained `state_dict`, read with `weights_only=True`: a model file runs no code). A scenario
without weights gives the model a run would start from (seeded by `run.seed`, untrained).
Every problem with either is one `ConfigError` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgeddl.config.loader import ConfigError, load_scenario
from edgeddl.config.schema import Scenario
from edgeddl.data import DatasetInfo
from edgeddl.task import Task, build_task
from edgeddl.workload import scenario_data, scenario_model

MODEL_FILE = "model.pt"


@dataclass(frozen=True, slots=True)
class Deployment:
    scenario: Scenario
    model: nn.Module
    """In eval mode."""
    info: DatasetInfo
    task: Task
    x_test: torch.Tensor
    y_test: torch.Tensor
    weights: Path | None
    """The model file the weights came from; None: the seeded, untrained model."""
    train: TensorDataset
    test: TensorDataset


def load_deployment(target: str, *, weights_needed: bool = True) -> Deployment:
    """The model and test set of `target`: a run folder, a scenario file or a bundled name
    (`weights_needed=False`: a run folder's model stays untrained, for shapes only)."""
    path = Path(target)
    weights: Path | None = None
    if path.is_dir():
        resolved = path / "config.resolved.toml"
        if not resolved.is_file():
            raise ConfigError(f"{path}: not a run folder (no config.resolved.toml)")
        scenario = load_scenario(resolved)
        weights = path / MODEL_FILE if weights_needed else None
        if weights is not None and not weights.is_file():
            raise ConfigError(f"{weights}: missing; this run folder holds no trained model")
    else:
        scenario = load_scenario(target)
    torch.manual_seed(scenario.run.seed)
    train, test, info = scenario_data(scenario)
    model = scenario_model(scenario, info)
    if weights is not None:
        load_weights(model, weights, scenario.model.name)
    x, y = test.tensors
    return Deployment(
        scenario=scenario,
        model=model.eval(),
        info=info,
        task=build_task(scenario.task),
        x_test=x.float(),
        y_test=y.long(),
        weights=weights,
        train=train,
        test=test,
    )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in `path`, or one line saying why it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn, foreign or code-carrying file: torch raises many kinds
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not a readable model file ({reason[:120]})") from None
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
