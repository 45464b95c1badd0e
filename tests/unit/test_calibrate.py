"""`edgeddl calibrate` output: a profile file a scenario can include, measured as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgeddl.config.loader import load_scenario
from edgeddl.config.schema import DeviceProfile
from edgeddl.fleet.fleet import Fleet
from edgeddl.models.calibrate import profile_toml


def test_profile_file_is_included_and_used(tmp_path: Path) -> None:
    measured = DeviceProfile(
        flops_per_s=3.5e10, memory_bytes=8e9, op_overhead_s=2e-5, source="edgeddl calibrate on test"
    )
    (tmp_path / "board.toml").write_text(profile_toml("board", measured))
    (tmp_path / "s.toml").write_text(
        'include = ["board.toml"]\n[[fleet.devices]]\nname = "b"\nprofile = "board"\n'
    )
    scenario = load_scenario(tmp_path / "s.toml")
    assert scenario.profiles["board"] == measured  # the resolved config carries it whole
    fleet = Fleet.from_scenario(scenario)
    assert fleet.flops_per_s.tolist() == [3.5e10]
    assert fleet.fixed_step_s(100).tolist() == pytest.approx([100 * 2e-5])


def test_run_restores_the_callers_thread_count(tmp_path: Path) -> None:
    import edgeddl

    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    edgeddl.run(
        "paper_fleet",
        overrides=[
            f"run.threads={wanted}",
            "train.num_steps=2",
            "data.dataset=synthetic",
            "model.name=mlp",
            "data.num_samples=400",
        ],
        out_dir=tmp_path,
        progress=False,
    )
    assert torch.get_num_threads() == before
