"""The compressor registry: each compressor's name, capabilities and builder, registered once.

Adding a compressor is one `register(CompressorSpec(...))` here (after writing its class and
its builder in `edgeddl.compress`): config validation, `check_compression`, split learning,
the federated and sealed-run checks, error feedback and `edgeddl compressors` all read the
spec. As in torchtitan, the config builds its component (`CompressorConfig.build`); the
builder is named by its dotted path and imported only then, so `edgeddl.config` loads
without torch and never imports the layers above it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from edgeddl.config.checks import require

if TYPE_CHECKING:
    from edgeddl.config.compression import CompressorConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildContext:
    """What a compressor is built for besides its config: the flat tensor's layout, the run's
    seed (shared: random-k and PowerSGD draw alike on every device) and the device."""

    layout: Any
    """The flat tensor's `edgeddl.compress.base.Layout` (configs know no tensors)."""
    seed: int
    device_index: int = 0

    @property
    def device_seed(self) -> int:
        """An independent, reproducible seed for this device's own draws (QSGD's rounding)."""
        return (self.seed * 1_000_003 + self.device_index + 1) % 2**63


Builder = Callable[["CompressorConfig", BuildContext], object]
"""Builds a compressor (`edgeddl.compress`: a `Compressor` or a `PhasedCompressor`)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CompressorSpec:
    """One compressor: what the checks need to know about it, and how its config builds it."""

    name: str
    build: Builder | str
    """How a setting builds it: a function, or its dotted path ("package.module:function",
    imported only when called, so configs load without torch and without the compressors)."""
    about: str
    """What it sends, in a few words (`edgeddl compressors`)."""
    params: tuple[str, ...] = ()
    """The `[compression]` keys it reads."""
    num_phases: int = 1
    """Exchange rounds per step (PowerSGD: 2); more than one needs every device each round."""
    fixed_size: bool = True
    """Every payload of a given layout encodes to the same number of bytes."""
    allreduce: bool = False
    """Payloads of all devices share one format and sum on the way: it can ride a ring."""
    adapt_density: bool = False
    """Has a `density` the network-aware policy (`[compression.adapt]`) sets per device."""
    cut_tensors: bool = False
    """Usable on split learning's cut tensors: single-round and memoryless (an activation is
    new every step, so a memory would add last step's residual to another batch's tensor)."""
    feedback_by_default: bool = True
    """`error_feedback = "auto"` turns the residual memory on (QSGD: off, it is unbiased and
    its variance would feed the memory)."""
    owns_momentum: bool = False
    """Its memory carries the optimizer's momentum (DGC's momentum correction): the optimizer
    runs without it, and every device must use this compressor in every step."""
    check: Callable[[CompressorConfig], None] | None = None
    """Its own config rule, beyond the ranges every setting has (one-line ValueError)."""

    def __post_init__(self) -> None:
        require(self.num_phases >= 1, f"{self.name}: num_phases must be >= 1")
        require(
            not self.cut_tensors or (self.num_phases == 1 and not self.owns_momentum),
            f"{self.name}: a compressor for cut tensors must be single-phase and memoryless",
        )
        require(
            not self.adapt_density or "density" in self.params,
            f"{self.name}: adapt_density needs the density parameter",
        )

    def make(self, cfg: CompressorConfig, at: BuildContext) -> object:
        """The compressor `cfg` describes, built for `at`."""
        build = self.build
        if isinstance(build, str):
            module, _, name = build.partition(":")
            build = getattr(importlib.import_module(module), name)
        return build(cfg, at)

    @property
    def every_device(self) -> bool:
        """Needs every device, with this compressor, in every step (rounds or momentum)."""
        return self.num_phases > 1 or self.owns_momentum


_SPECS: dict[str, CompressorSpec] = {}
COMPRESSORS: Mapping[str, CompressorSpec] = MappingProxyType(_SPECS)
"""Every registered compressor by name, in registration order (the order listings use)."""


def register(spec: CompressorSpec) -> CompressorSpec:
    """Make `spec` a compressor a scenario may name (once per name)."""
    if spec.name in _SPECS:
        raise ValueError(f"compressor {spec.name!r} is registered twice")
    _SPECS[spec.name] = spec
    return spec


def compressor_names(where: Callable[[CompressorSpec], bool] = lambda _: True) -> list[str]:
    """The registered names whose spec passes `where`, in registration order."""
    return [name for name, spec in COMPRESSORS.items() if where(spec)]


# The registrations. Each builder lives beside its class in `edgeddl.compress` and is named by
# its dotted path: imported when a setting is built (torch stays out of configs).


register(
    CompressorSpec(
        name="none",
        build="edgeddl.compress.quantize:build_none",
        about="dense fp32",
        allreduce=True,
        cut_tensors=True,
    )
)


register(
    CompressorSpec(
        name="fp16",
        build="edgeddl.compress.quantize:build_fp16",
        about="dense fp16",
        allreduce=True,
        cut_tensors=True,
    )
)


register(
    CompressorSpec(
        name="int8",
        build="edgeddl.compress.quantize:build_int8",
        about="8-bit codes, one scale per layer",
        cut_tensors=True,
    )
)


register(
    CompressorSpec(
        name="qsgd",
        build="edgeddl.compress.quantize:build_qsgd",
        about="stochastic levels, sign, one norm per layer (QSGD)",
        params=("levels",),
        cut_tensors=True,
        feedback_by_default=False,
    )
)


register(
    CompressorSpec(
        name="topk",
        build="edgeddl.compress.sparse:build_topk",
        about="the density largest values",
        params=("density",),
        adapt_density=True,
        cut_tensors=True,
    )
)


register(
    CompressorSpec(
        name="randomk",
        build="edgeddl.compress.sparse:build_randomk",
        about="density values at positions every device draws alike",
        params=("density",),
        allreduce=True,
        adapt_density=True,
        cut_tensors=True,
    )
)


def _threshold_is_set(c: CompressorConfig) -> None:
    require(
        c.threshold > 0,
        'threshold must be > 0 for compressor = "threshold" (the value to send above)',
    )


register(
    CompressorSpec(
        name="threshold",
        build="edgeddl.compress.sparse:build_threshold",
        about="values with |x| >= threshold",
        params=("threshold",),
        fixed_size=False,
        check=_threshold_is_set,
    )
)


register(
    CompressorSpec(
        name="two_step",
        build="edgeddl.compress.significance:build_two_step",
        about="S-global: values whose significance passes a threshold that holds density",
        params=("density", "criterion", "threshold", "adapt_threshold", "sample_fraction"),
        fixed_size=False,
        adapt_density=True,
    )
)


register(
    CompressorSpec(
        name="dgc",
        build="edgeddl.compress.significance:build_dgc",
        about="DGC: sampled threshold, momentum correction, clipping, density warm-up",
        params=("density", "warmup_steps", "clip_norm", "sample_fraction"),
        fixed_size=False,
        adapt_density=True,
        owns_momentum=True,
    )
)


register(
    CompressorSpec(
        name="signsgd",
        build="edgeddl.compress.quantize:build_signsgd",
        about="one sign bit per value, one scale per layer",
    )
)


register(
    CompressorSpec(
        name="powersgd",
        build="edgeddl.compress.lowrank:build_powersgd",
        about="rank-r factors P and Q of each weight matrix, two rounds, warm start",
        params=("rank",),
        num_phases=2,
        allreduce=True,
    )
)
