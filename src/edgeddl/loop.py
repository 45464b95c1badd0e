"""The reference loop: a scenario trained on the simulated fleet, step by step.

Per step: membership changes due by now take effect; the global batch is balanced over the
members; the fleet model gives each device's data-loading and compute time for its share;
the simulated transport lays out the exchange on the links and says whose work arrived
(crashes lose work); the strategy applies the update from the devices that contributed; the
clock moves to the step's end; the recorder adds it all up. The maths is real, the clock is
virtual.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from edgeddl.compress.adapt import DEFAULT_BYTES_PER_VALUE
from edgeddl.config.loader import (
    ConfigError,
    apply_override,
    load_scenario,
    scenario_from_dict,
)
from edgeddl.config.schema import Scenario
from edgeddl.data import ShardSampler
from edgeddl.fleet.clock import FleetSchedule, VirtualClock
from edgeddl.fleet.timeline import StepRequest
from edgeddl.report.files import (
    metric_label,
    metric_plot,
    write_json_atomic,
    write_jsonl_atomic,
    write_model_atomic,
    write_text_atomic,
)
from edgeddl.report.plots import plot_metric, plot_timeline
from edgeddl.report.progress import ProgressDisplay
from edgeddl.report.recorder import RunRecorder
from edgeddl.security.session import secure_run
from edgeddl.split_step import split_balance_inputs, split_request
from edgeddl.strategy.balance import balance_shares
from edgeddl.strategy.build import build_split, build_strategy
from edgeddl.strategy.compressed import CompressedDataParallel
from edgeddl.strategy.data_parallel import DataParallel
from edgeddl.strategy.errors import TrainingDiverged
from edgeddl.strategy.federated import Federated
from edgeddl.strategy.fused import batchnorm_layers
from edgeddl.strategy.split_learning import SplitLearning
from edgeddl.task import LossFn
from edgeddl.transport.sim import SimTransport
from edgeddl.workload import build_workload


@dataclass(frozen=True, slots=True)
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    model: nn.Module


def default_run_dir(scenario: Scenario) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{scenario.run.name}-{stamp}"


def run(
    config: Scenario | str | Path | None = None,
    *,
    model: nn.Module | None = None,
    train_set: Dataset | None = None,
    test_set: Dataset | None = None,
    loss_fn: LossFn | None = None,
    out_dir: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    progress: bool = True,
) -> RunResult:
    """Train `config` (a Scenario, a scenario file, or a bundled scenario name) on the
    simulated fleet and write its run folder.

    Bring your own `model` (any nn.Module) and `train_set`/`test_set` (any torch Dataset of
    (input, label) pairs: class indices, or for anomaly detection a training label to
    partition by and a test label 1 = anomaly) to replace the scenario's; `loss_fn(output,
    target)` must average over samples (the target: the label, or the input).
    """
    if isinstance(config, Scenario):
        scenario = config
        if overrides:  # the same strict path as a file: edit the raw table, validate again
            raw = dataclasses.asdict(config)
            for assignment in overrides:
                apply_override(raw, assignment)
            scenario = scenario_from_dict(raw)
    else:
        scenario = load_scenario(
            config, overrides, own_model=model is not None, own_data=train_set is not None
        )
    threads = torch.get_num_threads()
    if scenario.run.threads:
        torch.set_num_threads(scenario.run.threads)
    try:
        return _train(scenario, model, train_set, test_set, loss_fn, out_dir, progress)
    finally:
        torch.set_num_threads(threads)  # the caller's process keeps its own setting


def _train(
    scenario: Scenario,
    model: nn.Module | None,
    train_set: Dataset | None,
    test_set: Dataset | None,
    loss_fn: LossFn | None,
    out_dir: str | Path | None,
    progress: bool,
) -> RunResult:
    wall_start = time.perf_counter()
    seed = scenario.run.seed
    w = build_workload(scenario, model, train_set, test_set, loss_fn)
    model, info, cost, shards, fleet = w.model, w.info, w.cost, w.shards, w.fleet
    x_train, y_train, x_test, y_test = w.x_train, w.y_train, w.x_test, w.y_test
    device = x_train.device
    schedule = FleetSchedule(scenario)
    clock = VirtualClock()
    per_sample_s = w.per_sample_s
    sampler = ShardSampler(shards, seed)
    t = scenario.train
    split = build_split(scenario, model, w.task.loss_fn, info) if t.strategy == "split" else None
    strategy: DataParallel | SplitLearning
    if split is not None:
        strategy, policy = split, None
    else:
        sizes = np.array([len(s) for s in shards], dtype=np.int64)
        strategy, policy = build_strategy(scenario, model, w.task.loss_fn, sizes, info.num_classes)
    metric = w.task.metric
    transport = SimTransport(fleet, t.topology, seed)
    agg_flops = strategy.aggregation_flops()
    # BatchNorm cannot normalise a batch of one 1-D sample (PyTorch refuses it): to be safe
    # for every BatchNorm, a device that takes part gets at least two samples.
    min_share = 2 if batchnorm_layers(model) else 1
    caps = w.sample_caps()
    if isinstance(strategy, Federated):
        _check_local_batch(scenario.federated.local_batch, caps, min_share, fleet.names)

    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(scenario)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.resolved.toml", w.resolved_toml())
    rec = RunRecorder(fleet.names, fleet.profile_names, fleet.link_names)
    secure = secure_run(scenario, run_dir) if scenario.security.enabled else None

    members_key: tuple[int, ...] = ()
    shares = np.zeros(0, dtype=np.int64)
    active = np.zeros(0, dtype=np.int64)
    participated = np.zeros(fleet.num_devices, dtype=bool)  # holds the current model (ring)
    num_local: np.ndarray | int = 1  # local steps per device (federated clients: several)
    members: tuple[int, ...] = ()
    step = 0

    def evaluate(at_step: int, num_members: int) -> dict[str, Any]:
        """Test the current model; one line of metrics.jsonl (virtual time is not charged)."""
        scores = [w.task.evaluate(m, x_test, y_test) for m in strategy.evaluation_models()]
        row = rec.add_eval(
            step=at_step,
            virtual_time_s=clock.now_s,
            wall_time_s=time.perf_counter() - wall_start,
            metrics={k: float(np.mean([s[k] for s in scores])) for k in scores[0]},
            num_members=num_members,
        )
        write_jsonl_atomic(run_dir / "metrics.jsonl", rec.evals)
        return row

    evaluate(0, len(schedule.members()))  # where the metric's curve starts
    display = ProgressDisplay(t.num_steps, scenario.run.name, enabled=progress, metric=metric)
    with display:
        while step < t.num_steps:
            applied = schedule.advance_to(clock.now_s)
            for ev in applied:
                rec.add_event(ev.at_s, ev.device, ev.action)
                if secure is not None:
                    secure.event(ev.at_s, ev.device, ev.action)
                if ev.action == "crash":  # it lost its memory and its copy of the model
                    strategy.forget(ev.device)
                    participated[ev.device] = False
            if applied or not members_key:
                members = tuple(schedule.members())
            if not members:  # everyone is gone: wait for the next join, or stop
                nxt = schedule.next_event_s()
                if nxt is None or (t.max_virtual_time_s and nxt >= t.max_virtual_time_s):
                    break
                clock.advance_to(nxt)
                continue
            if isinstance(strategy, Federated):  # sampled clients, each its own local steps
                active, shares, num_local = strategy.plan_round(np.asarray(members), step)
            elif members != members_key:  # rebalance only when membership changes
                members_key = members
                idx = np.asarray(members, dtype=np.int64)
                if split is not None:  # its own part of the model, and the cut's bytes
                    per_sample, fixed = split_balance_inputs(
                        fleet, transport, split, idx, info.sample_bytes
                    )
                else:
                    up_bytes, down_bytes = strategy.payload_bytes(idx)
                    per_sample = per_sample_s[idx]
                    fixed = fleet.fixed_step_s(cost.ops_per_step)[idx] + transport.expected_link_s(
                        idx, up_bytes, down_bytes
                    )
                all_shares = balance_shares(
                    t.global_batch, per_sample, fixed, caps[idx], t.balance, min_share
                )
                active, shares = idx[all_shares > 0], all_shares[all_shares > 0]
            data_s, compute_s = fleet.work_time_s(
                active,
                shares,
                cost.train_flops_per_sample,
                info.sample_bytes,
                cost.ops_per_step,
                num_local,
            )
            # Every replica starts from the same seeded model; later, a device that sat out
            # the previous step must fetch the current one.
            needs_model = ~participated[active] if step else np.zeros(len(active), dtype=bool)
            down = strategy.down_bytes(needs_model)
            if policy is not None and isinstance(strategy, CompressedDataParallel):
                work_s = float((data_s + compute_s).max())
                bpv = strategy.bytes_per_value[active]
                bpv = np.where(np.isnan(bpv), DEFAULT_BYTES_PER_VALUE, bpv)
                link = transport.link_estimate(active)
                strategy.set_density(active, policy.densities(link, work_s, bpv))
            rows = torch.from_numpy(sampler.take_many(active, shares)).to(device)
            # Every device computes and sends; a crash decides later whose payload counts.
            try:
                ex = strategy.prepare(x_train[rows], y_train[rows], shares.tolist(), active, step)
            except TrainingDiverged as e:
                raise TrainingDiverged(e.step, e.device, fleet.names[e.device]) from None
            sealed, crypto_s, open_s, seal_s = None, None, 0.0, 0.0
            if secure is not None:  # every payload sealed, opened, recorded
                bodies = strategy.payload_bodies(ex)
                sealed = secure.seal_step(step, clock.now_s, active, bodies, ex.up_bytes, down)
                if split is None:  # a split chain charges its legs' crypto to the devices
                    open_s, seal_s = fleet.coordinator_crypto_s(
                        float(np.mean([len(b) for b in bodies])), float(np.mean(down))
                    )
                crypto_bytes = sealed.crypto_bytes
                if split is not None:  # each message of its chain in an envelope of its own
                    legs = [g.amount for g in split.legs(ex) if g.kind in ("up", "down")]
                    crypto_bytes = sum(legs) + down
                    split.add_envelopes(ex, sealed.up_bytes[0] - ex.up_bytes[0])
                ex.up_bytes, down = sealed.up_bytes, sealed.down_bytes
                crypto_s = fleet.crypto_seconds(active, crypto_bytes)
                compute_s = compute_s + crypto_s
            if split is not None:
                tl = transport.pipeline(
                    split_request(
                        fleet,
                        split,
                        ex,
                        clock.now_s,
                        data_s,
                        down,
                        schedule.next_crash_s[active],
                        crypto_s,
                    )
                )
            else:
                request = StepRequest(
                    start_s=clock.now_s,
                    devices=active,
                    data_s=data_s,
                    compute_s=compute_s,
                    up_bytes=ex.up_bytes,
                    down_bytes=down,
                    crash_at_s=schedule.next_crash_s[active],
                    needs_model=needs_model,
                    # sealed: the coordinator also seals each device's answer
                    agg_flops=agg_flops + seal_s * fleet.coordinator.flops_per_s,
                    open_s=open_s,
                    mid_down_bytes=ex.mid_down_bytes,
                    deadline_s=scenario.federated.deadline_s if t.strategy == "federated" else 0.0,
                )
                tl = transport.step(request)
            if tl.dropped is not None and tl.dropped.any():
                rec.add_dropped(step, tl.end_s, active[tl.dropped])
            if sealed is not None:  # a refused payload is left out, like a lost one
                tl.contributed = tl.contributed & sealed.accepted
            loss = strategy.commit(ex, tl.contributed)
            if secure is not None and sealed is not None:
                entry = {int(active[i]): sealed.entries[i] for i in np.flatnonzero(tl.contributed)}
                out = strategy.screened_at(step) if isinstance(strategy, DataParallel) else {}
                screened = {entry[d]: why for d, why in out.items() if d in entry}
                kept = [e for d, e in entry.items() if d not in out]
                secure.aggregate(step, tl.end_s, model, kept, screened)
            clock.advance_to(tl.end_s)
            rec.add_step(tl, shares, loss)
            participated[:] = False
            participated[active[tl.contributed]] = True
            step += 1
            done = step == t.num_steps or (
                t.max_virtual_time_s and clock.now_s >= t.max_virtual_time_s
            )
            if step % t.eval_every == 0 or done:
                row = evaluate(step, len(members))
                display.update(step, clock.now_s, row["train_loss"], row[metric])
            else:
                display.update(step, clock.now_s)
            if done:
                break
        if rec.evals[-1]["step"] != step:  # stopped early: the fleet emptied for good
            evaluate(step, 0)

    summary = rec.summary(
        metric=metric,
        virtual_time_s=clock.now_s,
        wall_time_s=time.perf_counter() - wall_start,
        extra={
            "scenario": scenario.run.name,
            "strategy": t.strategy,
            "topology": t.topology,
            "balance": t.balance,
            "task": w.task.name,
            **w.summary_entries(),
            "num_crashes": schedule.num_crashes,
            "compression": {
                "compressor": scenario.compression.compressor,
                "per_device": bool(scenario.compression.groups),
                "adaptive": scenario.compression.adapt.enabled,
                **strategy.compression_summary(),
            },
            **(
                {"federated": {**dataclasses.asdict(scenario.federated), "num_rounds": step}}
                if t.strategy == "federated"
                else {}
            ),
            **({"split": split.summary()} if split is not None else {}),
            **(secure.summary(clock.now_s, model) if secure is not None else {}),
            **(strategy.robust_summary() if isinstance(strategy, DataParallel) else {}),
        },
    )
    write_json_atomic(run_dir / "summary.json", summary)
    write_model_atomic(run_dir / "model.pt", model.state_dict())
    title = f"{scenario.run.name}: test {metric_label(metric)}"
    plot_metric(rec.evals, run_dir / metric_plot(metric), metric, title)
    plot_timeline(rec, run_dir / "timeline.png")
    display.print_summary(summary, str(run_dir))
    return RunResult(run_dir=run_dir, summary=summary, model=model)


def _check_local_batch(batch: int, caps: np.ndarray, min_share: int, names: list[str]) -> None:
    """Every client must hold one local batch in memory (and BatchNorm needs two samples)."""
    if batch < min_share:
        raise ConfigError(
            f"federated.local_batch: this model has BatchNorm, which needs >= {min_share} "
            f"samples per batch (got {batch})"
        )
    small = np.flatnonzero(caps < batch)
    if len(small):
        raise ConfigError(
            f"federated.local_batch: {batch} samples do not fit in the memory of "
            f"{names[small[0]]} (room for {caps[small[0]]}); lower it"
        )
