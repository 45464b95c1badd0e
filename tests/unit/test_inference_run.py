"""Executing inference plans: simulated pipeline, re-plan on leave, real processes, CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeddl.cli.main import main
from edgeddl.config.loader import load_scenario, to_toml
from edgeddl.fleet.fleet import Fleet
from edgeddl.inference.activations import ActivationCodec, largest_payload_bytes, nbytes
from edgeddl.inference.pipeline import received_shape, run_processes
from edgeddl.inference.plan import LayerCosts, evaluate_cuts
from edgeddl.inference.profile import chain_devices, layer_costs
from edgeddl.inference.simulate import Leave, PipelineConfig, SimResult, simulate
from edgeddl.inference.stages import StageRunner, single_device_outputs
from edgeddl.models import build_model
from edgeddl.models.layers import model_layers

CHAIN = ["pi-0", "pi-1", "jetson-0", "pc-0"]


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return Fleet.from_scenario(load_scenario("paper_fleet"))


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    shape = (1, 40) if name == "cnn1d" else (3, 32, 32)
    return build_model(name, input_shape=shape, num_classes=10, width=4 * (name != "cnn1d")), shape


def _run(name: str, fleet: Fleet, **cfg: object) -> tuple[SimResult, torch.Tensor, nn.Module]:
    model, shape = _model(name)
    x = torch.randn(24, *shape, generator=torch.Generator().manual_seed(1))
    config = PipelineConfig(**cfg)  # type: ignore[arg-type]
    result = simulate(model_layers(model), layer_costs(model, shape), fleet, CHAIN, x, config)
    return result, single_device_outputs(model, x, config.micro_batch), model


@pytest.mark.parametrize("name", ["cnn1d", "resnet20"])
@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_fp32_pipelined_outputs_equal_single_device_outputs(
    name: str, objective: str, fleet: Fleet
) -> None:
    result, reference, _ = _run(name, fleet, objective=objective, micro_batch=3)
    assert torch.equal(result.outputs, reference)
    if name == "resnet20" and objective == "throughput":  # a real split, not one device
        assert sum(e > s for s, e in result.plans[0].plan.segments) >= 2


@pytest.mark.parametrize(("fmt", "factor", "tolerance"), [("fp16", 2.0, 0.01), ("int8", 3.9, 0.1)])
def test_compressed_activations_within_tolerance_and_their_bytes(
    fmt: str, factor: float, tolerance: float, fleet: Fleet
) -> None:
    result, reference, model = _run("resnet20", fleet, objective="throughput", activations=fmt)
    assert not torch.equal(result.outputs, reference)  # it was compressed
    # Stated tolerance: max |diff| within `tolerance` of the outputs' largest magnitude.
    assert (result.outputs - reference).abs().max() <= tolerance * reference.abs().max()
    # Each send carries the codec's bytes of the activation it moved, scales included.
    costs = layer_costs(model, (3, 32, 32))
    codec = ActivationCodec(fmt)
    sends = [s for s in result.steps if s.kind == "send"]
    assert sends
    for s in sends:
        shape = costs.out_shapes[s.layers_done - 1] if s.layers_done else costs.input_shape
        assert s.num_bytes == codec.payload_bytes((1, *shape))
        assert 4 * np.prod(shape) / s.num_bytes >= factor  # fp32 bytes over these
    x = torch.randn(8, 16, 32, 32)
    assert nbytes(codec.encode(x)) == codec.payload_bytes(tuple(x.shape))
    assert 4 * x.numel() / nbytes(codec.encode(x)) >= factor


def test_int8_codes_and_scales_round_trip() -> None:
    codec = ActivationCodec("int8")
    x = torch.relu(torch.randn(4, 3, 5, 5)) * torch.tensor([1.0, 10.0, 0.0]).view(1, 3, 1, 1)
    parts = codec.encode(x)
    assert parts[0].dtype == torch.uint8 and parts[1].shape == (3,)
    assert nbytes(parts) == x.numel() + 8 * 3
    back = codec.decode(parts)
    step = (x.amax(dim=(0, 2, 3)) / 255).view(1, 3, 1, 1)
    assert torch.all((back - x).abs() <= step / 2 + 1e-6)  # half a code per channel
    flat = torch.randn(5, 7)
    assert nbytes(codec.encode(flat)) == 35 + 8  # one scale for a 2-D tensor


def test_virtual_timings_of_a_hand_made_two_device_case(fleet: Fleet) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    costs = LayerCosts(
        flops=np.array([1e6, 2e6]), ops=np.array([2.0, 3.0]), param_bytes=np.array([80.0, 40.0]),
        out_bytes=np.array([16.0, 8.0]), input_bytes=16.0, out_shapes=((4,), (2,)),
        input_shape=(4,),
    )  # fmt: skip
    two = dataclasses.replace(
        fleet,
        names=["a", "b"], profile_names=["x", "x"], link_names=["y", "y"],
        flops_per_s=np.full(2, 1e9), op_overhead_s=np.zeros(2), memory_bytes=np.full(2, 1e9),
        up_bps=np.full(2, 8e6), down_bps=np.full(2, 8e6), latency_s=np.full(2, 0.001),
        jitter_s=np.full(2, 0.01), loss=np.zeros(2),
    )  # fmt: skip
    x = torch.randn(3, 4)
    cfg = PipelineConfig(objective="throughput", link_noise=False)
    result = simulate(model_layers(model), costs, two, ["a", "b"], x, cfg)
    assert result.plans[0].plan.segments == ((0, 1), (1, 2))
    # a computes 1 ms a sample; the link takes 2 ms latency + 16 B at 1 MB/s = 2.016 ms;
    # b computes 2 ms. a: [0,1] [1,2] [2,3]; link: [1,3.016] [3.016,5.032] [5.032,7.048];
    # b: [3.016,5.016] [5.032,7.032] [7.048,9.048].
    ms = 1e-3
    flat = [t for pair in result.micro_batch_s for t in pair]
    assert flat == pytest.approx([0, 5.016 * ms, 1 * ms, 7.032 * ms, 2 * ms, 9.048 * ms])
    assert result.makespan_s == pytest.approx(9.048 * ms)
    assert result.devices["a"].compute_s == pytest.approx(3 * ms)
    assert result.devices["a"].send_s == pytest.approx(3 * 2.016 * ms)
    assert result.devices["b"].bytes_received == 3 * 16
    plan = result.plans[0].plan  # the planner agrees: latency + (N - 1) bottlenecks
    assert result.makespan_s == pytest.approx(plan.latency_s + 2 * plan.bottleneck_s)
    assert torch.equal(result.outputs, single_device_outputs(model, x, 1))


@pytest.mark.parametrize("leave", [Leave("jetson-0", at_sample=9), Leave("pi-1", at_s=0.004)])
def test_replan_on_leave_keeps_outputs_exact_and_the_leaver_idle(
    leave: Leave, fleet: Fleet
) -> None:
    result, reference, _ = _run("resnet20", fleet, objective="throughput", leaves=(leave,))
    assert torch.equal(result.outputs, reference)
    assert len(result.plans) == 2 and result.plans[1].reason == f"{leave.device} left"
    assert leave.device in result.plans[0].devices and leave.device not in result.plans[1].devices
    left = result.devices[leave.device].left_at_s
    assert left is not None and result.plans[1].from_s == left
    assert all(s.end_s <= left for s in result.steps if leave.device in (s.device, s.to))
    assert result.resumed  # micro-batches were in flight, and carried on
    assert any(s.device == leave.device for s in result.steps)  # it worked before it left


def test_the_input_device_cannot_leave(fleet: Fleet) -> None:
    with pytest.raises(ValueError, match="holds the input"):
        _run("cnn1d", fleet, leaves=(Leave("pi-0", at_sample=3),))


def test_processes_outputs_equal_single_device_outputs(fleet: Fleet) -> None:
    model, shape = _model("cnn1d")
    costs = layer_costs(model, shape)
    chain = chain_devices(fleet, CHAIN[:3])
    plan = evaluate_cuts(costs, chain, [0, 2, 5, 8])
    assert plan is not None
    x = torch.randn(30, *shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    try:
        reference = single_device_outputs(model, x, 4)
    finally:
        torch.set_num_threads(threads)
    runner = StageRunner(model_layers(model))
    codec = ActivationCodec("fp32")
    limit = largest_payload_bytes(costs, codec, 4)
    assert limit == 4 * 4 * 25 * 19  # the first conv's output is the largest
    run = run_processes(runner, plan.segments, x, codec, 4, max_payload_bytes=limit, timeout_s=60)
    assert torch.equal(run.outputs, reference)
    assert run.bytes_sent == [4 * 30 * 25 * 19, 4 * 30 * 25 * 5, 0]
    assert run.wall_s > 0 and len(run.latency_s) == 8
    assert len(run.generations) == 1 and not run.departures and run.generations[0].rerun == 0


class _Inflating:
    """A stage that sends a peer 100 times the activation the plan's cut has (faulty or
    hostile): module level, so the spawned processes can load it."""

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner

    def __call__(self, start: int, end: int, act: torch.Tensor) -> torch.Tensor:
        out = self.runner(start, end, act)
        return out.repeat(100, *[1] * (out.dim() - 1)) if start == 0 else out


def test_a_stage_never_allocates_what_a_peers_header_claims() -> None:
    """A receiver sizes its buffers from the header its peer sends: one announcing more than
    the plan's largest cut stops the plan instead of being allocated."""
    model, shape = _model("cnn1d")
    codec = ActivationCodec("int8")
    limit = largest_payload_bytes(layer_costs(model, shape), codec, 4)
    header = torch.zeros(8, dtype=torch.int64)
    header[:4] = torch.tensor([3, 4, 25, 19])
    assert received_shape(header, codec, limit) == (4, 25, 19)
    for dims, why in [
        ([3, 2**20, 2**20, 19], "announced an activation of shape"),
        ([3, 4, -25, 19], "shape"),
        ([9, 4, 25, 19], "9 dimensions"),
        ([0], "0 dimensions"),
    ]:
        header[: len(dims)] = torch.tensor(dims)
        with pytest.raises(ValueError, match=why):
            received_shape(header, codec, limit)
    runner = _Inflating(StageRunner(model_layers(model)))
    x = torch.randn(8, *shape)
    with pytest.raises(RuntimeError, match=r"plan 1 failed: .*process 1: a peer announced"):
        run_processes(runner, [(0, 2), (2, 8)], x, codec, 4, max_payload_bytes=limit)


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("edgeddl: error: ")
    return err


