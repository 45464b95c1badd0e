"""Split learning end to end on the simulated fleet, and the privacy promise of split and
federated learning: no raw input ever crosses to the coordinator."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from small_fleet import check_summary, small_scenario

import edgeddl
from edgeddl.config.loader import ConfigError
from edgeddl.strategy.federated import Federated
from edgeddl.strategy.split.learning import SplitLearning
from edgeddl.strategy.split.roles import CutWire

SPLIT = {"strategy": "split", "num_steps": 150, "eval_every": 50, "lr": 0.05}


def _split(split: dict[str, Any], **sections: Any) -> edgeddl.Scenario:
    return small_scenario(**{"train": SPLIT, "split": split, **sections})


@pytest.mark.parametrize(
    "split",
    [
        {"cut": 1},
        {"cut": 3, "labels": "u_shaped", "splitfed": True, "compression": {"compressor": "int8"}},
    ],
    ids=["plain", "u_shaped-splitfed-int8"],
)
def test_split_learning_learns_and_counts_what_crosses_the_cut(tmp_path, split) -> None:
    result = edgeddl.run(_split(split), out_dir=tmp_path, progress=False)
    s = result.summary
    check_summary(s)
    assert s["strategy"] == "split"
    assert s["final_test_accuracy"] > 0.4  # chance is 0.1
    info = s["split"]
    assert info["cut"] == split["cut"] and info["splitfed"] == split.get("splitfed", False)
    state = info["splitfed_bytes_per_device_step"] // 2
    steps = sum(d["steps"] for d in s["per_device"])
    # Every byte up is a cut tensor, labels or (SplitFed) a front; down the same way.
    assert s["bytes_up"] == info["cut_bytes_up"] + steps * state
    assert s["bytes_down"] <= info["cut_bytes_down"] + steps * state
    assert s["bytes_down"] >= info["cut_bytes_down"]
    dense = info["cut_bytes_per_sample_fp32"] * s["samples"]
    if split.get("compression"):  # int8 codes and one scale per sample: ~4x fewer
        assert 3.5 < info["cut_compression_ratio"] < 4.0
        assert info["cut_bytes_up"] < dense / 3
    else:
        # fp32 both ways, plus codec headers and the labels at 4 bits each (10 classes).
        assert dense < info["cut_bytes_down"] < info["cut_bytes_up"] < 1.01 * dense
    # The device computes its front (and head), the coordinator the rest: together the
    # whole model's work (the gradient at the cut is one the whole model computes too).
    device, rear = info["device_train_flops_per_sample"], info["coordinator_train_flops_per_sample"]
    assert min(device, rear) > 0 and device + rear == s["model"]["train_flops_per_sample"]
    devices = s["per_device"]
    assert all(d["breakdown_s"]["compute"] > 0 for d in devices)


def test_split_learning_refuses_what_it_cannot_do(tmp_path) -> None:
    def run(scenario: edgeddl.Scenario) -> None:
        edgeddl.run(scenario, out_dir=tmp_path, progress=False)

    with pytest.raises(ConfigError, match=r"^split\.cut: no layer named 'conv9'; the layers"):
        run(_split({"cut": "conv9"}))
    with pytest.raises(ConfigError, match=r"^split\.cut: cut index 7 leaves no layer"):
        run(_split({"cut": 7}))
    with pytest.raises(ConfigError, match=r"^split\.head_cut: 1 is not after the cut"):
        run(_split({"cut": 3, "labels": "u_shaped", "head_cut": 1}))
    with pytest.raises(ConfigError, match=r"^compression: split learning sends activations"):
        run(_split({}, compression={"compressor": "topk"}))
    anomaly = {"dataset": "sensors", "shard_sizes": "equal"}
    with pytest.raises(ConfigError, match=r"^split\.labels: an autoencoder's target is its input"):
        run(_split({}, data=anomaly, model={"name": "autoencoder1d"}))


# --- no raw data crosses -------------------------------------------------------------------


def _rows(x: torch.Tensor) -> np.ndarray:
    """Each sample's bytes, as one opaque value (to look up whole samples at once)."""
    flat = x.reshape(len(x), -1).to(torch.float32).numpy()
    return np.ascontiguousarray(flat).view(np.dtype((np.void, flat.shape[1] * 4))).ravel()


def _holds_a_sample(t: torch.Tensor, samples: np.ndarray, length: int) -> bool:
    """True if any `length` consecutive values of `t` are exactly one of `samples`."""
    flat = np.ascontiguousarray(t.detach().reshape(-1).to(torch.float32).numpy())
    if flat.size < length:
        return False
    windows = np.lib.stride_tricks.sliding_window_view(flat, length)
    keys = np.ascontiguousarray(windows).view(np.dtype((np.void, length * 4))).ravel()
    return bool(np.isin(keys, samples).any())


def _spy(monkeypatch: pytest.MonkeyPatch, cls: type, seen: list[Any]) -> None:
    prepare = cls.prepare

    def spying(self, x, y, counts, devices, step):  # type: ignore[no-untyped-def]
        ex = prepare(self, x, y, counts, devices, step)
        seen.append((x, ex))
        return ex

    monkeypatch.setattr(cls, "prepare", spying)


@pytest.mark.parametrize(
    "mode",
    [
        {"train": {"strategy": "split"}, "split": {"cut": 1}},
        {"train": {"strategy": "split"}, "split": {"cut": 1, "labels": "u_shaped"}},
        {"train": {"strategy": "federated"}, "federated": {"local_steps": 3, "local_batch": 16}},
    ],
    ids=["split", "split-u_shaped", "federated"],
)
def test_no_raw_input_crosses_to_the_coordinator(tmp_path, monkeypatch, mode) -> None:
    seen: list[Any] = []
    encoded: list[tuple[str, torch.Tensor]] = []
    encode = CutWire.encode

    def spying(self, t, kind, device, step):  # type: ignore[no-untyped-def]
        encoded.append((kind, t.detach().clone()))
        return encode(self, t, kind, device, step)

    monkeypatch.setattr(CutWire, "encode", spying)
    _spy(monkeypatch, SplitLearning, seen)
    _spy(monkeypatch, Federated, seen)
    train = {"num_steps": 6, "eval_every": 6, "global_batch": 64, **mode["train"]}
    scenario = small_scenario(**{**mode, "train": train})
    edgeddl.run(scenario, out_dir=tmp_path, progress=False)
    assert len(seen) == 6
    for x, ex in seen:
        samples, length = _rows(x), x[0].numel()
        assert _holds_a_sample(x, samples, length)  # the check finds a sample where one is
        assert ex.x is None and ex.y is None  # no batch is handed to the transport
        if mode["train"]["strategy"] != "split":
            crossed = [t for u in ex.updates for t in (u.values, *u.stats) if t is not None]
            assert crossed
            for t in crossed:
                assert not _holds_a_sample(t, samples, length)
    if mode["train"]["strategy"] == "split":  # every tensor the wire encoded, both ways
        assert len(encoded) >= 6 * 2 * 3
        for _, t in encoded:
            assert not _holds_a_sample(t, samples, length)
        u_shaped = mode["split"].get("labels") == "u_shaped"
        kinds = {k for k, _ in encoded}
        assert ("labels" in kinds) != u_shaped  # U-shaped: labels never leave the device
