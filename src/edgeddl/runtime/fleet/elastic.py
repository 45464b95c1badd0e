"""The real fleet's fallback engine: torchrun elastic, for devices without a torchft build.

torchft has no aarch64 wheel, and building it needs Rust and crates.io on every board; this
engine needs nothing beyond torch. A failure restarts every worker after a new rendezvous in
the coordinator's store, and the members adopt the most advanced state, so no committed step
is lost or applied twice. Recovery takes seconds, against torchft's sub-second healing, so
torchft stays the default.
Details: docs/real-fleet.md#the-elastic-engine
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import shutil
import signal
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from edgeddl.io import write_bytes_atomic, write_text_atomic
from edgeddl.runtime.fleet.checkpoint import (
    KEY_CHECKPOINT_EVERY,
    KEY_RESUME,
    CheckpointError,
    DeviceFailed,
    pack,
    unpack,
)
from edgeddl.runtime.fleet.device import DeviceRun
from edgeddl.runtime.fleet.device_setup import DeviceOptions
from edgeddl.runtime.fleet.quorum import DeviceStats, RestartRequired
from edgeddl.runtime.fleet.store import (
    parse_address,
)

RDZV_SETTINGS = {
    "is_host": False,  # the coordinator holds the store; an agent never does
    "last_call_timeout": 1,  # torch's default of 30 s delays every recovery by that much
    "keep_alive_interval": 1,
    "keep_alive_max_attempt": 3,
    "join_timeout": 600,
}
EXIT_RESTART = 75
"""A worker's exit code when it must be restarted (a member was lost, or it was stopped)."""


def in_elastic_worker() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def launch(opts: DeviceOptions, store: Any, num_devices: int, run_id: str) -> dict[str, Any]:
    """Be this device's torchrun elastic agent until the run ends; the device's report."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # workers get a store of their own
    folder = own_state_dir(opts, run_id)
    final = folder / f"{opts.name}.final.json"
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=num_devices,
        nproc_per_node=1,
        run_id=run_id,
        rdzv_endpoint=opts.coordinator,
        rdzv_backend="c10d",
        rdzv_configs=dict(RDZV_SETTINGS),
        max_restarts=opts.max_restarts,
        monitor_interval=0.1,
        local_addr=opts.host or None,
    )
    args = [
        "-m", "edgeddl", "device", "--coordinator", opts.coordinator, "--name", opts.name,
        "--timeout", str(opts.timeout_s), "--connect-timeout", str(opts.connect_timeout_s),
        "--state-dir", str(folder),
    ]  # fmt: skip
    if opts.host:
        args += ["--host", opts.host]
    if opts.profile:
        args += ["--profile", opts.profile]
    try:
        elastic_launch(config, sys.executable)(*args)
    except ChildFailedError as e:
        raise DeviceFailed(
            f"device {opts.name}: its worker failed {opts.max_restarts + 1} times "
            f"(--max-restarts {opts.max_restarts}); last: {str(e).splitlines()[0]}"
        ) from None
    except Exception as e:
        # The worker finished, then the agent's goodbye to the rendezvous found the
        # coordinator already gone: the run is over all the same.
        if not final.exists():
            if isinstance(e, RendezvousError):  # the coordinator's store is gone mid-run
                raise ConnectionError(
                    f"device {opts.name}: lost the coordinator at {opts.coordinator}; the "
                    "elastic engine cannot outlive it: start this device again once the "
                    "coordinator is back (it resumes from the coordinator's checkpoint)"
                ) from None
            raise
    if not final.exists():
        raise DeviceFailed(
            f"device {opts.name}: the run ended before this device took part in a step"
        )
    report = dict(json.loads(final.read_text()))
    shutil.rmtree(folder, ignore_errors=True)  # the run is over: nothing to restart from
    return report


def state_dir(opts: DeviceOptions) -> Path:
    """The folder for the worker's state: `--state-dir` as given to a worker, else (for the
    agent, which adds the device and the run id) one under the system's temporary
    directory."""
    if opts.state_dir:
        return Path(opts.state_dir)
    host, port = parse_address(opts.coordinator)
    return Path(tempfile.gettempdir()) / f"edgeddl-state-{host}-{port}"


def own_state_dir(opts: DeviceOptions, run_id: str) -> Path:
    """The agent's folder for its worker's state in run `run_id`: this device's alone, so
    devices sharing a machine (and a `--state-dir`) never read or delete each other's."""
    return state_dir(opts) / opts.name / run_id


class ElasticQuorum:
    """torch.distributed's default group, as torchrun elastic formed it, as the engine."""

    def __init__(self, step: int, comm: torch.device) -> None:
        self.step, self.comm = step, comm
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.error: Exception | None = None
        self.broken = False

    def start_step(self) -> tuple[int, int | None]:
        self.error, self.broken = None, False
        return self.world, self.rank

    def current_step(self) -> int:
        return self.step

    def allreduce_sum(self, t: torch.Tensor) -> bool:
        if self.error is not None:
            return False
        try:
            dist.all_reduce(t, op=ReduceOp.SUM)
        except Exception as e:  # gloo raises RuntimeError, timeouts DistError
            self.error, self.broken = e, True
            return False
        return True

    def report_error(self, e: Exception) -> None:
        self.error = self.error or e

    def should_commit(self) -> bool:
        """Every member votes; a lost member ends the worker (torchrun restarts the group)."""
        if self.broken:
            raise RestartRequired(f"step {self.step}: {self.error}")
        vote = torch.tensor([0 if self.error is not None else 1], device=self.comm)
        try:
            dist.all_reduce(vote, op=ReduceOp.MIN)
        except Exception as e:
            raise RestartRequired(f"step {self.step}: {e}") from None
        if int(vote.item()) == 1:
            self.step += 1
            return True
        return False

    def is_lead(self) -> bool:
        return self.rank == 0

    def batches_committed(self) -> int:
        return self.step

    def catch_up(self, step: int, batches_committed: int) -> None:
        self.step = step


