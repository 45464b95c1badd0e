"""End to end on the simulated fleet: a small heterogeneous fleet learns, and its run folder
and summary are complete and add up."""

from __future__ import annotations

import itertools
import json
import tomllib

import pytest
import torch
from small_fleet import check_summary as _check_summary
from small_fleet import small_scenario as _scenario
from torch import nn
from torch.utils.data import Dataset

import edgeddl
from edgeddl.config.loader import scenario_from_dict
from edgeddl.report.files import RUN_FILES


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> edgeddl.RunResult:
    return edgeddl.run(_scenario(), out_dir=tmp_path_factory.mktemp("run"), progress=False)


def test_small_fleet_learns_and_summary_adds_up(small_run: edgeddl.RunResult) -> None:
    s = small_run.summary
    assert s["final_test_accuracy"] >= 0.6  # chance is 0.1
    assert s["num_steps"] == 400
    assert s["samples"] == 400 * 128  # no crash: every sample of every step counted
    _check_summary(s)
    # Every device took part and the pc, the fastest, took the largest share.
    by_name = {d["name"]: d for d in s["per_device"]}
    assert all(d["samples"] > 0 for d in by_name.values())
    assert by_name["pc"]["samples"] > by_name["jetson"]["samples"] > by_name["pi-0"]["samples"]


def test_run_folder_files(small_run: edgeddl.RunResult) -> None:
    d = small_run.run_dir
    for name in (*RUN_FILES, "accuracy.png"):
        assert (d / name).stat().st_size > 0, name
    resolved = tomllib.loads((d / "config.resolved.toml").read_text())
    assert scenario_from_dict(resolved) == _scenario()
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 100, 200, 300, 400]
    assert rows[0]["virtual_time_s"] == 0 and rows[0]["train_loss"] is None
    assert all(a["virtual_time_s"] < b["virtual_time_s"] for a, b in itertools.pairwise(rows))
    summary = json.loads((d / "summary.json").read_text())
    assert summary["final_test_accuracy"] == rows[-1]["test_accuracy"]
    assert not list(d.glob(".*.tmp"))  # atomic writes leave no temporaries behind
    saved = torch.load(d / "model.pt", weights_only=True)
    final = small_run.model.state_dict()
    assert saved.keys() == final.keys()
    assert all(torch.equal(saved[k], final[k]) for k in final)


def test_same_seed_same_run(tmp_path, small_run: edgeddl.RunResult) -> None:
    again = edgeddl.run(_scenario(), out_dir=tmp_path, progress=False).summary
    s = small_run.summary
    assert again["virtual_time_s"] == s["virtual_time_s"]
    assert again["final_test_accuracy"] == s["final_test_accuracy"]
    assert again["per_device"] == s["per_device"]


def test_crash_loses_that_step_and_the_rest_go_on(tmp_path) -> None:
    base = edgeddl.run(
        _scenario(train={"num_steps": 30, "eval_every": 30}), out_dir=tmp_path / "a", progress=False
    ).summary
    t_crash = base["virtual_time_s"] / 2
    events = [
        {"at_s": t_crash, "device": "jetson", "action": "crash"},
        {"at_s": t_crash * 1.5, "device": "jetson", "action": "join"},
    ]
    s = edgeddl.run(
        _scenario(train={"num_steps": 30, "eval_every": 30}, events=events),
        out_dir=tmp_path / "b",
        progress=False,
    ).summary
    _check_summary(s)
    assert s["num_steps"] == 30
    assert s["steps_with_lost_work"] >= 1
    assert s["samples"] < 30 * 128  # the crashed step's share is missing...
    jetson = next(d for d in s["per_device"] if d["name"] == "jetson")
    assert jetson["steps"] < 30  # ...and the jetson sat out until it rejoined
    assert [e["action"] for e in s["events"]] == ["crash", "join"]
    # The others wait out failure detection (1 s by default) before the crashed step ends.
    assert s["virtual_time_s"] > t_crash + 1.0
    assert s["virtual_time_s"] > base["virtual_time_s"] + 0.5


