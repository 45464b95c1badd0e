"""Robust aggregation under attack: final accuracy of each rule against each misbehaviour.

Goal (trust issue): with f misbehaving devices of n (f < n/4), median or trimmed mean keeps
the final accuracy within 1 pp of the clean run while the plain mean collapses.

One fleet of n = 9 simulated Raspberry Pi 4s on Wi-Fi, MNIST-1D, the 1-D CNN, data-parallel
on the star, the same seed, data and steps for every run. For each rule (mean, median,
trimmed mean, Krum, Multi-Krum; all told f = 2, so trimmed mean drops 2 values at each end
and Multi-Krum averages the best n - 2) the fleet trains once clean, then with f = 1 and
f = 2 of its devices misbehaving in each way: sign flip (-update), scaled (update x -10),
noise (Gaussian of 10x the honest update's RMS, instead of it), label flip (trained on
y -> 9 - y), free rider (zeros). Each cell is the final test accuracy (1000 samples);
every run is printed and written with its rejections and wall time.

    python benchmarks/robust_aggregation.py            # ~8 min on 2 busy cores
    python benchmarks/robust_aggregation.py --quick    # ~1.5 min: median and mean, f = 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

from common import load_data, machine_info, print_table, source_version, write_json  # type: ignore[import-not-found]
from edgeddl import run
from edgeddl.config.loader import scenario_from_dict

RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum")
BEHAVIORS = {
    "sign_flip": 1.0,
    "scaled": -10.0,
    "noise": 10.0,
    "label_flip": 1.0,
    "free_rider": 1.0,
}
"""Each misbehaviour and its `behavior_scale`."""
NUM_DEVICES = 9
ASSUMED_F = 2


def scenario_raw(rule: str, behavior: str, f: int, steps: int) -> dict[str, Any]:
    devices: list[dict[str, Any]] = [
        {"name": "pi", "profile": "rpi4", "link": "wifi", "count": NUM_DEVICES - f}
    ]
    if f:
        devices.append(
            {
                "name": "bad",
                "profile": "rpi4",
                "link": "wifi",
                "count": f,
                "behavior": behavior,
                "behavior_scale": BEHAVIORS[behavior],
            }
        )
    robust: dict[str, Any] = {"rule": rule}
    if rule in ("trimmed_mean", "krum", "multi_krum"):
        robust["num_byzantine"] = ASSUMED_F
    return {
        "run": {"name": "robust", "seed": 0, "threads": 1},
        "fleet": {"devices": devices},
        "data": {"dataset": "mnist1d"},
        "model": {"name": "cnn1d"},
        "train": {
            "global_batch": 64 * NUM_DEVICES,
            "num_steps": steps,
            "eval_every": steps,
            "lr": 0.1,
        },
        "robust": robust,
    }


def one_run(rule: str, behavior: str, f: int, steps: int, data: Any) -> dict[str, Any]:
    scenario = scenario_from_dict(scenario_raw(rule, behavior, f, steps))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(scenario, train_set=data[0], test_set=data[1], out_dir=tmp, progress=False)
    s = result.summary
    return {
        "rule": rule,
        "behavior": behavior if f else "clean",
        "num_misbehaving": f,
        "final_accuracy": s["final_test_accuracy"],
        "num_rejected": s.get("robust", {}).get("num_rejected", 0),
        "num_skipped_steps": len(s.get("robust", {}).get("skipped_steps", [])),
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="mean and median, f = 2 only")
    p.add_argument("--json", default="")
    args = p.parse_args()
    rules = ("mean", "median") if args.quick else RULES
    fs = (2,) if args.quick else (1, 2)
    data = load_data(scenario_from_dict(scenario_raw("mean", "", 0, args.steps)))
    start = time.perf_counter()
    results = []
    for rule in rules:
        results.append(one_run(rule, "", 0, args.steps, data))
        print(f"{rule} clean: {results[-1]['final_accuracy']:.3f}", flush=True)
        for behavior in BEHAVIORS:
            for f in fs:
                results.append(one_run(rule, behavior, f, args.steps, data))
                r = results[-1]
                print(
                    f"{rule} {behavior} f={f}: {r['final_accuracy']:.3f} "
                    f"({r['num_rejected']} rejected, {r['wall_s']:.1f} s)",
                    flush=True,
                )
    total_s = time.perf_counter() - start
    acc = {(r["rule"], r["behavior"], r["num_misbehaving"]): r["final_accuracy"] for r in results}
    clean_mean = acc[("mean", "clean", 0)]
    columns = ["rule", "clean"] + [f"{b} f={f}" for b in BEHAVIORS for f in fs]
    rows = [
        [rule, f"{acc[(rule, 'clean', 0)]:.3f}"]
        + [f"{acc[(rule, b, f)]:.3f}" for b in BEHAVIORS for f in fs]
        for rule in rules
    ]
    print_table(
        f"final test accuracy, n = {NUM_DEVICES}, {args.steps} steps "
        f"(clean mean {clean_mean:.3f}; {total_s / 60:.1f} min)",
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
                "behavior_scales": BEHAVIORS,
                "total_wall_s": total_s,
                "source": source_version(),
                "machine": machine_info(1),
                "results": results,
            },
        )


if __name__ == "__main__":
    main()
