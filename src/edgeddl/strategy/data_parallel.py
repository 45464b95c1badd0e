"""Synchronous data-parallel SGD: the maths of one step, whatever carries the payloads.

Each device computes the mean gradient of the loss on its share of the global batch; the
aggregate is their average weighted by samples; one optimizer step follows (on the parameter
server, or identically on every replica after an all-reduce). Devices whose work was lost
(a crash) are simply left out of the weighted average.

A step is two calls around an exchange (`strategy/base.py`): `prepare` computes what each
device sends (and so its real byte count), the exchange says whose payload arrived, `commit`
applies the update from those. Uncompressed, the gradients are dense float32 and `commit`
trains the arrived devices' batches in one fused pass; a real fleet's device computes its
own (`local_update`) and the replicas apply the mean (`apply_aggregate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeddl.aggregation.robust import RobustAggregator
from edgeddl.compress.base import Layout, Payload, PhasedResult
from edgeddl.compress.codec import dense_payload_bytes, dense_values
from edgeddl.config.schema import TrainConfig
from edgeddl.fleet.behaviors import Behaviors
from edgeddl.strategy.base import (
    Aggregate,
    Combine,
    Plan,
    StepCost,
    StepPayloads,
    Update,
    unpack,
)
from edgeddl.strategy.fused import batchnorm_layers, segmented_batchnorm
from edgeddl.strategy.per_device import (
    DeviceGradients,
    apply_batchnorm_mean,
    batchnorm_stats_size,
    per_device_gradients,
    weighted_mean,
)
from edgeddl.task import LossFn


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class DataParallel:
    """Owns the model and optimizer; `prepare`/`commit` apply one synchronous update."""

    name = "data_parallel"

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        loss_fn: LossFn = nn.functional.cross_entropy,
        momentum: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        self.layout = Layout(tuple(tuple(p.shape) for p in self.params))
        self.batchnorms = batchnorm_layers(model)
        self.optimizer = torch.optim.SGD(
            self.params,
            lr=cfg.lr,
            momentum=cfg.momentum if momentum is None else momentum,
            weight_decay=cfg.weight_decay if weight_decay is None else weight_decay,
        )
        state = list(self.params) + [b for b in model.buffers() if b.is_floating_point()]
        self.state_bytes = tensor_bytes(state)
        """A whole model: what a device without the current one fetches."""
        self.dense_up_bytes = dense_payload_bytes(self.numel)
        """One uncompressed gradient on the wire."""
        self.sent_bytes = 0
        """Encoded bytes of every payload that arrived, all phases (for the summary)."""
        self.num_payloads = 0
        """Payloads (device steps) that arrived."""
        self.num_empty = 0
        """Payloads that carried nothing (a threshold nothing passed)."""
        self.robust: RobustAggregator | None = None
        """Screen and rule for per-device updates (`[robust]`); None: the trusting mean."""
        self.behaviors: Behaviors | None = None
        """Simulated misbehaving devices; None: all honest."""
        self.max_payload_bytes: int | None = None
        """The configured payload limit (`security.max_payload_bytes`, when on): no update
        is decoded past it; None: the model's size bounds it."""

    def plan(self, members: np.ndarray, step: int) -> Plan | None:
        """Every member trains, with the runtime's balanced shares."""
        return None

    def step_cost(self, idx: np.ndarray) -> StepCost:
        """Typical bytes of devices `idx` per step, for balancing: the gradient up, the
        model down."""
        n = len(idx)
        return StepCost(
            up_bytes=np.full(n, float(self.dense_up_bytes)),
            down_bytes=np.full(n, float(self.state_bytes)),
        )

    def replica_state(self) -> dict[str, Any]:
        """What a replica joining a real fleet copies from a peer: model and optimizer."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_replica_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def device_state(self, device: int) -> dict[str, Any]:
        """What only this device holds beyond the replica state (nothing, uncompressed)."""
        return {}

    def load_device_state(self, device: int, state: dict[str, Any]) -> None:
        return None

    def device_gradients(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], ids: list[int]
    ) -> DeviceGradients:
        """Each device's gradient on its consecutive `counts` rows (a label-flipping device
        computes it honestly on its poisoned labels)."""
        if self.behaviors is not None:
            y = self.behaviors.poison_labels(y, counts, ids)
        return per_device_gradients(
            self.model, self.params, self.loss_fn, x, y, counts, self.batchnorms
        )

    # --- a device's side: one device of a real fleet (`prepare` runs it for every device) ---

    def local_update(self, device: int, x: torch.Tensor, y: torch.Tensor, step: int) -> Update:
        """Device `device`'s update on its batch (x, y), ready for the wire."""
        return self.device_updates(x, y, [len(x)], [device], step)[0]

    def device_updates(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], ids: list[int], step: int
    ) -> list[Update]:
        """Each device's update on its consecutive `counts` rows: its gradient (what the
        device keeps of it, `_device_side`), then what its behaviour makes it send."""
        g = self.device_gradients(x, y, counts, ids)
        own = self._device_side(ids, g.grads)
        sent = self.behaviors.tamper(own, ids, step) if self.behaviors is not None else own
        return [
            Update(device=d, weight=float(n), loss=g.losses[i], values=v, batch_stats=g.stats[i])
            for i, (d, n, v) in enumerate(zip(ids, counts, sent, strict=True))
        ]

    def _device_side(self, ids: list[int], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """What each device makes of its gradient before it sends it (here: nothing)."""
        return grads

    # --- the aggregator's side on a real fleet -------------------------------------------

    sampled = False
    """Every member takes part in every step."""
    combine: Combine = "sum"
    """How the members' updates combine: `sum` (a weighted mean of `Update.packed()`),
    `payloads` (each decoded, then aggregated) or `phases` (a multi-phase scheme)."""

    def extras_size(self) -> int:
        """Values an update's extras take (`Update.extras`): BatchNorm batch statistics."""
        return batchnorm_stats_size(self.batchnorms)

    def decode_body(self, device: int, body: bytes) -> torch.Tensor | Payload:
        """An update's body as the aggregator reads it: its packed values (`CodecError` if
        it is not one, or if a value is not finite: with `[robust]`, the screen's to
        refuse, as in the simulator)."""
        finite = self.robust is None
        return dense_values(body, self.numel + self.extras_size(), finite, self.max_payload_bytes)

    def aggregate(
        self, step: int, devices: list[int], weights: list[float], decoded: list[Any]
    ) -> Aggregate | None:
        """The step's aggregate of the arrived updates (`decode_body`'s, weights summing to
        1): their weighted mean, or with `[robust]` its screen and rule on the values and
        the mean of the extras of those that passed. None: nothing usable."""
        if self.robust is None:
            mean = weighted_mean(decoded, weights)
            return Aggregate.of_packed(mean, self.numel)
        n = self.numel
        parts = [unpack(u, n) for u in decoded]
        values, passed = self.robust.combine(step, devices, [v for v, _ in parts], weights)
        if values is None:
            return None
        kept = torch.tensor([weights[i] for i in passed], dtype=torch.float32)
        kept = kept / kept.sum()
        extras = weighted_mean([parts[i][1] for i in passed], kept.tolist())
        return Aggregate(values=values.float(), extras=extras.float().reshape(-1))

    def on_commit(self, update: Update, sent: torch.Tensor | None) -> None:
        """The step committed: device `update.device` keeps what it did not send (nothing
        without error feedback)."""

    def reconstruct(self, update: Update, step: int) -> torch.Tensor:
        """Dense updates carry their values as they are."""
        assert update.values is not None
        return update.values

    def run_phases(
        self,
        update: Update | None,
        weight: float,
        step: int,
        reduce: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[PhasedResult, int]:
        raise ValueError(f"{self.name} updates are summed in one phase (combine = sum)")

    def commit_phases(self, result: PhasedResult) -> None:
        raise ValueError(f"{self.name} updates are summed in one phase (combine = sum)")

    def apply_aggregate(self, agg: Aggregate, devices: list[int]) -> None:
        """Every replica's step with the aggregate: the optimizer on the values, BatchNorm
        running statistics from the mean batch statistics."""
        self.apply(agg.values.to(self.params[0].device))
        if agg.extras.numel():
            apply_batchnorm_mean(self.model, agg.extras.to(self.params[0].device), self.batchnorms)

    def evaluation_models(self) -> list[nn.Module]:
        """The models the run is scored on (the metric is their mean): the one model."""
        return [self.model]

    def forget(self, device: int) -> None:
        """The device crashed (nothing to forget: the dense gradient is kept nowhere)."""

    def down_bytes(self, needs_model: np.ndarray) -> np.ndarray:
        """Bytes each device receives at a step's start (star): the whole model."""
        return np.full(len(needs_model), self.state_bytes, dtype=np.int64)

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], devices: np.ndarray, step: int
    ) -> StepPayloads:
        """What each device sends this step (dense: the same size for all); the fused pass
        computes their mean gradient from the batch at `commit`."""
        up = np.full((1, len(devices)), self.dense_up_bytes, dtype=np.int64)
        return StepPayloads(devices=devices, counts=counts, step=step, up_bytes=up, x=x, y=y)

    def commit(self, ex: StepPayloads, contributed: np.ndarray) -> torch.Tensor | None:
        """Apply the update from the devices whose payload arrived; None if none did."""
        self._count(ex, contributed)
        if not contributed.any():
            return None
        assert ex.x is not None and ex.y is not None
        x, y, counts = ex.x, ex.y, np.asarray(ex.counts)
        if not contributed.all():
            rows = torch.from_numpy(np.repeat(contributed, counts)).to(x.device)
            x, y = x[rows], y[rows]
        return self.step(x, y, counts[contributed].tolist())

    def _count(self, ex: StepPayloads, contributed: np.ndarray) -> None:
        self.sent_bytes += int(ex.up_bytes[:, contributed].sum())
        self.num_payloads += int(contributed.sum())

    def compression_summary(self) -> dict[str, float]:
        """Gradient bytes per device and step, against the dense float32 gradient."""
        per_step = self.sent_bytes / max(self.num_payloads, 1)
        return {
            "gradient_bytes_per_device_step": per_step,
            "dense_gradient_bytes": self.dense_up_bytes,
            "compression_ratio": self.dense_up_bytes / per_step if per_step else float("inf"),
            "empty_payloads": self.num_empty,
        }

    def update_flops(self) -> float:
        """Nothing once per step beyond taking in each contribution."""
        return 0.0

    def aggregation_flops(self) -> float:
        """FLOPs for the aggregator to take in one device's contribution: one multiply-add
        per value, or the screen and robust rule's share."""
        if self.robust is not None:
            return self.robust.flops_per_update(self.numel)
        return 2.0 * self.numel

    def screened_at(self, step: int) -> dict[int, str]:
        """Device -> reason for the updates a robust screen refused at `step`."""
        return self.robust.screened_at(step) if self.robust is not None else {}

    def report(self) -> dict[str, Any]:
        """summary.json's entries: the bytes sent against dense, and with a robust screen
        its rejections and rule."""
        out: dict[str, Any] = {"compression": self.compression_summary()}
        if self.robust is not None:
            out["robust"] = self.robust.summary()
        return out

    def apply(self, aggregate: torch.Tensor) -> None:
        """One optimizer step with a flat aggregate gradient (every replica, identically)."""
        self.model.train()
        for p, gi in zip(self.params, self.layout.split(aggregate), strict=True):
            p.grad = gi.to(p.dtype).clone()
        self.optimizer.step()

    def step(self, x: torch.Tensor, y: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """One update from the concatenated batches of the contributing devices.

        `counts[i]` samples of `x` belong to the i-th contributing device, in order. The mean
        loss over all samples has as gradient the sample-weighted mean of per-device mean
        gradients, so one fused pass gives exactly the aggregate. Returns the detached loss
        as a tensor: reading it out would make a GPU wait at every step.
        """
        self.model.train()
        with segmented_batchnorm(self.model, counts, self.batchnorms):
            loss = self.loss_fn(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()
