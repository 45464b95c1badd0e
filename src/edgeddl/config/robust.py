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
PreAggregationName = Literal["none", "bucketing", "nnm"]
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
    Small per-device batches make honest updates so noisy that a coordinate-wise rule mostly
    sees noise; `device_momentum` and `pre_aggregation` shrink that noise before the rule.
    """

    rule: RuleName = "mean"
    """mean: the sample-weighted mean; median: coordinate-wise median; trimmed_mean: per
    coordinate, the mean without the `trim` largest and smallest values; krum / multi_krum:
    the update(s) closest to their n - f - 2 nearest others (Blanchard et al., 2017)."""
    num_byzantine: int = 0
    """f, the misbehaving devices the rule must withstand (krum, multi_krum, nnm; the
    default trim of trimmed_mean); at most f of the rule's inputs are assumed hostile."""
    trim: int = 0
    """trimmed_mean: values dropped at each end of every coordinate; 0 takes num_byzantine."""
    multi_krum_m: int = 0
    """multi_krum: how many of the best-scored inputs are averaged; 0 takes all but f."""
    max_update_norm: float = 0.0
    """The screen refuses an update whose L2 norm is above this; 0 for no bound (non-finite
    updates are always refused)."""
    pre_aggregation: PreAggregationName = "none"
    """Mixing before a robust rule: bucketing (shuffled, seeded per run and step, into
    buckets of `bucket_size` whose means the rule sees; Karimireddy, He & Jaggi, 2022) or
    nnm (each update becomes the mean of its n - f nearest, itself included; Allouah et al.,
    2023)."""
    bucket_size: int = 2
    """bucketing: updates averaged into one bucket (s); the rule sees ceil(n / s) buckets."""
    device_momentum: bool = False
    """Keep `train.momentum` on each device instead of the coordinator (worker momentum,
    Karimireddy, He & Jaggi, 2021): a device sends m <- momentum * m + its gradient (weight
    decay included), the coordinator applies the rule's output with plain SGD. With the mean
    that is the same maths; a robust rule sees honest updates whose noise is averaged over
    past steps. A crashed device restarts from m = 0. Data-parallel, uncompressed only."""

    def __post_init__(self) -> None:
        _require(self.num_byzantine >= 0, f"num_byzantine must be >= 0 (got {self.num_byzantine})")
        _require(self.trim >= 0, f"trim must be >= 0 (got {self.trim})")
        _require(self.multi_krum_m >= 0, f"multi_krum_m must be >= 0 (got {self.multi_krum_m})")
        _require(
            self.max_update_norm >= 0, f"max_update_norm must be >= 0 (got {self.max_update_norm})"
        )
        _require(self.bucket_size >= 2, f"bucket_size must be >= 2 (got {self.bucket_size})")
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
        _require(
            self.bucket_size == 2 or self.pre_aggregation == "bucketing",
            f'bucket_size: only pre_aggregation = "bucketing" uses it '
            f"(pre_aggregation = {self.pre_aggregation!r})",
        )
        _require(
            self.pre_aggregation == "none" or self.rule != "mean",
            f"pre_aggregation: {self.pre_aggregation} only changes what a robust rule sees (the "
            "mean of the mixed updates is about their mean); set rule to median, trimmed_mean, "
            "krum or multi_krum",
        )
        _require(
            self.pre_aggregation != "nnm" or self.num_byzantine >= 1,
            "pre_aggregation: nnm averages each update with its n - f nearest; set "
            "num_byzantine >= 1",
        )
        _require(
            not self.device_momentum or self.screens,
            "device_momentum: with the trusting mean it is the coordinator's momentum "
            "(train.momentum) computed elsewhere; set a robust rule or max_update_norm",
        )

    @property
    def trim_each_end(self) -> int:
        return self.trim or self.num_byzantine

    @property
    def screens(self) -> bool:
        """Whether updates must be looked at one by one (anything but a trusting mean)."""
        return self.rule != "mean" or self.max_update_norm > 0

    def rule_inputs(self, num_updates: int) -> int:
        """How many rows the rule sees from `num_updates` (buckets, or the updates)."""
        if self.pre_aggregation == "bucketing":
            return -(-num_updates // self.bucket_size)
        return num_updates

    def shortfall(self, num_updates: int) -> tuple[str, str] | None:
        """(the key to change, why) when `num_updates` are too few for the rule to withstand
        f hostile ones (one of them per input at worst); None when they are enough."""
        f, m = self.num_byzantine, self.rule_inputs(num_updates)
        bucketing = self.pre_aggregation == "bucketing"
        unit = f"buckets of {self.bucket_size}" if bucketing else "updates"
        key = "bucket_size" if bucketing else "num_byzantine"
        if self.rule in ("krum", "multi_krum") and m <= 2 * f + 2:
            return key, f"{self.rule} needs more than 2f + 2 = {2 * f + 2} {unit}, got {m}"
        if self.rule == "trimmed_mean" and 2 * self.trim_each_end >= m:
            return (
                "bucket_size" if bucketing else "trim",
                f"trimmed_mean trims {self.trim_each_end} at each end of {m} {unit}",
            )
        if self.rule != "mean" and 2 * f >= m:  # also gives nnm its n - f >= 1 neighbours
            return key, f"{self.rule} needs more than 2f = {2 * f} {unit}, got {m}"
        return None

    def check_fleet(self, num_taking_part: int, how: str) -> None:
        """The rule works with `num_taking_part` updates a step (`how`: where that comes from)."""
        n, f = num_taking_part, self.num_byzantine
        short = self.shortfall(n)
        if short is not None:
            key, why = short
            raise ValueError(f"robust.{key}: {why} ({how} gives {n} updates a step)")
        most = self.rule_inputs(n) - f
        _require(
            self.multi_krum_m <= most,
            f"robust.multi_krum_m: {self.multi_krum_m} is more than the {most} inputs "
            f"multi_krum may trust ({how} gives {n} updates a step, f = {f})",
        )

    def check_training(self, strategy: str, compressed: bool, momentum: float) -> None:
        """`device_momentum` fits the training: uncompressed data-parallel with a momentum."""
        if not self.device_momentum:
            return
        _require(
            strategy == "data_parallel",
            f"robust.device_momentum: {strategy} devices do not send gradients; it is for "
            'train.strategy = "data_parallel"',
        )
        _require(
            not compressed,
            "robust.device_momentum: compressed gradients keep their own memory (error "
            'feedback, DGC\'s momentum); set compression.compressor = "none"',
        )
        _require(
            momentum > 0,
            "robust.device_momentum: train.momentum is 0, so there is no momentum to keep on "
            "the devices; set train.momentum (e.g. 0.9)",
        )
