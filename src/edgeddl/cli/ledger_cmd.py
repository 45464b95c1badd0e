"""`edgeddl ledger verify | head | show`: an outsider's check of a run's audit ledger against
keys of their own, the coordinator's signed head to publish, and the timeline
(`security/audit.py` does the work)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edgeddl.cli.checks import require_writable
from edgeddl.config.loader import ConfigError, load_scenario

if TYPE_CHECKING:
    from edgeddl.security.keys import PublicIdentity

VERIFY_HELP = (
    "check the chain, who wrote what, every signature and receipt, and that the run folder's "
    "config.resolved.toml, model.pt and summary.json are the files the ledger signed"
)


def add_ledger_parser(sub: argparse._SubParsersAction) -> None:
    lg = sub.add_parser("ledger", help="check, sign the head of, or read a run's audit ledger")
    lsub = lg.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    lv = lsub.add_parser("verify", help=VERIFY_HELP)
    lh = lsub.add_parser(
        "head", help="the coordinator's signed head of the ledger (JSON), to publish"
    )
    ls = lsub.add_parser("show", help="print the ledger as a timeline")
    for sp in (lv, lh, ls):
        sp.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run folder")
    trust = lv.add_mutually_exclusive_group()
    trust.add_argument(
        "--keys",
        type=Path,
        default=None,
        metavar="DIR",
        help="the keys to trust: a folder of NAME.pub files (coordinator.pub and the "
        "devices'), your own copy; without --keys or --scenario the keys come from the "
        "folder under audit, with a warning",
    )
    trust.add_argument(
        "--scenario",
        default=None,
        metavar="FILE",
        help="the keys to trust: the enrolled keys of your own copy of the scenario",
    )
    lv.add_argument(
        "--head",
        type=Path,
        default=None,
        metavar="FILE",
        help="a signed head (from `edgeddl ledger head` or RUN_DIR/ledger.head.json, kept "
        "elsewhere): the ledger must hold and extend it, which is what catches a ledger cut "
        "short when --partial is given",
    )
    lv.add_argument(
        "--partial",
        action="store_true",
        help="accept a ledger of a run that did not end (a crash): no closing entry, so "
        "model.pt and summary.json go unchecked, and only --head catches truncation",
    )
    lh.add_argument(
        "--key",
        type=Path,
        default=None,
        metavar="KEYFILE",
        help="the coordinator's private key (default: coordinator.key in the security.keys_dir "
        "RUN_DIR/config.resolved.toml names)",
    )
    lh.add_argument(
        "--out", type=Path, default=None, metavar="FILE", help="write it here (default: print it)"
    )


def cmd_ledger(args: argparse.Namespace) -> int:
    from edgeddl.security.keys import SecurityError
    from edgeddl.security.ledger import LEDGER_FILE, read_entries

    path = args.run_dir / LEDGER_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no ledger (was the run's security enabled?)")
    if args.ledger_command == "show":
        from edgeddl.cli.ledger_view import print_timeline

        print_timeline(*read_entries(path), _head_line(args.run_dir))
        return 0
    try:
        return _verify(args) if args.ledger_command == "verify" else _head(args)
    except SecurityError as e:
        raise ConfigError(str(e)) from None


def _verify(args: argparse.Namespace) -> int:
    from edgeddl.security.audit import read_head, verify_run

    peers, source = _trust_root(args)
    head = read_head(args.head) if args.head is not None else None
    report = verify_run(args.run_dir, peers, complete=not args.partial, head=head)
    if not report.ok:
        raise ConfigError(report.error)
    checked = "chain, roles, signatures, receipts"
    if report.closing is not None:
        checked += ", final model digest"
    if head is not None:
        checked += f", the signed head's {head.entries} entries"
    files = ", ".join(report.files)
    unchecked = "" if report.closing else "; no closing entry: model.pt, summary.json unchecked"
    torn = (
        f"; a torn last line of {report.torn_tail_bytes} bytes ignored (a crash mid-write)"
        if report.torn_tail_bytes
        else ""
    )
    print(
        f"{args.run_dir}: {report.num_entries} entries verified ({checked}); {files} match "
        f"the ledger{unchecked}{torn}; keys from {source}"
    )
    return 0


def _trust_root(args: argparse.Namespace) -> tuple[dict[str, PublicIdentity], str]:
    """The keys to trust and where they came from; the folder's own, with a warning, only
    when the auditor brings none."""
    from edgeddl.security.audit import trusted_keys
    from edgeddl.security.keys import enrolled
    from edgeddl.security.ledger import CONFIG_FILE

    if args.keys is not None:
        return trusted_keys(args.keys), f"--keys {args.keys}"
    config = args.scenario or args.run_dir / CONFIG_FILE
    if args.scenario is None:
        print(
            f"edgeddl: warning: trusting the keys in {config}, inside the folder under audit "
            "(a history forged with fresh keys verifies too); pass your own: --keys DIR of "
            "NAME.pub files, or --scenario FILE",
            file=sys.stderr,
        )
    # Only [security] is read: a run of your own model or data set verifies too.
    scenario = load_scenario(config, own_model=True, own_data=True)
    return enrolled(scenario.security), str(config)


def _head(args: argparse.Namespace) -> int:
    from edgeddl.io import write_text_atomic
    from edgeddl.security.audit import head_of
    from edgeddl.security.keys import load_identity

    if args.out is not None:
        require_writable("--out", args.out, folder=False)
    head = head_of(args.run_dir, load_identity(args.key or _default_key(args.run_dir)))
    text = json.dumps(head.to_json(), indent=2) + "\n"
    if args.out is None:
        print(text, end="")
        return 0
    write_text_atomic(args.out, text)
    print(f"wrote {args.out}: the signed head of {head.entries} entries of run {head.run_id}")
    return 0


def _head_line(run_dir: Path) -> str:
    """What `show` says of the run's ledger.head.json (as written: `verify --head` checks)."""
    from edgeddl.security.audit import read_head
    from edgeddl.security.keys import SecurityError
    from edgeddl.security.ledger import HEAD_FILE

    path = run_dir / HEAD_FILE
    if not path.exists():
        return ""
    try:
        head = read_head(path)
    except SecurityError as e:
        return f"{HEAD_FILE}: unreadable ({e})"
    return f"{HEAD_FILE}: {head.signer} signed a head of {head.entries} entries ({head.hash[:12]})"


def _default_key(run_dir: Path) -> Path:
    """coordinator.key in the `security.keys_dir` the run's resolved config names."""
    from edgeddl.config.security import SECURITY_COORDINATOR
    from edgeddl.security.keys import key_paths
    from edgeddl.security.ledger import CONFIG_FILE

    config = run_dir / CONFIG_FILE
    keys_dir = load_scenario(config, own_model=True, own_data=True).security.keys_dir
    if not keys_dir:
        raise ConfigError(
            f"--key: {config} names no security.keys_dir; pass --key FILE (the "
            f"coordinator's private {SECURITY_COORDINATOR}.key)"
        )
    return key_paths(Path(keys_dir), SECURITY_COORDINATOR)[0]