class _ListDataset(Dataset):
    """Not a TensorDataset: the API must take any map-style torch Dataset."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.items = list(zip(x, y, strict=True))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i]


def test_python_api_takes_any_model_and_dataset(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 6, generator=g) * 3
    y = torch.randint(0, 3, (600,), generator=g)
    x = centers[y] + torch.randn(600, 6, generator=g)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    result = edgeddl.run(
        _scenario(train={"num_steps": 60, "eval_every": 30, "global_batch": 64}),
        model=model,
        train_set=_ListDataset(x[:500], y[:500]),
        test_set=_ListDataset(x[500:], y[500:]),
        out_dir=tmp_path,
        progress=False,
    )
    assert result.model is model
    assert result.summary["model"]["name"] == "custom"
    assert result.summary["dataset"]["name"] == "custom"
    assert result.summary["dataset"]["class_name"] == "_ListDataset"
    assert result.summary["final_test_accuracy"] > 0.8


def test_virtual_time_limit_holds_while_the_fleet_is_empty(tmp_path) -> None:
    events = [
        {"at_s": 0.05, "device": "pc", "action": "leave"},
        {"at_s": 0.05, "device": "jetson", "action": "leave"},
        {"at_s": 0.05, "device": "pi", "action": "leave"},
        {"at_s": 1000.0, "device": "pc", "action": "join"},
    ]
    s = edgeddl.run(
        _scenario(train={"num_steps": 400, "max_virtual_time_s": 1.0}, events=events),
        out_dir=tmp_path,
        progress=False,
    ).summary
    _check_summary(s)
    assert s["num_steps"] < 400
    assert s["virtual_time_s"] < 1.0  # it stopped instead of waiting for the join at 1000 s


# --- compression ----------------------------------------------------------------------------


def test_two_step_compressed_run_learns_with_far_fewer_bytes_and_a_crash(tmp_path) -> None:
    """S-global's two-step scheme on a 29 k-parameter CNN: it learns, it sends > 100x fewer
    gradient bytes, the aggregate comes back sparse, and a crashed device loses only itself."""
    events = [{"at_s": 2.0, "device": "pi-1", "action": "crash"}]
    s = _scenario(
        model={"name": "cnn1d", "width": 64},
        compression={"compressor": "two_step", "density": 0.005, "values": "fp16"},
        events=events,
    )
    dense = _scenario(model={"name": "cnn1d", "width": 64}, events=events)
    comp = edgeddl.run(s, out_dir=tmp_path / "two_step", progress=False).summary
    ref = edgeddl.run(dense, out_dir=tmp_path / "dense", progress=False).summary
    _check_summary(comp)
    c = comp["compression"]
    assert c["compressor"] == "two_step" and c["compression_ratio"] > 100
    assert c["gradient_bytes_per_device_step"] < c["dense_gradient_bytes"] / 100
    assert comp["bytes_down"] < ref["bytes_down"] / 5  # sparse aggregates, not the model
    assert comp["final_test_accuracy"] > 0.5  # chance is 0.1
    assert comp["num_crashes"] == 1 and comp["virtual_time_s"] < ref["virtual_time_s"]


def test_powersgd_rides_the_ring_and_topk_is_refused_there(tmp_path) -> None:
    ring = {"topology": "ring", "num_steps": 60, "eval_every": 60}
    s = _scenario(train=ring, compression={"compressor": "powersgd", "rank": 1})
    summary = edgeddl.run(s, out_dir=tmp_path / "psgd", progress=False).summary
    _check_summary(summary)
    assert summary["compression"]["compression_ratio"] > 2
    with pytest.raises(edgeddl.ConfigError, match="cannot ride a ring all-reduce"):
        edgeddl.run(
            _scenario(train=ring, compression={"compressor": "topk"}),
            out_dir=tmp_path / "topk",
            progress=False,
        )


def test_lossless_compression_follows_the_uncompressed_trajectory(tmp_path) -> None:
    """`none` with zstd takes the whole compressed path (per-device passes, codec, decoded
    aggregate) yet loses nothing: the same seed gives the same losses to float tolerance."""
    train = {"num_steps": 100, "eval_every": 20}
    plain = edgeddl.run(_scenario(train=train), out_dir=tmp_path / "plain", progress=False)
    comp = edgeddl.run(
        _scenario(train=train, compression={"compressor": "none", "zstd": True}),
        out_dir=tmp_path / "zstd",
        progress=False,
    )
    rows = [json.loads(x) for x in (plain.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows_c = [json.loads(x) for x in (comp.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(rows_c) == 6
    for a, b in zip(rows, rows_c, strict=True):
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)
    for a, b in zip(rows[1:], rows_c[1:], strict=True):  # no train loss before step 1
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert comp.summary["compression"]["compression_ratio"] > 1.0  # zstd saved some bytes


def test_a_crash_event_wipes_the_memory_even_between_payloads(tmp_path, monkeypatch) -> None:
    """The crash event itself (not only a payload lost in flight) empties the device's
    memory, and on rejoining it fetches the model and the optimizer's momentum."""
    from edgeddl.strategy.compressed import CompressedDataParallel

    calls: list[int] = []
    forget = CompressedDataParallel.forget

    def spy(self: CompressedDataParallel, device: int) -> None:
        calls.append(device)
        forget(self, device)

    monkeypatch.setattr(CompressedDataParallel, "forget", spy)
    events = [
        {"at_s": 0.0, "device": "pi-1", "action": "crash"},  # before any payload exists
        {"at_s": 0.5, "device": "pi-1", "action": "join"},
    ]
    s = _scenario(
        compression={"compressor": "topk", "density": 0.01},
        events=events,
        train={"num_steps": 40, "eval_every": 40},
    )
    summary = edgeddl.run(s, out_dir=tmp_path / "r", progress=False).summary
    names = [d["name"] for d in summary["per_device"]]
    assert calls[0] == names.index("pi-1")
    pi, pc = (summary["per_device"][names.index(n)] for n in ("pi-1", "pc"))
    params = summary["model"]["num_params"]
    # Everyone else started from the same seeded replica and only ever received aggregates;
    # pi-1 fetched the model and the momentum once (8 bytes a parameter), then aggregates.
    assert 8 * params <= pi["bytes_down"] < 8 * params + pc["bytes_down"]
    assert pc["bytes_down"] < 8 * params


