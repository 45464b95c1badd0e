"""A secured run's folder, written by hand for the ledger's tests (importable as
`ledger_folder`: pytest puts tests/unit on the path).

What a coordinator records (run, joins, each device's update with its receipt, a replay it
refused, each aggregation) and its closing order (model.pt, summary.json, then the closing
entry and the signed head, by the writer's own `close_ledger`), with real keys and files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgeddl.io import write_json_atomic, write_model_atomic
from edgeddl.security.envelope import Opened, Receiver, Rejection, Sender
from edgeddl.security.keys import Identity, PublicIdentity, save_identity
from edgeddl.security.ledger import (
    CONFIG_FILE,
    LEDGER_FILE,
    MODEL_FILE,
    SUMMARY_FILE,
    Ledger,
    model_digest,
    reject_payload,
    run_payload,
    update_payload,
)
from edgeddl.security.session import close_ledger

RUN = "run-1"
DEVICES = ("pi-0", "pi-1")


def identities(names: tuple[str, ...] = DEVICES) -> dict[str, Identity]:
    return {n: Identity.generate(n) for n in (*names, "coordinator")}


def peers(ids: dict[str, Identity]) -> dict[str, PublicIdentity]:
    return {n: i.public() for n, i in ids.items()}


def model(step: int) -> dict[str, torch.Tensor]:
    """The model after step `step`'s aggregate."""
    return {"w": torch.full((3, 2), float(step)), "b": torch.arange(2.0)}


def save_public_keys(folder: Path, ids: dict[str, Identity]) -> Path:
    """An auditor's trust root: NAME.key and NAME.pub of every identity in `folder`."""
    for identity in ids.values():
        save_identity(identity, folder)
    return folder


def write_config(run_dir: Path, ids: dict[str, Identity], name: str = "audited") -> None:
    """config.resolved.toml enrolling `ids` (only [run] and [security] matter to the ledger)."""
    tables = "".join(i.public().scenario_toml() for i in ids.values())
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(
        f'[run]\nname = "{name}"\n\n[[fleet.devices]]\nname = "pi"\nprofile = "rpi4"\n'
        f"count = {len(ids) - 1}\n\n[security]\nenabled = true\n" + tables
    )


def record_steps(
    ledger: Ledger,
    ids: dict[str, Identity],
    steps: range,
    run_id: str = RUN,
    devices: tuple[str, ...] = DEVICES,
) -> None:
    """Each step: every device's sealed update (and its replay, refused), one aggregate."""
    coord = ids["coordinator"]
    receiver = Receiver(coord, run_id, peers(ids), max_payload_bytes=1 << 20)
    senders = {n: Sender(ids[n], run_id, first_seq=steps.start) for n in devices}
    for step in steps:
        refs = []
        for n in devices:
            wire = senders[n].seal(
                coord.public(), f"{n} {step}".encode(), step=step, ledger_head=ledger.head
            )
            opened = receiver.open(wire)
            assert isinstance(opened, Opened)
            refs.append(ledger.append(coord, "update", update_payload(opened), time_s=step))
            replay = receiver.open(wire)
            assert isinstance(replay, Rejection)
            ledger.append(coord, "reject", reject_payload(replay, step=step), time_s=step)
        payload = {"step": step, "updates": refs, "model_digest": model_digest(model(step))}
        ledger.append(coord, "aggregate", payload, time_s=step + 0.5)


def write_run(
    run_dir: Path,
    ids: dict[str, Identity],
    *,
    num_steps: int = 2,
    devices: tuple[str, ...] = DEVICES,
    run_id: str = RUN,
    name: str = "audited",
    close: bool = True,
    flush_every: int = 3,
) -> Path:
    """A run folder as a secured run leaves it; `close=False`: a run that crashed."""
    write_config(run_dir, ids, name)
    coord = ids["coordinator"]
    ledger = Ledger(run_dir / LEDGER_FILE, flush_every=flush_every)
    ledger.append(coord, "run", run_payload(run_id, name, list(devices), run_dir), time_s=0.0)
    for n in devices:
        ledger.append(coord, "join", {"device": n}, time_s=0.1)
    record_steps(ledger, ids, range(num_steps), run_id, devices)
    if not close:
        ledger.close()
        return run_dir
    final = model(num_steps - 1)
    write_files(run_dir, final, run_id, ledger.index + 2)
    close_ledger(ledger, coord, run_id, run_dir, model_digest(final), 9.0)
    return run_dir


def write_files(
    run_dir: Path, state: dict[str, torch.Tensor], run_id: str, ledger_entries: int
) -> None:
    """model.pt and summary.json as the closing order writes them."""
    write_model_atomic(run_dir / MODEL_FILE, state)
    summary = {
        "status": "completed",
        "model_digest": model_digest(state),
        "security": {"run_id": run_id, "ledger_entries": ledger_entries},
    }
    write_json_atomic(run_dir / SUMMARY_FILE, summary)


def entries(run_dir: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(x) for x in (run_dir / LEDGER_FILE).read_text().splitlines()]


def cut(run_dir: Path, kept: int) -> Ledger:
    """The run's ledger cut to its first `kept` entries, reopened to append to."""
    path = run_dir / LEDGER_FILE
    lines = path.read_bytes().split(b"\n")[:kept]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return Ledger(path, flush_every=1)
