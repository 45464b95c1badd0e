"""Robust aggregation under attack: final accuracy of each variant against each misbehaviour.

Goal (trust issue): with f misbehaving devices of n (f < n/4), median or trimmed mean keeps
the final accuracy within 1 pp of the clean run while the plain mean collapses.

One fleet of n = 9 simulated Raspberry Pi 4s on Wi-Fi, MNIST-1D, the 1-D CNN, data-parallel
on the star, global batch 576 (64 a device), lr 0.1, momentum 0.9, 600 steps (where the
clean run's accuracy has levelled off), the same data for every run. A variant is a rule
with its options, written `rule[+momentum][+nnm|+bucketing]` (`[robust]` device_momentum,
pre_aggregation; every rule but the mean is told f = 2). Each trains once clean, then with
f = 1 or 2 of its devices sending -update (sign flip), update x -10 (scaled), Gaussian noise
of 10x the honest update's RMS (noise), an honest update on labels y -> 9 - y (label flip)
or zeros (free rider). Cells: final test accuracy (1000 samples), the mean over `--seeds`.

Two references: the clean mean (every device honest) and "honest only", an oracle that
drops the f misbehaving devices' updates and averages the n - f honest ones (they are made
`nan` devices behind the screen). What the honest devices reach on their own is the best any
rule can do: the f devices' shards are lost to training.

    python benchmarks/robust_aggregation.py            # ~16 min on 2 busy cores
    python benchmarks/robust_aggregation.py --quick    # ~3 min: 3 variants, f = 2
    # ~17 min: 3 seeds of the mixing variants against the two main attacks
    python benchmarks/robust_aggregation.py --seeds 3 --attacks sign_flip,scaled \\
        --variants mean,median+nnm,trimmed_mean+nnm,median+momentum+nnm,trimmed_mean+momentum+nnm
    # ~22 min: four times the data (--samples), twice the steps
    python benchmarks/robust_aggregation.py --samples 20000 --steps 1200 --seeds 3 \\
        --attacks sign_flip,scaled --variants median+nnm,trimmed_mean+nnm
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import load_data, machine_info, print_table, source_version, write_json  # type: ignore[import-not-found]
from edgeddl import run
from edgeddl.config.loader import scenario_from_dict

NUM_DEVICES = 9
ASSUMED_F = 2
BEHAVIORS = {
    "sign_flip": 1.0,
    "scaled": -10.0,
    "noise": 10.0,
    "label_flip": 1.0,
    "free_rider": 1.0,
}
"""Each misbehaviour and its `behavior_scale`."""
ATTACKS = (
    ("sign_flip", 1),
    ("sign_flip", 2),
    ("scaled", 1),
    ("scaled", 2),
    ("noise", 2),
    ("label_flip", 2),
    ("free_rider", 2),
)
"""The columns: (behaviour, number of misbehaving devices)."""
VARIANTS = (
    "mean",
    "median",
    "trimmed_mean",
    "multi_krum",
    "median+momentum",
    "median+momentum+bucketing",
    "median+nnm",
    "median+momentum+nnm",
    "trimmed_mean+nnm",
)
QUICK_VARIANTS = ("mean", "median", "trimmed_mean+nnm")
ORACLE = "honest only"


def robust_section(variant: str) -> dict[str, Any]:
    """`[robust]` of a variant `rule[+momentum][+nnm|+bucketing]`, or of the oracle."""
    if variant == ORACLE:  # a screen (any bound) refuses the nan devices; the mean of the rest
        return {"rule": "mean", "max_update_norm": 1e30}
    rule, *options = variant.split("+")
    robust: dict[str, Any] = {"rule": rule}
    if rule != "mean":
        robust["num_byzantine"] = ASSUMED_F
    for option in options:
        if option == "momentum":
            robust["device_momentum"] = True
        else:
            robust["pre_aggregation"] = option
    return robust


def scenario_raw(
    variant: str, behavior: str, f: int, steps: int, seed: int, samples: int = 0
) -> dict[str, Any]:
    devices: list[dict[str, Any]] = [
        {"name": "pi", "profile": "rpi4", "link": "wifi", "count": NUM_DEVICES - f}
    ]
    if f:
        bad = {"name": "bad", "profile": "rpi4", "link": "wifi", "count": f}
        devices.append(bad | {"behavior": behavior, "behavior_scale": BEHAVIORS.get(behavior, 1)})
    return {
        "run": {"name": "robust", "seed": seed, "threads": 1},
        "fleet": {"devices": devices},
        "data": {"dataset": "mnist1d", "num_samples": samples},
        "model": {"name": "cnn1d"},
        "train": {
            "global_batch": 64 * NUM_DEVICES,
            "num_steps": steps,
            "eval_every": min(200, steps),
            "lr": 0.1,
            "momentum": 0.9,
        },
        "robust": robust_section(variant),
    }


def one_run(
    variant: str, behavior: str, f: int, steps: int, seed: int, data: Any, samples: int
) -> dict[str, Any]:
    scenario = scenario_from_dict(scenario_raw(variant, behavior, f, steps, seed, samples))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(scenario, train_set=data[0], test_set=data[1], out_dir=tmp, progress=False)
        lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
    s = result.summary
    return {
        "variant": variant,
        "behavior": behavior if f else "clean",
        "num_misbehaving": f,
        "seed": seed,
        "final_accuracy": s["final_test_accuracy"],
        "accuracy_by_step": {r["step"]: r["test_accuracy"] for r in map(json.loads, lines)},
        "num_rejected": s.get("robust", {}).get("num_rejected", 0),
        "num_skipped_steps": len(s.get("robust", {}).get("skipped_steps", [])),
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1; cells are their mean")
    p.add_argument("--variants", default="", help="comma-separated; default: all listed")
    p.add_argument("--attacks", default="", help="comma-separated behaviours; default: all")
    p.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_VARIANTS)}; f = 2")
    p.add_argument("--samples", type=int, default=0, help="MNIST-1D samples, 80/20 (0: its 5000)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    attacks = [(b, f) for b, f in ATTACKS if not args.attacks or b in args.attacks.split(",")]
    if args.quick:
        variants = list(QUICK_VARIANTS)
        attacks = [(b, f) for b, f in attacks if f == 2 and b in ("sign_flip", "scaled")]
    fs = sorted({f for _, f in attacks})
    seeds = range(args.seeds)
    data = load_data(scenario_from_dict(scenario_raw("mean", "", 0, args.steps, 0, args.samples)))
    start = time.perf_counter()
    results = []
    cells = [("mean", "", 0)] + [(v, "", 0) for v in variants if v != "mean"]
    cells += [(v, b, f) for v in variants for b, f in attacks]
    cells += [(ORACLE, "nan", f) for f in fs]
    for variant, behavior, f in cells:
        for seed in seeds:
            r = one_run(variant, behavior, f, args.steps, seed, data, args.samples)
            results.append(r)
            print(
                f"{variant} {r['behavior']} f={f} seed {seed}: {r['final_accuracy']:.3f} "
                f"({r['num_rejected']} rejected, {r['wall_s']:.1f} s)",
                flush=True,
            )
    total_s = time.perf_counter() - start

    def acc(variant: str, behavior: str, f: int) -> float:
        return float(
            np.mean(
                [
                    r["final_accuracy"]
                    for r in results
                    if (r["variant"], r["behavior"], r["num_misbehaving"])
                    == (variant, behavior if f else "clean", f)
                ]
            )
        )

    clean = acc("mean", "", 0)
    oracle = {f: acc(ORACLE, "nan", f) for f in fs}
    columns = ["variant", "clean"] + [f"{b} f={f}" for b, f in attacks]
    columns += ["worst vs clean (pp)", "worst vs honest only (pp)"]
    rows = [[ORACLE, f"{clean:.3f}"] + [f"{oracle[f]:.3f}" for _, f in attacks] + ["", ""]]
    for v in dict.fromkeys(["mean", *variants]):
        row = [v, f"{acc(v, '', 0):.3f}"]
        if v not in variants:  # the mean, run clean only as the reference
            rows.append(row + [""] * (len(attacks) + 2))
            continue
        attacked = [acc(v, b, f) for b, f in attacks]
        worst_clean = min(attacked) - clean
        worst_oracle = min(a - oracle[f] for a, (_, f) in zip(attacked, attacks, strict=True))
        row += [f"{a:.3f}" for a in attacked]
        rows.append([*row, f"{100 * worst_clean:+.1f}", f"{100 * worst_oracle:+.1f}"])
    print_table(
        f"final test accuracy, n = {NUM_DEVICES}, {args.steps} steps, "
        f"{args.samples or 5000} MNIST-1D samples, mean of "
        f"{args.seeds} seed(s) ({total_s / 60:.1f} min)",
        columns,
        rows,
    )
    if args.json:
        write_json(
            args.json,
            {
                "num_devices": NUM_DEVICES,
                "assumed_f": ASSUMED_F,
                "steps": args.steps,
                "mnist1d_samples": args.samples or 5000,
                "seeds": args.seeds,
                "behavior_scales": BEHAVIORS,
                "total_wall_s": total_s,
                "source": source_version(),
                "machine": machine_info(1),
                "results": results,
            },
        )


if __name__ == "__main__":
    main()
