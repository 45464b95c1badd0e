"""The `[robust]` section (how the server combines updates) and devices' misbehaviour.

Robust aggregation is its own section rather than keys of `[security]`: it needs no keys or
envelopes (it runs with `security.enabled = false`), it is a choice of maths on the
coordinator, and its checks depend on the fleet and the strategy, not on identities.
Misbehaviour is a property of a device, so it sits on the device groups of `[fleet]`
(`behavior`, `behavior_scale`); the checks against the fleet are `check_fleet` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgeddl.config.checks import require as _require

RuleName = Literal["mean", "median", "trimmed_mean", "krum", "multi_krum"]
BehaviorName = Literal["honest", "sign_flip", "scaled", "noise", "label_flip", "free_rider", "nan"]
SCALED_BEHAVIORS = ("scaled", "noise")
"""Behaviours that read `behavior_scale` (the others must leave it at 1)."""


def check_behavior(behavior: str, scale: float) -> None:
    """A device group's `behavior` and `behavior_scale` make sense together."""
    if behavior == "scaled":
        _require(
            scale not in (0.0, 1.0),
            f"behavior_scale: scaled by {scale:g} is "
            f"{'honest' if scale == 1 else 'free_rider'}; give the factor (e.g. -10)",
        )
    elif behavior == "noise":
        _require(scale > 0, f"behavior_scale: noise needs a std > 0 (got {scale:g})")
    else:
        _require(
            scale == 1.0,
            f"behavior_scale: only {' and '.join(SCALED_BEHAVIORS)} take a scale "
            f"(behavior = {behavior!r}); leave it at 1",
        )


@dataclass(kw_only=True, slots=True)
class RobustConfig:
    """How the coordinator combines the updates that arrive (star topology).

    Before the rule, a screen drops updates with non-finite values or a norm above
    `max_update_norm`; each drop is recorded (step, device, reason) in `summary.json`.
    """

    rule: RuleName = "mean"
    """mean: the sample-weighted mean; median: coordinate-wise median; trimmed_mean: per
    coordinate, the mean without the `trim` largest and smallest values; krum / multi_krum:
    the update(s) closest to their n - f - 2 nearest others (Blanchard et al., 2017)."""
    num_byzantine: int = 0
    """f, the misbehaving devices the rule must withstand (krum, multi_krum; the default
    trim of trimmed_mean)."""
    trim: int = 0
    """trimmed_mean: values dropped at each end of every coordinate; 0 takes num_byzantine."""
    multi_krum_m: int = 0
    """multi_krum: how many of the best-scored updates are averaged; 0 takes n - f."""
    max_update_norm: float = 0.0
    """The screen refuses an update whose L2 norm is above this; 0 for no bound (non-finite
    updates are always refused)."""

    def __post_init__(self) -> None:
        _require(self.num_byzantine >= 0, f"num_byzantine must be >= 0 (got {self.num_byzantine})")
        _require(self.trim >= 0, f"trim must be >= 0 (got {self.trim})")
        _require(self.multi_krum_m >= 0, f"multi_krum_m must be >= 0 (got {self.multi_krum_m})")
        _require(
            self.max_update_norm >= 0, f"max_update_norm must be >= 0 (got {self.max_update_norm})"
        )
        _require(
            self.trim == 0 or self.rule == "trimmed_mean",
            f"trim: only trimmed_mean uses it (rule = {self.rule!r})",
        )
        _require(
            self.multi_krum_m == 0 or self.rule == "multi_krum",
            f"multi_krum_m: only multi_krum uses it (rule = {self.rule!r})",
        )
        _require(
            self.rule != "trimmed_mean" or self.trim_each_end >= 1,
            "trim: trimmed_mean that trims nothing is the mean; set num_byzantine or trim >= 1",
        )

    @property
    def trim_each_end(self) -> int:
        return self.trim or self.num_byzantine

    @property
    def screens(self) -> bool:
        """Whether updates must be looked at one by one (anything but a trusting mean)."""
        return self.rule != "mean" or self.max_update_norm > 0

    def check_fleet(self, num_taking_part: int, how: str) -> None:
        """The rule works with `num_taking_part` updates a step (`how`: where that comes from)."""
        n, f = num_taking_part, self.num_byzantine
        if self.rule in ("krum", "multi_krum"):
            _require(
                n > 2 * f + 2,
                f"robust.num_byzantine: {self.rule} needs more than 2f + 2 = {2 * f + 2} "
                f"devices taking part, {how} gives {n}; lower num_byzantine or add devices",
            )
            _require(
                self.multi_krum_m <= n - f,
                f"robust.multi_krum_m: {self.multi_krum_m} is more than the n - f = {n - f} "
                f"updates multi_krum may trust ({how} gives n = {n})",
            )
        if self.rule == "trimmed_mean":
            _require(
                2 * self.trim_each_end < n,
                f"robust.trim: trimming {self.trim_each_end} at each end needs more than "
                f"{2 * self.trim_each_end} devices taking part, {how} gives {n}",
            )
