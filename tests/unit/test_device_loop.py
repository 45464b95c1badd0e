"""One real-fleet device's loop (`runtime/fleet/device.py`) over a stand-in engine and store:
what it commits, what it gives up, how its wall time is split, and how a stop request waits
for the update being applied."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fleet_fakes import SCENARIO, Alone, DictStore, device_run, params

from edgeddl.config.loader import load_scenario
from edgeddl.fleet.timeline import STATES
from edgeddl.runtime.fleet.checkpoint import KEY_FINAL_STATE, pack
from edgeddl.runtime.fleet.device import DeviceRun
from edgeddl.runtime.fleet.device_setup import DeviceOptions
from edgeddl.runtime.fleet.quorum import RestartRequired, recoveries
from edgeddl.runtime.fleet.secure_device import SecureDevice
from edgeddl.runtime.fleet.store import KEY_DONE, KEY_MIN_DEVICES, KEY_ROWS, engine_key, row_key


def test_a_lone_device_commits_every_step_and_its_wall_time_adds_up(tmp_path: Path) -> None:
    run, store = device_run(tmp_path, steps=10), DictStore()
    before = params(run)
    run.train(Alone(), store)
    st = run.stats
    assert st.committed == 10 and st.failed == 0
    assert st.samples == 10 * 32  # alone, it takes the whole global batch every step
    assert any(not torch.equal(a, b) for a, b in zip(before, params(run), strict=True))
    report = run.report(final_step=10, resumed_from=None)
    assert set(report["breakdown_s"]) == set(STATES)
    assert report["time_s"] == pytest.approx(sum(report["breakdown_s"].values()))
    assert report["breakdown_s"]["compute"] > 0 and report["idle_s"] == 0.0  # nobody to wait for
    rows = int(store.get(KEY_ROWS))  # evaluations at steps 5 and 10
    assert rows == 2 and b'"step": 10' in store.get(row_key(2))


def test_a_failed_exchange_applies_nothing_and_is_counted(tmp_path: Path) -> None:
    run, store = device_run(tmp_path, steps=3), DictStore()
    engine = Alone(fail_at={1})
    run.step(engine, store)  # step 0 commits
    after_first = params(run)
    run.step(engine, store)  # step 1's sum fails: nothing applied, the step is not counted
    assert all(torch.equal(a, b) for a, b in zip(after_first, params(run), strict=True))
    assert (run.stats.committed, run.stats.failed, engine.step) == (1, 1, 1)


def test_a_stop_request_waits_for_the_update_then_restarts(tmp_path: Path) -> None:
    run, store = device_run(tmp_path, steps=5), DictStore()

    def stop_while_committing() -> None:  # what the elastic worker's SIGTERM handler does
        assert run.critical
        run.stop_requested = True

    before = params(run)
    with pytest.raises(RestartRequired):
        run.step(Alone(on_commit=stop_while_committing), store)
    # The update of the committed step was applied before the stop: model and step agree.
    assert any(not torch.equal(a, b) for a, b in zip(before, params(run), strict=True))


def test_a_device_the_others_finished_without_takes_their_state_not_their_step(
    tmp_path: Path,
) -> None:
    """Left out of the last step's quorum (a straggler on a busy machine), a device got a
    quorum of its own once the others had finished and gone, and took that step again alone
    (seen: the rear stepped 41 times in 40 steps, and the run's last row was that device's).
    It takes the state the first device to finish left instead, and stops."""
    store = DictStore()
    finisher = device_run(tmp_path, steps=2)
    finisher.train(Alone(), store)
    scenario = finisher.scenario

    class LateQuorum(Alone):
        def start_step(self) -> tuple[int, int | None]:
            finisher.finish(store, 2, None)  # the others finished while it waited
            return super().start_step()

    behind = DeviceRun(DeviceOptions(coordinator="h:1", name="dev-1"), scenario, 1)
    engine = LateQuorum()
    engine.step = 1  # it took step 0 with the others, then was left out of step 1
    behind.train(engine, store)
    assert engine.step == 2 and (behind.stats.committed, behind.stats.failed) == (0, 0)
    assert all(torch.equal(a, b) for a, b in zip(params(finisher), params(behind), strict=True))


def test_a_secured_device_left_behind_takes_the_coordinators_state_not_the_stores(
    tmp_path: Path,
) -> None:
    """In a secured fleet the final state in the store is signed by whoever finished first,
    so by any enrolled key: the device left behind takes the coordinator's replica at the
    last step instead, over its session (here a stand-in that is there on the second ask)."""
    store = DictStore()
    finisher = device_run(tmp_path, steps=2)
    finisher.train(Alone(), store)
    scenario = finisher.scenario
    rogue = DeviceRun(DeviceOptions(coordinator="h:1", name="dev-1"), scenario, 1)
    with torch.no_grad():
        for p in rogue.strategy.model.parameters():
            p.fill_(7.0)
    store.set(KEY_FINAL_STATE, pack(2, 2, rogue.strategy.replica_state(), finisher.toml))
    store.set(KEY_DONE, "1")
    asked: list[int] = []

    class Coordinator(SecureDevice):
        def __init__(self) -> None:  # only its session's answers matter here
            pass

        def coordinator_state(self, store: Any, step: int) -> bytes | None:
            asked.append(step)
            if len(asked) < 2:  # still committing the last step
                return None
            return pack(step, 2, finisher.strategy.replica_state(), finisher.toml)

    behind = DeviceRun(DeviceOptions(coordinator="h:1", name="dev-1"), scenario, 1)
    behind.exchange = Coordinator()
    engine = Alone()
    engine.step = 1
    behind.train(engine, store)
    assert asked == [2, 2] and engine.step == 2
    assert all(torch.equal(a, b) for a, b in zip(params(finisher), params(behind), strict=True))


def test_the_first_quorum_waits_until_min_devices_have_their_engine_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchft's lighthouse forms a quorum of the Managers it has heard from: a device that
    asked before the others' were up took step 0 alone, and the others the same step 0 in
    a quorum of their own (seen on a loaded machine: the rear stepped 41 times in 40 steps).
    A device's first quorum waits until --min-devices Managers are up."""
    from edgeddl.runtime.fleet import torchft_quorum as torchdist

    polls: list[str] = []
    other = engine_key("dev-1")

    class Coordinator(DictStore):
        def check(self, keys: list[str]) -> bool:
            if keys == [other]:  # the device waits; the other's engine comes up meanwhile
                polls.append(other)
                if len(polls) == 2:
                    self.set(other, "1")
            return super().check(keys)

    class Quorum(Alone):
        def __init__(self, run: DeviceRun, store: DictStore, opts: Any, backend: str) -> None:
            super().__init__()
            self.store = store

        def start_step(self) -> tuple[int, int | None]:
            assert other in self.store.kv  # never before both are up
            return super().start_step()

        def shutdown(self) -> None:
            pass

    monkeypatch.setattr(torchdist, "TorchftQuorum", Quorum)
    store = Coordinator()
    store.set(KEY_MIN_DEVICES, "2")
    run = device_run(tmp_path, steps=2)
    report = torchdist.run_torchft(run.opts, store, run, "gloo")
    assert report["final_step"] == 2 and len(polls) == 2  # it waited for the other
    assert store.kv[engine_key("dev-0")] == b"1"


