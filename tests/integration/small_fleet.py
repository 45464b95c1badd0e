"""A small mixed fleet on MNIST-1D for end-to-end tests, and the invariants every run
folder's summary must keep."""

from __future__ import annotations

import json
import math

import edgeddl
from edgeddl.config.loader import scenario_from_dict

SMALL_FLEET = {
    "run": {"name": "small", "seed": 3},
    "fleet": {
        "coordinator": {"profile": "pc", "link": "lan"},
        "devices": [
            {"name": "pc", "profile": "pc", "link": "lan"},
            {"name": "jetson", "profile": "jetson_nano", "link": "wifi"},
            {"name": "pi", "profile": "rpi4", "link": "wifi", "count": 2},
        ],
    },
    "data": {"dataset": "mnist1d", "shard_sizes": "capability"},
    "model": {"name": "cnn1d"},
    "train": {"global_batch": 128, "num_steps": 400, "eval_every": 100, "lr": 0.05},
}


def small_scenario(**sections: dict) -> edgeddl.Scenario:
    raw = json.loads(json.dumps(SMALL_FLEET))
    for name, values in sections.items():
        if isinstance(values, list):
            raw[name] = values
        else:
            raw.setdefault(name, {}).update(values)
    return scenario_from_dict(raw)


def check_summary(s: dict) -> None:
    devices = s["per_device"]
    assert s["num_devices"] == len(devices)
    assert sum(d["bytes_up"] for d in devices) == s["bytes_up"]
    assert sum(d["bytes_down"] for d in devices) == s["bytes_down"]
    assert sum(d["samples"] for d in devices) == s["samples"]
    for d in devices:
        assert math.isclose(
            sum(d["breakdown_s"].values()), d["time_s"], rel_tol=1e-9, abs_tol=1e-12
        )
        assert math.isclose(d["busy_s"] + d["idle_s"], d["time_s"], rel_tol=1e-9, abs_tol=1e-12)
        assert d["time_s"] <= s["virtual_time_s"] * (1 + 1e-9)
    for state, total in s["breakdown_s"].items():
        assert math.isclose(total, sum(d["breakdown_s"][state] for d in devices), rel_tol=1e-9)
    assert math.isclose(s["samples_per_virtual_s"], s["samples"] / s["virtual_time_s"])
