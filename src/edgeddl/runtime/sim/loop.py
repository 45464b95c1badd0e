"""The reference loop: a scenario trained on the simulated fleet, step by step.

Per step: membership changes take effect; the strategy plans who trains (or the loop
balances the global batch); every device prepares its update; the run's `Exchange` carries
the step and says what it cost and whose work arrived; the strategy commits the update from
those; the clock moves to the step's end. The maths is real, the clock is virtual.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from edgeddl.config.loader import ConfigError
from edgeddl.config.schema import Scenario
from edgeddl.io import write_json_atomic, write_jsonl_atomic, write_model_atomic, write_text_atomic
from edgeddl.report.files import metric_label, metric_plot
from edgeddl.report.plots import plot_metric, plot_timeline
from edgeddl.report.progress import ProgressDisplay
from edgeddl.runtime.sim.exchange import EXCHANGES, Exchange, SealedExchange, StepCarry, WorkModel
from edgeddl.runtime.sim.resume import (
    CHECKPOINT_FILE,
    CheckpointHeader,
    StopRequest,
    checkpoint,
    restore,
    resume_scenario,
    stop_requests,
)
from edgeddl.runtime.sim.state import (
    SimRun,
    SimState,
    fresh_state,
    min_share,
    run_summary,
    scenario_of,
)
from edgeddl.security.session import secure_run
from edgeddl.strategy.balance import balance_shares
from edgeddl.strategy.errors import TrainingDiverged
from edgeddl.task import LossFn
from edgeddl.threads import scenario_threads
from edgeddl.workload import build_workload


@dataclass(frozen=True, slots=True)
class RunResult:
    run_dir: Path
    summary: dict[str, Any]
    model: nn.Module

    @property
    def interrupted(self) -> bool:
        """The run stopped on Ctrl-C (or SIGTERM); `edgeddl run --resume RUN` goes on."""
        return self.summary.get("status") == "interrupted"


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
    resume: str | Path | None = None,
) -> RunResult:
    """Train `config` (a Scenario, a scenario file, or a bundled scenario name) on the
    simulated fleet and write its run folder.

    Bring your own `model` (any nn.Module) and `train_set`/`test_set` (any torch Dataset of
    (input, label) pairs: class indices, or for anomaly detection a training label to
    partition by and a test label 1 = anomaly) to replace the scenario's; `loss_fn(output,
    target)` must average over samples (the target: the label, or the input).

    `resume`: a run folder with a checkpoint (an interrupted run, or one killed after a
    checkpoint); the run goes on in that folder to the same result as if it had never
    stopped. Its scenario comes from the checkpoint (`overrides` may change only
    `RESUMABLE_KEYS`); pass the same `model`, data and `loss_fn` it was started with.
    Ctrl-C (or SIGTERM) stops a run after the step in flight with a complete run folder.
    """
    own = {"own_model": model is not None, "own_data": train_set is not None}
    if resume is not None:
        if out_dir is not None and Path(out_dir).resolve() != Path(resume).resolve():
            raise ConfigError("--out: a resumed run goes on in its own folder; leave --out out")
        out_dir = resume
        scenario, header = resume_scenario(Path(resume), config, overrides, **own)
    else:
        scenario, header = scenario_of(config, overrides, **own), None
    threads = torch.get_num_threads()
    try:
        return _train(scenario, model, train_set, test_set, loss_fn, out_dir, progress, header)
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
    resume: CheckpointHeader | None,
) -> RunResult:
    wall_start = time.perf_counter()
    w = build_workload(scenario, model, train_set, test_set, loss_fn)
    threads = scenario_threads(scenario, w.cost.train_flops_per_sample)
    torch.set_num_threads(threads)
    run_dir = Path(out_dir) if out_dir is not None else default_run_dir(scenario)
    st = fresh_state(scenario, w)
    if scenario.train.strategy == "federated":
        _check_local_batch(
            scenario.federated.local_batch, w.sample_caps(), min_share(w), w.fleet.names
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = SimRun(
        scenario=scenario,
        w=w,
        run_dir=run_dir,
        secure=None,
        caps=w.sample_caps(),
        min_share=min_share(w),
        agg_flops=st.strategy.aggregation_flops(),
        threads=threads,
        wall_start=wall_start,
    )
    write_text_atomic(run_dir / "config.resolved.toml", w.resolved_toml())
    if resume is not None:
        st = restore(ctx)
        # The run is under way again: the stopped session's summary no longer holds.
        (run_dir / "summary.json").unlink(missing_ok=True)
    else:
        ctx.secure = secure_run(scenario, run_dir) if scenario.security.enabled else None
    ctx.exchange = _exchange(ctx, st)
    if resume is None:
        _evaluate(ctx, st, len(st.schedule.members()))  # where the metric's curve starts
    display = ProgressDisplay(
        scenario.train.num_steps, scenario.run.name, enabled=progress, metric=w.task.metric
    )
    with display, stop_requests() as stop:
        display.update(st.step, st.clock.now_s)
        interrupted = _loop(ctx, st, display, stop)
    return _finish(ctx, st, interrupted, display)


def _exchange(ctx: SimRun, st: SimState) -> Exchange:
    """How this run carries its steps (`run.exchange`), sealed with `[security]`."""
    name, w = ctx.scenario.run.exchange, ctx.w
    if name not in EXCHANGES:
        raise ConfigError(
            f"run.exchange: {name!r} is not a registered exchange; registered: "
            f"{', '.join(sorted(EXCHANGES))}"
        )
    work = WorkModel(
        fleet=w.fleet,
        train_flops_per_sample=w.cost.train_flops_per_sample,
        ops_per_step=w.cost.ops_per_step,
        sample_bytes=w.info.sample_bytes,
    )
    exchange = EXCHANGES[name](st.network, work)
    if ctx.secure is not None:
        exchange = SealedExchange(exchange, ctx.secure, w.fleet, ctx.model)
    return exchange


def _loop(ctx: SimRun, st: SimState, display: ProgressDisplay, stop: StopRequest) -> bool:
    """Train until the last step, the time limit or an empty fleet; True if interrupted."""
    t, every = ctx.scenario.train, ctx.scenario.run.checkpoint_every
    while st.step < t.num_steps:
        if stop.requested:
            return True
        ready = _plan_step(ctx, st)
        if ready is None:  # everyone is gone for good
            break
        if not ready:  # everyone is gone until the next join
            continue
        _step(ctx, st)
        done = st.step == t.num_steps or bool(
            t.max_virtual_time_s and st.clock.now_s >= t.max_virtual_time_s
        )
        if st.step % t.eval_every == 0 or done:
            row = _evaluate(ctx, st, len(st.members))
            display.update(st.step, st.clock.now_s, row["train_loss"], row[ctx.w.task.metric])
        else:
            display.update(st.step, st.clock.now_s)
        if done:
            break
        if every and st.step % every == 0:
            checkpoint(ctx, st, "checkpoint")
    return False


def _plan_step(ctx: SimRun, st: SimState) -> bool | None:
    """Apply membership changes due by now and choose who trains how many samples. False:
    nobody is in the fleet (the clock moved to the next join); None: nobody will be."""
    strategy = st.strategy
    applied = st.schedule.advance_to(st.clock.now_s)
    for ev in applied:
        st.rec.add_event(ev.at_s, ev.device, ev.action)
        if ctx.secure is not None:
            ctx.secure.event(ev.at_s, ev.device, ev.action)
        if ev.action == "crash":  # it lost its memory and its copy of the model
            strategy.forget(ev.device)
            st.participated[ev.device] = False
    if applied or not st.members_key:
        st.members = tuple(st.schedule.members())
    if not st.members:
        nxt = st.schedule.next_event_s()
        limit = ctx.scenario.train.max_virtual_time_s
        if nxt is None or (limit and nxt >= limit):
            return None
        st.clock.advance_to(nxt)
        return False
    plan = strategy.plan(np.asarray(st.members), st.step)
    if plan is not None:  # the strategy chose (a federated round's sampled clients)
        st.active, st.shares, st.num_local = plan.devices, plan.samples, plan.local_steps
    elif st.members != st.members_key:  # rebalance only when membership changes
        st.members_key = st.members
        idx = np.asarray(st.members, dtype=np.int64)
        per_sample, fixed = ctx.exchange.balance_inputs(strategy.step_cost(idx), idx)
        t = ctx.scenario.train
        all_shares = balance_shares(
            t.global_batch, per_sample, fixed, ctx.caps[idx], t.balance, ctx.min_share
        )
        st.active, st.shares = idx[all_shares > 0], all_shares[all_shares > 0]
    return True


def _step(ctx: SimRun, st: SimState) -> None:
    """One step of the planned devices: compute, carry, commit, record."""
    w, strategy, active, shares = ctx.w, st.strategy, st.active, st.shares
    data_s, compute_s = w.fleet.work_time_s(
        active,
        shares,
        w.cost.train_flops_per_sample,
        w.info.sample_bytes,
        w.cost.ops_per_step,
        st.num_local,
    )
    # Every replica starts from the same seeded model; later, a device that sat out the
    # previous step must fetch the current one.
    needs_model = ~st.participated[active] if st.step else np.zeros(len(active), dtype=bool)
    if st.adapt is not None:  # network-aware density, from each device's path
        st.adapt.before_step(
            active, ctx.exchange.link_estimate(active), float((data_s + compute_s).max())
        )
    rows = torch.from_numpy(st.sampler.take_many(active, shares)).to(w.x_train.device)
    # Every device computes and sends; a crash decides later whose payload counts.
    try:
        sent = strategy.prepare(w.x_train[rows], w.y_train[rows], shares.tolist(), active, st.step)
    except TrainingDiverged as e:
        raise TrainingDiverged(e.step, e.device, w.fleet.names[e.device]) from None
    carry = StepCarry(
        start_s=st.clock.now_s,
        sent=sent,
        data_s=data_s,
        compute_s=compute_s,
        down_bytes=strategy.down_bytes(needs_model),
        needs_model=needs_model,
        crash_at_s=st.schedule.next_crash_s[active],
        agg_flops=ctx.agg_flops,
        update_flops=strategy.update_flops(),
        deadline_s=ctx.scenario.federated.deadline_s
        if ctx.scenario.train.strategy == "federated"
        else 0.0,
    )
    tl = ctx.exchange.carry(carry)
    if tl.dropped is not None and tl.dropped.any():
        st.rec.add_dropped(st.step, tl.end_s, active[tl.dropped])
    loss = strategy.commit(sent, tl.contributed)
    ctx.exchange.committed(carry, tl, strategy)
    st.clock.advance_to(tl.end_s)
    st.rec.add_step(tl, shares, loss)
    st.participated[:] = False
    st.participated[active[tl.contributed]] = True
    st.step += 1


def _evaluate(ctx: SimRun, st: SimState, num_members: int) -> dict[str, Any]:
    """Test the current model; one line of metrics.jsonl (virtual time is not charged)."""
    w = ctx.w
    scores = [w.task.evaluate(m, w.x_test, w.y_test) for m in st.strategy.evaluation_models()]
    row = st.rec.add_eval(
        step=st.step,
        virtual_time_s=st.clock.now_s,
        wall_time_s=ctx.wall_s(st),
        metrics={k: float(np.mean([s[k] for s in scores])) for k in scores[0]},
        num_members=num_members,
    )
    write_jsonl_atomic(ctx.run_dir / "metrics.jsonl", st.rec.evals)
    return row


def _finish(ctx: SimRun, st: SimState, interrupted: bool, display: ProgressDisplay) -> RunResult:
    """Close the run: the last evaluation, model, summary, the ledger's end and plots; an
    interrupted run first writes the checkpoint it resumes from (named by a `checkpoint`
    entry: the ledger's closing entry comes after the files it names)."""
    model, run_dir, secure = ctx.model, ctx.run_dir, ctx.secure
    if interrupted:
        checkpoint(ctx, st, "checkpoint")
        if st.rec.evals[-1]["step"] != st.step:
            _evaluate(ctx, st, len(st.members))
    elif st.rec.evals[-1]["step"] != st.step:  # stopped early: the fleet emptied for good
        _evaluate(ctx, st, 0)
    security = secure.summary(model) if secure is not None else {}
    summary = run_summary(ctx, st, "interrupted" if interrupted else "completed", security)
    write_model_atomic(run_dir / "model.pt", model.state_dict())
    write_json_atomic(run_dir / "summary.json", summary)
    if secure is not None:  # last: its closing entry names model.pt's and summary.json's SHA-256
        secure.close(st.clock.now_s, model, interrupted_at=st.step if interrupted else None)
    if not interrupted:  # a finished run has nothing to resume
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    metric = ctx.w.task.metric
    title = f"{ctx.scenario.run.name}: test {metric_label(metric)}"
    plot_metric(st.rec.evals, run_dir / metric_plot(metric), metric, title)
    plot_timeline(st.rec, run_dir / "timeline.png")
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
