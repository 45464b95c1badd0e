"""What a device of a real fleet settles before it trains: its options, the scenario it
reads from the coordinator's store (refusing what a real fleet cannot carry, with one line),
its name, the run it proves the store is bound to (`[security]`), and the fleet it paces
itself to."""

from __future__ import annotations

import dataclasses
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeddl.config.loader import ConfigError, scenario_from_dict
from edgeddl.config.schema import Scenario
from edgeddl.config.security import SECURITY_COORDINATOR
from edgeddl.fleet.fleet import Fleet
from edgeddl.runtime.fleet.signed_store import unchecked
from edgeddl.runtime.fleet.store import KEY_SCENARIO
from edgeddl.security.session import check_sealable

if TYPE_CHECKING:  # torch's: the CLI starts without it
    from edgeddl.runtime.fleet.split_device import Link


@dataclass(kw_only=True, slots=True)
class DeviceOptions:
    coordinator: str
    """The coordinator's HOST:PORT."""
    name: str
    """Which device of the scenario this process is ('': torchrun's RANK says)."""
    host: str = ""
    """Address the other devices reach this one at ('': the route to the coordinator)."""
    timeout_s: float = 5.0
    """How long a collective may wait for a peer before the step is given up: it bounds the
    recovery after a crash, and must exceed the longest wait for a slower peer."""
    connect_timeout_s: float = 60.0
    """How long to wait for the coordinator at start."""
    profile: str = ""
    """Pace this process to a device profile's speed ('scenario': the device's own), so a
    fleet of processes on one machine behaves like a mixed fleet; '' runs at full speed."""
    max_restarts: int = 100
    """Elastic engine: how many times this device's worker may fail and be restarted."""
    state_dir: str = ""
    """Elastic engine: where the worker keeps its state between restarts ('': a folder
    under the system's temporary directory)."""
    keys_dir: str = ""
    """`[security]`: the device's key folder, with `coordinator.pub`, the coordinator it
    trusts ('': the scenario's `security.keys_dir`)."""


def read_scenario(store: Any, opts: DeviceOptions) -> tuple[Scenario, DeviceOptions, int, str]:
    """The coordinator's scenario, the options with the name settled, this device's index,
    and with `--keys` the run id the scenario is bound to ('' without: the network's word)."""
    # [security] with --keys: only a scenario the coordinator it trusts signed for the run
    # the store names; without, signed or not, the network's word for it
    if opts.keys_dir:
        run_id, data = signed_scenario(store, opts.keys_dir)
    else:
        run_id, data = "", unchecked(bytes(store.get(KEY_SCENARIO)))
    scenario = scenario_from_dict(tomllib.loads(data.decode()))
    names = scenario.fleet.device_names()
    if not opts.name:
        opts = dataclasses.replace(opts, name=_name_from_rank(names))
    if opts.name not in names:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise ConfigError(
            f"--name: {opts.name!r} is not a device of the scenario; allowed: {shown}"
        )
    check_real_fleet(scenario)
    return scenario, opts, names.index(opts.name), run_id


def signed_scenario(store: Any, keys_dir: str) -> tuple[str, bytes]:
    """(run id, scenario) in `store` once the coordinator key in `keys_dir`
    (coordinator.pub) signed both, the scenario for that run; ForgedValue or ConfigError
    (one line) otherwise."""
    from pathlib import Path

    from edgeddl.runtime.fleet.signed_store import fleet_authors, open_value, run_id_of
    from edgeddl.security.keys import SecurityError, key_paths, load_public

    _, public = key_paths(Path(keys_dir), SECURITY_COORDINATOR)
    try:
        peers = {SECURITY_COORDINATOR: load_public(public)}
    except SecurityError as e:
        raise ConfigError(f"--keys: {e}") from None
    run_id = run_id_of(store, peers)
    allowed = fleet_authors([])(KEY_SCENARIO) or frozenset()
    return run_id, open_value(KEY_SCENARIO, bytes(store.get(KEY_SCENARIO)), peers, allowed, run_id)


