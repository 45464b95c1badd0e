"""The [compression] section: typed values, per-group settings, capability checks, policy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgeddl.compress.adapt import DensityPolicy
from edgeddl.compress.base import Layout
from edgeddl.compress.registry import COMPRESSORS, build_compressor, check_compression
from edgeddl.config.loader import ConfigError, scenario_from_dict
from edgeddl.config.schema import AdaptConfig, CompressionConfig, CompressorConfig
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
        (CompressionConfig(compressor="fp16", adapt=AdaptConfig(enabled=True)), "star", "has none"),
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
            cfg = CompressorConfig(compressor=name, threshold=0.1)  # type: ignore[arg-type]
            assert build_compressor(cfg, layout, seed=0, device_index=0).name == name


def test_policy_gives_a_lan_device_more_than_an_lte_device() -> None:
    policy = DensityPolicy(
        AdaptConfig(enabled=True, target_share=0.2, max_density=0.5), numel=100_000
    )
    link = LinkEstimate(
        up_goodput_bps=np.array([940e6, 10e6, 10e6]),
        down_goodput_bps=np.array([940e6, 30e6, 30e6]),
        latency_s=np.array([0.0005, 0.03, 0.03]),
    )
    d = policy.densities(
        link, work_s=0.5, down_bytes=np.zeros(3), bytes_per_value=np.array([6.0, 6.0, 3.0])
    )
    assert d[0] == 0.5  # the LAN budget buys more than the cap
    budget = 0.2 / 0.8 * 0.5 - 0.03 - 0.03  # the down latency, then one latency up
    assert d[1] == pytest.approx((budget * 10e6 / 8 - 8) / (6 * 100_000))
    assert d[2] == pytest.approx(2 * d[1], rel=1e-3)  # cheaper values: twice as many
    # A tiny step leaves LTE nothing: it falls back to the floor.
    tiny = policy.densities(
        link, work_s=0.01, down_bytes=np.zeros(3), bytes_per_value=np.full(3, 6.0)
    )
    assert tiny[1] == policy.cfg.min_density