def test_infer_run_cli_loads_a_run_folder_and_gives_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = load_scenario("paper_fleet")
    (tmp_path / "config.resolved.toml").write_text(to_toml(scenario))
    base = ["infer", "run", str(tmp_path), "--fleet", "paper_fleet", "--samples", "16"]
    assert "no trained model" in _error(capsys, base)
    cnn1d = build_model("cnn1d", input_shape=(1, 40), num_classes=10).state_dict()
    torch.save(cnn1d, tmp_path / "model.pt")
    assert main([*base, "--devices", "pi-0,pc-0", "--leave", "pc-0@4"]) == 0
    out = capsys.readouterr().out
    assert "trained weights from" in out and "identical to single-device outputs" in out
    assert "pc-0 left" in out
    (tmp_path / "model.pt").write_bytes(b"not a torch file")
    assert "not a readable model file" in _error(capsys, base)
    torch.save(build_model("mlp", input_shape=(1, 40), num_classes=10).state_dict(),
               tmp_path / "model.pt")  # fmt: skip
    assert "not the weights of this run's cnn1d" in _error(capsys, base)
    torch.save(cnn1d, tmp_path / "model.pt")
    assert "expected NAME@SAMPLE" in _error(capsys, [*base, "--leave", "pc-0"])
    assert "holds the input" in _error(capsys, [*base, "--leave", "pc-0@3"])  # first here
    procs = [*base, "--devices", "pi-0,pc-0", "--processes", "--timeout", "60"]
    assert "simulated only" in _error(capsys, [*procs, "--leave", "pc-0@0.001s"])
    assert main([*procs, "--leave", "pc-0@4"]) == 0  # the 1-D CNN stays on pi-0: pc-0 is idle
    out = capsys.readouterr().out
    assert "across processes" in out and "pc-0 left at" in out
    assert "processes' outputs: identical to single-device outputs" in out
    scen = ["infer", "run", "paper_fleet", "--fleet", "paper_fleet", "--samples", "8"]
    assert main([*scen, "--activations", "int8"]) == 0
    assert "seeded, untrained" in capsys.readouterr().out