# --- federated --------------------------------------------------------------------------------

FEDERATED = {"strategy": "federated", "num_steps": 25, "eval_every": 25, "lr": 0.1}
LOCAL = {"local_steps": 20, "local_batch": 32, "fraction": 0.75}


def _federated(**sections: dict) -> edgeddl.Scenario:
    return _scenario(**{"train": FEDERATED, "federated": LOCAL, **sections})


@pytest.mark.parametrize("mu", [0.0, 0.01], ids=["fedavg", "fedprox"])
def test_federated_fleet_learns_and_its_summary_adds_up(tmp_path, mu: float) -> None:
    scenario = _federated(federated={**LOCAL, "proximal_mu": mu})
    result = edgeddl.run(scenario, out_dir=tmp_path, progress=False)
    s = result.summary
    _check_summary(s)
    assert s["final_test_accuracy"] > 0.5  # chance is 0.1
    assert s["strategy"] == "federated" and s["federated"]["num_rounds"] == 25
    assert s["federated"]["proximal_mu"] == mu and s["dropped_updates"] == []
    assert s["samples"] == 25 * 3 * 20 * 32  # 3 of 4 clients a round, 20 steps of 32
    devices = s["per_device"]
    assert sum(d["steps"] for d in devices) == 25 * 3
    update = s["compression"]["gradient_bytes_per_device_step"]
    assert all(d["bytes_up"] == d["steps"] * update for d in devices)  # one update a round
    resolved = tomllib.loads((result.run_dir / "config.resolved.toml").read_text())
    assert scenario_from_dict(resolved) == scenario


def test_federated_updates_compressed_send_far_fewer_bytes(tmp_path) -> None:
    comp = edgeddl.run(
        _federated(compression={"compressor": "topk", "density": 0.05, "values": "fp16"}),
        out_dir=tmp_path / "topk",
        progress=False,
    ).summary
    _check_summary(comp)
    c = comp["compression"]
    assert c["compressor"] == "topk" and c["compression_ratio"] > 10
    assert comp["bytes_up"] < comp["bytes_down"] / 10  # the model still goes down dense
    assert comp["final_test_accuracy"] > 0.35  # chance is 0.1


def test_federated_deadline_drops_the_stragglers_and_caps_each_round(tmp_path) -> None:
    deadline = 0.05  # the pc needs about 0.02 s a round; the jetson and the Pis about 0.1 s
    s = edgeddl.run(
        _federated(
            train={**FEDERATED, "num_steps": 6, "eval_every": 6},
            federated={**LOCAL, "fraction": 1.0, "deadline_s": deadline},
        ),
        out_dir=tmp_path,
        progress=False,
    ).summary
    _check_summary(s)
    dropped = s["dropped_updates"]
    assert {d["device"] for d in dropped} == {"jetson", "pi-0", "pi-1"}
    assert sorted(d["round"] for d in dropped) == sorted(list(range(6)) * 3)
    assert s["virtual_time_s"] == pytest.approx(6 * deadline)  # every round ends at it
    by_name = {d["name"]: d for d in s["per_device"]}
    assert by_name["pi-0"]["steps"] == 0 and by_name["pi-0"]["bytes_up"] == 0
    assert by_name["pc"]["steps"] == 6 and by_name["pi-0"]["time_s"] == pytest.approx(0.3)