def test_recoveries_are_the_gaps_around_a_lost_step_or_member() -> None:
    commits = [(0.0, 3), (1.0, 3), (4.5, 2), (5.0, 2), (6.0, 3), (9.0, 1), (9.5, 1), (12.0, 1)]
    # Fewer members at 4.5 and 9.0; a step given up at 10.0 (a joiner died in its first step).
    assert recoveries(commits, failures=[10.0]) == [3.5, 3.0, 2.5]
    assert recoveries(commits, failures=[]) == [3.5, 3.0]


@pytest.mark.slow  # it waits out the slow profile's seconds: about 18 s
def test_pacing_waits_out_a_slow_profile_and_counts_a_fast_one_it_cannot_hold(
    tmp_path: Path,
) -> None:
    path = tmp_path / "loop.toml"
    path.write_text(
        SCENARIO.format(steps=3)
        + "\n[profiles.crawl]\nflops_per_s = 1.0e6\nmemory_bytes = 4.0e9\n"
        + "op_overhead_s = 0.0\nstep_overhead_s = 0.0\nio_bytes_per_s = 1.0e9\n"
        + "\n[profiles.blink]\nflops_per_s = 1.0e18\nmemory_bytes = 4.0e9\n"
        + "op_overhead_s = 0.0\nstep_overhead_s = 0.0\nio_bytes_per_s = 1.0e18\n"
    )
    scenario = load_scenario(path)
    slow = DeviceRun(DeviceOptions(coordinator="h:1", name="dev-0", profile="crawl"), scenario, 0)
    slow.train(Alone(), DictStore())
    # 32 samples of the 1-D CNN at 1 MFLOP/s: the profile's seconds, not the machine's.
    per_step = 32 * slow.w.cost.train_flops_per_sample / 1.0e6
    work = slow.stats.seconds["compute"] + slow.stats.seconds["data_loading"]
    assert work >= 3 * per_step and slow.stats.pacing_overruns == 0
    fast = DeviceRun(DeviceOptions(coordinator="h:1", name="dev-0", profile="blink"), scenario, 0)
    fast.train(Alone(), DictStore())
    assert fast.stats.pacing_overruns == 3  # a profile no machine keeps up with


