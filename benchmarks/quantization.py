"""Data-free int8 deployment: float against int8 calibrated on synthesised, real and noise inputs.

1. The 1-D CNN with BatchNorm (cnn1d_bn) trained on MNIST-1D by the simulator (a 3-device mix
   of the paper fleet, `--steps` steps), loaded back from its run folder as
   `edgeddl infer quantize` does; both int8 backends (qnnpack, x86).
2. A narrow ResNet-20 (width 8) trained briefly with plain torch on the CIFAR-shaped
   synthetic set (no CIFAR-10 is read: none is bundled), qnnpack.

Per variant: test accuracy, serialized size, BatchNorm-statistics loss of its calibration
inputs, median batch-1 latency on this CPU (one thread, the variants taking turns), and that
latency scaled to the paper fleet's profiles (see `edgeddl.inference.deploy`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import edgeddl
from common import machine_info, make_scenario, print_table, warn_if_busy, write_json
from edgeddl.config.profiles import DEVICE_PROFILES
from edgeddl.data import load_dataset
from edgeddl.inference.int8_deploy import (
    Variant,
    compare,
    load_run,
    profile_scales,
    variant_header,
    variant_rows,
)
from edgeddl.inference.synthesize import SynthesisConfig
from edgeddl.models import build_model
from edgeddl.models.calibrate import calibrate_profile

TARGETS = {name: DEVICE_PROFILES[name] for name in ("pc", "jetson_nano", "rpi4")}


def _record(variants: list[Variant], scales: dict[str, float]) -> list[dict[str, Any]]:
    return [
        {
            "variant": v.name,
            "accuracy": v.accuracy,
            "size_bytes": v.size_bytes,
            "calibration_bn_loss": v.calibration_loss,
            "cpu_latency_s": v.latency_s,
            "device_latency_s": {name: v.latency_s * s for name, s in scales.items()},
        }
        for v in variants
    ]


def _train_resnet(steps: int) -> tuple[torch.nn.Module, Any, Any]:
    train, test, info = load_dataset(
        "synthetic", num_samples=4000, input_shape=(3, 32, 32), num_classes=10
    )
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=info.input_shape, num_classes=10, width=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = train.tensors
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randint(0, len(x), (64,), generator=generator)
        loss = F.cross_entropy(model(x[pick]), y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), train, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="simulated training steps")
    parser.add_argument("--resnet-steps", type=int, default=150, help="ResNet SGD steps")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args()
    warn_if_busy()
    torch.set_num_threads(1)  # batch-1 latency is measured on one thread; train alike
    results: dict[str, Any] = {"machine": machine_info(1)}

    start = time.perf_counter()
    here, report = calibrate_profile(threads=1)
    results["this_machine"] = report
    print(f"this machine (1 thread): {report}")

    scenario = make_scenario(num_devices=3, model="cnn1d_bn", num_steps=args.steps, threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        edgeddl.run(scenario, out_dir=Path(tmp) / "run", progress=False)
        run = load_run(Path(tmp) / "run")
    print(f"trained cnn1d_bn ({args.steps} simulated steps) in {time.perf_counter() - start:.0f} s")
    scales = profile_scales(run.model, run.info.input_shape, here, TARGETS)
    for backend in ("qnnpack", "x86"):
        variants = compare(run.model, run.train, run.test, backend=backend)
        print_table(
            f"cnn1d_bn on MNIST-1D, int8 {backend}; device columns: ms per sample",
            variant_header(scales),
            variant_rows(variants, scales),
        )
        results[f"cnn1d_bn_{backend}"] = _record(variants, scales)

    model, train, test = _train_resnet(args.resnet_steps)
    shape = tuple(train.tensors[0].shape[1:])
    scales = profile_scales(model, shape, here, TARGETS)
    synthesis = SynthesisConfig(num_samples=128, num_steps=100)
    variants = compare(model, train, test, backend="qnnpack", synthesis=synthesis, repeats=50)
    print_table(
        f"resnet20 width 8 on synthetic 3x32x32 ({args.resnet_steps} steps), int8 qnnpack; "
        "device columns: ms per sample",
        variant_header(scales),
        variant_rows(variants, scales),
    )
    results["resnet20_w8_qnnpack"] = _record(variants, scales)
    results["wall_s"] = time.perf_counter() - start
    print(f"total {results['wall_s']:.0f} s")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
