"""Gradient compressors side by side: bytes, accuracy, time to accuracy on four networks.

Workload: MNIST-1D, the 1-D CNN at width 128 (105,738 parameters), the paper fleet (2 PC,
3 Jetson Nano, 6 Pi 4), star topology, global batch 256. Every compressor trains once, with
the same seed, data and batches; every step's request to the transport (who sends how many
bytes) is recorded. The maths does not depend on the network, so each network's virtual time
is obtained by laying the same recorded requests out again on that network's links with a
fresh `SimNetwork`: the same code and draws a run on that network would use.

Sections (each prints a table; `--json` keeps everything):

1. per compressor: gradient bytes per device and step, compression ratio, final accuracy,
   virtual time to the target accuracy on LAN, Wi-Fi, LTE and lossy WAN, and the speed-up
   over dense;
2. latency sweep (10-500 ms one way) and bandwidth sweep (1-1000 Mbit/s): time to target,
   dense over two-step;
3. network-aware adaptation on a mixed fleet (PCs on LAN, Jetsons on Wi-Fi, Pis on LTE):
   real runs (the density depends on the network), adaptive against fixed densities;
4. compressor CPU cost on a ResNet-32 gradient (464,154 values), against the slowest
   device profile's ResNet-32 step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

import edgeddl
from common import machine_info, make_scenario, print_table, warn_if_busy, write_json
from edgeddl.compress.base import Layout
from edgeddl.compress.codec import Codec
from edgeddl.compress.registry import build_compressor, build_phased
from edgeddl.config.compression import CompressorConfig
from edgeddl.config.compressors import COMPRESSORS
from edgeddl.config.loader import scenario_from_dict
from edgeddl.config.profiles import DEVICE_PROFILES, RESNET32_TRAIN_FLOPS_PER_SAMPLE
from edgeddl.config.schema import Scenario
from edgeddl.fleet.fleet import Fleet
from edgeddl.fleet.timeline import StepRequest
from edgeddl.models import build_model
from edgeddl.runtime.sim import network as sim

NETWORKS = ("lan", "wifi", "lte", "wan_lossy")
ADAPT_FIXED = (0.0005, 0.002, 0.005, 0.01, 0.05)
"""Fixed two-step densities the adaptive policy is measured against."""
ADAPT_SHARES = (0.1, 0.2, 0.35)
"""Target communication shares of the adaptive policy (0.2 is the default)."""
SETTINGS: dict[str, tuple[str, ...]] = {
    "none": (),
    "fp16": (),
    "int8": (),
    "qsgd": ("compression.levels=16",),
    "topk": ("compression.density=0.01",),
    "randomk": ("compression.density=0.1", "compression.error_feedback=off"),
    "threshold": ("compression.threshold=0.03",),
    "two_step": ("compression.density=0.002", "compression.values=fp16"),
    "dgc": ("compression.density=0.002", "compression.warmup_steps=100"),
    "signsgd": (),
    "powersgd": ("compression.rank=2",),
}
"""Each compressor's setting (two_step and dgc aim at >= 300x fewer bytes). Random-k runs
without error feedback: with it, the stale sums it releases make momentum SGD oscillate
(accuracy 0.1-0.25 after 200 steps at density 0.1)."""


def scenario(
    name: str, steps: int, links: tuple[str, str, str], extra: tuple[str, ...] = ()
) -> Scenario:
    sets = [
        "model.width=128",
        f"train.eval_every={max(steps // 40, 1)}",
        f"compression.compressor={name}",
        *SETTINGS.get(name, ()),
        *(f"fleet.devices.{i}.link={link}" for i, link in enumerate(links)),
        *extra,
    ]
    return make_scenario(num_steps=steps, threads=1, extra=tuple(sets))


def train(args: tuple[str, int, tuple[str, str, str], tuple[str, ...]]) -> dict[str, Any]:
    """One run; records every step's transport request. Runs in a worker process."""
    name, steps, links, extra = args
    requests: list[StepRequest] = []
    step = sim.SimNetwork.step

    def recording(self: sim.SimNetwork, req: StepRequest) -> Any:
        requests.append(req)
        return step(self, req)

    sim.SimNetwork.step = recording  # type: ignore[method-assign]
    wall = time.perf_counter()
    try:
        out = tempfile.mkdtemp(prefix=f"edgeddl-bench-{name}-")  # one folder per run
        result = edgeddl.run(scenario(name, steps, links, extra), out_dir=out, progress=False)
    finally:
        sim.SimNetwork.step = step  # type: ignore[method-assign]
    evals = [(r["step"], r["virtual_time_s"], r["test_accuracy"]) for r in _metrics(result.run_dir)]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "name": name,
        "links": links,
        "extra": extra,
        "requests": requests,
        "evals": evals,
        "summary": result.summary,
        "wall_s": time.perf_counter() - wall,
    }


