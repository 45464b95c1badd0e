"""`[security]`: the coordinator's store with signed values (`runtime/fleet/signed_store.py`).

A rogue that reaches the store writes whatever it likes, and replays what it recorded of an
earlier run: each value a secured party reads must be one an author allowed for that key
signed for this run, or it is not there; and a device trusts the run its store names only
once the coordinator's handshake proves it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fleet_fakes import SCENARIO, Alone, DictStore, device_run, params

from edgeddl.config.loader import ConfigError
from edgeddl.runtime.fleet import checkpoint as ck
from edgeddl.runtime.fleet import store as keys
from edgeddl.runtime.fleet.device_setup import DeviceOptions, read_scenario
from edgeddl.runtime.fleet.secure_device import SecureDevice
from edgeddl.runtime.fleet.signed_store import (
    ForgedValue,
    SignedStore,
    fleet_authors,
    run_id_of,
    unchecked,
)
from edgeddl.security.handshake import Initiator, Responder
from edgeddl.security.keys import Identity, PublicIdentity, save_identity

DEVICES = ["dev-0", "dev-1"]
RUN = "edgeddl-b"


@pytest.fixture(scope="module")
def ids() -> dict[str, Identity]:
    return {n: Identity.generate(n) for n in ("coordinator", *DEVICES, "mallory")}


def _peers(ids: dict[str, Identity]) -> dict[str, PublicIdentity]:
    return {n: ids[n].public() for n in ("coordinator", *DEVICES)}


def _party(raw: Any, ids: dict[str, Identity], name: str, run: str = RUN) -> SignedStore:
    return SignedStore(raw, ids[name], _peers(ids), fleet_authors(DEVICES), run)


def test_each_key_is_read_only_from_whom_may_write_it(ids: dict[str, Identity]) -> None:
    raw = DictStore()
    coordinator, dev0, dev1 = (_party(raw, ids, n) for n in ("coordinator", *DEVICES))
    coordinator.set(keys.KEY_ENGINE, "torchft")
    dev0.set(keys.progress_key("dev-0"), "7")
    dev1.set(keys.row_key(1), '{"step": 5}')
    assert dev0.get(keys.KEY_ENGINE) == b"torchft"
    assert coordinator.get(keys.progress_key("dev-0")) == b"7"
    assert coordinator.get(keys.row_key(1)) == b'{"step": 5}'
    # An enrolled device may not announce for the coordinator, nor speak for another device.
    dev1.set(ck.KEY_RESUME, b"state")
    dev1.set(keys.progress_key("dev-0"), "300")
    for key in (ck.KEY_RESUME, keys.progress_key("dev-0")):
        with pytest.raises(ForgedValue, match="'dev-1', who may not write it"):
            coordinator.get(key)
        assert not coordinator.check([key])  # a forged value is not there
    # Counters and the engines' keys are not signed.
    assert dev0.add(keys.KEY_ROWS, 1) == 1 and raw.kv[keys.KEY_ROWS] == b"1"


def test_a_rogue_cannot_write_or_move_values(ids: dict[str, Identity]) -> None:
    raw = DictStore()
    coordinator, dev0 = _party(raw, ids, "coordinator"), _party(raw, ids, "dev-0")
    raw.set(keys.KEY_DONE, "dev-0")  # no signature at all
    with pytest.raises(ForgedValue, match="not a signed value"):
        coordinator.get(keys.KEY_DONE)
    rogue = SignedStore(
        raw, ids["mallory"], {"mallory": ids["mallory"].public()}, fleet_authors(DEVICES), RUN
    )
    rogue.set(ck.KEY_CHECKPOINT, b"poison")  # signed, by nobody enrolled
    with pytest.raises(ForgedValue, match="'mallory', who may not write it"):
        coordinator.get(ck.KEY_CHECKPOINT)
    # dev-0's key under dev-0's name but another key's signature: moved values do not check.
    dev0.set(ck.KEY_CHECKPOINT_STEP, "40")
    raw.set(ck.KEY_CHECKPOINT, raw.get(ck.KEY_CHECKPOINT_STEP))
    with pytest.raises(ForgedValue, match="not signed by 'dev-0'"):
        coordinator.get(ck.KEY_CHECKPOINT)
    # A flipped byte in the value.
    data = bytearray(raw.get(ck.KEY_CHECKPOINT_STEP))
    data[-1] ^= 1
    raw.set(ck.KEY_CHECKPOINT_STEP, bytes(data))
    with pytest.raises(ForgedValue):
        coordinator.get(ck.KEY_CHECKPOINT_STEP)
    assert unchecked(raw.get(ck.KEY_CHECKPOINT_STEP)) == b"41"  # a watcher's view only


def _security(tmp_path: Path, ids: dict[str, Identity]) -> str:
    """The [security] table enrolling `ids` (their private keys in tmp_path/keys)."""
    keys_dir = tmp_path / "keys"
    for n in ("coordinator", *DEVICES):
        save_identity(ids[n], keys_dir)
    devices = "\n".join(
        f'"{n}" = {{ sign = "{ids[n].public().to_config().sign}", '
        f'agree = "{ids[n].public().to_config().agree}" }}'
        for n in DEVICES
    )
    c = ids["coordinator"].public().to_config()
    return (
        f'[security]\nenabled = true\nkeys_dir = "{keys_dir}"\n'
        f'coordinator = {{ sign = "{c.sign}", agree = "{c.agree}" }}\n'
        f"[security.devices]\n{devices}\n"
    )


def _scenario_file(tmp_path: Path, ids: dict[str, Identity]) -> bytes:
    return (
        '[run]\nname = "s"\n[[fleet.devices]]\nname = "dev"\nprofile = "pc"\ncount = 2\n'
        '[data]\ndataset = "mnist1d"\n[train]\nglobal_batch = 32\nnum_steps = 5\n'
        + _security(tmp_path, ids)
    ).encode()


def test_a_device_with_keys_takes_only_the_scenario_its_coordinator_signed(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    toml = _scenario_file(tmp_path, ids)
    opts = DeviceOptions(coordinator="h:1", name="dev-0", keys_dir=str(tmp_path / "keys"))
    raw = DictStore()
    coordinator = _party(raw, ids, "coordinator")
    coordinator.set(keys.KEY_RUN_ID, RUN)
    coordinator.set(keys.KEY_SCENARIO, toml)
    scenario, _, idx, run_id = read_scenario(raw, opts)
    assert scenario.security.enabled and idx == 0 and run_id == RUN
    # Without --keys the device reads it too (trusting the network for it).
    assert read_scenario(raw, DeviceOptions(coordinator="h:1", name="dev-1"))[2:] == (1, "")
    # The scenario of an earlier run, replayed under this run's id, is not this run's.
    earlier = _party(DictStore(), ids, "coordinator", run="edgeddl-a")
    earlier.set(keys.KEY_SCENARIO, toml)
    raw.set(keys.KEY_SCENARIO, earlier.raw.get(keys.KEY_SCENARIO))
    with pytest.raises(ForgedValue, match="belongs to another run"):
        read_scenario(raw, opts)
    for forged in (
        toml,  # unsigned
        SignedStore(DictStore(), ids["mallory"], {}, fleet_authors(DEVICES), RUN),  # another's
    ):
        if isinstance(forged, SignedStore):
            forged.set(keys.KEY_SCENARIO, toml)
            raw.set(keys.KEY_SCENARIO, forged.raw.get(keys.KEY_SCENARIO))
        else:
            raw.set(keys.KEY_SCENARIO, forged)
        with pytest.raises(ForgedValue, match="the store's edgeddl/scenario"):
            read_scenario(raw, opts)


def _author(data: bytes) -> str:
    """Who a signed value says wrote it."""
    return data[1 : 1 + data[0]].decode()


def test_values_of_an_earlier_run_replayed_into_a_new_one_are_not_there(
    ids: dict[str, Identity],
) -> None:
    """Everything a recorded earlier run of the same scenario and keys signed (its end, its
    final state, checkpoints, rows, progress), replayed into a new run's store."""
    earlier, now = DictStore(), DictStore()
    old = {n: _party(earlier, ids, n, run="edgeddl-a") for n in ("coordinator", "dev-0")}
    old["coordinator"].set(keys.KEY_RUN_ID, "edgeddl-a")
    old["coordinator"].set(ck.KEY_RESUME, b"old state")
    old["dev-0"].set(ck.KEY_FINAL_STATE, b"old model")
    old["dev-0"].set(keys.KEY_DONE, "dev-0")
    old["dev-0"].set(ck.KEY_CHECKPOINT, b"old checkpoint")
    old["dev-0"].set(keys.row_key(1), '{"step": 300}')
    old["dev-0"].set(keys.progress_key("dev-0"), "300")
    _party(now, ids, "coordinator").set(keys.KEY_RUN_ID, RUN)
    # The run id is signed for no run: a reader takes it before it binds to it.
    assert run_id_of(now, _peers(ids)) == RUN and run_id_of(earlier, _peers(ids)) == "edgeddl-a"
    device, coordinator = _party(now, ids, "dev-1"), _party(now, ids, "coordinator")
    assert device.get(keys.KEY_RUN_ID) == RUN.encode()
    for key in [k for k in earlier.kv if k != keys.KEY_RUN_ID]:
        now.set(key, earlier.get(key))
        for reader in (device, coordinator):
            with pytest.raises(ForgedValue) as e:
                reader.get(key)
            assert str(e.value) == (
                f"the store's {key}: not signed by '{_author(now.get(key))}' in run "
                f"'{RUN}' (it belongs to another run, or someone else wrote it)"
            )
            assert not reader.check([key])  # not there: the device's KEY_DONE check is False
    # Only the coordinator names the run.
    rogue = _party(DictStore(), ids, "dev-0")
    rogue.set(keys.KEY_RUN_ID, "edgeddl-a")
    now.set(keys.KEY_RUN_ID, rogue.raw.get(keys.KEY_RUN_ID))
    with pytest.raises(ForgedValue, match="'dev-0', who may not write it"):
        run_id_of(now, _peers(ids))


