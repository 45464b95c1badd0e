"""`[security]`: the coordinator's store with signed values (`runtime/fleet/signed_store.py`).

A rogue that reaches the store writes whatever it likes: each value a secured party reads
must be one an author allowed for that key signed, or it is not there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fleet_fakes import DictStore

from edgeddl.runtime.fleet import checkpoint as ck
from edgeddl.runtime.fleet import store as keys
from edgeddl.runtime.fleet.device_setup import DeviceOptions, read_scenario
from edgeddl.runtime.fleet.signed_store import (
    ForgedValue,
    SignedStore,
    fleet_authors,
    unchecked,
)
from edgeddl.security.keys import Identity, save_identity

DEVICES = ["dev-0", "dev-1"]


@pytest.fixture(scope="module")
def ids() -> dict[str, Identity]:
    return {n: Identity.generate(n) for n in ("coordinator", *DEVICES, "mallory")}


def _party(raw: Any, ids: dict[str, Identity], name: str) -> SignedStore:
    peers = {n: ids[n].public() for n in ("coordinator", *DEVICES)}
    return SignedStore(raw, ids[name], peers, fleet_authors(DEVICES))


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
        raw, ids["mallory"], {"mallory": ids["mallory"].public()}, fleet_authors(DEVICES)
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


def _scenario_file(tmp_path: Path, ids: dict[str, Identity]) -> bytes:
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
        '[run]\nname = "s"\n[[fleet.devices]]\nname = "dev"\nprofile = "pc"\ncount = 2\n'
        '[data]\ndataset = "mnist1d"\n[train]\nglobal_batch = 32\nnum_steps = 5\n'
        f'[security]\nenabled = true\nkeys_dir = "{keys_dir}"\n'
        f'coordinator = {{ sign = "{c.sign}", agree = "{c.agree}" }}\n'
        f"[security.devices]\n{devices}\n"
    ).encode()


def test_a_device_with_keys_takes_only_the_scenario_its_coordinator_signed(
    tmp_path: Path, ids: dict[str, Identity]
) -> None:
    toml = _scenario_file(tmp_path, ids)
    opts = DeviceOptions(coordinator="h:1", name="dev-0", keys_dir=str(tmp_path / "keys"))
    raw = DictStore()
    _party(raw, ids, "coordinator").set(keys.KEY_SCENARIO, toml)
    scenario, _, idx = read_scenario(raw, opts)
    assert scenario.security.enabled and idx == 0
    # Without --keys the device reads it too (trusting the network for it).
    assert read_scenario(raw, DeviceOptions(coordinator="h:1", name="dev-1"))[2] == 1
    for forged in (
        toml,  # unsigned
        SignedStore(DictStore(), ids["mallory"], {}, fleet_authors(DEVICES)),  # another's
    ):
        if isinstance(forged, SignedStore):
            forged.set(keys.KEY_SCENARIO, toml)
            raw.set(keys.KEY_SCENARIO, forged.raw.get(keys.KEY_SCENARIO))
        else:
            raw.set(keys.KEY_SCENARIO, forged)
        with pytest.raises(ForgedValue, match="the store's edgeddl/scenario"):
            read_scenario(raw, opts)