def _metrics(run_dir: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def replay(requests: list[StepRequest], fleet: Fleet, seed: int) -> np.ndarray:
    """Virtual time at the end of every step, the recorded requests laid out on `fleet`."""
    transport = sim.SimNetwork(fleet, "star", seed)
    t, ends = 0.0, np.zeros(len(requests) + 1)
    for i, req in enumerate(requests):
        t = transport.step(dataclasses.replace(req, start_s=t)).end_s
        ends[i + 1] = t
    return ends


def time_to(evals: list[tuple[int, float, float]], ends: np.ndarray, target: float) -> float:
    """Virtual time of the first evaluation at or above `target` (inf if never)."""
    for step, _, acc in evals:
        if acc >= target:
            return float(ends[step])
    return float("inf")


def fleet_on(
    links: tuple[str, ...], extra_links: dict[str, dict[str, float]] | None = None
) -> Fleet:
    """The paper fleet with its three groups on `links` (built-in or from `extra_links`)."""
    raw = dataclasses.asdict(make_scenario())
    raw["links"].update(extra_links or {})
    for group, link in zip(raw["fleet"]["devices"], links, strict=True):
        group["link"] = link
    return Fleet.from_scenario(scenario_from_dict(raw))


def section_compressors(runs: dict[str, dict[str, Any]], target: float) -> list[dict[str, Any]]:
    rows, out = [], []
    dense = runs["none"]
    fleets = {net: fleet_on((net,) * 3) for net in NETWORKS}
    ends = {
        n: {net: replay(r["requests"], f, 0) for net, f in fleets.items()} for n, r in runs.items()
    }
    times_dense = {net: time_to(dense["evals"], ends["none"][net], target) for net in NETWORKS}
    for name, r in runs.items():
        c = r["summary"]["compression"]
        acc = r["summary"]["final_test_accuracy"]
        times = {net: time_to(r["evals"], ends[name][net], target) for net in NETWORKS}
        curves = {
            net: [[float(ends[name][net][step]), a] for step, _, a in r["evals"]]
            for net in NETWORKS
        }
        out.append(
            {
                "compressor": name,
                **c,
                "final_test_accuracy": acc,
                "time_to_target_s": times,
                "curves": curves,
            }
        )
        rows.append(
            [
                name,
                f"{c['gradient_bytes_per_device_step']:,.0f}",
                f"{c['compression_ratio']:.0f}x",
                f"{acc:.3f}",
                f"{(acc - dense['summary']['final_test_accuracy']) * 100:+.1f}",
            ]
            + [f"{times[n]:.1f} ({times_dense[n] / times[n]:.2f}x)" for n in NETWORKS]
        )
    print_table(
        f"compressors: time to {target:.2f} test accuracy in virtual s (speed-up over dense)",
        ["compressor", "bytes/step", "ratio", "accuracy", "pp vs dense", *NETWORKS],
        rows,
    )
    return out


def section_sweeps(runs: dict[str, dict[str, Any]], target: float) -> dict[str, Any]:
    results: dict[str, Any] = {"latency": [], "bandwidth": []}
    names = [n for n in ("none", "two_step", "dgc", "topk", "powersgd") if n in runs]
    for kind, values in (
        ("latency", (0.01, 0.05, 0.1, 0.2, 0.5)),
        ("bandwidth", (1, 10, 100, 1000)),
    ):
        rows = []
        for v in values:
            link = {
                "up_bps": 10e6,
                "down_bps": 30e6,
                "latency_s": 0.03,
                "jitter_s": 0.0,
                "loss": 0.0,
            }
            if kind == "latency":
                link["latency_s"] = v
            else:
                link["up_bps"] = link["down_bps"] = v * 1e6
            fleet = fleet_on(("sweep",) * 3, {"sweep": link})
            t = {
                n: time_to(runs[n]["evals"], replay(runs[n]["requests"], fleet, 0), target)
                for n in names
            }
            results[kind].append({"value": v, **t})
            rows.append(
                [f"{v}", *(f"{t[n]:.1f}" for n in names), f"{t['none'] / t['two_step']:.1f}x"]
            )
        unit = "one-way latency s (10/30 Mbit/s)" if kind == "latency" else "Mbit/s (30 ms)"
        print_table(
            f"{kind} sweep: time to {target:.2f} (virtual s)",
            [unit, *names, "dense/two_step"],
            rows,
        )
    return results


def section_adaptive(steps: int, target: float, workers: int) -> list[dict[str, Any]]:
    mixed = ("lan", "wifi", "lte")
    adapt = ("compression.adapt.enabled=true", "compression.adapt.max_density=0.05")
    jobs = [
        ("two_step", steps, mixed, (f"compression.density={d}", "compression.values=fp16"))
        for d in ADAPT_FIXED
    ]
    jobs += [
        (
            "two_step",
            steps,
            mixed,
            (f"compression.adapt.target_share={s}", "compression.values=fp16", *adapt),
        )
        for s in ADAPT_SHARES
    ]
    with ProcessPoolExecutor(workers) as pool:
        done = list(pool.map(train, jobs))
    rows, out = [], []
    for r in done:
        value = r["extra"][0].split("=")[1]
        label = f"adaptive, share {value}" if "adapt" in r["extra"][0] else value
        t = next((vt for _, vt, acc in r["evals"] if acc >= target), float("inf"))
        c = r["summary"]["compression"]
        out.append(
            {
                "setting": label,
                "curve": [[vt, acc] for _, vt, acc in r["evals"]],
                "time_to_target_s": t,
                **c,
                "final_test_accuracy": r["summary"]["final_test_accuracy"],
            }
        )
        rows.append(
            [
                label,
                f"{c['gradient_bytes_per_device_step']:,.0f}",
                f"{r['summary']['final_test_accuracy']:.3f}",
                f"{t:.1f}",
                f"{r['summary']['virtual_time_s'] / steps * 1000:.0f}",
            ]
        )
    print_table(
        f"adaptation, mixed fleet (PC LAN, Jetson Wi-Fi, Pi LTE): time to {target:.2f}",
        ["two_step density", "bytes/step", "accuracy", "time to target (s)", "ms/step"],
        rows,
    )
    return out


def _round_trip(name: str, layout: Layout, g: torch.Tensor) -> Callable[[], int]:
    """One device's compress + encode + decode + decompress (PowerSGD: its two rounds)."""
    cfg = CompressorConfig(compressor=name, density=0.002, threshold=3e-3)
    codec = Codec()
    if COMPRESSORS[name].num_phases > 1:
        phased, w = build_phased(cfg, layout, 0), torch.ones(1)

        def rounds() -> int:
            r = phased.run([g], w, 0)
            return sum(len(codec.encode(p[0])) for p in r.payloads)

        return rounds
    comp = build_compressor(cfg, layout, 0, 0)

    def once() -> int:
        data = codec.encode(comp.compress(g, 1))
        comp.decompress(codec.decode(data, g.numel()), 1)
        return len(data)

    return once


def section_cost(repeats: int) -> list[dict[str, Any]]:
    """CPU cost of compressing one ResNet-32 gradient, per compressor, 1 thread."""
    torch.set_num_threads(1)
    model = build_model("resnet32", input_shape=(3, 32, 32), num_classes=10)
    layout = Layout(tuple(tuple(p.shape) for p in model.parameters()))
    g = torch.randn(layout.numel) * 1e-3
    pi = DEVICE_PROFILES["rpi4"]
    step_s = pi.step_overhead_s + 32 * RESNET32_TRAIN_FLOPS_PER_SAMPLE / pi.flops_per_s
    rows, out = [], []
    for name in COMPRESSORS:
        fn = _round_trip(name, layout, g)
        num_bytes = fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        ms = 1000 * float(np.median(times))
        share = ms / 1000 / step_s
        out.append({"compressor": name, "ms": ms, "bytes": num_bytes, "share_of_pi_step": share})
        rows.append([name, f"{ms:.2f}", f"{num_bytes:,}", f"{100 * share:.2f} %"])
    print_table(
        f"CPU cost per ResNet-32 gradient (1 thread) vs a Pi 4 step, batch 32 ({step_s:.2f} s)",
        ["compressor", "ms", "bytes", "share of Pi step"],
        rows,
    )
    return out


def plot(results: dict[str, Any], out_dir: Path) -> None:
    """The figures of benchmarks/README.md, from the results JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    target = results["target_accuracy"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab20").colors
    for net, ax in zip(("lan", "lte"), axes, strict=True):
        ax.set_prop_cycle(color=colors[::2] + colors[1::2])
        for c in results["compressors"]:
            xs, ys = zip(*[p for p in c["curves"][net] if p[0] > 0], strict=True)
            ax.plot(xs, ys, label=c["compressor"], lw=2.2 if c["compressor"] == "two_step" else 1)
        ax.axhline(target, color="grey", ls=":", lw=1)
        ax.set(xscale="log", xlabel="virtual time (s)", ylabel="test accuracy", title=net)
        ax.set_ylim(0, 1)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "compression_curves.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for kind, ax in zip(("latency", "bandwidth"), axes, strict=True):
        rows = results["sweeps"][kind]
        names = [k for k in rows[0] if k != "value"]
        for n in names:
            ax.plot([r["value"] for r in rows], [r[n] for r in rows], marker="o", label=n)
        xlabel = (
            "one-way latency (s), 10/30 Mbit/s"
            if kind == "latency"
            else "bandwidth (Mbit/s), 30 ms"
        )
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=f"time to {target:.3f} (s)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "compression_sweeps.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for a in results["adaptive"]:
        xs, ys = zip(*a["curve"], strict=True)
        ax.plot(xs, ys, label=a["setting"], lw=2.2 if "adaptive" in a["setting"] else 1)
    ax.axhline(target, color="grey", ls=":", lw=1)
    ax.set(xlabel="virtual time (s)", ylabel="test accuracy", title="mixed fleet: two_step density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "compression_adaptive.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument(
        "--target", type=float, default=0.0, help="accuracy to reach (0: 0.97 x dense final)"
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke test: 60 steps, 4 compressors")
    ap.add_argument("--json", default="benchmarks/results/compression.json")
    ap.add_argument("--plot-only", action="store_true", help="redraw the figures from --json")
    ap.add_argument(
        "--adaptive-only",
        action="store_true",
        help="run the adaptation section again into the existing --json (same target)",
    )
    args = ap.parse_args()
    figures = Path(args.json).parent
    if args.plot_only:
        plot(json.loads(Path(args.json).read_text()), figures)
        return
    if args.adaptive_only:
        results = json.loads(Path(args.json).read_text())
        results["adaptive"] = section_adaptive(
            results["steps"], results["target_accuracy"], args.workers
        )
        write_json(args.json, results)
        plot(results, figures)
        return
    warn_if_busy()
    steps = 60 if args.quick else args.steps
    names = ["none", "two_step", "dgc", "powersgd"] if args.quick else list(SETTINGS)
    cost = section_cost(3 if args.quick else 20)
    with ProcessPoolExecutor(args.workers) as pool:
        done = list(pool.map(train, [(n, steps, ("lan",) * 3, ()) for n in names]))
    runs = {r["name"]: r for r in done}
    target = args.target or round(0.97 * runs["none"]["summary"]["final_test_accuracy"], 3)
    table = section_compressors(runs, target)
    sweeps = section_sweeps(runs, target)
    adaptive = section_adaptive(steps, target, args.workers)
    results = {
        "machine": machine_info(1),
        "steps": steps,
        "target_accuracy": target,
        "cost": cost,
        "compressors": table,
        "sweeps": sweeps,
        "adaptive": adaptive,
        "wall_s": {n: r["wall_s"] for n, r in runs.items()},
    }
    write_json(args.json, results)
    plot(results, figures)


if __name__ == "__main__":
    main()
