"""`edgeddl infer quantize RUN_DIR`: an int8 model for deployment, with or without the data.

Loads the run's config.resolved.toml and model.pt, quantizes the model to int8 calibrated
three ways (inputs synthesised from its BatchNorm statistics, real training samples, plain
noise), writes the chosen one, and prints float against int8: test accuracy, size, batch-1
latency on this CPU and scaled to the fleet's device profiles. torch is imported only when
the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeddl.config.loader import ConfigError
from edgeddl.config.schema import DeviceProfile, Scenario

DEFAULT_OUT = "model.int8.pt"


QUANTIZE_HELP = "post-training int8 quantization of a run's model, calibrated without its data"


def quantize_args(q: argparse.ArgumentParser) -> None:
    """The arguments of `edgeddl infer quantize` (listed in cli/infer.py's ACTIONS)."""
    q.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder")
    q.add_argument(
        "--calibration",
        choices=("synthetic", "real", "noise"),
        default="synthetic",
        help="the int8 model to write: calibrated on inputs synthesised from the model's "
        "BatchNorm statistics (no data), on training samples, or on Gaussian noise; the "
        "table compares all that apply (default: %(default)s)",
    )
    q.add_argument(
        "--samples", type=int, default=256, help="calibration samples (default: %(default)s)"
    )
    q.add_argument(
        "--steps",
        type=int,
        default=200,
        help="optimiser steps synthesising the inputs (default: %(default)s)",
    )
    q.add_argument(
        "--backend",
        choices=("qnnpack", "x86"),
        default="qnnpack",
        help="int8 kernels: qnnpack (ARM boards such as a Raspberry Pi; also runs on x86) or "
        "x86 (fbgemm, x86 CPUs only; default: %(default)s)",
    )
    q.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"file to write (default: RUN_DIR/{DEFAULT_OUT})",
    )
    q.add_argument(
        "--this-machine",
        default="",
        metavar="PROFILE",
        help="device profile standing for this CPU when scaling latencies to the fleet "
        "(default: measure it, as `edgeddl calibrate` does, single-threaded: ~6 s)",
    )


def cmd_quantize(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from edgeddl.inference.int8_deploy import (
        CALIBRATIONS,
        compare,
        fleet_profiles,
        load_run,
        profile_scales,
        require_batchnorm,
        variant_header,
        variant_rows,
    )
    from edgeddl.inference.quantize import load_quantized, save_quantized
    from edgeddl.inference.synthesize import SynthesisConfig, batchnorm_layers

    try:
        synthesis = SynthesisConfig(num_samples=args.samples, num_steps=args.steps)
    except ValueError as e:
        raise ConfigError(f"--samples/--steps: {e}") from None
    if args.calibration == "synthetic":
        require_batchnorm(args.run_dir)  # first: loading data and measuring take seconds
    run = load_run(args.run_dir)
    profiles = fleet_profiles(run.scenario)
    here = _this_machine(args.this_machine, run.scenario)
    has_bn = bool(batchnorm_layers(run.model))
    calibrations = [k for k in CALIBRATIONS if k != "synthetic" or has_bn]
    variants = compare(
        run.model,
        run.train,
        run.test,
        calibrations=calibrations,
        backend=args.backend,
        synthesis=synthesis,
    )
    chosen = next(v for v in variants if v.name == f"int8 {args.calibration}")
    out = args.out or args.run_dir / DEFAULT_OUT
    save_quantized(out, run.spec(args.backend), chosen.model)
    try:
        load_quantized(out)  # what was written must load again
    except ValueError as e:
        raise ConfigError(str(e)) from None
    scales = profile_scales(run.model, run.info.input_shape, here, profiles)

    table = Table(
        *variant_header(scales),
        title=f"{run.scenario.model.name} float vs int8 ({args.backend}), batch 1; "
        "device columns: ms per sample",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for column in table.columns:
        column.no_wrap = True
    for row in variant_rows(variants, scales):
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(
        "ratio: float file size / this one. BN loss: gap between the calibration inputs' "
        "activations and the model's BatchNorm statistics. CPU us: median of 200 batch-1 "
        "runs here, 1 thread, the models taking turns. Device ms: CPU us x the device's "
        "predicted forward time over "
        f"this machine's (FLOPs and per-op overhead; this machine: {here.source}), assuming "
        "int8 gains there what it gains here."
    )
    console.print(f"wrote {out} ({chosen.name}, {chosen.size_bytes:,} bytes)")
    return 0


def _this_machine(name: str, scenario: Scenario) -> DeviceProfile:
    """The profile standing for this CPU: named, or measured by calibrate's probe."""
    from edgeddl.config.profiles import DEVICE_PROFILES

    if name:
        known = {**DEVICE_PROFILES, **scenario.profiles}
        if name not in known:
            raise ConfigError(f"--this-machine: unknown profile {name!r}; allowed: "
                              f"{', '.join(known)}")  # fmt: skip
        return known[name]
    import torch

    from edgeddl.models.calibrate import calibrate_profile

    threads = torch.get_num_threads()
    try:
        return calibrate_profile(threads=1)[0]
    finally:
        torch.set_num_threads(threads)
