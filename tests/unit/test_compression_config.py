"""The [compression] section: typed values, per-group settings, capability checks, policy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgeddl.compress.adapt import DensityPolicy
from edgeddl.compress.base import Layout
from edgeddl.compress.registry import build_compressor
from edgeddl.config.compression import (
    AdaptConfig,
    CompressionConfig,
    CompressorConfig,
    check_compression,
)
from edgeddl.config.compressors import COMPRESSORS
from edgeddl.config.loader import ConfigError, scenario_from_dict
from edgeddl.fleet.link import LinkEstimate


def _scenario(compression: dict[str, Any]) -> Any:
    return scenario_from_dict(
        {
            "fleet": {
                "devices": [
                    {"name": "pc", "profile": "pc"},
                    {"name": "pi", "profile": "rpi4", "link": "lte", "count": 2},
                ]
            },
            "compression": compression,
        }
    )


def test_per_group_and_per_device_settings_resolve_most_specific_first() -> None:
    s = _scenario(
        {
            "compressor": "topk",
            "density": 0.01,
            "groups": {
                "pi": {"compressor": "two_step", "density": 0.001},
                "pi-1": {"compressor": "fp16"},
            },
        }
    )
    c = s.compression
    assert c.for_device("pc", "pc").compressor == "topk"
    assert c.for_device("pi-0", "pi").density == 0.001
    assert c.for_device("pi-1", "pi").compressor == "fp16"
    assert c.enabled


@pytest.mark.parametrize(
    ("compression", "start"),
    [
        ({"compresor": "topk"}, "compression.compresor: unknown key; did you mean 'compressor'?"),
        ({"compressor": "zip"}, "compression.compressor: expected one of"),
        ({"density": 0}, "compression.density: must be in (0, 1]"),
        ({"compressor": "threshold"}, "compression.threshold must be > 0"),
        ({"groups": {"nobody": {}}}, "compression.groups.nobody: unknown group or device"),
        ({"adapt": {"target_share": 1.5}}, "compression.adapt.target_share: must be in (0, 1)"),
        ({"groups": {"pi": {"levels": 500}}}, "compression.groups.pi.levels: must be in 1..127"),
    ],
)
def test_bad_compression_tables_name_the_key(compression: dict[str, Any], start: str) -> None:
    with pytest.raises(ConfigError) as e:
        _scenario(compression)
    assert str(e.value).startswith(start.split(":")[0])
    assert start.split("; ")[0].split(": ", 1)[-1].split(" (")[0] in str(e.value)


def test_no_compression_section_keeps_the_dense_path() -> None:
    assert not _scenario({}).compression.enabled
    assert not CompressionConfig().enabled


@pytest.mark.parametrize(
    ("cfg", "topology", "message"),
    [
        (CompressionConfig(compressor="topk"), "ring", "cannot ride a ring all-reduce"),
        (CompressionConfig(compressor="fp16", zstd=True), "ring", "zstd-compressed bytes"),
        (
            CompressionConfig(
                compressor="powersgd", groups={"pi": CompressorConfig(compressor="fp16")}
            ),
            "star",
            "every device must use it",
        ),
        (
            CompressionConfig(compressor="dgc", groups={"pi": CompressorConfig(compressor="topk")}),
            "star",
            "every device must use dgc",
        ),
        (
            CompressionConfig(compressor="fp16", adapt=AdaptConfig(enabled=True)),
            "star",
            "does not have",
        ),
        (
            CompressionConfig(compressor="topk", adapt=AdaptConfig(enabled=True)),
            "ring",
            "all-reduce",
        ),
        (CompressionConfig(compressor="powersgd", values="fp16"), "star", "float32"),
    ],
)
def test_impossible_combinations_are_refused(
    cfg: CompressionConfig, topology: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_compression(cfg, topology)


@pytest.mark.parametrize("name", ["none", "fp16", "randomk", "powersgd"])
def test_all_reduce_compressors_may_ride_a_ring(name: str) -> None:
    check_compression(CompressionConfig(compressor=name), "ring")
    assert COMPRESSORS[name].allreduce


def test_every_single_phase_compressor_builds_from_its_config() -> None:
    layout = Layout(((4, 3), (4,)))
    for name, cls in COMPRESSORS.items():
        if cls.num_phases == 1:
            cfg = CompressorConfig(compressor=name, threshold=0.1)
            assert build_compressor(cfg, layout, seed=0, device_index=0).name == name


def _links() -> LinkEstimate:
    return LinkEstimate(  # a LAN device and two LTE devices
        up_goodput_bps=np.array([940e6, 10e6, 10e6]),
        down_goodput_bps=np.array([940e6, 30e6, 30e6]),
        latency_s=np.array([0.0005, 0.03, 0.03]),
        jitter_s=np.array([0.0, 0.01, 0.01]),
    )


def test_policy_spends_the_slack_the_slowest_path_leaves() -> None:
    policy = DensityPolicy(AdaptConfig(enabled=True, target_share=0.2), numel=100_000)
    up = policy.upload_bytes(_links(), work_s=0.02)
    floor = 2 * 0.04  # LTE: latency and jitter, one message each way
    target = (0.02 + floor) / 0.8
    lte_slack = target - 0.02 - floor
    down_cap = lte_slack * 30e6 / 8 / 2  # half the LTE slack for the aggregate
    # The LAN device could send megabytes in its slack, but the union of everything comes
    # back down to the LTE devices: the uploads together fit the aggregate's cap.
    assert up.sum() == pytest.approx(down_cap)
    assert up[0] > 10 * up[1] and up[1] == pytest.approx(up[2])
    # Each LTE upload, before the joint scaling, fits in what its slack leaves.
    assert up[1] <= (lte_slack - 8 * down_cap / 30e6) * 10e6 / 8


def test_policy_densities_follow_the_measured_bytes_per_value_and_clamp() -> None:
    cfg = AdaptConfig(enabled=True, target_share=0.2, min_density=0.001, max_density=0.02)
    policy = DensityPolicy(cfg, numel=100_000)
    d = policy.densities(_links(), work_s=0.02, bytes_per_value=np.array([6.0, 6.0, 3.0]))
    up = policy.upload_bytes(_links(), work_s=0.02)
    assert d[0] == pytest.approx(min((up[0] - 8) / 600_000, 0.02))
    assert d[2] == pytest.approx(max(2 * (up[1] - 8) / 600_000, 0.001))
    # Nothing to spend when the step is all latency on every path: the floor.
    same = LinkEstimate(
        up_goodput_bps=np.full(2, 1e3),
        down_goodput_bps=np.full(2, 1e3),
        latency_s=np.full(2, 0.1),
        jitter_s=np.zeros(2),
    )
    assert (policy.densities(same, 0.0, np.full(2, 6.0)) == 0.001).all()
