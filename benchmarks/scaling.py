"""Scaling efficiency of the paper fleet: aggregate throughput over the sum of standalone ones.

For the paper-shaped 11-device fleet (2 PCs, 3 Jetson Nanos, 6 Raspberry Pi 4s on a LAN), the
ratio is the fleet's training throughput (``summary["samples_per_virtual_s"]``, samples per
virtual second) divided by the sum of what each of its devices trains alone. Goal: >= 0.95
with balanced batches. Everything here is virtual time, so the numbers are deterministic up to
the links' seeded jitter and do not depend on how busy the simulating machine is.

Standalone throughput, the choice made here: a device alone trains the *global batch* (or as
much of it as fits its memory) with no coordinator and no peers, so it pays data loading and
compute only. It is measured by running a one-device ring scenario with that device's profile
(one member: no all-reduce, no model download, nothing on the wire) and checked against the
fleet model's formula ``B / (data_s(B) + compute_s(B))``. A one-device *star* would still pay
the transfers to and from the coordinator, which a lone device does not have. The global batch
is the device's best case (its fixed per-step costs spread over the most samples), so this is
the demanding denominator. The table also gives the ratio against each device training alone
at the share it actually got in the fleet: that isolates the cost of synchronisation and
communication from the cost of the smaller per-device batch.

    python benchmarks/scaling.py --quick      # smoke test, < 60 s
    python benchmarks/scaling.py              # the reported table
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

import edgeddl
from common import (
    console,
    load_data,
    machine_info,
    make_scenario,
    print_table,
    warn_if_busy,
    write_json,
)
from edgeddl import Scenario
from edgeddl.config.schema import DeviceGroup, FleetConfig
from edgeddl.fleet.fleet import Fleet
from edgeddl.models import build_model, model_cost
from edgeddl.workload import sample_caps

GOAL_RATIO = 0.95
BALANCES = ("capability", "min_time", "equal")
TOPOLOGIES = ("star", "ring")
WORKLOADS = {
    # name: (model, dataset, global batch, steps, quick batch, quick steps)
    "cnn1d": ("cnn1d", "mnist1d", 256, 30, 256, 5),
    "resnet32": ("resnet32", "synthetic", 512, 4, 64, 1),
}


def run_scenario(
    sc: Scenario, train: TensorDataset, test: TensorDataset, tmp: Path
) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(dir=tmp))
    return edgeddl.run(sc, train_set=train, test_set=test, out_dir=out, progress=False).summary


def standalone(
    base: Scenario, train: TensorDataset, test: TensorDataset, tmp: Path
) -> dict[str, dict[str, Any]]:
    """Per device profile of the fleet: samples per virtual second training alone."""
    x, y = train.tensors
    shape = tuple(x.shape[1:])
    torch.manual_seed(base.run.seed)
    model = build_model(
        base.model.name, input_shape=shape, num_classes=int(y.max()) + 1, width=base.model.width
    )
    cost = model_cost(model, shape)
    sample_bytes = x[0].numel() * x.element_size()
    out: dict[str, dict[str, Any]] = {}
    for group in base.fleet.devices:
        if group.profile in out:
            continue
        fleet_cfg = FleetConfig(
            devices=[DeviceGroup(name=f"alone-{group.profile}", profile=group.profile)],
            coordinator=base.fleet.coordinator,
            failure_detection_s=base.fleet.failure_detection_s,
        )
        fleet = Fleet.from_scenario(dataclasses.replace(base, fleet=fleet_cfg))
        cap = int(sample_caps(fleet, cost, sample_bytes)[0])
        batch = min(base.train.global_batch, cap)
        train_cfg = dataclasses.replace(
            base.train, topology="ring", global_batch=batch, num_steps=1, eval_every=1
        )
        sc = dataclasses.replace(base, fleet=fleet_cfg, train=train_cfg)
        summary = run_scenario(sc, train, test, tmp)

        def at_share(b: float, fleet: Fleet = fleet) -> float:
            """Samples per virtual second of this device alone training a batch of `b`."""
            if b <= 0:
                return 0.0
            d, c = fleet.work_time_s(
                np.array([0]),
                np.array([b]),
                cost.train_flops_per_sample,
                sample_bytes,
                cost.ops_per_step,
            )
            return b / float(d[0] + c[0])

        formula = at_share(batch)
        out[group.profile] = {
            "batch": batch,
            "memory_cap": cap,
            "samples_per_virtual_s": summary["samples_per_virtual_s"],
            "formula_samples_per_virtual_s": formula,
            "bytes_on_wire": summary["bytes_up"] + summary["bytes_down"],
            "fleet": fleet,
        }

        out[group.profile]["at_share"] = at_share
    return out


def bench_workload(
    name: str, batch: int, steps: int, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    model, dataset = WORKLOADS[name][:2]
    base = make_scenario(
        model=model, dataset=dataset, global_batch=batch, num_steps=steps, threads=args.threads
    )
    train, test = load_data(base)
    t0 = time.perf_counter()
    alone = standalone(base, train, test, tmp)
    profile_of = [g.profile for g in base.fleet.devices for _ in range(g.count)]
    sum_alone = sum(alone[p]["samples_per_virtual_s"] for p in profile_of)
    rows = []
    for topology in args.topologies:
        for balance in args.balances:
            sc = make_scenario(
                model=model,
                dataset=dataset,
                global_batch=batch,
                num_steps=steps,
                topology=topology,
                balance=balance,
                threads=args.threads,
            )
            s = run_scenario(sc, train, test, tmp)
            shares = [d["samples"] / d["steps"] if d["steps"] else 0.0 for d in s["per_device"]]
            sum_at_share = sum(
                alone[p]["at_share"](b) for p, b in zip(profile_of, shares, strict=True)
            )
            br = s["breakdown_s"]
            total = sum(br.values()) or 1.0
            agg = s["samples_per_virtual_s"]
            rows.append(
                {
                    "workload": name,
                    "topology": topology,
                    "balance": balance,
                    "global_batch": batch,
                    "steps": s["num_steps"],
                    "step_virtual_ms": 1e3 * s["virtual_time_s"] / max(s["num_steps"], 1),
                    "aggregate_samples_per_virtual_s": agg,
                    "sum_standalone_samples_per_virtual_s": sum_alone,
                    "ratio": agg / sum_alone,
                    "meets_goal": bool(agg / sum_alone >= GOAL_RATIO),
                    "sum_standalone_at_own_share": sum_at_share,
                    "ratio_at_own_share": agg / sum_at_share if sum_at_share else float("nan"),
                    "shares": shares,
                    "fraction": {k: v / total for k, v in br.items()},
                }
            )
            r = rows[-1]
            console.print(
                f"  {name} {topology:4s} {balance:10s}: {agg:9.1f} samples/virtual s, "
                f"ratio {r['ratio']:.3f}"
            )
    return {
        "workload": name,
        "model": model,
        "dataset": dataset,
        "global_batch": batch,
        "steps": steps,
        "wall_s": time.perf_counter() - t0,
        "standalone": {
            p: {k: v for k, v in a.items() if k not in ("fleet", "at_share")}
            for p, a in alone.items()
        },
        "devices": profile_of,
        "rows": rows,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Paper fleet (11 devices): aggregate throughput over the sum of the devices' "
            f"standalone throughputs, per balance mode and topology (goal >= {GOAL_RATIO} "
            "balanced). Virtual time: deterministic, independent of this machine's speed."
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test (< 60 s): cnn1d 5 steps, ResNet-32 1 step at global batch 64",
    )
    p.add_argument(
        "--workloads",
        nargs="+",
        default=list(WORKLOADS),
        choices=list(WORKLOADS),
        help="cnn1d: 1-D CNN on MNIST-1D; resnet32: ResNet-32 on CIFAR-shaped "
        "synthetic tensors (the paper's workload); default: both",
    )
    p.add_argument(
        "--balances",
        nargs="+",
        default=list(BALANCES),
        choices=BALANCES,
        help="balance modes to run (default: all three)",
    )
    p.add_argument(
        "--topologies",
        nargs="+",
        default=list(TOPOLOGIES),
        choices=TOPOLOGIES,
        help="topologies to run (default: both)",
    )
    p.add_argument("--cnn1d-batch", type=int, default=None, help="global batch (default 256)")
    p.add_argument(
        "--cnn1d-steps", type=int, default=None, help="steps per fleet run (default 30; --quick 5)"
    )
    p.add_argument(
        "--resnet32-batch", type=int, default=None, help="global batch (default 512; --quick 64)"
    )
    p.add_argument(
        "--resnet32-steps",
        type=int,
        default=None,
        help="steps per fleet run (default 4; --quick 1); each trains the real "
        "model on the CPU, so keep it small",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for the real maths (default 1); affects wall time only ("
        "multi-threaded kernels stall when other processes share the cores)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warn_if_busy()
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="edgeddl-scaling-") as tmp_name:
        for name in args.workloads:
            _, _, batch, steps, qbatch, qsteps = WORKLOADS[name]
            batch = getattr(args, f"{name}_batch") or (qbatch if args.quick else batch)
            steps = getattr(args, f"{name}_steps") or (qsteps if args.quick else steps)
            console.print(f"{name}: global batch {batch}, {steps} steps per fleet run")
            results.append(bench_workload(name, batch, steps, args, Path(tmp_name)))

    for res in results:
        print_table(
            f"{res['workload']}: standalone throughput per device kind "
            f"(one-device ring, no communication)",
            [
                "profile",
                "count",
                "batch",
                "memory cap",
                "samples/virtual s",
                "formula",
                "bytes on wire",
            ],
            [
                [
                    p,
                    res["devices"].count(p),
                    a["batch"],
                    a["memory_cap"],
                    f"{a['samples_per_virtual_s']:.1f}",
                    f"{a['formula_samples_per_virtual_s']:.1f}",
                    a["bytes_on_wire"],
                ]
                for p, a in res["standalone"].items()
            ],
        )
    print_table(
        f"paper fleet: aggregate / sum of standalone throughputs (goal >= {GOAL_RATIO} balanced)",
        [
            "workload",
            "batch",
            "topology",
            "balance",
            "step ms (virtual)",
            "aggregate /s",
            "sum standalone /s",
            "ratio",
            "goal",
            "comm %",
            "idle %",
            "ratio vs own-share alone",
        ],
        [
            [
                r["workload"],
                r["global_batch"],
                r["topology"],
                r["balance"],
                f"{r['step_virtual_ms']:.2f}",
                f"{r['aggregate_samples_per_virtual_s']:.1f}",
                f"{r['sum_standalone_samples_per_virtual_s']:.1f}",
                f"{r['ratio']:.3f}",
                "met" if r["meets_goal"] else "missed",
                f"{100 * r['fraction']['communication']:.1f}",
                f"{100 * r['fraction']['idle']:.1f}",
                f"{r['ratio_at_own_share']:.3f}",
            ]
            for res in results
            for r in res["rows"]
        ],
    )
    met = [
        f"{r['workload']}/{r['topology']}/{r['balance']}"
        for res in results
        for r in res["rows"]
        if r["meets_goal"]
    ]
    console.print(f"rows meeting >= {GOAL_RATIO}: {', '.join(met) if met else 'none'}")
    console.print(f"total benchmark time {time.perf_counter() - started:.0f} s")
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "scaling",
                "goal_ratio": GOAL_RATIO,
                "args": vars(args),
                "machine": machine_info(args.threads),
                "results": results,
            },
        )


if __name__ == "__main__":
    main()
