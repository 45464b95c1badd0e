"""The coordinator's key-value store, as the real fleet's devices and coordinator use it.

The coordinator serves torch's `TCPStore`; devices find the scenario and the engine there,
and leave evaluation rows, progress, checkpoints and their final reports. These are the
keys and the few helpers both sides share (no torch import at module level: the CLI starts
without it).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from edgeddl.config.loader import ConfigError

KEY_SCENARIO = "edgeddl/scenario"
KEY_ENGINE = "edgeddl/engine"
"""Which fault-tolerance engine the fleet runs on: 'torchft' or 'elastic'."""
KEY_BACKEND = "edgeddl/backend"
"""The process groups' backend: 'gloo' (CPUs, or a mixed fleet) or 'nccl' (GPUs only)."""
KEY_RUN_ID = "edgeddl/run_id"
"""The run's id, new for every coordinator: with `[security]` every signed value is bound to
it and the session handshake proves it; also the elastic engine's rendezvous id."""
KEY_MIN_DEVICES = "edgeddl/min_devices"
"""How many of the scenario's devices must be in before the first step, each counted once
(later ones join mid-run)."""
KEY_LIGHTHOUSE = "edgeddl/lighthouse"
KEY_ROWS = "edgeddl/rows"
"""How many evaluation rows have been announced; row i is under `row_key(i)` once written."""
KEY_ROWS_KNOWN = "edgeddl/rows_known"
"""A restarted coordinator's: the last step the earlier one wrote a row for. Devices that
outlived it hand in the rows they reported after that step (`DeviceRun.resend_rows`)."""
KEY_DONE = "edgeddl/done"
KEY_FAILED = "edgeddl/failed"
"""How many times a device process stopped on an error (each stop counts); the last one's
message is under KEY_FAILED + "/last"."""

ENGINES = ("torchft", "elastic")
BACKENDS = ("gloo", "nccl")


def row_key(i: int) -> str:
    return f"edgeddl/row/{i}"


def joined_key(name: str) -> str:
    """Set by device `name` when it is in (again): it counts towards --min-devices."""
    return f"edgeddl/joined/{name}"


def engine_key(name: str) -> str:
    """Set by device `name` once its engine is up (torchft: a Manager that heartbeats)."""
    return f"edgeddl/engine_up/{name}"


def stopped_key(name: str) -> str:
    """Device `name` stopped on an error (its message); cleared when it joins again."""
    return f"edgeddl/stopped/{name}"


def final_key(name: str) -> str:
    return f"edgeddl/final/{name}"


def progress_key(name: str) -> str:
    return f"edgeddl/progress/{name}"


def parse_address(address: str, flag: str = "--coordinator") -> tuple[str, int]:
    """HOST:PORT, or a one-line ConfigError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag}: expected HOST:PORT, got {address!r}")
    return host, int(port)


def advertised_host(coordinator_host: str) -> str:
    """The address peers reach this device at: the interface that routes to the coordinator."""
    if coordinator_host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((coordinator_host, 9))  # no packet is sent: this only picks the route
        return str(s.getsockname()[0])


def connect(address: str, timeout_s: float) -> Any:
    """The coordinator's store (a TCPStore client) once it holds the scenario (published
    last, so every other key is there too), waiting up to `timeout_s` for it."""
    from torch.distributed import TCPStore

    host, port = parse_address(address)
    timeout = timedelta(seconds=timeout_s)
    try:
        store = TCPStore(host, port, is_master=False, timeout=timeout)
        store.wait([KEY_SCENARIO], timeout)
    except RuntimeError:  # torch's DistStoreError: nobody answered in time
        raise ConnectionError(
            f"--coordinator: no coordinator answered at {address} within "
            f"{timeout_s:g} s (is `edgeddl coordinator` running there?)"
        ) from None
    return store


def answers(store: Any) -> bool:
    """Whether the coordinator's store still answers."""
    try:
        store.check([KEY_SCENARIO])
    except (RuntimeError, OSError):
        return False
    return True


def mark_joined(store: Any, name: str) -> None:
    """Device `name` is in (again, after a restart): its engine is not up yet."""
    store.delete_key(stopped_key(name))
    store.delete_key(engine_key(name))
    store.set(joined_key(name), "1")


def mark_stopped(store: Any, name: str, reason: str) -> None:
    """Device `name` ('' if it never learnt it) stopped on an error: the coordinator
    prints `reason`, and the device no longer counts as in."""
    if name:
        store.set(stopped_key(name), reason)
    store.set(KEY_FAILED + "/last", f"{name or 'device'}: {reason}")
    store.add(KEY_FAILED, 1)


def devices_in(store: Any, names: list[str]) -> list[str]:
    """The scenario's devices that joined and have not stopped on an error since: each
    device once, however often it connected (a name the scenario lacks never counts)."""
    return [n for n in names if store.check([joined_key(n)]) and not store.check([stopped_key(n)])]


def wait_for_devices(store: Any, names: list[str], timeout_s: float) -> None:
    """Before the first step: wait until the coordinator's minimum of the scenario's devices
    `names` are in (a ConnectionError after `timeout_s`)."""
    _wait(store, timeout_s, lambda: len(devices_in(store, names)), "connected")


def wait_for_engines(store: Any, names: list[str], timeout_s: float) -> None:
    """Before the first quorum: wait until the coordinator's minimum of the scenario's
    devices `names` have their engine up (a ConnectionError after `timeout_s`). torchft's
    lighthouse forms a quorum of the replicas it has heard from: a device that asked before
    the others' Managers were up would take the first step alone, and the others the same
    step again in a quorum of their own (a split brain: two histories of one step). Once
    every Manager heartbeats, a quorum needs more than half of them. A device that stopped
    on an error still counts here (it may have stopped before its engine was up)."""

    def up() -> int:
        return sum(store.check([engine_key(n)]) or store.check([stopped_key(n)]) for n in names)

    _wait(store, timeout_s, up, "had their engine up")


def _wait(store: Any, timeout_s: float, count: Callable[[], int], what: str) -> None:
    wanted = int(store.get(KEY_MIN_DEVICES)) if store.check([KEY_MIN_DEVICES]) else 1
    deadline = time.monotonic() + timeout_s
    while (have := count()) < wanted:
        if time.monotonic() > deadline:
            raise ConnectionError(
                f"--connect-timeout: {have} of the {wanted} devices the coordinator waits "
                f"for (--min-devices) {what} within {timeout_s:g} s"
            )
        time.sleep(0.1)


def silence_engine_logs() -> None:
    """torchft's lighthouse and managers log every quorum at INFO: keep warnings only."""
    os.environ.setdefault("RUST_LOG", "warn")
