"""Distributed inference: the planner's split against all-on-one-device and an equal split.

For ResNet-32 (CIFAR-shaped 3x32x32 input, untrained seeded weights: timing does not depend
on them) and the 1-D CNN (MNIST-1D 1x40), on four chains of Pi 4, Jetson Nano and PC boards
(the first holds the input, like a sensor), every device on LAN, Wi-Fi or LTE (the built-in
link profiles), three plans:

* `best latency` / `best throughput`: the planner's optimum for that objective;
* `first device`: everything on the first Pi;
* `equal split`: the same number of layers on each device of the chain.

Each plan is both predicted (the planner's per-sample latency, and its throughput over N
samples, N / (latency + (N - 1) bottleneck), exact for a tandem of FIFO stages) and executed
on the simulated fleet (`inference.simulate`: real outputs, virtual clock, fp32, micro-batch
1, links without jitter or loss so that both must agree; `agree` checks it to 1e-9).
Ratios compare the best plan with the two baselines, measured in the same run.

    python benchmarks/inference.py [--json benchmarks/results/inference.json]   # ~30 s
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from common import console, machine_info, print_table, write_json
from edgeddl import load_scenario
from edgeddl.fleet.fleet import Fleet
from edgeddl.inference.plan import evaluate_cuts, plan_split
from edgeddl.inference.profile import chain_devices, layer_costs
from edgeddl.inference.simulate import PipelineConfig, simulate
from edgeddl.inference.stages import single_device_outputs
from edgeddl.models import build_model
from edgeddl.models.layers import model_layers

CHAINS = (
    ("pi-0", "pi-1", "jetson-0", "pc-0"),
    ("pi-0", "jetson-0"),
    ("pi-0", "pc-0"),
    ("jetson-0", "jetson-1", "jetson-2"),
)
MODELS = {"resnet32": (3, 32, 32), "cnn1d": (1, 40)}
LINKS = ("lan", "wifi", "lte")


def fleet_on(link: str) -> Fleet:
    sets = [f"fleet.devices.{g}.link={link}" for g in range(3)]  # pc, jetson, pi groups
    return Fleet.from_scenario(load_scenario("paper_fleet", sets))


def measure(
    model_name: str, link: str, chain_names: tuple[str, ...], num_samples: int
) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    shape = MODELS[model_name]
    model = build_model(model_name, input_shape=shape, num_classes=10).eval()
    layers, costs = model_layers(model), layer_costs(model, shape)
    fleet = fleet_on(link)
    chain = chain_devices(fleet, list(chain_names))
    n, m = len(costs), len(chain)
    x = torch.randn(num_samples, *shape, generator=torch.Generator().manual_seed(1))
    reference = single_device_outputs(model, x, 1)
    plans = {
        "best latency": plan_split(costs, chain, "latency"),
        "best throughput": plan_split(costs, chain, "throughput"),
        "first device": evaluate_cuts(costs, chain, [0] + [n] * m),
        "equal split": evaluate_cuts(costs, chain, [round(i * n / m) for i in range(m + 1)]),
    }
    rows = []
    for label, plan in plans.items():
        assert plan is not None, f"{label} does not fit"
        cuts = (*(s for s, _ in plan.segments), n)
        cfg = PipelineConfig(link_noise=False, cuts=cuts)
        sim = simulate(layers, costs, fleet, list(chain_names), x, cfg)
        predicted_tput = num_samples / (plan.latency_s + (num_samples - 1) * plan.bottleneck_s)
        rows.append({
            "model": model_name, "link": link, "chain": "->".join(chain_names), "plan": label,
            "devices": "+".join(
                c for c, (s, e) in zip(chain_names, plan.segments, strict=True) if e > s
            ),
            "latency_pred_ms": plan.latency_s * 1e3, "latency_sim_ms": sim.latency_s[0] * 1e3,
            "tput_pred": predicted_tput, "tput_sim": sim.throughput,
            "tput_limit": plan.throughput,
            "agree": math.isclose(plan.latency_s, sim.latency_s[0], rel_tol=1e-9)
            and math.isclose(predicted_tput, sim.throughput, rel_tol=1e-9),
            "identical": bool(torch.equal(sim.outputs, reference)),
        })  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32, help="samples streamed per plan")
    ap.add_argument("--json", default="", help="write the results here")
    args = ap.parse_args()
    results = [
        r
        for chain in CHAINS
        for m in MODELS
        for link in LINKS
        for r in measure(m, link, chain, args.samples)
    ]
    print_table(
        f"plans, {args.samples} samples, fp32, micro-batch 1",
        ["chain", "model", "link", "plan", "devices", "latency ms pred/sim",
         "samples/s pred/sim", "agree", "identical"],
        [[r["chain"], r["model"], r["link"], r["plan"], r["devices"],
          f"{r['latency_pred_ms']:.3f} / {r['latency_sim_ms']:.3f}",
          f"{r['tput_pred']:,.1f} / {r['tput_sim']:,.1f}", r["agree"], r["identical"]]
         for r in results],
    )  # fmt: skip
    ratios = []
    for chain in ("->".join(c) for c in CHAINS):
        for m in MODELS:
            for link in LINKS:
                by = {
                    r["plan"]: r
                    for r in results
                    if (r["chain"], r["model"], r["link"]) == (chain, m, link)
                }
                lat, tput = by["best latency"], by["best throughput"]
                ratios.append([
                    chain, m, link,
                    f"{by['first device']['latency_sim_ms'] / lat['latency_sim_ms']:.2f}x",
                    f"{by['equal split']['latency_sim_ms'] / lat['latency_sim_ms']:.2f}x",
                    f"{tput['tput_sim'] / by['first device']['tput_sim']:.2f}x",
                    f"{tput['tput_sim'] / by['equal split']['tput_sim']:.2f}x",
                ])  # fmt: skip
    print_table(
        "best plan against the baselines (simulated)",
        ["chain", "model", "link", "latency: first/best", "latency: equal/best",
         "throughput: best/first", "throughput: best/equal"],
        ratios,
    )  # fmt: skip
    if not all(r["agree"] and r["identical"] for r in results):
        console.print("[red]prediction and simulation disagree, or outputs differ[/red]")
    if args.json:
        write_json(args.json, {"machine": machine_info(torch.get_num_threads()),
                               "samples": args.samples, "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
