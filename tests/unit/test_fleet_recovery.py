"""What keeps a real fleet going through damage and restarts: an elastic worker's saved state,
each device's own state folder, --min-devices counting devices (not connections), the
coordinator's non-blocking reads of its devices and their rows, rows across a coordinator
restart, and who counts as having finished."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fleet_fakes import Alone, DictStore, device_run, params

from edgeddl.runtime.fleet.checkpoint import pack
from edgeddl.runtime.fleet.coordinator import _merged, _summary
from edgeddl.runtime.fleet.device import DeviceRun
from edgeddl.runtime.fleet.device_setup import DeviceOptions
from edgeddl.runtime.fleet.elastic import _load_local, _save_local, own_state_dir
from edgeddl.runtime.fleet.store import (
    KEY_FAILED,
    KEY_MIN_DEVICES,
    KEY_ROWS,
    KEY_ROWS_KNOWN,
    final_key,
    mark_joined,
    mark_stopped,
    progress_key,
    row_key,
    wait_for_devices,
)
from edgeddl.runtime.fleet.watch import DeviceWatch, RowReader

TOPK = '\n[compression]\ncompressor = "topk"\ndensity = 0.05\n'


def _overwrite(suffix: str, data: Callable[[DeviceRun, Path], bytes]) -> Callable:
    def damage(run: DeviceRun, path: Path) -> None:
        target = path.with_suffix(suffix)
        target.write_bytes(data(run, target))

    return damage


def _torch_bytes(obj: object, path: Path) -> bytes:
    torch.save(obj, path)
    return path.read_bytes()


DAMAGES = {
    "state truncated": _overwrite(".pt", lambda r, p: p.read_bytes()[: p.stat().st_size // 2]),
    "state empty": _overwrite(".pt", lambda r, p: b""),
    "own state empty": _overwrite(".own.pt", lambda r, p: b""),
    "own state not torch's": _overwrite(".own.pt", lambda r, p: b"garbage, not a torch file"),
    "own state of another kind": _overwrite(
        ".own.pt", lambda r, p: _torch_bytes({"memory": "oops"}, p)
    ),
    # the model loads, then the optimizer fails: nothing of it may stay
    "replica half right": _overwrite(
        ".pt", lambda r, p: pack(4, 4, {"model": r.strategy.model.state_dict()}, r.toml)
    ),
    "step not a step": _overwrite(
        ".pt",
        lambda r, p: pack(-3, 4, r.strategy.replica_state(), r.toml),  # type: ignore[arg-type]
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_elastic_state_starts_the_device_afresh_with_one_line(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = device_run(tmp_path, steps=4, extra=TOPK)
    before.train(Alone(), DictStore())
    _save_local(before, tmp_path / "state", step=4)
    DAMAGES[damage](before, tmp_path / "state" / "dev-0.pt")
    capsys.readouterr()
    after, fresh = device_run(tmp_path, 4, TOPK), device_run(tmp_path, 4, TOPK)
    assert _load_local(after, tmp_path / "state") == 0
    assert all(torch.equal(a, b) for a, b in zip(params(fresh), params(after), strict=True))
    assert not after.strategy.device_state(0)["memory"]  # no error-feedback memory either
    assert after.stats.committed == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("starting afresh\n"), err


def test_damaged_counters_beside_a_good_state_are_ignored_not_the_state(tmp_path: Path) -> None:
    before = device_run(tmp_path, steps=4, extra=TOPK)
    before.train(Alone(), DictStore())
    _save_local(before, tmp_path / "state", step=4)
    stats = tmp_path / "state" / "dev-0.json"
    stats.write_text(stats.read_text().replace('"seconds": {', '"seconds": 5, "x": {'))
    after = device_run(tmp_path, 4, TOPK)
    assert _load_local(after, tmp_path / "state") == 4
    assert all(torch.equal(a, b) for a, b in zip(params(before), params(after), strict=True))
    assert after.stats.committed == 0  # fresh counters: a damaged one would break the report


def test_devices_sharing_a_machine_keep_their_state_apart() -> None:
    """The first device to finish deletes its state folder: it must hold nobody else's (the
    others then lost their final report and exited with an error after finishing)."""
    for state_dir in ("", "/srv/edgeddl-state"):
        opts = DeviceOptions(coordinator="127.0.0.1:29400", name="dev-0", state_dir=state_dir)
        mine = own_state_dir(opts, "edgeddl-0123")
        theirs = own_state_dir(dataclasses.replace(opts, name="dev-1"), "edgeddl-0123")
        assert not mine.is_relative_to(theirs) and not theirs.is_relative_to(mine)
        assert mine != own_state_dir(opts, "edgeddl-4567")  # a new run starts afresh


def test_min_devices_counts_each_of_the_scenarios_devices_once() -> None:
    """One device that connected three times is one device (it trained steps 1-63 alone
    while the coordinator waited for three); a name the scenario lacks is none."""
    store, names = DictStore(), ["dev-0", "dev-1"]
    store.set(KEY_MIN_DEVICES, "2")
    for name in ("dev-0", "dev-0", "dev-0", "nope"):
        mark_joined(store, name)
    with pytest.raises(ConnectionError, match="1 of the 2 devices"):
        wait_for_devices(store, names, timeout_s=0.0)
    mark_joined(store, "dev-1")
    mark_stopped(store, "dev-1", "out of memory")  # stopped: it no longer counts
    with pytest.raises(ConnectionError, match="1 of the 2 devices"):
        wait_for_devices(store, names, timeout_s=0.0)
    mark_joined(store, "dev-1")  # restarted: in again
    wait_for_devices(store, names, timeout_s=0.0)


def test_the_end_waits_only_for_devices_still_training() -> None:
    store, names = DictStore(), ["dev-0", "dev-1", "dev-2", "dev-3"]
    watch = DeviceWatch(names)
    for name in names[:3]:  # dev-3 never comes
        mark_joined(store, name)
        store.set(progress_key(name), "5")
    assert watch.poll(store, now=0.0) is None and watch.alive == set(names[:3])
    store.set(progress_key("dev-0"), "60")
    mark_stopped(store, "dev-2", "out of memory")
    assert watch.poll(store, now=20.0) == "dev-2: out of memory"
    assert watch.alive == {"dev-0", "dev-1"}
    store.set(final_key("dev-0"), "{}")  # dev-0 ends the run; dev-1 was killed at step 5
    watch.poll(store, now=21.0)
    assert watch.awaited(now=21.0, recent_s=10.0) == []
    store.set(progress_key("dev-1"), "59")  # ... or it was only slow: it is waited for
    watch.poll(store, now=22.0)
    assert watch.awaited(now=22.0, recent_s=10.0) == ["dev-1"]
    inflated = DictStore()  # a counter another client inflated: no message behind it
    inflated.add(KEY_FAILED, 5)
    assert DeviceWatch(names).poll(inflated, now=0.0) is None


def test_rows_announced_but_not_written_are_read_later_never_waited_for() -> None:
    """`DictStore.get` of a missing key raises where torch's store would block for 30 s."""
    store, reader = DictStore(), RowReader(started_at=1000.0, earlier=[])
    store.add(KEY_ROWS, 1)  # announced; the device writes it a moment later
    assert reader.poll(store) == []
    store.set(row_key(1), json.dumps({"step": 50, "at": 1012.5}))
    assert reader.poll(store) == [{"step": 50, "wall_time_s": 12.5}]
    store.add(KEY_ROWS, 10**9)  # another client inflated the counter: no row behind it
    assert reader.poll(store) == [] and len(reader.pending) <= 1024
    store.set(row_key(store.add(KEY_ROWS, 1)), b"\x00 not a row")  # skipped, not a crash
    store.set(row_key(store.add(KEY_ROWS, 1)), json.dumps({"step": 100, "at": 1020.0}))
    assert [r["step"] for r in reader.poll(store)] == [100]


