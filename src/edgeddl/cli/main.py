"""The `edgeddl` command: builds configs and calls the library; knows no internals.

Every user mistake (a bad scenario, override or argument) ends in one line on stderr,
``edgeddl: error: ...``, and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from edgeddl.cli.catalog_cmd import CATALOG_COMMANDS, add_catalog_parsers
from edgeddl.cli.checks import require_writable
from edgeddl.cli.infer import add_infer_parser, cmd_infer
from edgeddl.cli.ledger_cmd import add_ledger_parser, cmd_ledger
from edgeddl.cli.runs_cmd import RUNS_COMMANDS, add_runs_parsers
from edgeddl.config.compression import check_compression
from edgeddl.config.loader import ConfigError, load_scenario, to_toml
from edgeddl.report.runs import ReportError
from edgeddl.runtime.fleet.checkpoint import CheckpointError, DeviceFailed, FleetFailed
from edgeddl.runtime.fleet.store import BACKENDS, ENGINES
from edgeddl.strategy.balance import BalanceError
from edgeddl.strategy.errors import TrainingDiverged

# Files the user named (scenario, data folder, --out) that cannot be read or written are
# their mistake too: OSError covers FileNotFoundError, NotADirectoryError, PermissionError.
USER_ERRORS = (
    ConfigError,
    ReportError,
    BalanceError,
    TrainingDiverged,
    CheckpointError,
    FleetFailed,
    DeviceFailed,
    OSError,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeddl",
        description="Distributed deep learning on IoT and edge fleets, simulated or real.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def scenario_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "scenario",
            nargs="?",
            default=None,
            help="scenario file, or a bundled scenario name (default: paper_fleet)",
        )
        sp.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a scenario value, e.g. --set train.lr=0.1 (repeatable)",
        )

    r = sub.add_parser("run", help="train a scenario on the simulated fleet")
    scenario_args(r)
    r.add_argument(
        "--out", type=Path, default=None, help="run folder (default: runs/NAME-TIMESTAMP)"
    )
    r.add_argument("--quiet", action="store_true", help="no progress display")
    r.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="go on with an interrupted run from its checkpoint, in its folder, to the same "
        "result (its scenario is in the checkpoint; --set may change only train.num_steps, "
        "train.max_virtual_time_s, train.eval_every, run.checkpoint_every)",
    )

    v = sub.add_parser("validate", help="check a scenario and print it fully resolved")
    scenario_args(v)

    add_catalog_parsers(sub)  # profiles, scenarios, compressors

    c = sub.add_parser("calibrate", help="measure this machine and write a device profile")
    c.add_argument("--name", default="this_machine", help="profile name (default: %(default)s)")
    c.add_argument(
        "--out",
        type=Path,
        default=None,
        help="TOML file to write (default: NAME.toml); include it from a scenario",
    )
    c.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")

    co = sub.add_parser(
        "coordinator", help="serve a real fleet: rendezvous, membership, run folder"
    )
    scenario_args(co)
    co.add_argument(
        "--port", type=int, default=29400, help="port devices connect to (default: %(default)s)"
    )
    co.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    co.add_argument(
        "--out", type=Path, default=None, help="run folder (default: runs/NAME-TIMESTAMP)"
    )
    co.add_argument(
        "--heartbeat-ms",
        type=int,
        default=1000,
        help="a device silent this long is dropped from the quorum (default: %(default)s)",
    )
    co.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        metavar="STEPS",
        help="write RUN/checkpoint.pt every STEPS committed steps; a coordinator restarted "
        "on the same --out resumes from it (0: never; default: %(default)s)",
    )

    co.add_argument(
        "--engine",
        choices=ENGINES,
        default="torchft",
        help="fault-tolerance engine: torchft (heals in place, sub-second) or elastic "
        "(torchrun elastic: restarts every worker, for devices without a torchft build; "
        "default: %(default)s)",
    )
    co.add_argument(
        "--min-devices",
        type=int,
        default=1,
        metavar="N",
        help="devices start training once N of the scenario's devices have connected (each "
        "counted once); later ones join mid-run (default: %(default)s)",
    )
    co.add_argument(
        "--backend",
        choices=BACKENDS,
        default="gloo",
        help="process-group backend of the devices: gloo (CPUs, mixed fleets) or nccl "
        "(every device has a CUDA GPU; default: %(default)s)",
    )

    add_infer_parser(sub)  # infer plan, infer run (and more: cli/infer.py ACTIONS)
    add_runs_parsers(sub)  # compare, export

    d = sub.add_parser("device", help="be one device of a real fleet")
    d.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator")
    d.add_argument(
        "--name",
        default="",
        help="this device's name in the scenario (default under torchrun: the device whose "
        "position in the scenario is the worker's RANK)",
    )
    d.add_argument(
        "--host", default="", help="address peers reach this device at (default: guessed)"
    )
    d.add_argument(
        "--connect-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the coordinator at start (default: %(default)s)",
    )
    d.add_argument(
        "--profile",
        default="",
        help=(
            "pace this process to a device profile's speed (a built-in, one of the scenario's, "
            "or 'scenario' for the device's own); default: full speed"
        ),
    )
    d.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        help=(
            "seconds a collective may wait for a peer before the step is given up: it bounds "
            "the recovery after a crash, and must exceed the longest wait for a slower peer "
            "(default: %(default)s)"
        ),
    )
    d.add_argument(
        "--max-restarts",
        type=int,
        default=100,
        help="elastic engine: how often this device's worker may fail and be restarted "
        "(default: %(default)s)",
    )
    d.add_argument(
        "--keys",
        default="",
        metavar="DIR",
        help="[security]: this device's key folder (NAME.key, and coordinator.pub: the only "
        "coordinator it will train for); default: the scenario's security.keys_dir",
    )
    d.add_argument(
        "--state-dir",
        default="",
        help="elastic engine: where the worker keeps its state between restarts, in "
        "NAME/RUN_ID under it (default: a folder under the system's temporary directory)",
    )
    k = sub.add_parser("keys", help="device and coordinator identities")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kn = ksub.add_parser(
        "new", help="make an identity (NAME.key, NAME.pub) and print its scenario entry"
    )
    kn.add_argument("name", help="a device name from the scenario, or 'coordinator'")
    kn.add_argument(
        "--out", type=Path, default=Path("."), help="folder for the key files (default: .)"
    )
    add_ledger_parser(sub)  # verify, head, show

    return p


def _cmd_keys(args: argparse.Namespace) -> int:
    from edgeddl.security.keys import Identity, SecurityError, key_paths, save_identity

    try:
        identity = Identity.generate(args.name)
        save_identity(identity, args.out)
    except SecurityError as e:
        raise ConfigError(str(e)) from None
    private, public = key_paths(args.out, args.name)
    print(f"# wrote {private} (private, keep it on {args.name}) and {public}")
    print("# add this to the scenario's [security] section:")
    print(identity.public().scenario_toml(), end="")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from edgeddl.runtime.sim.loop import (  # torch is imported only when it is needed
        default_run_dir,
        run,
    )

    if args.resume is not None:
        if args.scenario is not None:
            raise ConfigError("--resume: the run's scenario is in its checkpoint; name no other")
        result = run(
            resume=args.resume, overrides=args.overrides, out_dir=args.out, progress=not args.quiet
        )
    else:
        scenario = load_scenario(args.scenario, args.overrides)
        out = args.out or default_run_dir(scenario)
        require_writable("--out", out, folder=True)  # before the data is loaded and trained on
        result = run(scenario, out_dir=out, progress=not args.quiet)
    print(result.run_dir)
    if result.interrupted:
        print(f"interrupted: go on with `edgeddl run --resume {result.run_dir}`", file=sys.stderr)
        return 130
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario, args.overrides)
    if scenario.data.dataset == "cifar10":  # read from disk: the loader's own check (torch)
        from edgeddl.data.datasets import check_local_files

        check_local_files(scenario.data.dataset, scenario.data.root)
    if scenario.compression.enabled:  # capability checks (the registry's; no torch)
        try:
            check_compression(scenario.compression, scenario.train.topology)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    print(to_toml(scenario), end="")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from edgeddl.io import write_text_atomic
    from edgeddl.models.calibrate import calibrate_profile, profile_toml

    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (got {args.threads})")
    out = args.out or Path(f"{args.name}.toml")
    profile, report = calibrate_profile(threads=args.threads)
    write_text_atomic(out, profile_toml(args.name, profile))
    print(report)
    print(
        f'wrote {out}: add `include = ["{out}"]` at the top of a scenario to use '
        f'profile = "{args.name}"'
    )
    return 0


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from edgeddl.report.files import metric_label
    from edgeddl.runtime.fleet.coordinator import serve
    from edgeddl.runtime.fleet.device_setup import check_real_fleet
    from edgeddl.runtime.sim.loop import default_run_dir
    from edgeddl.task import TASKS

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535 (got {args.port})")
    if args.heartbeat_ms < 1:
        raise ConfigError(f"--heartbeat-ms must be >= 1 (got {args.heartbeat_ms})")
    scenario = load_scenario(args.scenario, args.overrides)
    check_real_fleet(scenario)  # refused here, before any device connects
    if not 1 <= args.min_devices <= len(scenario.fleet.device_names()):
        raise ConfigError(
            f"--min-devices: must be in 1..{len(scenario.fleet.device_names())} "
            f"(the scenario's devices), got {args.min_devices}"
        )
    if args.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint-every: must be >= 0, got {args.checkpoint_every}")
    out = args.out or default_run_dir(scenario)
    require_writable("--out", out, folder=True)
    print(f"edgeddl coordinator: devices connect to {args.host}:{args.port}", flush=True)
    summary = serve(
        scenario,
        port=args.port,
        host=args.host,
        out_dir=out,
        heartbeat_timeout_ms=args.heartbeat_ms,
        checkpoint_every=args.checkpoint_every,
        engine=args.engine,
        backend=args.backend,
        min_devices=args.min_devices,
    )
    metric = TASKS[scenario.task].metric
    value = summary[f"final_{metric}"]
    print(f"{out}: {metric_label(metric)} {value}, {summary['num_steps']} steps")
    # The run folder is written: end now. A link still open (a device, or a rogue holding a
    # device's key) has a thread blocked in gloo, which would abort the interpreter's exit.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _cmd_device(args: argparse.Namespace) -> int:
    from edgeddl.runtime.fleet.device_setup import DeviceOptions
    from edgeddl.runtime.fleet.launch import run_device
    from edgeddl.runtime.fleet.store import silence_engine_logs

    if args.timeout <= 0 or args.connect_timeout <= 0:
        raise ConfigError("--timeout and --connect-timeout must be > 0")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts: must be >= 0, got {args.max_restarts}")
    silence_engine_logs()
    report = run_device(
        DeviceOptions(
            coordinator=args.coordinator,
            name=args.name,
            host=args.host,
            timeout_s=args.timeout,
            connect_timeout_s=args.connect_timeout,
            profile=args.profile,
            max_restarts=args.max_restarts,
            state_dir=args.state_dir,
            keys_dir=args.keys,
        )
    )
    if report is not None:
        print(f"{report['name']}: {report['steps']} steps committed, {report['samples']} samples")
    # The report is with the coordinator: end now. torchft's and gloo's background threads
    # can keep the interpreter alive for a long while after their last use.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


COMMANDS = {
    "run": _cmd_run,
    "validate": _cmd_validate,
    **CATALOG_COMMANDS,
    **RUNS_COMMANDS,
    "calibrate": _cmd_calibrate,
    "coordinator": _cmd_coordinator,
    "device": _cmd_device,
    "infer": cmd_infer,
    "keys": _cmd_keys,
    "ledger": cmd_ledger,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as e:
        print(f"edgeddl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeddl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
