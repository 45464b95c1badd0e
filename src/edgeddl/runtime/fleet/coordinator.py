"""The real fleet's coordinator: the rendezvous, the engine's membership, the run folder.

`edgeddl coordinator SCENARIO --port P` opens torch's `TCPStore` on P, where devices find
the scenario, the engine and the backend, and leave their evaluation rows and final
reports. With the torchft engine it also runs torchft's lighthouse (quorums and
heartbeats); with the elastic engine the same store holds torchrun's rendezvous. It trains
nothing itself (devices exchange payloads among themselves), except in split learning,
where it holds the rear and answers each device (`split_rear.py`). It writes the same run
folder as the simulator, with wall-clock times.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from torch.distributed import TCPStore

from edgeddl.config.loader import to_toml
from edgeddl.config.schema import Scenario
from edgeddl.config.security import SECURITY_COORDINATOR
from edgeddl.fleet.timeline import STATES
from edgeddl.io import (
    write_bytes_atomic,
    write_json_atomic,
    write_jsonl_atomic,
    write_model_atomic,
    write_text_atomic,
)
from edgeddl.report.files import metric_label, metric_plot
from edgeddl.report.plots import plot_metric
from edgeddl.report.recorder import metric_summary
from edgeddl.runtime.fleet.checkpoint import (
    CHECKPOINT_FILE,
    KEY_CHECKPOINT,
    KEY_CHECKPOINT_EVERY,
    KEY_CHECKPOINT_STEP,
    KEY_RESUME,
    FleetFailed,
    read_checkpoint,
    unpack,
)
from edgeddl.runtime.fleet.coordinator_link import LinkServer
from edgeddl.runtime.fleet.secure_coordinator import SecureCoordinator
from edgeddl.runtime.fleet.signed_store import ForgedValue, fleet_store
from edgeddl.runtime.fleet.split_rear import SplitRear
from edgeddl.runtime.fleet.store import (
    KEY_BACKEND,
    KEY_DONE,
    KEY_ENGINE,
    KEY_LIGHTHOUSE,
    KEY_MIN_DEVICES,
    KEY_ROWS_KNOWN,
    KEY_RUN_ID,
    KEY_SCENARIO,
    final_key,
    silence_engine_logs,
)
from edgeddl.runtime.fleet.watch import DeviceWatch, RowReader
from edgeddl.security.ledger import MODEL_FILE, SUMMARY_FILE
from edgeddl.task import TASKS


def serve(
    scenario: Scenario,
    *,
    port: int,
    out_dir: Path,
    host: str = "0.0.0.0",
    heartbeat_timeout_ms: int = 1000,
    linger_s: float = 10.0,
    poll_s: float = 0.2,
    checkpoint_every: int = 100,
    engine: str = "torchft",
    backend: str = "gloo",
    min_devices: int = 1,
) -> dict[str, Any]:
    """Run the fleet's rendezvous until a device finishes the last step; write the run folder.

    After the first device reports the end, the others get `linger_s` to report theirs.
    If `out_dir` holds a checkpoint of this scenario, the run resumes from it.
    """
    silence_engine_logs()
    store: Any
    try:
        store = TCPStore(
            host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30)
        )
    except RuntimeError as e:  # torch's DistNetworkError: the port is taken, or no such host
        reason = str(e).splitlines()[0]
        raise OSError(f"--port: cannot listen on {host}:{port} ({reason})") from None
    # New for every coordinator, a restarted one too: every signed value is bound to it (an
    # earlier run's, replayed, does not check), and the session handshake proves it.
    run_id = f"edgeddl-{uuid.uuid4().hex[:12]}"
    if scenario.security.enabled:  # the store is open to anyone: its values are signed
        store = fleet_store(store, scenario, SECURITY_COORDINATOR, run_id=run_id)
    store.set(KEY_RUN_ID, run_id)
    toml = to_toml(scenario)
    resume = read_checkpoint(out_dir, toml)
    lighthouse = _lighthouse(heartbeat_timeout_ms) if engine == "torchft" else None
    rows: list[dict[str, Any]] = []  # this run's rows, after those of an earlier coordinator
    earlier: list[dict[str, Any]] = []
    if resume is not None:
        store.set(KEY_RESUME, resume[0])
        metrics = out_dir / "metrics.jsonl"
        if metrics.exists():
            earlier = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        print(f"edgeddl coordinator: resuming from the checkpoint at step {resume[1]}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "config.resolved.toml", toml)
    store.set(KEY_CHECKPOINT_EVERY, str(checkpoint_every))
    store.set(KEY_ENGINE, engine)
    store.set(KEY_MIN_DEVICES, str(min_devices))
    store.set(KEY_BACKEND, backend)
    if earlier:  # devices that outlived the earlier coordinator hand in the rows it lacks
        store.set(KEY_ROWS_KNOWN, str(max(int(r["step"]) for r in earlier)))
    if lighthouse is not None:
        store.set(KEY_LIGHTHOUSE, lighthouse.address())
    handler: SplitRear | SecureCoordinator | None = None
    if scenario.train.strategy == "split":  # the coordinator holds the rear
        handler = SplitRear.for_scenario(scenario, store, out_dir, checkpoint_every, run_id)
    elif scenario.security.enabled:  # it opens, records and aggregates every payload
        # its replica is the fleet's (a device that heals takes it): from the checkpoint too
        replica = unpack(resume[0], toml, "the checkpoint") if resume is not None else None
        handler = SecureCoordinator(scenario, out_dir, run_id, replica)
    links = None
    if handler is not None:
        party = handler.seal  # [security]: every link is an authenticated session
        near = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        links = LinkServer(
            handler,
            store,
            sessions=party.responder if party else None,
            client=lambda: TCPStore(near, port, is_master=False, timeout=timedelta(seconds=30)),
        )
    store.set(KEY_SCENARIO, toml)  # last: a device that sees it sees everything above
    names = scenario.fleet.device_names()
    checkpoint_step = resume[1] if resume else -1
    start, started_at = time.perf_counter(), time.time()
    watch, reader = DeviceWatch(names), RowReader(started_at, earlier)
    done_at: float | None = None
    last = ""
    all_failed_at: float | None = None
    try:
        while True:
            try:  # a value replaced between its check and its read: skipped
                if links is not None:
                    links.poll()
                now = time.perf_counter()
                if (message := watch.poll(store, now)) is not None:
                    last = message
                    print(f"edgeddl coordinator: device stopped on an error: {last}", flush=True)
                if done_at is None and watch.num_failures and not watch.alive:  # nobody is left
                    all_failed_at = all_failed_at or now
                    if now - all_failed_at > linger_s:
                        raise FleetFailed(
                            f"every device stopped on an error (last: {last}); "
                            f"the run folder {out_dir} keeps what was written"
                        )
                else:
                    all_failed_at = None
                # The checkpoint before the rows: every row up to its step was written before
                # it, so metrics.jsonl has them all by the time the checkpoint is on disk.
                checkpoint = (
                    handler.checkpoint(checkpoint_step, checkpoint_every)
                    if isinstance(handler, SecureCoordinator)  # its own replica, no device's
                    else _new_checkpoint(store, checkpoint_step)
                )
                if new_rows := reader.poll(store):
                    rows += new_rows
                    write_jsonl_atomic(out_dir / "metrics.jsonl", _merged(earlier, rows))
                if checkpoint is not None:
                    checkpoint_step = checkpoint[0]
                    write_bytes_atomic(out_dir / CHECKPOINT_FILE, checkpoint[1])
                if done_at is None and store.check([KEY_DONE]):
                    done_at = now
                # After the first device's end: wait for the others still training, no longer
                # than linger_s (a device killed without a word is not waited for).
                if done_at is not None and (
                    not watch.awaited(now, linger_s) or now - done_at > linger_s
                ):
                    break
            except ForgedValue as e:
                print(f"edgeddl coordinator: {e}", file=sys.stderr, flush=True)
            time.sleep(poll_s)
    finally:
        if lighthouse is not None:
            lighthouse.shutdown()
    reports = _reports(store, names)
    rows = _merged(earlier, rows)
    summary = _summary(scenario, rows, reports, time.perf_counter() - start)
    summary["engine"], summary["backend"] = engine, backend
    summary["resumed_from_step"] = resume[1] if resume else None
    summary["checkpoint_step"] = checkpoint_step if checkpoint_step >= 0 else None
    with handler.lock if handler is not None else contextlib.nullcontext():
        if links is not None:
            served = {"links_opened": links.opened, "requests_refused": list(links.refused)}
            if isinstance(handler, SplitRear):
                summary["split"] = {**handler.summary(), **served}
                summary.update(handler.sealed_summary())  # [security]: digest, ledger keys
            elif isinstance(handler, SecureCoordinator):
                sealed = handler.summary()
                summary["model_digest"] = sealed["model_digest"]
                summary["security"] = {**sealed["security"], **served}
                if "robust" in sealed:  # the screen's rejections and the rule
                    summary["robust"] = sealed["robust"]
        _write_closing(out_dir, summary, handler)
    if rows:
        metric = TASKS[scenario.task].metric
        title = f"{scenario.run.name}: test {metric_label(metric)} (real fleet)"
        plot_metric(rows, out_dir / metric_plot(metric), metric, title, time_key="wall_time_s")
    return summary


def _write_closing(
    out_dir: Path, summary: dict[str, Any], handler: SplitRear | SecureCoordinator | None
) -> None:
    """summary.json; with `[security]` first model.pt (what the coordinator vouches for: its
    replica, or split learning's rear) and last the ledger's closing entry naming both."""
    seal = handler.seal if handler is not None else None
    if handler is not None and seal is not None:
        write_model_atomic(out_dir / MODEL_FILE, handler.model_state())
    write_json_atomic(out_dir / SUMMARY_FILE, summary)
    if handler is not None and seal is not None:
        seal.close(handler.digest())


def _lighthouse(heartbeat_timeout_ms: int) -> Any:
    from torchft._torchft import LighthouseServer  # only the torchft engine needs it

    return LighthouseServer(
        bind="[::]:0",
        min_replicas=1,
        join_timeout_ms=200,
        quorum_tick_ms=50,
        heartbeat_timeout_ms=heartbeat_timeout_ms,
    )


def _reports(store: Any, names: list[str]) -> list[dict[str, Any]]:
    """The devices' final reports (with `[security]`: those their devices signed)."""
    out = []
    for name in names:
        try:
            if store.check([final_key(name)]):
                out.append(json.loads(store.get(final_key(name))))
        except (ForgedValue, ValueError) as e:
            print(f"edgeddl coordinator: {name}'s final report: {e}", file=sys.stderr)
    return out


def _new_checkpoint(store: Any, have: int) -> tuple[int, bytes] | None:
    """(step, bytes) of the checkpoint the lead device left, if newer than step `have`."""
    if not store.check([KEY_CHECKPOINT_STEP, KEY_CHECKPOINT]):
        return None
    step = store.get(KEY_CHECKPOINT_STEP)
    if not step.isdigit() or int(step) <= have:
        return None
    return int(step), bytes(store.get(KEY_CHECKPOINT))


def _merged(earlier: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An earlier coordinator's rows, then this one's; a step evaluated again keeps the new."""
    by_step = {r["step"]: r for r in [*earlier, *rows]}
    return [by_step[k] for k in sorted(by_step)]


def _summary(
    scenario: Scenario, rows: list[dict[str, Any]], reports: list[dict[str, Any]], wall_s: float
) -> dict[str, Any]:
    recoveries = [g for r in reports for g in r["recovery_s"]]
    time_s = max((r["time_s"] for r in reports), default=0.0)  # the longest time in steps
    samples = sum(r["samples"] for r in reports)
    return {
        "transport": "torchdist",
        "clock": "wall",
        "scenario": scenario.run.name,
        "task": scenario.task,
        **metric_summary(rows, TASKS[scenario.task].metric),
        "time_s": time_s,
        "wall_time_s": wall_s,
        "num_devices": len(scenario.fleet.device_names()),
        "num_steps": max((r["final_step"] for r in reports), default=0),
        "samples": samples,
        "samples_per_s": samples / time_s if time_s else 0.0,
        "bytes_up": sum(r["bytes_up"] for r in reports),
        "bytes_down": sum(r["bytes_down"] for r in reports),
        "breakdown_s": {s: sum(r["breakdown_s"][s] for r in reports) for s in STATES},
        # a device that joined as the run ended, and committed nothing, did not finish it
        "devices_finished": [r["name"] for r in reports if r["steps"] > 0],
        "devices_without_steps": [r["name"] for r in reports if r["steps"] == 0],
        "recovery_s": recoveries,
        "max_recovery_s": max(recoveries, default=0.0),
        "steps_not_committed": sum(r["steps_not_committed"] for r in reports),
        "replicas_consistent": len(
            {
                round(r["checksum"], 6)
                for r in reports
                if r["final_step"] == max(x["final_step"] for x in reports)
                and r["checksum"] is not None  # split without SplitFed: fronts differ
            }
        )
        <= 1,
        "per_device": reports,
    }
