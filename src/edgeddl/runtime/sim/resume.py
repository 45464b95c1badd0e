"""A simulated run's checkpoints, and stopping one cleanly on Ctrl-C.

`RUN/checkpoint.pkl` is one JSON header line (format, the code's fingerprint, the scenario,
the step) followed by the run's state (`snapshot.py`). The header is readable without
unpickling anything, so `edgeddl run --resume RUN` learns the scenario first and rebuilds
the run's data and model from it before the state is restored into them. A checkpoint fits
only the code that wrote it: another edgeddl or torch is refused with one line.

The first SIGINT or SIGTERM asks the loop to stop after the step in flight (it then writes a
checkpoint and a complete run folder marked interrupted); a second stops at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

from edgeddl.config.loader import ConfigError, apply_override, scenario_from_dict, to_toml
from edgeddl.config.schema import Scenario
from edgeddl.io import write_bytes_atomic
from edgeddl.runtime.sim.snapshot import SnapshotError, code_fingerprint, dumps, loads
from edgeddl.runtime.sim.state import SimRun, SimState, scenario_of
from edgeddl.security.session import secure_run
from edgeddl.workload import as_config_error

CHECKPOINT_FILE = "checkpoint.pkl"
MAGIC = b"edgeddl simulated-run checkpoint\n"
FORMAT = 1


@dataclass(frozen=True, slots=True)
class CheckpointHeader:
    step: int
    scenario_toml: str
    code: str
    """`snapshot.code_fingerprint()` of the code that wrote it."""


def save_checkpoint(
    run_dir: Path, step: int, scenario_toml: str, state: object, shared: Mapping[str, object]
) -> None:
    """Write `state` (atomically, readable by the owner only) as the run's checkpoint."""
    header = {"format": FORMAT, "code": code_fingerprint(), "step": step, "scenario": scenario_toml}
    body = dumps(state, shared)
    data = MAGIC + json.dumps(header).encode() + b"\n" + body
    write_bytes_atomic(run_dir / CHECKPOINT_FILE, data, mode=0o600)