def prove_run(store: Any, link: Callable[[], Link], timeout_s: float) -> None:
    """`[security]`: the run `store` is bound to, proven by the coordinator's handshake on a
    link `link()` opens (waiting up to `timeout_s` for one), before anything bound to it is
    trusted. The store's run id is only the store's word: one recorded in an earlier run
    could have been replayed with that run's end, final state and checkpoints. A store bound
    to another run than the coordinator's: ConfigError (one line), the device stops."""
    from edgeddl.runtime.fleet.coordinator_link import LinkError
    from edgeddl.runtime.fleet.signed_store import SignedStore

    if not isinstance(store, SignedStore):
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            session = link().session
            break
        except LinkError as e:
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"--connect-timeout: no session with the coordinator within {timeout_s:g} "
                    f"s to prove its run, so nothing in its store is trusted ({e})"
                ) from None
            time.sleep(1.0)  # refused, or not served yet: ask again
    proven = session.run_id if session is not None else None
    if proven != store.run_id:
        raise ConfigError(
            f"--coordinator: its store names run {store.run_id!r}, but the coordinator's "
            f"handshake proves run {proven!r}: the store's values are another run's "
            "(replayed); refusing to act on them"
        )


def check_real_fleet(scenario: Scenario) -> None:
    """One-line ConfigError for what a real fleet cannot run (yet)."""
    if scenario.train.strategy == "federated":
        if scenario.compression.enabled:
            raise ConfigError(
                "compression: federated updates travel dense on a real fleet for now; "
                'leave [compression] at compressor = "none" (the simulator compresses them)'
            )
        if scenario.federated.deadline_s > 0:
            raise ConfigError(
                "federated.deadline_s: a real fleet waits for every sampled member (its "
                "engine's timeout drops a lost one); set it to 0"
            )
    if scenario.security.enabled:
        check_sealable(scenario)
        if not scenario.security.keys_dir:
            raise ConfigError(
                "security.keys_dir: each party of a real fleet loads its own private key from "
                "this folder (`edgeddl keys new NAME --out DIR`)"
            )
    if scenario.compression.adapt.enabled:
        raise ConfigError(
            "compression.adapt: network-aware adaptation runs on the simulated fleet only; "
            "set compression.adapt.enabled = false for a real fleet"
        )
    if (scenario.robust.screens or scenario.misbehaving) and not scenario.security.enabled:
        raise ConfigError(
            "robust: without [security] a real fleet sums updates in an all-reduce, so no one "
            "sees them to screen; set security.enabled = true (each update then goes sealed to "
            'the coordinator), or leave robust.rule = "mean" and every device honest'
        )
    if scenario.robust.device_momentum:
        raise ConfigError(
            "robust.device_momentum: runs on the simulated fleet only (a real device's "
            "momentum would have to follow the engine's commits); set it to false"
        )


def _name_from_rank(names: list[str]) -> str:
    """Under torchrun (which sets RANK): the scenario's device at that position."""
    rank = os.environ.get("RANK", "")
    if not rank.isdigit():
        raise ConfigError("--name: required (or launch with torchrun, which sets RANK)")
    if int(rank) >= len(names):
        raise ConfigError(
            f"--name: torchrun's RANK {rank} has no device: the scenario has {len(names)}"
        )
    return names[int(rank)]


def pacing_fleet(scenario: Scenario, name: str, profile: str) -> Fleet | None:
    """The fleet with this device's group on `profile`, for its paced work times."""
    if not profile:
        return None
    groups = [
        dataclasses.replace(g, profile=profile)
        if profile != "scenario" and name in g.device_names()
        else g
        for g in scenario.fleet.devices
    ]
    try:
        paced = dataclasses.replace(
            scenario, fleet=dataclasses.replace(scenario.fleet, devices=groups)
        )
    except ValueError:
        raise ConfigError(
            f"--profile: unknown device profile {profile!r} (see `edgeddl profiles`)"
        ) from None
    return Fleet.from_scenario(paced)