class _Dying(DictStore):
    """A coordinator's store that stops answering once `dead`."""

    dead = False

    def __getattribute__(self, name: str) -> object:
        if name in ("get", "set", "check", "add") and object.__getattribute__(self, "dead"):
            raise RuntimeError("Connection reset by peer")
        return object.__getattribute__(self, name)


def test_rows_the_lost_coordinator_never_wrote_reach_the_restarted_one(tmp_path: Path) -> None:
    """The coordinator wrote the row of step 5 and died as step 10 (an evaluation) was
    committed. The device hands the restarted one that row, and the wall times go on from
    the earlier run's (a row went missing, and wall time jumped back)."""
    run = device_run(tmp_path, steps=15)  # evaluations every 5 steps
    old, earlier = _Dying(), []
    old_reader = RowReader(started_at=time.time(), earlier=[])

    def coordinator_dies() -> None:
        if engine.step == 7:
            earlier.extend(old_reader.poll(old))
        old.dead = engine.step == 10

    engine = Alone(on_commit=coordinator_dies)
    with pytest.raises(RuntimeError, match="reset by peer"):  # noticed at the next step
        run.train(engine, old)
    assert [r["step"] for r in earlier] == [5] and engine.step == 10
    new = DictStore()
    new.set(KEY_ROWS_KNOWN, "5")  # what the restarted coordinator found in metrics.jsonl
    reader = RowReader(started_at=time.time(), earlier=earlier)
    run.resend_rows(new)
    engine.on_commit = None
    run.train(engine, new)
    rows = _merged(earlier, reader.poll(new))
    assert [r["step"] for r in rows] == [5, 10, 15]
    walls = [r["wall_time_s"] for r in rows]
    assert walls == sorted(walls) and walls[1] == walls[0]  # evaluated before the restart


def test_a_device_that_committed_no_step_did_not_finish_the_run(tmp_path: Path) -> None:
    store = DictStore()
    finisher = device_run(tmp_path, steps=2)
    finisher.train(Alone(), store)
    joiner = device_run(tmp_path, steps=2, name="dev-1")  # came as the run ended
    reports = [finisher.report(2, None), joiner.report(2, None)]
    summary = _summary(finisher.scenario, [], reports, wall_s=1.0)
    assert summary["devices_finished"] == ["dev-0"]
    assert summary["devices_without_steps"] == ["dev-1"]
    assert [d["name"] for d in summary["per_device"]] == ["dev-0", "dev-1"]
