"""`edgeddl profiles`, `edgeddl scenarios` and `edgeddl compressors`: what ships with edgeddl,
listed."""

from __future__ import annotations

import argparse

from edgeddl.config.loader import (
    BUNDLED_DIR,
    bundled_names,
    load_scenario,
    scenario_description,
)


def add_catalog_parsers(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("profiles", help="list the built-in device and link profiles")
    sub.add_parser("scenarios", help="list the bundled scenarios (edgeddl run NAME)")
    sub.add_parser("compressors", help="list the gradient compressors and what each can do")


def cmd_profiles(_: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgeddl.config.profiles import DEVICE_PROFILES, LINK_PROFILES

    dev = Table("device profile", "GFLOP/s", "memory GiB", "us/op", "source", title="devices")
    for name, d in DEVICE_PROFILES.items():
        dev.add_row(
            name,
            f"{d.flops_per_s / 1e9:.1f}",
            f"{d.memory_bytes / 2**30:.0f}",
            f"{d.op_overhead_s * 1e6:.0f}",
            d.source,
        )
    lnk = Table(
        "link profile", "up Mbit/s", "down Mbit/s", "latency ms", "jitter ms", "loss", title="links"
    )
    for name, x in LINK_PROFILES.items():
        lnk.add_row(
            name,
            f"{x.up_bps / 1e6:g}",
            f"{x.down_bps / 1e6:g}",
            f"{x.latency_s * 1e3:g}",
            f"{x.jitter_s * 1e3:g}",
            f"{x.loss:.2%}",
        )
    console = Console()
    console.print(dev)
    console.print(lnk)
    return 0


def cmd_scenarios(_: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Column, Table
    from rich.text import Text

    table = Table(
        Column("scenario", no_wrap=True),
        Column("devices", no_wrap=True),
        "description",  # the one column that gives way: each cut to one line
        title="bundled scenarios",
    )
    for name in bundled_names():
        devices = len(load_scenario(name).fleet.device_names())
        description = scenario_description(BUNDLED_DIR / f"{name}.toml")
        table.add_row(name, str(devices), Text(description, no_wrap=True, overflow="ellipsis"))
    console = Console()
    console.print(table)
    console.print("run one: edgeddl run NAME; see it in full: edgeddl validate NAME")
    return 0


def cmd_compressors(_: argparse.Namespace) -> int:
    """The registry (config/compressors.py), as the scenario checks read it."""
    from rich.console import Console
    from rich.table import Column, Table

    from edgeddl.config.compressors import COMPRESSORS

    table = Table(
        Column("compressor", no_wrap=True),
        Column("rounds", no_wrap=True),
        Column("ring", no_wrap=True),
        Column("adapt", no_wrap=True),
        Column("split", no_wrap=True),
        Column("memory", no_wrap=True),
        "parameters",
        "sends",
        title="compressors: [compression] compressor = NAME",
    )
    for name, spec in COMPRESSORS.items():
        memory = "momentum" if spec.owns_momentum else "on" if spec.feedback_by_default else "off"
        table.add_row(
            name,
            str(spec.num_phases),
            "yes" if spec.allreduce else "",
            "yes" if spec.adapt_density else "",
            "yes" if spec.cut_tensors else "",
            memory,
            ", ".join(spec.params),
            spec.about,
        )
    console = Console(markup=False, highlight=False)
    console.print(table)
    console.print(
        'ring: payloads sum on the way (train.topology = "ring"); adapt: [compression.adapt] '
        "sets each device's density; split: usable on cut tensors; memory: what "
        'error_feedback = "auto" keeps'
    )
    return 0


CATALOG_COMMANDS = {
    "profiles": cmd_profiles,
    "scenarios": cmd_scenarios,
    "compressors": cmd_compressors,
}