def test_an_elastic_worker_keeps_model_memory_and_counters_across_a_restart(
    tmp_path: Path,
) -> None:
    """What a worker writes as it goes down is what its restarted self reads back: the
    replica state, its own error-feedback memory, its counters; another run's is ignored."""
    from edgeddl.runtime.fleet.elastic import _load_local, _save_local

    path = tmp_path / "loop.toml"
    path.write_text(
        SCENARIO.format(steps=4) + '\n[compression]\ncompressor = "topk"\ndensity = 0.05\n'
    )
    scenario = load_scenario(path)
    opts = DeviceOptions(coordinator="h:1", name="dev-0")
    before = DeviceRun(opts, scenario, 0)
    before.train(Alone(), DictStore())
    _save_local(before, tmp_path / "state", step=4)
    after = DeviceRun(opts, scenario, 0)
    assert _load_local(after, tmp_path / "state") == 4
    assert all(torch.equal(a, b) for a, b in zip(params(before), params(after), strict=True))
    memory = before.strategy.device_state(0)["memory"]["error"]
    assert memory.abs().sum() > 0  # top-k held most of the gradient back
    assert torch.equal(after.strategy.device_state(0)["memory"]["error"], memory)
    assert after.stats.committed == 4 and after.stats.samples == before.stats.samples
    other = load_scenario(path, ["train.lr=0.01"])  # another run's state: start afresh
    assert _load_local(DeviceRun(opts, other, 0), tmp_path / "state") == 0


def test_a_device_evaluates_as_the_simulator_does(tmp_path: Path) -> None:
    path = tmp_path / "anomaly.toml"
    text = (
        SCENARIO.format(steps=5)
        .replace('"mnist1d"', '"sensors"')
        .replace('"cnn1d"', '"autoencoder1d"')
    )
    path.write_text(text)
    run = DeviceRun(DeviceOptions(coordinator="127.0.0.1:1", name="dev-0"), load_scenario(path), 0)
    store = DictStore()
    run.train(Alone(), store)
    row = json.loads(store.get(row_key(1)))
    w = run.w
    expected = w.task.evaluate(run.strategy.model, w.x_test, w.y_test)  # the loop's call
    assert row["test_auroc"] == expected["test_auroc"] and row["test_loss"] == expected["test_loss"]
    assert "test_accuracy" not in row and run.strategy.model.training


class _Pair:
    """Two members in two threads: the sum is taken across a barrier, like a collective."""

    def __init__(self, shared: dict[str, Any], slot: int) -> None:
        self.shared, self.slot, self.step = shared, slot, 0

    def start_step(self) -> tuple[int, int | None]:
        return 2, self.slot

    def current_step(self) -> int:
        return self.step

    def allreduce_sum(self, t: torch.Tensor) -> bool:
        barrier, parts = self.shared["barrier"], self.shared["parts"]
        parts[self.slot] = t.clone()
        barrier.wait()
        total = parts[0] + parts[1]
        barrier.wait()  # both have read before either writes the next step's part
        t.copy_(total)
        return True

    def report_error(self, e: Exception) -> None:
        raise AssertionError(f"no step may fail here: {e}")

    def should_commit(self) -> bool:
        self.step += 1
        return True

    def is_lead(self) -> bool:
        return self.slot == 0

    def batches_committed(self) -> int:
        return self.step


def test_federated_rounds_on_two_members_give_the_simulators_model(tmp_path: Path) -> None:
    import threading

    import edgeddl

    rounds = 4
    path = tmp_path / "fed.toml"
    path.write_text(
        SCENARIO.format(steps=rounds).replace("[train]\n", '[train]\nstrategy = "federated"\n')
        + "\n[federated]\nlocal_steps = 3\nlocal_batch = 16\n"
    )
    scenario = load_scenario(path)
    runs = [
        DeviceRun(DeviceOptions(coordinator="h:1", name=f"dev-{i}"), scenario, i) for i in (0, 1)
    ]
    shared: dict[str, Any] = {"barrier": threading.Barrier(2, timeout=60), "parts": [None, None]}
    errors: list[BaseException] = []

    def train(i: int) -> None:
        try:
            runs[i].train(_Pair(shared, i), DictStore())
        except BaseException as e:  # surfaced below, not lost in the thread
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=train, args=(i,)) for i in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors and not any(th.is_alive() for th in threads), errors
    assert all(r.stats.committed == rounds for r in runs)
    assert all(r.stats.samples == rounds * 3 * 16 for r in runs)  # every client, each round
    sim = edgeddl.run(scenario, out_dir=tmp_path / "sim", progress=False).model
    for a, b, c in zip(params(runs[0]), params(runs[1]), sim.parameters(), strict=True):
        assert torch.equal(a, b)  # one model on both members
        torch.testing.assert_close(a, c.detach(), rtol=1e-5, atol=1e-6)  # the simulator's
