"""Where a torchft device heals from (`runtime/fleet/heal.py`): a peer's state as tensors
only and within a bound; a secured fleet's from the coordinator's replica at the step."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("torchft")

from edgeddl.config.loader import scenario_from_dict, to_toml
from edgeddl.runtime.fleet.checkpoint import CheckpointError, pack, unpack
from edgeddl.runtime.fleet.heal import (
    STATE_KEY,
    CoordinatorTransport,
    HealError,
    SafeHTTPTransport,
    load_tensors,
    state_bound,
)
from edgeddl.runtime.fleet.secure_coordinator import SecureCoordinator
from edgeddl.security.keys import Identity, save_identity

T = timedelta(seconds=5)


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _served(state: dict[str, Any], max_bytes: int = 1 << 22) -> dict[str, Any]:
    """`state` sent by torchft's own HTTP server, received by the safe transport."""
    peer = SafeHTTPTransport(T, max_bytes)
    try:
        peer.send_checkpoint([1], 7, state, T)
        return peer.recv_checkpoint(0, peer.metadata(), 7, T)
    finally:
        peer.shutdown()


def test_a_peers_state_of_tensors_arrives_whole() -> None:
    replica = {"w": torch.arange(6.0), "opt": {"state": {}, "param_groups": [{"lr": 0.1}]}}
    got = _served({"user": {STATE_KEY: replica}, "torchft": {"step": 7}})
    assert torch.equal(got["user"][STATE_KEY]["w"], replica["w"])
    assert got["user"][STATE_KEY]["opt"] == replica["opt"] and got["torchft"] == {"step": 7}


def test_a_peers_state_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with pytest.raises(HealError, match="not a state of tensors"):
        _served({"user": {STATE_KEY: {"w": torch.zeros(2), "x": Payload(marker)}}})
    assert not marker.exists()


def test_a_peers_state_over_the_bound_is_refused() -> None:
    replica = {"w": torch.zeros(64)}
    bound = state_bound(replica)
    assert bound > 2 * 64 * 4
    with pytest.raises(HealError, match="over 4096 bytes"):
        _served({"user": {STATE_KEY: {"w": torch.zeros(4096)}}}, max_bytes=4096)


def test_a_peer_address_that_is_not_http_is_refused() -> None:
    t = SafeHTTPTransport(T, 1 << 20)
    try:
        with pytest.raises(HealError, match="not over http"):
            t.recv_checkpoint(0, "file:///etc/passwd#", 1, T)
    finally:
        t.shutdown()


def test_load_tensors_refuses_garbage() -> None:
    with pytest.raises(HealError, match="is not a state of tensors"):
        load_tensors(b"\x00" * 40, "x")


TOML = "scenario"


def test_the_coordinator_transport_waits_for_the_coordinator_to_reach_the_step() -> None:
    replica = {"w": torch.ones(3)}
    answers = [None, None, pack(5, 12, replica, TOML)]
    asked: list[int] = []

    def fetch(step: int) -> bytes | None:
        asked.append(step)
        return answers.pop(0)

    t = CoordinatorTransport(fetch, TOML)
    got = t.recv_checkpoint(0, "ignored", 5, T)
    assert asked == [5, 5, 5]
    assert torch.equal(got["user"][STATE_KEY]["w"], replica["w"])
    assert got["torchft"] == {"step": 5, "batches_committed": 12}
    t.send_checkpoint([1], 5, {"user": {}}, T)  # nothing goes to a peer: no error, no effect


def test_the_coordinator_transport_loads_nothing_it_was_not_asked_for() -> None:
    never = CoordinatorTransport(lambda step: None, TOML)
    with pytest.raises(CheckpointError, match="did not reach step 9"):
        never.recv_checkpoint(0, "", 9, timedelta(seconds=0.2))
    other = CoordinatorTransport(lambda step: pack(4, 0, {}, TOML), TOML)
    with pytest.raises(CheckpointError, match="at step 4, not 5"):
        other.recv_checkpoint(0, "", 5, T)
    wrong = CoordinatorTransport(lambda step: pack(5, 0, {}, "another"), TOML)
    with pytest.raises(Exception, match="another scenario"):
        wrong.recv_checkpoint(0, "", 5, T)


def _secured(tmp_path: Path) -> Any:
    keys = tmp_path / "keys"
    public = {}
    for name in ("coordinator", "pi-0", "pi-1"):
        identity = Identity.generate(name)
        save_identity(identity, keys)
        cfg = identity.public().to_config()
        public[name] = {"sign": cfg.sign, "agree": cfg.agree}
    raw = {
        "fleet": {"devices": [{"name": "pi", "profile": "rpi4", "count": 2}]},
        "data": {"dataset": "mnist1d", "num_samples": 400},
        "model": {"name": "cnn1d"},
        "train": {"global_batch": 32, "num_steps": 4},
        "security": {
            "enabled": True,
            "keys_dir": str(keys),
            "coordinator": public.pop("coordinator"),
            "devices": public,
        },
    }
    return scenario_from_dict(raw)


def test_the_coordinator_serves_its_replica_only_at_its_own_step(tmp_path: Path) -> None:
    scenario = _secured(tmp_path)
    for run in ("run", "run2"):  # as the coordinator leaves it before the ledger starts
        (tmp_path / run).mkdir()
        (tmp_path / run / "config.resolved.toml").write_text(to_toml(scenario))
    c = SecureCoordinator(scenario, tmp_path / "run", "run-1")
    ask = lambda step: c.answer("pi-0", "state", step, 0, 0, [], [])[0]  # noqa: E731
    assert ask(1) == b""  # not there yet: the healing device asks again
    ck = unpack(ask(0), to_toml(scenario), "x")
    assert ck["step"] == 0 and ck["batches_committed"] == 0
    mine = c.strategy.replica_state()
    assert all(torch.equal(ck["replica"]["model"][k], v) for k, v in mine["model"].items())
    # a restarted coordinator resumes its replica from the checkpoint
    moved = {k: v + 1 if v.is_floating_point() else v for k, v in mine["model"].items()}
    resumed = SecureCoordinator(
        scenario,
        tmp_path / "run2",
        "run-2",
        {"step": 3, "batches_committed": 6, "replica": mine | {"model": moved}},
    )
    with pytest.raises(ValueError, match="past step 2"):
        resumed.answer("pi-1", "state", 2, 1, 0, [], [])
    again = unpack(resumed.answer("pi-1", "state", 3, 1, 0, [], [])[0], to_toml(scenario), "x")
    assert again["batches_committed"] == 6
    w = next(k for k, v in moved.items() if v.is_floating_point())
    assert torch.equal(again["replica"]["model"][w], moved[w])
    assert torch.equal(resumed.strategy.model.state_dict()[w], moved[w])
