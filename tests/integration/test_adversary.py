"""A secured real fleet on localhost against a rogue process in the test: one with no keys
(only the coordinator's port), and one holding a device's private key.

Each attack is refused and recorded, or leaves training as it would have been: the run
ends with every replica the coordinator's, the accuracy of a clean run of the same fleet,
and a ledger that verifies; each rewrite of the finished run folder fails verification."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from test_sealed_real_fleet import DEVICES, PACED, _security

from edgeddl.runtime.fleet.checkpoint import KEY_CHECKPOINT, KEY_CHECKPOINT_STEP
from edgeddl.runtime.fleet.coordinator_link import (
    KEY_LINKS,
    OPS,
    CoordinatorLink,
    LinkError,
    _framed,
    _recv,
    _recv_header,
    _send,
    link_key,
)
from edgeddl.runtime.fleet.store import KEY_DONE, KEY_ROWS, final_key, progress_key, row_key
from edgeddl.security.handshake import Initiator
from edgeddl.security.keys import Identity, load_identity, load_public
from edgeddl.security.ledger import LEDGER_FILE, Ledger

torchft = pytest.importorskip("torchft")

pytestmark = pytest.mark.slow

STEPS = 300
"""Long enough for the rogue's attacks to land while the fleet trains."""


def _verify(run_dir: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeddl", "ledger", "verify", str(run_dir), *map(str, args)],
        capture_output=True,
        text=True,
    )


def _fleet(fleet_factory, keys: Path):  # type: ignore[no-untyped-def]
    fleet = fleet_factory(
        steps=STEPS,
        # equal shares: capability balancing follows measured speeds, which vary run to
        # run, and so would the clean run's accuracy
        train='balance = "equal"\n',
        extra=PACED + _security(keys),
        coordinator_args=("--min-devices", "3"),
    )
    for name in DEVICES:
        fleet.start(name, "--keys", str(keys), "--profile", "paced_board")
    return fleet


def _refused(store, name: str, handshake: Initiator | None, op: str = "aggregate") -> str:  # type: ignore[no-untyped-def]
    """What became of a rogue link: the error the rogue saw."""
    try:
        link = CoordinatorLink(store, name, 5.0, handshake)
        table = np.array([0, 1, 1000, -999], dtype=np.int64).tobytes()
        link.call(op, 3, 0, 0, [table])
    except LinkError as e:
        return str(e)
    raise AssertionError(f"the coordinator answered a rogue {op} as {name}")


