"""Simulator overhead: wall time of `edgeddl.run` on N simulated devices over a plain PyTorch loop.

Both sides train the same model (same seeded initialisation) with the same optimizer (SGD with
momentum, as `DataParallel`) on the same samples in the same order (the index sequence the
simulator feeds is captured from one untimed run) with the same global batch, then evaluate
once on the same test set. Data is generated before timing and handed to both in memory.
The simulator's time is everything `edgeddl.run` does: model cost measurement, balancing,
partitioning, the virtual-clock bookkeeping of every step, and writing the run folder (files
and plots). Goal: simulated / plain <= 1.2 for N = 11 and N = 100.

Each configuration runs at two step counts, so ``t(S) = fixed + S * per_step`` separates the
per-step overhead from the fixed setup; an instrumented run breaks the setup down further.
Measurements repeat in alternating order and the best of each is kept.

    python benchmarks/sim_overhead.py --quick          # smoke test, < 60 s
    python benchmarks/sim_overhead.py --profile        # the full table and cProfile hot spots
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import pstats
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

import edgeddl
import edgeddl.runtime.sim.loop as loop
import edgeddl.runtime.sim.state as sim_state
import edgeddl.strategy.build as strategy_build
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
from edgeddl.models import build_model
from edgeddl.task import Classification

GOAL_RATIO = 1.2

# Functions `edgeddl.run` calls by these names, timed in the instrumented run, by category.
SETUP_PARTS = {
    "model_cost": "model_cost",
    "partition": "partition",
    "plot_metric": "plots",
    "plot_timeline": "plots",
    "write_text_atomic": "files",
    "write_json_atomic": "files",
    "write_jsonl_atomic": "files",
}


@dataclass
class Workload:
    model: str
    dataset: str
    topology: str
    device: torch.device
    threads: int


# ---------------------------------------------------------------------------------------------
# The two contestants


def fresh_model(scenario: Scenario, train: TensorDataset, device: torch.device) -> nn.Module:
    """The model `edgeddl.run` would build: seeded with the run's seed, then built."""
    x, y = train.tensors
    torch.manual_seed(scenario.run.seed)
    model = build_model(
        scenario.model.name,
        input_shape=tuple(x.shape[1:]),
        num_classes=int(y.max()) + 1,
        width=scenario.model.width,
    )
    return model.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy, computed as the simulator does (`Task.evaluate`, loss included)."""
    return Classification().evaluate(model, x, y)["test_accuracy"]


def plain_loop(
    model: nn.Module,
    scenario: Scenario,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
) -> float:
    """Plain PyTorch: gather each global batch, forward, backward, SGD step; evaluate once.

    No per-step `.item()`: the loss is never read back, as in a tuned training loop.
    """
    x, y, x_test, y_test = data
    t = scenario.train
    opt = torch.optim.SGD(
        model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
    )
    model.train()
    for r in rows:
        loss = nn.functional.cross_entropy(model(x[r]), y[r])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return evaluate(model, x_test, y_test)


def run_sim(
    scenario: Scenario,
    model: nn.Module,
    train: TensorDataset,
    test: TensorDataset,
    out_dir: Path,
    device: torch.device,
) -> dict[str, Any]:
    result = edgeddl.run(
        scenario, model=model, train_set=train, test_set=test, out_dir=out_dir, progress=False
    )
    return result.summary


# ---------------------------------------------------------------------------------------------
# Capturing what the simulator does


@contextlib.contextmanager
def instrumented() -> Iterator[dict[str, Any]]:
    """Patch `edgeddl.runtime.sim.loop` to record each step's sample indices and time its parts.

    Yields a dict filled during the run: `rows` (one index array per step), `seconds` per
    setup category, `step_s` (strategy.step, the fused maths) and `eval_s`.
    """
    found: dict[str, Any] = {
        "rows": [],
        "seconds": dict.fromkeys(SETUP_PARTS.values(), 0.0),
        "step_s": 0.0,
        "eval_s": 0.0,
    }
    pending: list[np.ndarray] = []
    # The run's state builds its sampler and strategy (`runtime/sim/state.py`, through
    # `strategy.build`): patch them where they are looked up.
    base_sampler, base_strategy = sim_state.ShardSampler, strategy_build.DataParallel

    class RecordingSampler(base_sampler):  # type: ignore[misc,valid-type]
        def take_many(self, devices: np.ndarray, counts: np.ndarray) -> np.ndarray:
            out = super().take_many(devices, counts)
            pending.append(np.asarray(out))
            return out

    class TimedStrategy(base_strategy):  # type: ignore[misc,valid-type]
        def step(self, x: torch.Tensor, y: torch.Tensor, counts: list[int]) -> torch.Tensor:
            rows = np.concatenate(pending) if pending else np.zeros(0, dtype=np.int64)
            pending.clear()
            found["rows"].append((rows, y.detach().cpu()))
            t0 = time.perf_counter()
            loss = super().step(x, y, counts)
            found["step_s"] += time.perf_counter() - t0
            return loss

    def timed(fn: Callable[..., Any], part: str) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                found["seconds"][part] += time.perf_counter() - t0

        return wrapper

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(sim_state, "ShardSampler", RecordingSampler))
        stack.enter_context(mock.patch.object(strategy_build, "DataParallel", TimedStrategy))
        base_evaluate = Classification.evaluate

        def timed_evaluate(self: Classification, *a: Any, **k: Any) -> dict[str, float]:
            t0 = time.perf_counter()
            out = base_evaluate(self, *a, **k)
            found["eval_s"] += time.perf_counter() - t0
            return out

        stack.enter_context(mock.patch.object(Classification, "evaluate", timed_evaluate))
        for name, part in SETUP_PARTS.items():
            if hasattr(loop, name):
                stack.enter_context(mock.patch.object(loop, name, timed(getattr(loop, name), part)))
        yield found


def captured_rows(found: dict[str, Any], y_train: torch.Tensor, batch: int) -> torch.Tensor | None:
    """The captured per-step indices as a [steps, batch] tensor, if they check out."""
    rows = []
    for idx, y_seen in found["rows"]:
        if len(idx) != batch or not torch.equal(y_train[torch.from_numpy(idx)].cpu(), y_seen):
            return None
        rows.append(idx)
    return torch.from_numpy(np.stack(rows)) if rows else None


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Case:
    num_devices: int
    global_batch: int
    steps: tuple[int, int]
    scenarios: dict[int, Scenario]
    rows: torch.Tensor
    same_samples: bool
    breakdown: dict[str, float]


def build_case(
    w: Workload,
    num_devices: int,
    batch: int,
    steps: tuple[int, int],
    train: TensorDataset,
    test: TensorDataset,
    tmp: Path,
) -> Case:
    scenarios = {
        s: make_scenario(
            num_devices=num_devices,
            model=w.model,
            dataset=w.dataset,
            global_batch=batch,
            num_steps=s,
            topology=w.topology,
            threads=w.threads,
            device=w.device.type,
        )
        for s in steps
    }
    s_hi = steps[1]
    sc = scenarios[s_hi]
    with instrumented() as found:
        t0 = time.perf_counter()
        run_sim(sc, fresh_model(sc, train, w.device), train, test, tmp / "capture", w.device)
        total = time.perf_counter() - t0
    shutil.rmtree(tmp / "capture", ignore_errors=True)
    y_train = train.tensors[1]
    rows = captured_rows(found, y_train.cpu(), batch)
    same = rows is not None and len(rows) == s_hi
    if not same:
        console.print(
            f"[yellow]N={num_devices}: could not capture the simulator's sample order "
            "(did runtime/sim/loop.py change?); the plain loop uses seeded random batches of the "
            "same size instead[/yellow]"
        )
        g = torch.Generator().manual_seed(sc.run.seed)
        rows = torch.randint(0, len(y_train), (s_hi, batch), generator=g)
    assert rows is not None
    setup = dict(found["seconds"])
    known = sum(setup.values()) + found["step_s"] + found["eval_s"]
    breakdown = {
        "instrumented_total_s": total,
        **{f"{k}_s": v for k, v in setup.items()},
        "eval_s": found["eval_s"],
        "fused_step_ms_per_step": 1e3 * found["step_s"] / s_hi,
        "loop_rest_ms_per_step": 1e3 * max(total - known, 0.0) / s_hi,
    }
    return Case(num_devices, batch, steps, scenarios, rows, same, breakdown)


def measure(
    w: Workload,
    case: Case,
    train: TensorDataset,
    test: TensorDataset,
    tmp: Path,
    repeats: int,
) -> dict[str, Any]:
    """Best-of-`repeats` wall time of plain and sim at both step counts, order alternating."""
    dev = w.device
    data = (*train.tensors, *test.tensors)
    rows_dev = case.rows.to(dev)
    best: dict[tuple[str, int], float] = {}
    acc: dict[str, float] = {}

    def time_plain(s: int) -> None:
        model = fresh_model(case.scenarios[s], train, dev)
        gc.collect()
        sync(dev)
        t0 = time.perf_counter()
        a = plain_loop(model, case.scenarios[s], data, rows_dev[:s])  # type: ignore[arg-type]
        sync(dev)
        dt = time.perf_counter() - t0
        best[("plain", s)] = min(best.get(("plain", s), np.inf), dt)
        acc["plain"] = a

    def time_sim(s: int) -> None:
        sc = case.scenarios[s]
        model = fresh_model(sc, train, dev)
        out = tmp / f"sim-{case.num_devices}-{case.global_batch}-{s}"
        gc.collect()
        sync(dev)
        t0 = time.perf_counter()
        summary = run_sim(sc, model, train, test, out, dev)
        sync(dev)
        dt = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
        best[("sim", s)] = min(best.get(("sim", s), np.inf), dt)
        acc["sim"] = summary["final_test_accuracy"]

    time_plain(case.steps[0])  # warm-up at this batch size (the capture run warmed the sim)
    for r in range(repeats):
        for s in case.steps:
            pair = (time_plain, time_sim) if (r + s) % 2 == 0 else (time_sim, time_plain)
            for fn in pair:
                fn(s)

    s_lo, s_hi = case.steps
    out: dict[str, Any] = {
        "num_devices": case.num_devices,
        "global_batch": case.global_batch,
        "steps": list(case.steps),
        "same_samples": case.same_samples,
        "test_accuracy_plain": acc["plain"],
        "test_accuracy_sim": acc["sim"],
    }
    for kind in ("plain", "sim"):
        lo, hi = best[(kind, s_lo)], best[(kind, s_hi)]
        per = (hi - lo) / (s_hi - s_lo)
        out[f"{kind}_s"] = hi
        out[f"{kind}_s_short"] = lo
        out[f"{kind}_ms_per_step"] = 1e3 * per
        out[f"{kind}_fixed_s"] = hi - s_hi * per
    out["ratio"] = out["sim_s"] / out["plain_s"]
    out["per_step_ratio"] = out["sim_ms_per_step"] / out["plain_ms_per_step"]
    out["overhead_ms_per_step"] = out["sim_ms_per_step"] - out["plain_ms_per_step"]
    out["overhead_fixed_s"] = out["sim_fixed_s"] - out["plain_fixed_s"]
    out["breakdown"] = case.breakdown
    return out


def profile_sim(
    w: Workload, case: Case, train: TensorDataset, test: TensorDataset, tmp: Path, top: int
) -> dict[str, Any]:
    """cProfile one simulated run; the top functions by own time and edgeddl's by total time."""
    s = case.steps[1]
    sc = case.scenarios[s]
    model = fresh_model(sc, train, w.device)
    prof = cProfile.Profile()
    prof.enable()
    run_sim(sc, model, train, test, tmp / "profile", w.device)
    prof.disable()
    shutil.rmtree(tmp / "profile", ignore_errors=True)
    stats = pstats.Stats(prof)
    total = stats.total_tt  # type: ignore[attr-defined]
    entries = []
    for (file, line, name), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        short = file.split("/src/", 1)[-1].split("site-packages/", 1)[-1]
        entries.append(
            {
                "function": f"{short}:{line}({name})" if line else name,
                "ncalls": nc,
                "tottime_s": tt,
                "cumtime_s": ct,
                "edgeddl": "edgeddl/" in file and "/src/" in file,
            }
        )
    by_own = sorted(entries, key=lambda e: -e["tottime_s"])[:top]
    by_cum = sorted((e for e in entries if e["edgeddl"]), key=lambda e: -e["cumtime_s"])[:top]
    for title, rows in (("own time", by_own), ("edgeddl functions, cumulative time", by_cum)):
        print_table(
            f"cProfile, N={case.num_devices}, batch {case.global_batch}, {s} steps "
            f"({total:.2f} s profiled): top {top} by {title}",
            ["function", "calls", "own s", "cum s", "cum us/step"],
            [
                [
                    e["function"],
                    e["ncalls"],
                    f"{e['tottime_s']:.3f}",
                    f"{e['cumtime_s']:.3f}",
                    f"{1e6 * e['cumtime_s'] / s:.0f}",
                ]
                for e in rows
            ],
        )
    return {
        "num_devices": case.num_devices,
        "global_batch": case.global_batch,
        "steps": s,
        "profiled_s": total,
        "top_own": by_own,
        "top_edgeddl_cumulative": by_cum,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Wall time of simulating N devices with edgeddl.run over a plain PyTorch loop "
            f"training the same model on the same samples (goal <= {GOAL_RATIO}x)."
        ),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 60 steps (resnets 6), two repeats, batch 256 only; < 60 s",
    )
    p.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=[11, 100],
        help="fleet sizes (default 11 100): 11 is the paper fleet; others mix "
        "pc/jetson/pi as 10/30/60 %%",
    )
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="global batch sizes (default 256 1024; --quick: 256)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps of the main measurement (default 300, resnets 30; --quick 60, 6); "
        "a second one at a third of it separates fixed from per-step cost",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="measurements per configuration, best kept (default 3; --quick 2)",
    )
    p.add_argument(
        "--model",
        default="cnn1d",
        choices=["mlp", "cnn1d", "resnet20", "resnet32", "resnet56"],
        help="the model both sides train (default cnn1d)",
    )
    p.add_argument(
        "--dataset",
        default="mnist1d",
        choices=["mnist1d", "synthetic"],
        help="default mnist1d; synthetic is CIFAR-shaped (3, 32, 32) for the resnets, "
        "(1, 40) otherwise",
    )
    p.add_argument(
        "--topology",
        default="star",
        choices=["star", "ring"],
        help="the simulated exchange (default star; the maths is the same either way)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the maths runs, for both sides (default cpu; the simulator's run.device)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1), the same for both sides (also run.threads); "
        "1 by default because on a shared machine torch's multi-threaded kernels stall "
        "whenever another process takes a core, which swamps what is measured",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile one simulated run at the largest N and print the hot spots",
    )
    p.add_argument(
        "--profile-top", type=int, default=20, help="rows per profile table (default 20)"
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    resnet = args.model.startswith("resnet")
    if args.batches is None:
        args.batches = [256] if args.quick else [256, 1024]
    if args.steps is None:
        args.steps = (6 if resnet else 60) if args.quick else (30 if resnet else 300)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    steps = (max(1, args.steps // 3), args.steps)
    if steps[0] >= steps[1]:
        raise SystemExit("--steps must be at least 2")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    w = Workload(args.model, args.dataset, args.topology, device, args.threads)
    warn_if_busy()
    console.print(
        f"edgeddl.run vs plain PyTorch: {args.model} on {args.dataset}, {args.topology}, "
        f"{device}, "
        f"{args.threads} torch threads, steps {steps[0]} and {steps[1]}, "
        f"best of {args.repeats}"
    )

    started = time.perf_counter()
    base = make_scenario(
        model=args.model, dataset=args.dataset, threads=args.threads, device=device.type
    )
    train, test = (TensorDataset(*(t.to(device) for t in ds.tensors)) for ds in load_data(base))
    results, profile = [], None
    with tempfile.TemporaryDirectory(prefix="edgeddl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # Warm-up: first-call costs (font cache, allocator, lazy imports) belong to no one.
        warm = make_scenario(
            model=args.model,
            dataset=args.dataset,
            num_steps=2,
            threads=args.threads,
            device=device.type,
        )
        run_sim(warm, fresh_model(warm, train, device), train, test, tmp / "warm", device)
        cases = []
        for n in args.devices:
            for b in args.batches:
                case = build_case(w, n, b, steps, train, test, tmp)
                cases.append(case)
                res = measure(w, case, train, test, tmp, args.repeats)
                results.append(res)
                console.print(
                    f"  N={n:4d} batch {b:5d}: plain {res['plain_s']:.2f} s, "
                    f"sim {res['sim_s']:.2f} s, ratio {res['ratio']:.2f}"
                )
        if args.profile:
            big = max(cases, key=lambda c: (c.num_devices, -c.global_batch))
            profile = profile_sim(w, big, train, test, tmp, args.profile_top)

    print_table(
        f"simulated / plain wall time ({args.model}, {args.dataset}, {args.topology}, {device}, "
        f"{args.threads} threads; goal <= {GOAL_RATIO})",
        [
            "N",
            "batch",
            "steps",
            "plain s",
            "sim s",
            "ratio",
            "per-step ratio",
            "overhead ms/step",
            "fixed setup s",
            "same samples",
            "acc plain/sim",
            "goal",
        ],
        [
            [
                r["num_devices"],
                r["global_batch"],
                r["steps"][1],
                f"{r['plain_s']:.2f}",
                f"{r['sim_s']:.2f}",
                f"{r['ratio']:.2f}",
                f"{r['per_step_ratio']:.2f}",
                f"{r['overhead_ms_per_step']:.3f}",
                f"{r['overhead_fixed_s']:.2f}",
                "yes" if r["same_samples"] else "no",
                f"{r['test_accuracy_plain']:.3f}/{r['test_accuracy_sim']:.3f}",
                "met" if r["ratio"] <= GOAL_RATIO else "missed",
            ]
            for r in results
        ],
    )
    print_table(
        "where the simulator's time goes (one instrumented run at the larger step count)",
        [
            "N",
            "batch",
            "total s",
            "model_cost s",
            "partition s",
            "plots s",
            "files s",
            "eval s",
            "fused step ms/step",
            "rest of loop ms/step",
            "plain ms/step",
        ],
        [
            [
                r["num_devices"],
                r["global_batch"],
                f"{r['breakdown']['instrumented_total_s']:.2f}",
                f"{r['breakdown']['model_cost_s']:.3f}",
                f"{r['breakdown']['partition_s']:.3f}",
                f"{r['breakdown']['plots_s']:.3f}",
                f"{r['breakdown']['files_s']:.3f}",
                f"{r['breakdown']['eval_s']:.3f}",
                f"{r['breakdown']['fused_step_ms_per_step']:.3f}",
                f"{r['breakdown']['loop_rest_ms_per_step']:.3f}",
                f"{r['plain_ms_per_step']:.3f}",
            ]
            for r in results
        ],
    )
    console.print(f"total benchmark time {time.perf_counter() - started:.0f} s")
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "sim_overhead",
                "goal_ratio": GOAL_RATIO,
                "args": vars(args),
                "machine": machine_info(args.threads),
                "results": results,
                "profile": profile,
            },
        )


if __name__ == "__main__":
    main()
