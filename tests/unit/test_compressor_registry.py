"""The compressor registry (config/compressors.py): every registered name builds, declares what
its class has, and is all the checks read; one registration is all a new compressor needs."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from edgeddl.cli.main import main
from edgeddl.compress.base import Compressor, Layout
from edgeddl.compress.feedback import MomentumFeedback, NoFeedback, ResidualFeedback
from edgeddl.compress.registry import build_compressor, build_feedback, build_phased
from edgeddl.config import compressors
from edgeddl.config.compression import (
    AdaptConfig,
    CompressionConfig,
    CompressorConfig,
    check_compression,
)
from edgeddl.config.compressors import COMPRESSORS, BuildContext, CompressorSpec, compressor_names
from edgeddl.config.loader import ConfigError, scenario_from_dict
from edgeddl.config.split import SplitConfig
from edgeddl.security.session import check_sealable
from edgeddl.strategy.build import build_strategy

LAYOUT = Layout(((40, 20), (200,)))
FLEET = {"devices": [{"name": "pc", "profile": "pc"}]}


def _setting(name: str, **params: Any) -> CompressorConfig:
    return CompressorConfig(compressor=name, threshold=0.1, sample_fraction=1.0, **params)


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_every_registered_compressor_builds_and_has_the_declared_capabilities(name: str) -> None:
    spec = COMPRESSORS[name]
    cfg = _setting(name)
    built = cfg.build(LAYOUT, seed=3, device_index=1)
    assert built.name == name
    for capability in ("num_phases", "fixed_size", "allreduce"):
        declared = getattr(spec, capability)
        assert getattr(built, capability) == getattr(type(built), capability) == declared
    if spec.num_phases == 1:
        assert type(build_compressor(cfg, LAYOUT, 3, 1)) is type(built)
        with pytest.raises(ValueError, match="single-phase"):
            build_phased(cfg, LAYOUT, 3)
    else:
        assert type(build_phased(cfg, LAYOUT, 3)) is type(built)
        with pytest.raises(ValueError, match="not single-phase"):
            build_compressor(cfg, LAYOUT, 3, 1)
    assert set(spec.params) <= set(CompressorConfig.__dataclass_fields__)


@pytest.mark.parametrize("name", compressor_names(lambda s: s.adapt_density))
def test_a_density_the_policy_sets_changes_what_is_sent(name: str) -> None:
    x = torch.randn(LAYOUT.numel, generator=torch.Generator().manual_seed(0))
    sent = []
    for density in (0.05, 0.5):
        comp = build_compressor(_setting(name), LAYOUT, 0, 0)
        comp.density = density  # type: ignore[attr-defined]  # as set_density does
        sent.append(comp.compress(x, 0).num_sent)
    assert sent[0] < sent[1]


@pytest.mark.parametrize("name", list(COMPRESSORS))
@pytest.mark.parametrize("mode", ["auto", "on", "off"])
def test_error_feedback_follows_the_registration(name: str, mode: str) -> None:
    spec = COMPRESSORS[name]
    memory = build_feedback(_setting(name, error_feedback=mode), 0.9, 4)
    if spec.owns_momentum:
        expected: type = MomentumFeedback
    elif mode == "on" or (mode == "auto" and spec.feedback_by_default):
        expected = ResidualFeedback
    else:
        expected = NoFeedback
    assert type(memory) is expected


KNOWN = {  # what the registry says of the compressors the old hand-kept lists named
    "topk": {"adapt_density": True, "cut_tensors": True},
    "randomk": {"adapt_density": True, "cut_tensors": True},
    "two_step": {"adapt_density": True, "cut_tensors": False},
    "dgc": {"adapt_density": True, "cut_tensors": False, "owns_momentum": True},
    "qsgd": {"cut_tensors": True, "feedback_by_default": False},
    "int8": {"cut_tensors": True, "adapt_density": False},
    "signsgd": {"cut_tensors": False, "feedback_by_default": True},
    "powersgd": {"cut_tensors": False, "adapt_density": False, "every_device": True},
}


@pytest.mark.parametrize("name", list(KNOWN))
def test_registered_capabilities_keep_the_old_rules(name: str) -> None:
    spec = COMPRESSORS[name]
    for capability, value in KNOWN[name].items():
        assert getattr(spec, capability) is value, capability


def test_device_seeds_are_independent_and_reproducible() -> None:
    seeds = [BuildContext(layout=LAYOUT, seed=7, device_index=i).device_seed for i in range(4)]
    assert len(set(seeds)) == 4
    assert seeds[2] == (7 * 1_000_003 + 3) % 2**63


@pytest.mark.parametrize(
    ("compressor", "hint"),
    [("top-k", "did you mean 'topk'? "), ("PowerSGD", "did you mean 'powersgd'? "), ("zip", "")],
)
def test_an_unknown_name_is_one_line_with_the_name_it_likely_means(
    compressor: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as e:
        scenario_from_dict({"fleet": FLEET, "compression": {"compressor": compressor}})
    listed = ", ".join(repr(n) for n in COMPRESSORS)
    unknown = f"unknown compressor {compressor!r}; {hint}expected one of {listed}"
    assert str(e.value) == f"compression.compressor: {unknown}"
    with pytest.raises(ConfigError, match=r"^split\.compression\.compressor: .*'dgc'\?"):
        scenario_from_dict({"fleet": FLEET, "split": {"compression": {"compressor": "dgcc"}}})


def test_a_spec_that_contradicts_itself_is_refused() -> None:
    build = COMPRESSORS["topk"].build
    with pytest.raises(ValueError, match="single-phase and memoryless"):
        CompressorSpec(name="x", build=build, about="", num_phases=2, cut_tensors=True)
    with pytest.raises(ValueError, match="density parameter"):
        CompressorSpec(name="x", build=build, about="", adapt_density=True)
    with pytest.raises(ValueError, match="registered twice"):
        compressors.register(COMPRESSORS["topk"])


def test_one_registration_is_all_a_new_compressor_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    def build(c: CompressorConfig, at: BuildContext) -> Compressor:
        from edgeddl.compress.sparse import RandomKCompressor

        comp = RandomKCompressor(c.density, at.seed)
        comp.name = "mine"
        return comp

    spec = CompressorSpec(
        name="mine",
        build=build,
        about="random-k under another name",
        params=("density",),
        allreduce=True,
        adapt_density=True,
        cut_tensors=True,
        feedback_by_default=False,
    )
    monkeypatch.setitem(compressors._SPECS, "mine", spec)  # as register() would, undone after
    cfg = CompressionConfig(compressor="mine", density=0.1)
    assert build_compressor(cfg, LAYOUT, 0, 0).name == "mine"
    assert type(build_feedback(cfg, 0.9, 2)) is NoFeedback
    check_compression(cfg, "ring")
    check_compression(CompressionConfig(compressor="mine", adapt=AdaptConfig(enabled=True)), "star")
    SplitConfig(compression=CompressorConfig(compressor="mine"))
    with pytest.raises(ValueError, match=r"randomk, powersgd, mine$"):
        check_compression(CompressionConfig(compressor="topk"), "ring")


@pytest.mark.parametrize("name", compressor_names(lambda s: s.every_device))
def test_federated_rounds_refuse_what_needs_every_device_every_step(name: str) -> None:
    raw = {"fleet": FLEET, "train": {"strategy": "federated"}, "compression": {"compressor": name}}
    scenario = scenario_from_dict(raw)
    with pytest.raises(ConfigError, match=f"^compression.compressor: {name} needs every device"):
        build_strategy(scenario, nn.Linear(3, 2), nn.functional.cross_entropy, np.ones(1))


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_sealed_runs_refuse_exactly_the_multi_phase_compressors(name: str) -> None:
    comp = {"compressor": name, "threshold": 0.1}
    scenario = scenario_from_dict({"fleet": FLEET, "compression": comp})
    if COMPRESSORS[name].num_phases > 1:
        with pytest.raises(ConfigError, match="multi-round compressor"):
            check_sealable(scenario)
    else:
        check_sealable(scenario)


def test_the_registry_and_the_checks_load_without_torch() -> None:
    code = (
        "import sys\n"
        "import edgeddl.config.loader\n"
        "from edgeddl.config.compression import CompressionConfig, check_compression\n"
        "check_compression(CompressionConfig(compressor='powersgd'), 'ring')\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_lists_every_registered_compressor(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compressors"]) == 0
    out = capsys.readouterr().out
    for name in COMPRESSORS:
        assert f"│ {name} " in out