def test_a_rogue_without_keys_changes_nothing(fleet_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys"
    fleet = _fleet(fleet_factory, keys)
    coordinator = load_public(keys / "coordinator.pub")
    fleet.wait_for("dev-0", 2)
    store = fleet.store
    name_claim = Initiator(Identity.generate("dev-1"), coordinator)  # its own key as dev-1
    nobody = Initiator(Identity.generate("mallory"), coordinator)  # a name nobody enrolled
    attacks = [
        ("dev-1", name_claim, "aggregate"),
        ("mallory", nobody, "aggregate"),
        # forged requests with their own table and weights, without a handshake
        *(("dev-0", None, op) for op in ("aggregate", "commit", "update", "hello")),
    ]
    with ThreadPoolExecutor(len(attacks)) as pool:  # all at once, while the fleet trains
        seen = list(pool.map(lambda a: _refused(store, *a), attacks))
    assert "not signed by 'dev-1'" in seen[0] and "not an enrolled device" in seen[1]
    # Store floods: the link counter, and links named in the store that never come.
    store.add(KEY_LINKS, 300)
    top = store.add(KEY_LINKS, 0)
    for i in range(top + 1, top + 21):
        store.set(link_key(i), "dev-2")
    store.add(KEY_LINKS, 20)
    # Store values: a forged end, progress, evaluation row, final report and checkpoint.
    store.set(KEY_DONE, "dev-0")
    store.set(progress_key("dev-1"), str(STEPS))
    store.set(row_key(store.add(KEY_ROWS, 1)), json.dumps({"step": 7, "test_accuracy": 0.99}))
    store.set(final_key("dev-0"), json.dumps({"name": "dev-0", "steps": 10**6}))
    store.set(KEY_CHECKPOINT, b"poison")
    store.set(KEY_CHECKPOINT_STEP, "999")
    assert fleet.progress("dev-0") < STEPS, "the fleet ended before the attacks: make it longer"
    summary = fleet.finish()
    _check_attacked(summary, fleet, tmp_path, clean=None)
    assert summary["num_steps"] == STEPS and summary["checkpoint_step"] != 999
    assert {d["name"]: d["steps"] for d in summary["per_device"]}["dev-0"] <= STEPS
    rows = [json.loads(x) for x in (fleet.out / "metrics.jsonl").read_text().splitlines()]
    assert 7 not in {r["step"] for r in rows}
    assert (fleet.out / "checkpoint.pt").read_bytes() != b"poison"
    log = (tmp_path / "coordinator-1.log").read_text()
    assert "refused dev-1's session handshake" in log
    assert "did not start with a session handshake" in log


def test_a_rogue_replica_on_the_lighthouse_heals_nobody(fleet_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """torchft's lighthouse is open to anyone: a rogue joins the quorums claiming a step far
    ahead, so every device must heal from it, and offers a poisoned state whose unpickling
    runs a command. The devices heal from the coordinator instead: the rogue's steps fail
    (nothing is committed without the coordinator's state), nothing of it is loaded or run,
    and once it is gone the fleet finishes as the coordinator's replica."""
    keys = tmp_path / "keys"
    fleet = _fleet(fleet_factory, keys)
    fleet.wait_for("dev-0", 2)
    marker = tmp_path / "the-rogue-ran-code"
    rogue = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "rogue_replica.py"),
            str(fleet.port),
            str(STEPS - 50),
            "10",
            str(marker),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rogue.returncode == 0, rogue.stderr[-2000:]
    assert int(rogue.stdout.split()[-1]) >= 2, "the rogue never got into the fleet's quorums"
    assert fleet.progress("dev-0") < STEPS - 50, "the fleet ended before the rogue left"
    summary = fleet.finish()
    assert not marker.exists()
    _check_attacked(summary, fleet, tmp_path, clean=None)
    assert all(np.isfinite(d["checksum"]) for d in summary["per_device"])


def test_a_rogue_with_a_stolen_device_key(fleet_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys"
    fleet = _fleet(fleet_factory, keys)
    coordinator = load_public(keys / "coordinator.pub")
    stolen = load_identity(keys / "dev-0.key")
    fleet.wait_for("dev-0", 2)
    store = fleet.store
    # A session as dev-0 works (the key is dev-0's), but it may not weigh what it likes,
    link = CoordinatorLink(store, "dev-0", 5.0, Initiator(stolen, coordinator))
    with pytest.raises(LinkError, match="weight"):
        link.call("update", 6, 0, 10**6, [b"x" * 64])
    # and a commit it names alone does not make the coordinator step: most senders must say.
    step = fleet.progress("dev-0") + 1
    mine = np.array([0], dtype=np.int64).tobytes()
    for s in range(step, step + 3):
        with contextlib.suppress(LinkError):  # no aggregate of dev-0 alone for that step
            link.call("commit", s, 0, 0, [mine])
    # Not a third link for dev-0 (its own and the rogue's are open).
    with pytest.raises(LinkError, match="has 2 links already"):
        CoordinatorLink(store, "dev-0", 5.0, Initiator(stolen, coordinator))
    # A frame replayed on the link does not open the second time: the link ends.
    assert link.session is not None
    hello = [OPS.index("hello"), 0, 0, 0, 0, 0, 0, 0]
    frame = _framed(link.session, hello, b"")
    header = [OPS.index("hello"), 0, 0, 0, 0, 0, len(frame), 0]
    _send(link.pg, header, frame)
    _recv(link.pg, int(_recv_header(link.pg, 5.0)[1]), 5.0)  # the answer to the first
    _send(link.pg, header, frame)
    with pytest.raises(LinkError):
        link.call("hello", 0, 0, 0, [])
    assert fleet.progress("dev-0") < STEPS, "the fleet ended before the attacks: make it longer"
    summary = fleet.finish()
    clean = _clean_accuracy(fleet_factory, tmp_path)
    _check_attacked(summary, fleet, tmp_path, clean=clean)
    assert "does not open" in (tmp_path / "coordinator-1.log").read_text()
    _ledger_attacks(fleet.out, keys, stolen)


def _clean_accuracy(fleet_factory, tmp_path: Path) -> float:  # type: ignore[no-untyped-def]
    """The same fleet without the rogue."""
    folder = tmp_path / "clean"
    folder.mkdir()
    fleet = _fleet(lambda **kw: fleet_factory(folder=folder, **kw), folder / "keys")
    return float(fleet.finish()["final_test_accuracy"])


def _check_attacked(summary, fleet, tmp_path: Path, clean: float | None) -> None:  # type: ignore[no-untyped-def]
    sec = summary["security"]
    assert sec["num_rejected"] == 0
    assert sec["steps_aggregated"] == STEPS
    assert {round(d["checksum"], 6) for d in summary["per_device"]} == {
        round(sec["coordinator_checksum"], 6)
    }
    if clean is not None:
        assert abs(summary["final_test_accuracy"] - clean) <= 0.01
    done = _verify(fleet.out, "--keys", tmp_path / "keys")
    assert done.returncode == 0, done.stderr


def _ledger_attacks(run: Path, keys: Path, stolen: Identity) -> None:
    """With dev-0's key: rewrite the end of the ledger; swap model.pt; cut the ledger."""
    lines = (run / LEDGER_FILE).read_bytes().splitlines(keepends=True)
    forged = run.parent / "forged"
    shutil.copytree(run, forged)
    (forged / LEDGER_FILE).write_bytes(b"".join(lines[:-2]))  # drop aggregate and run_end
    with Ledger(forged / LEDGER_FILE) as ledger:
        last = json.loads(lines[-2])
        ledger.append(stolen, "aggregate", {**last["payload"], "updates": []})
    bad = _verify(forged, "--keys", keys)
    assert bad.returncode != 0 and "'dev-0' is a device" in bad.stderr, bad.stderr
    swapped = run.parent / "swapped"
    shutil.copytree(run, swapped)
    state = torch.load(swapped / "model.pt", weights_only=True)
    torch.save({k: v * 0 for k, v in state.items()}, swapped / "model.pt")
    bad = _verify(swapped, "--keys", keys)
    assert bad.returncode != 0 and "model.pt" in bad.stderr, bad.stderr
    cut = run.parent / "cut"
    shutil.copytree(run, cut)
    (cut / LEDGER_FILE).write_bytes(b"".join(lines[:-5]))
    assert _verify(cut, "--keys", keys, "--partial").returncode == 0  # without a head
    bad = _verify(cut, "--keys", keys, "--partial", "--head", run / "ledger.head.json")
    assert bad.returncode != 0, bad.stdout