def test_an_earlier_runs_end_and_final_state_do_not_stop_a_device(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    """The attack the binding closes: an old end plus an old final state would make every
    device stop at once with the old run's model."""
    run = device_run(tmp_path, steps=3)
    earlier = _party(DictStore(), ids, "dev-1", run="edgeddl-a")
    earlier.set(ck.KEY_FINAL_STATE, ck.pack(3, 3, run.strategy.replica_state(), run.toml))
    earlier.set(keys.KEY_DONE, "dev-1")
    store = _party(DictStore(), ids, "dev-0")
    for key in (ck.KEY_FINAL_STATE, keys.KEY_DONE):
        store.raw.set(key, earlier.raw.get(key))
    before = params(run)
    run.train(Alone(), store)
    assert run.stats.committed == 3  # it trained every step, took nothing of the old run
    assert any(not torch.equal(a, b) for a, b in zip(before, params(run), strict=True))
    final = ck.unpack(store.get(ck.KEY_FINAL_STATE), run.toml, "this run's final state")
    assert final["step"] == 3  # its own, signed for this run, replaced the old one


class _Link:
    """A coordinator link whose session came from a real handshake with a coordinator in
    run `run_id` (its answers: only the session's `hello`)."""

    def __init__(self, ids: dict[str, Identity], run_id: str, initiator: Initiator) -> None:
        devices = {n: ids[n].public() for n in DEVICES}
        responder = Responder(ids["coordinator"], run_id, devices)
        confirm, self.session = initiator.confirm(responder.reply(initiator.hello()))
        responder.accept(confirm)
        self.seconds = 0.0
        self.run_id = run_id

    def call(self, op: str, *args: Any, **kw: Any) -> tuple[bytes, float]:
        assert op == "hello"
        hello = {"run_id": self.run_id, "next_seq": 0, "ledger": [0, "00" * 32]}
        return json.dumps(hello).encode(), 0.0


def test_a_device_proves_the_run_with_its_link_before_it_acts_on_the_store(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    run = device_run(tmp_path, steps=2, extra=_security(tmp_path, ids))
    assert isinstance(run.exchange, SecureDevice)
    opened: list[_Link] = []

    def connect(store: Any, name: str, timeout_s: float, initiator: Any) -> _Link:
        opened.append(_Link(ids, "edgeddl-b", initiator))
        return opened[-1]

    run.exchange.connect = connect
    store = _party(DictStore(), ids, "dev-0", run="edgeddl-b")
    run.prove_run(store)
    assert run.exchange.link(store) is opened[0]  # the exchange goes on with that session
    with pytest.raises(ConfigError) as e:  # a store that names another run than the proven
        run.prove_run(_party(DictStore(), ids, "dev-0", run="edgeddl-a"))
    assert str(e.value) == (
        "--coordinator: its store names run 'edgeddl-a', but the coordinator's handshake "
        "proves run 'edgeddl-b': the store's values are another run's (replayed); refusing "
        "to act on them"
    )
    run.prove_run(DictStore())  # without [security] there is nothing to prove


def test_a_device_whose_store_names_an_unproven_run_stops_with_one_line(
    tmp_path: Path, ids: dict[str, Identity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An earlier run's id, scenario and values replayed whole (each checks, signed for
    that run): the coordinator's handshake names the run it is in, and the device stops."""
    from edgeddl.runtime.fleet import launch, secure_device

    raw = DictStore()
    earlier = _party(raw, ids, "coordinator", run="edgeddl-a")
    earlier.set(keys.KEY_RUN_ID, "edgeddl-a")
    earlier.set(keys.KEY_ENGINE, "torchft")
    earlier.set(ck.KEY_RESUME, b"the earlier run's checkpoint")
    earlier.set(keys.KEY_SCENARIO, SCENARIO.format(steps=2) + _security(tmp_path, ids))
    monkeypatch.setattr(launch, "connect", lambda address, timeout_s: raw)
    real_open_link = secure_device.open_link

    def open_link(connect: Any, *args: Any) -> Any:
        return real_open_link(lambda s, n, t, i: _Link(ids, "edgeddl-b", i), *args)

    monkeypatch.setattr(secure_device, "open_link", open_link)
    opts = DeviceOptions(coordinator="h:1", name="dev-0", keys_dir=str(tmp_path / "keys"))
    with pytest.raises(ConfigError, match=r"^--coordinator: its store names run 'edgeddl-a', "):
        launch.run_device(opts)
    # It left the reason with the coordinator (one line), and took nothing.
    reason = unchecked(raw.get(keys.stopped_key("dev-0"))).decode()
    assert "handshake proves run 'edgeddl-b'" in reason and "\n" not in reason
