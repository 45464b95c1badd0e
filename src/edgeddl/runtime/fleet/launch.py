"""`edgeddl device`: connect to the coordinator, then train on the engine it names.

The coordinator publishes the engine (`torchft`, or `elastic` for devices without a torchft
build) and the process-group backend (`gloo`, or `nccl` where every device has a GPU), so
every device of a fleet runs the same ones and the device command never changes.
"""

from __future__ import annotations

import contextlib
from typing import Any

from edgeddl.config.loader import ConfigError
from edgeddl.config.schema import Scenario
from edgeddl.runtime.fleet.coordinator_link import CoordinatorLink
from edgeddl.runtime.fleet.device import DeviceRun
from edgeddl.runtime.fleet.device_setup import DeviceOptions, prove_run, read_scenario
from edgeddl.runtime.fleet.signed_store import SignedStore, unchecked
from edgeddl.runtime.fleet.split_device import Link, open_link
from edgeddl.runtime.fleet.store import (
    KEY_BACKEND,
    KEY_DONE,
    KEY_ENGINE,
    KEY_RUN_ID,
    connect,
    mark_joined,
    mark_stopped,
    wait_for_devices,
)
from edgeddl.security.parties import DeviceParty


def run_device(opts: DeviceOptions) -> dict[str, Any] | None:
    """Train as device `opts.name` until the scenario's last step; return its report (None
    from an elastic worker started after the run ended: its agent then ends too).

    An error that stops the device is also left with the coordinator, which reports it.
    """
    from edgeddl.runtime.fleet.elastic import in_elastic_worker

    worker = in_elastic_worker()
    try:
        store = connect(opts.coordinator, opts.connect_timeout_s)
    except ConnectionError:
        if worker:  # restarted after the coordinator ended the run: nothing left to do
            return None
        raise
    # Which engine, before the scenario (and the keys to check it by) is read: only to know
    # whether this is a restarted elastic worker; what the device runs on is read checked.
    hint = unchecked(store.get(KEY_ENGINE)) if store.check([KEY_ENGINE]) else b"torchft"
    worker = worker and hint == b"elastic"
    try:
        scenario, opts, idx, run_id = read_scenario(store, opts)
        store = device_store(store, scenario, opts, run_id)
        # [security]: only this run's end counts (it only keeps the device from starting;
        # nothing shared is acted on before the coordinator proves the run, `_run`)
        if store.check([KEY_DONE]):
            if worker:  # restarted as the run ended (a late join)
                return None
            raise ConfigError(f"--coordinator: the run at {opts.coordinator} has already finished")
    except ConfigError as e:
        if not worker:
            _stopped(store, opts.name, e)
        raise
    engine = store.get(KEY_ENGINE).decode() if store.check([KEY_ENGINE]) else "torchft"
    try:
        if not worker:  # a restarted elastic worker is the same device, not a new one
            mark_joined(store, opts.name)
        return _run(opts, store, engine, worker, scenario, idx)
    except Exception as e:
        if not worker:  # the agent reports for its workers, once it gives up
            _stopped(store, opts.name, e)
        raise


def _stopped(store: Any, name: str, e: Exception) -> None:
    """Leave the error that stops this device with the coordinator, which reports it."""
    reason = (str(e).splitlines() or [type(e).__name__])[0]
    with contextlib.suppress(RuntimeError, OSError):  # the coordinator is gone too
        mark_stopped(store, name, reason)


def device_store(store: Any, scenario: Scenario, opts: DeviceOptions, run_id: str = "") -> Any:
    """With `[security]`: the store with this device's values signed and every read checked
    (`signed_store.py`), bound to run `run_id` (default: the one the store names)."""
    if not scenario.security.enabled:
        return store
    from edgeddl.runtime.fleet.signed_store import fleet_store

    return fleet_store(store, scenario, opts.name, opts.keys_dir, run_id)


def _agent_link(store: Any, scenario: Scenario, opts: DeviceOptions, idx: int) -> Link:
    """The elastic agent's own link, only for the coordinator's handshake (its workers, which
    train, open theirs)."""
    seal = DeviceParty(scenario, idx, opts.name, opts.keys_dir)
    return open_link(CoordinatorLink, store, opts.name, idx, opts.timeout_s, seal)


def _run(
    opts: DeviceOptions, store: Any, engine: str, worker: bool, scenario: Scenario, idx: int
) -> dict[str, Any]:
    import torch

    names = scenario.fleet.device_names()
    if not worker:
        wait_for_devices(store, names, opts.connect_timeout_s)
    backend = store.get(KEY_BACKEND).decode() if store.check([KEY_BACKEND]) else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError(
            "the coordinator runs the fleet on NCCL (--backend nccl), but this device has "
            "no CUDA GPU; start the coordinator with --backend gloo"
        )
    if engine == "elastic" and not worker:
        from edgeddl.runtime.fleet.elastic import launch

        # fails at once on a store that lies, not in every restarted worker
        prove_run(store, lambda: _agent_link(store, scenario, opts, idx), opts.connect_timeout_s)
        run_id = store.run_id if isinstance(store, SignedStore) else store.get(KEY_RUN_ID).decode()
        return launch(opts, store, len(names), run_id)
    run = DeviceRun(opts, scenario, idx, backend)
    run.prove_run(store)  # [security]: before it acts on anything shared
    if engine == "elastic":
        from edgeddl.runtime.fleet.elastic import run_worker

        return run_worker(opts, store, run, backend)
    from edgeddl.runtime.fleet.torchft_quorum import run_torchft

    return run_torchft(opts, store, run, backend)