def _load_local(run: DeviceRun, folder: Path) -> int:
    """This device's own state from before its restart (its step), or 0. A state that
    cannot be used (damaged, truncated, empty, another run's) leaves the device as it
    started, with a one-line warning: its peers' state, or a fresh start, takes over."""
    s, path = run.strategy, folder / f"{run.opts.name}.pt"
    if not path.exists():
        return 0
    fresh = copy.deepcopy((s.replica_state(), s.device_state(run.idx)))
    try:
        ck = unpack(path.read_bytes(), run.toml, str(path))
        own = torch.load(path.with_suffix(".own.pt"), weights_only=True, map_location="cpu")
        step = ck["step"]
        if not isinstance(step, int) or step < 0:
            raise CheckpointError(f"{path}: step {step!r} is not a step")
        s.load_replica_state(ck["replica"])
        s.load_device_state(run.idx, own)  # its error-feedback memory
    except Exception as e:  # a damaged file raises anything: unpickling, EOF, a wrong key
        s.load_replica_state(fresh[0])  # nothing half-loaded stays
        s.load_device_state(run.idx, fresh[1])
        reason = (str(e).splitlines() or [""])[0] or type(e).__name__
        print(
            f"edgeddl device {run.opts.name}: ignoring its saved state {path} ({reason}); "
            "starting afresh",
            file=sys.stderr,
        )
        return 0
    run.stats = _read_stats(path.with_suffix(".json")) or run.stats
    return step


def _read_stats(path: Path) -> DeviceStats | None:
    """The counters saved beside the state, None if missing or damaged (they are only
    reported: the state matters)."""
    try:
        stats = DeviceStats(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    fresh = DeviceStats()
    for f in dataclasses.fields(DeviceStats):
        if not isinstance(getattr(stats, f.name), type(getattr(fresh, f.name))):
            return None
    return stats


def _save_local(run: DeviceRun, folder: Path, step: int) -> None:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # the device's own: nobody else's
    path = folder / f"{run.opts.name}.pt"
    buf = io.BytesIO()
    torch.save(run.strategy.device_state(run.idx), buf)
    write_bytes_atomic(path.with_suffix(".own.pt"), buf.getvalue())
    write_bytes_atomic(path, pack(step, step, run.strategy.replica_state(), run.toml))
    st = run.stats
    write_text_atomic(
        path.with_suffix(".json"),
        json.dumps(dataclasses.asdict(st)),
    )


def _adopt_most_advanced(run: DeviceRun, step: int, comm: torch.device) -> int:
    """Every member takes the state of the most advanced one (the lowest rank among equals)."""
    rank = dist.get_rank()
    steps = [torch.zeros(2, dtype=torch.int64, device=comm) for _ in range(dist.get_world_size())]
    dist.all_gather(steps, torch.tensor([step, rank], dtype=torch.int64, device=comm))
    best, src = max((int(s[0]), -int(s[1])) for s in steps)
    src = -src
    data = pack(best, best, run.strategy.replica_state(), run.toml) if rank == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=comm)
    dist.broadcast(size, src=src)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=comm)
    if rank == src:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=src)
    if rank != src:
        ck = unpack(buf.cpu().numpy().tobytes(), run.toml, "a peer's state")
        run.strategy.load_replica_state(ck["replica"])
    return best


def run_worker(opts: DeviceOptions, store: Any, run: DeviceRun, backend: str) -> dict[str, Any]:
    """One incarnation of the device under torchrun elastic: join, catch up, train."""
    folder = state_dir(opts)
    step = _load_local(run, folder)
    resume = None
    if store.check([KEY_RESUME]):  # a coordinator restarted from its checkpoint
        resume = unpack(store.get(KEY_RESUME), run.toml, "the coordinator's checkpoint")
        if resume["step"] > step:
            run.strategy.load_replica_state(resume["replica"])
            step = int(resume["step"])
    if store.check([KEY_CHECKPOINT_EVERY]):
        run.checkpoint_every = int(store.get(KEY_CHECKPOINT_EVERY))
    if step:  # a worker restarted (after a loss, or to let a device join)
        run.stats.restarts += 1
    comm = run.comm
    dist.init_process_group(
        backend,
        timeout=timedelta(seconds=opts.timeout_s),
        device_id=comm if comm.type == "cuda" else None,
    )
    quorum = ElasticQuorum(step, comm)

    def stop(signum: int, frame: FrameType | None) -> None:
        if run.critical:  # applying an update: stop right after it
            run.stop_requested = True
        else:
            raise RestartRequired(f"stopped by the elastic agent (signal {signum})")

    signal.signal(signal.SIGTERM, stop)
    try:
        quorum.step = _adopt_most_advanced(run, step, comm)
        run.train(quorum, store)
    except RestartRequired as e:
        _save_local(run, folder, quorum.step)
        print(f"edgeddl device {opts.name}: restarting ({e})", file=sys.stderr, flush=True)
        os._exit(EXIT_RESTART)  # gloo's threads may still wait on the dead peer
    except Exception:
        if quorum.step > step:
            _save_local(run, folder, quorum.step)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    report = run.finish(store, quorum.step, resume["step"] if resume else None)
    write_text_atomic(folder / f"{opts.name}.final.json", json.dumps(report))  # for the agent
    dist.destroy_process_group()
    return report
