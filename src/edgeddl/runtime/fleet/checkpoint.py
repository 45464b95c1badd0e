"""The real fleet's checkpoint: what a restarted coordinator resumes the run from.

Every `checkpoint_every` committed steps the device of participating rank 0 packs the replica
state (model, optimizer, PowerSGD's warm start) with torchft's step counters and the
scenario, and leaves it in the coordinator's store; the coordinator writes it to
`RUN/checkpoint.pt` atomically (temp + rename). A coordinator started on a run folder that
holds one hands it to every device that starts from nothing; devices that outlived the
coordinator keep their newer state and heal the others (torchft takes the highest step).
With `[security]` the coordinator holds the fleet's replica: it checkpoints that, and every
device goes on from it (`await_state`).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

KEY_CHECKPOINT = "edgeddl/checkpoint"
KEY_CHECKPOINT_STEP = "edgeddl/checkpoint_step"
KEY_CHECKPOINT_EVERY = "edgeddl/checkpoint_every"
KEY_RESUME = "edgeddl/resume"
KEY_FINAL_STATE = "edgeddl/final_state"
"""The fleet's state at the last step, left by the first device to finish (before it says
the run is done), for a device that was left behind (`DeviceRun.train`)."""
CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (damaged, or of another scenario)."""


class FleetFailed(RuntimeError):
    """Every device that connected stopped on an error, and no other came."""


class DeviceFailed(RuntimeError):
    """A device gave up: its worker failed more often than it may be restarted, or it ended
    without taking part."""


def pack(step: int, batches_committed: int, replica: dict[str, Any], scenario_toml: str) -> bytes:
    import torch  # only a real fleet's processes get here: the CLI starts without torch

    buf = io.BytesIO()
    torch.save(
        {
            "step": step,
            "batches_committed": batches_committed,
            "replica": replica,
            "scenario": scenario_toml,
        },
        buf,
    )
    return buf.getvalue()


def unpack(data: bytes, scenario_toml: str, where: str) -> dict[str, Any]:
    """The checkpoint in `data`, checked to belong to the scenario (tensors only: no code)."""
    import torch

    try:
        ck = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises many kinds on a damaged file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{where}: not a readable checkpoint ({reason})") from None
    if not isinstance(ck, dict) or not {"step", "batches_committed", "replica"} <= ck.keys():
        raise CheckpointError(f"{where}: not an edgeddl checkpoint")
    if ck.get("scenario") != scenario_toml:
        raise CheckpointError(
            f"{where}: the checkpoint is of another scenario; use another --out "
            "or delete the file to start afresh"
        )
    return ck


POLL_S = 0.05
"""How often a device asks again while the coordinator finishes the step before."""


def await_state(
    fetch: Callable[[int], bytes | None], step: int, timeout_s: float, scenario_toml: str
) -> dict[str, Any]:
    """A secured fleet's coordinator's replica at `step` (`fetch`: its packed state, None
    while it is not there yet), once the coordinator has committed the steps before;
    CheckpointError if it does not get there within `timeout_s` or sends another step."""
    deadline = time.monotonic() + timeout_s
    while (data := fetch(step)) is None:
        if time.monotonic() > deadline:
            raise CheckpointError(f"the coordinator did not reach step {step} to take it from")
        time.sleep(POLL_S)
    ck = unpack(data, scenario_toml, "the coordinator's state")
    if int(ck["step"]) != step:
        raise CheckpointError(f"the coordinator sent its state at step {ck['step']}, not {step}")
    return ck


def read_checkpoint(out_dir: Path, scenario_toml: str) -> tuple[bytes, int] | None:
    """(bytes, step) of the run folder's checkpoint, or None if it has none."""
    path = out_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    data = path.read_bytes()
    return data, int(unpack(data, scenario_toml, str(path))["step"])