def read_header(run_dir: Path) -> tuple[CheckpointHeader, bytes]:
    """The checkpoint's header and its state's bytes; one-line ConfigError if `run_dir` has
    none, or one that is damaged or written by other code."""
    path = run_dir / CHECKPOINT_FILE
    if not run_dir.is_dir():
        raise ConfigError(f"--resume: {run_dir} is not a run folder")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"--resume: {run_dir} has no {CHECKPOINT_FILE} (checkpoints are written every "
            "run.checkpoint_every steps and when a run is interrupted)"
        ) from None
    if not data.startswith(MAGIC):
        raise ConfigError(f"{path}: not an edgeddl checkpoint")
    head, _, body = data[len(MAGIC) :].partition(b"\n")
    try:
        h = json.loads(head)
        header = CheckpointHeader(int(h["step"]), str(h["scenario"]), str(h["code"]))
        fmt = h["format"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: damaged header") from None
    if fmt != FORMAT or header.code != code_fingerprint():
        raise ConfigError(
            f"{path}: written by another version of edgeddl or torch; resume it with that "
            "version (a checkpoint holds the code's own objects)"
        )
    return header, body


def load_state(
    run_dir: Path, body: bytes, shared: Mapping[str, object], modules: frozenset[str]
) -> Any:
    """The checkpoint's state, with `shared` standing for what it referenced."""
    try:
        return loads(body, shared, modules)
    except SnapshotError as e:
        raise ConfigError(f"{run_dir / CHECKPOINT_FILE}: {e}") from None


class StopRequest:
    """Set when the user asked the run to stop (Ctrl-C, or SIGTERM from a scheduler)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Catch SIGINT and SIGTERM while a run trains: the first asks it to stop after the
    current step, a second raises KeyboardInterrupt at once. Outside the main thread
    signals cannot be caught; the run then only stops at its end."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _: FrameType | None) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested, stop.signal_name = True, signal.Signals(signum).name
        print(
            f"\nedgeddl: {stop.signal_name}: stopping after this step and writing the run "
            "folder (again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    for s in previous:
        signal.signal(s, handler)
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def check_resumable(run_dir: Path) -> None:
    """A run folder can be written to (the resumed run rewrites its files)."""
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"--resume: {run_dir} is not writable")


RESUMABLE_KEYS = (
    "train.num_steps",
    "train.max_virtual_time_s",
    "train.eval_every",
    "run.checkpoint_every",
)
"""What a resumed run may change: when it stops, evaluates and checkpoints, never its maths."""


def resume_scenario(
    run_dir: Path,
    config: Scenario | str | Path | None,
    overrides: Sequence[str],
    **own: bool,
) -> tuple[Scenario, CheckpointHeader]:
    """The scenario to resume `run_dir` with: its checkpoint's, with `overrides` of
    `RESUMABLE_KEYS` only; a `config` passed too must be the same scenario (`own`: the
    caller brings its own model or data, as `scenario_of` takes them)."""
    header, _ = read_header(run_dir)
    saved = scenario_from_dict(tomllib.loads(header.scenario_toml))
    if config is not None and _comparable(scenario_of(config, (), **own)) != _comparable(saved):
        raise ConfigError(
            f"--resume: {run_dir} was trained with another scenario; resume it without one "
            "(its own is in the checkpoint)"
        )
    raw = dataclasses.asdict(saved)
    for assignment in overrides:
        key = assignment.partition("=")[0].strip()
        if key not in RESUMABLE_KEYS:
            raise ConfigError(
                f"--set {key}: a resumed run keeps its scenario; only "
                f"{', '.join(RESUMABLE_KEYS)} may change"
            )
        apply_override(raw, assignment)
    scenario = scenario_from_dict(raw)
    if scenario.train.num_steps <= header.step:
        raise ConfigError(
            f"--resume: {run_dir} is at step {header.step} of train.num_steps = "
            f"{scenario.train.num_steps}; nothing is left to train"
        )
    return scenario, header


def _comparable(scenario: Scenario) -> str:
    raw = dataclasses.asdict(scenario)
    for key in RESUMABLE_KEYS:
        section, name = key.split(".")
        raw[section][name] = None
    return repr(raw)


def shared_objects(ctx: SimRun) -> dict[str, object]:
    """What a resumed run rebuilds from its scenario, by name: a checkpoint only refers to
    it (the model's values travel in the checkpoint's state dict)."""
    w = ctx.w
    shared: dict[str, object] = {
        "x_train": w.x_train,
        "y_train": w.y_train,
        "x_test": w.x_test,
        "y_test": w.y_test,
        "task": w.task,
        "loss_fn": w.task.loss_fn,
        "fleet": w.fleet,
        "cost": w.cost,
        "info": w.info,
    }
    shared.update({f"module:{k}": m for k, m in w.model.named_modules()})
    shared.update({f"param:{k}": p for k, p in w.model.named_parameters()})
    shared.update({f"buffer:{k}": b for k, b in w.model.named_buffers()})
    return shared


def checkpoint(ctx: SimRun, st: SimState, mark: str | None) -> None:
    """Save the run's state; `mark`: the ledger entry that names it (`checkpoint`), or
    None when the ledger already ends with one (`interrupted`)."""
    model = ctx.model
    if ctx.secure is not None and mark is not None:
        ctx.secure.mark(mark, st.clock.now_s, model, {"step": st.step})
    st.wall_s, ctx.wall_start = ctx.wall_s(st), time.perf_counter()
    state = {
        "sim": st,
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {k: p.grad for k, p in model.named_parameters() if p.grad is not None},
        "rng": _rng_states(),
        "secure": ctx.secure.state() if ctx.secure is not None else None,
        "data": _data_fingerprint(ctx),
    }
    save_checkpoint(ctx.run_dir, st.step, to_toml(ctx.scenario), state, shared_objects(ctx))


def restore(ctx: SimRun) -> SimState:
    """The checkpoint's state restored into this session's rebuilt model and data."""
    _, body = read_header(ctx.run_dir)
    modules = frozenset(type(m).__module__ for m in ctx.model.modules())
    state = load_state(ctx.run_dir, body, shared_objects(ctx), modules)
    model = ctx.model
    if state["data"] != _data_fingerprint(ctx):
        raise ConfigError(
            "--resume: the run was trained on other data than it is given now; pass the "
            "train_set and test_set it started with"
        )
    with as_config_error("--resume"):
        model.load_state_dict(state["model"])
    params = dict(model.named_parameters())
    for k, g in state["grads"].items():
        params[k].grad = g
    _set_rng_states(state["rng"])
    st: SimState = state["sim"]
    if ctx.scenario.security.enabled:
        ctx.secure = secure_run(ctx.scenario, ctx.run_dir, state["secure"])
        entry = state["secure"]["ledger_head"][0]
        ctx.secure.mark(
            "resumed", st.clock.now_s, model, {"from_step": st.step, "checkpoint_entry": entry}
        )
    return st


def _data_fingerprint(ctx: SimRun) -> list[tuple[str, list[int], str, float]]:
    """Shape, type and sum of each data tensor: a resumed run must train on the same data."""
    w = ctx.w
    tensors = {"x_train": w.x_train, "y_train": w.y_train, "x_test": w.x_test, "y_test": w.y_test}
    return [(k, list(t.shape), str(t.dtype), float(t.double().sum())) for k, t in tensors.items()]


def _rng_states() -> dict[str, Any]:
    """The global generators a user's model may draw from (dropout, augmentation)."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
