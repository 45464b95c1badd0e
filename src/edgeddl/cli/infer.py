"""`edgeddl infer ACTION`: plan a split of a model across devices, run one, or quantize a
model for deployment (`quantize_cmd.py`).

Each action is an `InferAction` (name, help, arguments, handler) in `ACTIONS`; another
module adds one by importing it here and listing it there (see the marked line).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgeddl.cli.quantize_cmd import QUANTIZE_HELP, cmd_quantize, quantize_args
from edgeddl.config.loader import ConfigError, load_scenario

if TYPE_CHECKING:
    from edgeddl.inference.deploy import Deployment
    from edgeddl.inference.plan import ChainDevices, LayerCosts, Plan


@dataclass(frozen=True, slots=True)
class InferAction:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


def _common_args(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("model", help=model_help)
    p.add_argument("--fleet", required=True, help="scenario whose fleet runs the inference")
    p.add_argument(
        "--devices",
        default="",
        help="comma-separated device names, in chain order (the first holds the input); "
        "default: the fleet's devices in scenario order",
    )
    p.add_argument("--objective", choices=("latency", "throughput"), default="latency")
    p.add_argument(
        "--model",
        dest="model_factory",
        metavar="MODULE:FACTORY",
        default="",
        help="your own model, for a run of edgeddl.run(model=...): FACTORY() in the "
        "importable MODULE gives the nn.Module (default: the run's recorded class, built "
        "without arguments, where it can be)",
    )
    p.add_argument(
        "--data",
        dest="data_factory",
        metavar="MODULE:FACTORY",
        default="",
        help="your own data, for a run of edgeddl.run(train_set=..., test_set=...): "
        "FACTORY() in the importable MODULE gives (train_set, test_set)",
    )


def _deployment(args: argparse.Namespace, *, weights_needed: bool = True) -> Deployment:
    """What `args.model` deploys, with your own model and data from --model and --data."""
    from edgeddl.inference.deploy import factory_data, factory_model, load_deployment

    own: dict[str, Any] = {}
    try:
        if args.model_factory:
            own["model"] = factory_model(args.model_factory)
    except ValueError as e:
        raise ConfigError(f"--model {args.model_factory}: {e}") from None
    try:
        if args.data_factory:
            own["train_set"], own["test_set"] = factory_data(args.data_factory)
    except ValueError as e:
        raise ConfigError(f"--data {args.data_factory}: {e}") from None
    return load_deployment(args.model, weights_needed=weights_needed, **own)


def _plan_args(p: argparse.ArgumentParser) -> None:
    _common_args(
        p,
        "a run folder (its config.resolved.toml), a scenario file or a bundled scenario "
        "name: the model and input it describes (the plan depends on shapes, not weights)",
    )
    p.add_argument("--batch", type=int, default=1, help="samples per batch (default: 1)")


def _run_args(p: argparse.ArgumentParser) -> None:
    _common_args(
        p,
        "a run folder (config.resolved.toml + model.pt: the trained weights), or a scenario "
        "file or bundled name (its seeded, untrained model)",
    )
    p.add_argument("--samples", type=int, default=256, help="test samples to stream (default: 256)")
    p.add_argument(
        "--micro-batch", type=int, default=1, help="samples per micro-batch (default: 1)"
    )
    p.add_argument(
        "--activations",
        choices=("fp32", "fp16", "int8"),
        default="fp32",
        help="how activations cross links (default: fp32, exact)",
    )
    p.add_argument(
        "--leave",
        action="append",
        default=[],
        metavar="NAME@SAMPLE|NAME@SECONDSs",
        help="device NAME leaves when the stream reaches sample SAMPLE, or at virtual time "
        "SECONDS (e.g. pi-1@100, pi-1@0.25s); the rest are re-planned (repeatable); with "
        "--processes (NAME@SAMPLE only) its process leaves too and the survivors re-plan",
    )
    p.add_argument(
        "--no-link-noise",
        action="store_true",
        help="links without jitter or loss: transfers take what the planner predicts",
    )
    p.add_argument(
        "--processes",
        action="store_true",
        help="also run for real: one process per device on 127.0.0.1 (gloo point-to-point), "
        "leaves included, and report wall-clock latency and throughput per plan",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="--processes: seconds before a hung run is stopped (default: %(default)s)",
    )


def _chain(args: argparse.Namespace) -> tuple[Any, list[str]]:
    from edgeddl.fleet.fleet import Fleet

    fleet = Fleet.from_scenario(load_scenario(args.fleet))
    names = [n for n in args.devices.split(",") if n]
    unknown = [n for n in names if n not in fleet.names]
    if unknown:
        raise ConfigError(f"--devices: {', '.join(unknown)} not in the fleet of {args.fleet}")
    if len(set(names)) != len(names):
        raise ConfigError("--devices: a device is named twice")
    return fleet, names or list(fleet.names)


def _plan_table(layers: LayerCosts, chain: ChainDevices, plan: Plan, title: str) -> Any:
    from rich.table import Table

    from edgeddl.inference.profile import plan_rows

    table = Table("device", "layers", "compute ms", "bytes out", "link ms", title=title)
    for row in plan_rows(layers, chain, plan):
        table.add_row(*row)
    return table


def _predicted(plan: Plan) -> str:
    return (
        f"latency {plan.latency_s * 1e3:.3f} ms, pipelined throughput "
        f"{plan.throughput:,.1f} samples/s (bottleneck {plan.bottleneck_s * 1e3:.3f} ms)"
    )


def _cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from edgeddl.inference.plan import plan_split
    from edgeddl.inference.profile import chain_devices, layer_costs

    if args.batch < 1:
        raise ConfigError(f"--batch: must be >= 1, got {args.batch}")
    dep = _deployment(args, weights_needed=False)
    fleet, names = _chain(args)
    try:
        layers = layer_costs(dep.model, dep.info.input_shape)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    chain = chain_devices(fleet, names)
    try:
        plan = plan_split(layers, chain, args.objective, args.batch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    title = f"{dep.model_name} across {len(chain)} devices, best {args.objective}"
    console = Console()
    console.print(_plan_table(layers, chain, plan, title))
    console.print(f"predicted per sample: {_predicted(plan)}")
    return 0


_LEAVE = re.compile(r"^(?P<name>[^@]+)@(?:(?P<sample>\d+)|(?P<seconds>\d+(?:\.\d*)?)s)$")


def parse_leave(text: str) -> Any:
    """`NAME@SAMPLE` or `NAME@SECONDSs` as a `Leave`."""
    from edgeddl.inference.simulate import Leave

    m = _LEAVE.match(text)
    if m is None:
        raise ConfigError(f"--leave {text!r}: expected NAME@SAMPLE or NAME@SECONDSs")
    if m["sample"] is not None:
        return Leave(m["name"], at_sample=int(m["sample"]))
    return Leave(m["name"], at_s=float(m["seconds"]))


def _cmd_run(args: argparse.Namespace) -> int:
    from edgeddl.cli.infer_report import print_report
    from edgeddl.inference.profile import layer_costs
    from edgeddl.inference.simulate import PipelineConfig, simulate
    from edgeddl.models.layers import model_layers

    if args.samples < 1 or args.micro_batch < 1:
        raise ConfigError("--samples and --micro-batch must be >= 1")
    if args.timeout <= 0:
        raise ConfigError(f"--timeout: must be > 0, got {args.timeout}")
    leaves = tuple(parse_leave(t) for t in args.leave)
    dep = _deployment(args)
    try:
        layers = model_layers(dep.model)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    fleet_scenario = load_scenario(args.fleet)
    fleet, names = _chain(args)
    num = min(args.samples, len(dep.x_test))
    x, y = dep.x_test[:num], dep.y_test[:num]
    try:
        costs = layer_costs(dep.model, dep.info.input_shape)
        cfg = PipelineConfig(
            objective=args.objective,
            micro_batch=args.micro_batch,
            activations=args.activations,
            link_noise=not args.no_link_noise,
            leaves=leaves,
        )
        result = simulate(layers, costs, fleet, names, x, cfg, seed=fleet_scenario.run.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    procs = None
    if args.processes:
        from edgeddl.inference.processes import run_on_processes

        try:
            procs = run_on_processes(layers, costs, fleet, names, x, cfg, timeout_s=args.timeout)
        except (ValueError, RuntimeError, TimeoutError) as e:
            raise ConfigError(f"--processes: {e}") from None
    print_report(dep, costs, fleet, cfg, x, y, result, procs)
    return 0


PLAN = InferAction(
    "plan", "where to split a model across a chain of devices (latency or throughput)",
    _plan_args, _cmd_plan,
)  # fmt: skip
RUN = InferAction(
    "run", "stream test samples through a plan on the simulated fleet (and processes)",
    _run_args, _cmd_run,
)  # fmt: skip

QUANTIZE = InferAction("quantize", QUANTIZE_HELP, quantize_args, cmd_quantize)

# ---- The actions of `edgeddl infer`: list an InferAction here, that is the whole registration.
ACTIONS: tuple[InferAction, ...] = (PLAN, RUN, QUANTIZE)


def add_infer_parser(sub: Any) -> None:
    """`edgeddl infer` and its actions, on the main parser's subparsers `sub`."""
    inf = sub.add_parser("infer", help="distributed inference across a fleet's devices")
    inf_sub = inf.add_subparsers(dest="infer_command", required=True, metavar="ACTION")
    for action in ACTIONS:
        action.add_arguments(inf_sub.add_parser(action.name, help=action.help))


def cmd_infer(args: argparse.Namespace) -> int:
    return next(a for a in ACTIONS if a.name == args.infer_command).handler(args)
