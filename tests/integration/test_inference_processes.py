"""Inference across real processes when a device leaves or crashes mid-stream: the survivors
re-plan in a new gloo group and the outputs stay those of one device (`torch.equal`).

A narrow ResNet-20 over three Pi-class boards, best throughput: three stages (layers 0-3,
4-6, 7-11), and two once a board is gone. Every wait is bounded by the run's timeout, so a
hang fails the test instead of stalling it.
"""

from __future__ import annotations

import pytest
import torch

from edgeddl.config.loader import load_scenario
from edgeddl.fleet.fleet import Fleet
from edgeddl.inference.processes import ProcessResult, run_on_processes
from edgeddl.inference.profile import layer_costs
from edgeddl.inference.simulate import Leave, PipelineConfig
from edgeddl.inference.stages import single_device_outputs
from edgeddl.models import build_model
from edgeddl.models.layers import model_layers

CHAIN = ["pi-0", "pi-1", "pi-2"]
SHAPE = (3, 32, 32)
MB = 2
TIMEOUT_S = 60.0


def _run(
    leaves: tuple[Leave, ...] = (), crashes: dict[str, int] | None = None
) -> tuple[ProcessResult, torch.Tensor]:
    fleet = Fleet.from_scenario(load_scenario("paper_fleet"))
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=SHAPE, num_classes=10, width=4)
    x = torch.randn(20, *SHAPE, generator=torch.Generator().manual_seed(1))
    cfg = PipelineConfig(objective="throughput", micro_batch=MB, leaves=leaves)
    result = run_on_processes(
        model_layers(model), layer_costs(model, SHAPE), fleet, CHAIN, x, cfg,
        crashes=crashes, timeout_s=TIMEOUT_S,
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process runs
    try:
        reference = single_device_outputs(model, x, MB)
    finally:
        torch.set_num_threads(threads)
    return result, reference


def _check_replanned(result: ProcessResult, gone: str, kind: str) -> None:
    run = result.run
    rest = tuple(n for n in CHAIN if n != gone)
    assert [chain for _, chain in result.plans] == [tuple(CHAIN), rest]
    assert [len(g.members) for g in run.generations] == [3, 2]  # three stages, then two
    assert run.generations[1].members == tuple(CHAIN.index(n) for n in rest)
    (dep,) = run.departures
    assert result.device(dep.process) == gone and dep.kind == kind and dep.generation == 0
    first, second = run.generations
    # The new plan starts at the first micro-batch without output, and re-runs the rest.
    assert second.from_mb == len(first.output_s)
    assert second.from_mb + len(second.output_s) == len(run.latency_s) == 10
    assert first.rerun == first.num_started - second.from_mb
    assert dep.at_s <= second.start_s < dep.at_s + TIMEOUT_S / 2  # noticed, not timed out


def test_a_requested_leave_continues_on_two_processes_with_identical_outputs() -> None:
    result, reference = _run(leaves=(Leave("pi-1", at_sample=11),))  # micro-batch 5
    assert torch.equal(result.run.outputs, reference)
    _check_replanned(result, "pi-1", "left")
    assert result.run.departures[0].at_mb == 5
    # The leaver did no work after it left: it sent micro-batches 0-4, nothing more.
    assert result.run.bytes_sent[1] == 5 * MB * result.plans[0][0].out_bytes[1]


@pytest.mark.parametrize("device", ["pi-1", "pi-2"])  # a middle stage, the last stage
def test_kill_9_of_a_stage_is_noticed_replanned_and_outputs_stay_identical(
    device: str,
) -> None:
    result, reference = _run(crashes={device: 3})  # SIGKILL right before micro-batch 3
    assert torch.equal(result.run.outputs, reference)
    _check_replanned(result, device, "crashed")
    assert result.run.departures[0].at_mb is None  # it said nothing: its pipe closed
    assert result.run.bytes_sent[CHAIN.index(device)] == 0  # a crash reports nothing
