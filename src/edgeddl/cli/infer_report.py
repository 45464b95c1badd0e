"""What `edgeddl infer run` prints: each plan used, each device's work, and a summary that
sets the split's outputs against single-device inference."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.table import Table

from edgeddl.fleet.fleet import Fleet
from edgeddl.inference.activations import ActivationCodec, wire_costs
from edgeddl.inference.plan import LayerCosts
from edgeddl.inference.profile import chain_devices, plan_rows
from edgeddl.inference.simulate import PipelineConfig, SimResult
from edgeddl.inference.stages import single_device_outputs
from edgeddl.report.files import metric_label

if TYPE_CHECKING:
    from edgeddl.inference.deploy import Deployment
    from edgeddl.inference.processes import ProcessResult


def compare(outputs: torch.Tensor, reference: torch.Tensor) -> str:
    """'identical' (torch.equal), or the largest absolute difference."""
    if torch.equal(outputs, reference):
        return "identical to single-device outputs (torch.equal)"
    return f"max |diff| {float((outputs - reference).abs().max()):.3g} vs single-device outputs"


def _ms(values: list[float]) -> str:
    return (
        f"first {values[0] * 1e3:.3f} ms, mean {statistics.fmean(values) * 1e3:.3f} ms, "
        f"max {max(values) * 1e3:.3f} ms"
    )


def print_report(
    dep: Deployment,
    costs: LayerCosts,
    fleet: Fleet,
    cfg: PipelineConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    result: SimResult,
    procs: ProcessResult | None,
) -> None:
    console = Console()
    name = dep.model_name
    if dep.weights is not None:
        console.print(f"{name}: trained weights from {dep.weights}")
    else:
        console.print(
            f"{name}: no weights given (a scenario, not a run folder): the seeded, untrained "
            f"model (run.seed = {dep.scenario.run.seed})"
        )
    wire = wire_costs(costs, ActivationCodec(cfg.activations), cfg.micro_batch)
    for i, use in enumerate(result.plans):
        chain = chain_devices(fleet, list(use.devices))
        table = Table(
            "device", "layers", "compute ms", "bytes out", "link ms",
            title=f"plan {i + 1}: from {use.from_s * 1e3:.3f} ms virtual ({use.reason}), best "
            f"{cfg.objective} over {len(chain)} devices, per sample ({cfg.activations})",
        )  # fmt: skip
        for row in plan_rows(wire, chain, use.plan):
            table.add_row(*row)
        console.print(table)
        p = use.plan
        console.print(
            f"  predicted per sample: latency {p.latency_s * 1e3:.3f} ms, pipelined "
            f"throughput {p.throughput:,.1f} samples/s"
        )
    dev = Table(
        "device", "profile", "link", "compute s", "sending s", "wasted s", "bytes sent",
        "bytes received", "left at s", title="each device's work (virtual)",
    )  # fmt: skip
    for n, s in result.devices.items():
        i = fleet.names.index(n)
        dev.add_row(
            n, fleet.profile_names[i], fleet.link_names[i], f"{s.compute_s:.4f}",
            f"{s.send_s:.4f}", f"{s.wasted_s:.4f}", f"{s.bytes_sent:,}",
            f"{s.bytes_received:,}", "" if s.left_at_s is None else f"{s.left_at_s:.4f}",
        )  # fmt: skip
    console.print(dev)
    num_mb = len(result.micro_batch_s)
    console.print(
        f"{len(x)} samples in {num_mb} micro-batches of {cfg.micro_batch}, {cfg.activations} "
        f"activations, links {'with' if cfg.link_noise else 'without'} jitter and loss"
    )
    console.print(
        f"simulated: throughput {result.throughput:,.1f} samples/s (all {len(x)} in "
        f"{result.makespan_s * 1e3:.3f} ms virtual); latency per micro-batch "
        f"{_ms(result.latency_s)}"
    )
    for b, k, holder in result.resumed:
        console.print(f"  micro-batch {b} resumed after {k} layers, from {holder}")
    reference = single_device_outputs(dep.model, x, cfg.micro_batch)
    console.print(f"outputs: {compare(result.outputs, reference)}")
    metric = dep.task.metric
    split = dep.task.score(dep.task.sample_scores(result.outputs, x, y), y)
    single = dep.task.score(dep.task.sample_scores(reference, x, y), y)
    label = metric_label(metric)
    console.print(
        f"{label} on {len(x)} test samples: split {split:.4f}, single device {single:.4f} "
        f"(change {split - single:+.4f})"
    )
    if procs is not None:
        print_processes(console, procs, len(x), cfg.micro_batch)
        with _threads(1):  # as each process runs: kernels may round differently otherwise
            reference = single_device_outputs(dep.model, x, cfg.micro_batch)
        console.print(f"processes' outputs: {compare(procs.run.outputs, reference)}")


@contextmanager
def _threads(num: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def print_processes(console: Console, procs: ProcessResult, num_samples: int, mb: int) -> None:
    """Each plan the processes used (when it took over, its wall-clock throughput and
    latency, the micro-batches it started but did not finish), and each departure."""
    run = procs.run
    table = Table(
        "plan", "layers per device", "from mb", "at s", "1st out ms", "mbs", "re-run",
        "samples/s", "mean lat ms",
        title=f"across processes ({len(procs.names)} on 127.0.0.1, gloo; wall clock since the "
        "first micro-batch started)",
    )  # fmt: skip
    for i, (gen, (plan, chain)) in enumerate(zip(run.generations, procs.plans, strict=True)):
        parts = [f"{chain[d]}: {s}-{e - 1}" for d, (s, e) in enumerate(plan.segments) if e > s]
        done = range(gen.from_mb, gen.from_mb + len(gen.output_s))
        samples = min(done.stop * mb, num_samples) - done.start * mb
        span_s = gen.output_s[-1] - gen.start_s if gen.output_s else 0.0
        table.add_row(
            str(i + 1), ", ".join(parts) or chain[0], str(gen.from_mb), f"{gen.start_s:.4f}",
            f"{(gen.output_s[0] - gen.start_s) * 1e3:.2f}" if gen.output_s else "-",
            str(len(gen.output_s)), str(gen.rerun),
            f"{samples / span_s:,.1f}" if span_s > 0 else "-",
            f"{statistics.fmean(run.latency_s[b] for b in done) * 1e3:.3f}" if done else "-",
        )  # fmt: skip
    console.print(table)
    for d in run.departures:
        name = procs.device(d.process)
        what = "crashed (its process died)" if d.kind == "crashed" else "left"
        if d.at_mb is not None:
            what += f" before micro-batch {d.at_mb}"
        nxt = run.generations[d.generation + 1] if d.generation + 1 < len(run.generations) else None
        line = f"{name} {what} at {d.at_s:.4f} s, under plan {d.generation + 1}"
        if nxt is not None and nxt.from_mb < len(run.latency_s):
            line += (
                f"; plan {d.generation + 2} took over {(nxt.start_s - d.at_s) * 1e3:.1f} ms "
                f"later, its first output {(nxt.output_s[0] - d.at_s) * 1e3:.1f} ms after the "
                "departure"
            )
        elif d.process not in run.generations[d.generation].members:
            line += f" (it held no layers in plan {d.generation + 1}: no re-plan)"
        elif nxt is None:
            line += " (after the last micro-batch: no re-plan)"
        console.print(line)
    console.print(
        f"processes: throughput {run.throughput:,.1f} samples/s ({run.wall_s * 1e3:.1f} ms); "
        f"latency per micro-batch {_ms(run.latency_s)}; bytes sent per device "
        + ", ".join(f"{procs.device(i)} {b:,}" for i, b in enumerate(run.bytes_sent))
    )
