"""`run.threads = 0` picks torch threads from the model's work and the cores, never the load."""

from __future__ import annotations

import json
from pathlib import Path

import edgeddl
from edgeddl.config.loader import load_scenario
from edgeddl.threads import PARALLEL_MIN_FLOPS, auto_threads, pass_samples, scenario_threads


def test_small_passes_take_one_thread_large_ones_the_cores() -> None:
    assert auto_threads(PARALLEL_MIN_FLOPS / 10, cores=2) == 1
    assert auto_threads(PARALLEL_MIN_FLOPS * 10, cores=2) == 2
    assert auto_threads(PARALLEL_MIN_FLOPS * 10, cores=64) == 8  # small batches scale poorly
    assert auto_threads(PARALLEL_MIN_FLOPS * 10, cores=1) == 1


def test_the_scenario_decides_the_pass_and_an_explicit_setting_wins() -> None:
    paper = load_scenario("paper_fleet")
    assert pass_samples(paper) == 24  # 256 samples over 11 devices, rounded up
    fed = load_scenario("paper_fleet", ["train.strategy=federated", "federated.local_batch=32"])
    assert pass_samples(fed) == 32
    resnet_flops = 2.4e8  # ResNet-20 on 32x32 images, per training sample
    assert scenario_threads(paper, 1.9e5) == 1  # the 1-D CNN
    assert scenario_threads(paper, resnet_flops) == auto_threads(resnet_flops * 24)
    pinned = load_scenario("paper_fleet", ["run.threads=3"])
    assert scenario_threads(pinned, 1.9e5) == 3


def test_a_run_records_the_threads_it_used(tmp_path: Path) -> None:
    edgeddl.run("paper_fleet", overrides=["train.num_steps=2"], out_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / "summary.json").read_text())["threads"] == 1
