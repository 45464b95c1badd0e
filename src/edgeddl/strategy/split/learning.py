"""Split learning as a strategy: devices train fronts, the coordinator the rear.

A step: each device runs its front and sends the activations at the cut, the coordinator
runs the rear and sends the gradient back (U-shaped: the labels stay on the device), and
SplitFed then averages the fronts. Every crossing goes through `CutWire`, so the bytes that
count are the encoded ones; raw inputs never cross. The step is a chain of legs per device,
which the simulator's exchange turns into time.
Details: docs/split.md#the-strategy
"""

from __future__ import annotations

import copy
import io
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeddl.config.schema import TrainConfig
from edgeddl.config.split import SplitConfig
from edgeddl.models.layers import split_model
from edgeddl.strategy.base import Call, Leg, Plan, StepCost, StepPayloads, Update
from edgeddl.strategy.data_parallel import tensor_bytes
from edgeddl.strategy.errors import TrainingDiverged
from edgeddl.strategy.split.maths import SplitModels
from edgeddl.strategy.split.roles import CutWire, RearServer, device_step
from edgeddl.task import LossFn


class SplitLearning:
    """Per-device fronts (and heads), the rear on the coordinator; docs/split.md#the-strategy."""

    name = "split"

    def __init__(
        self,
        model: nn.Module,
        train: TrainConfig,
        cfg: SplitConfig,
        num_devices: int,
        input_shape: tuple[int, ...],
        num_classes: int,
        seed: int,
        loss_fn: LossFn,
    ) -> None:
        head_cut = cfg.head_cut if cfg.labels == "u_shaped" else None
        self.parts = SplitModels(model, cfg.cut, num_devices, loss_fn, head_cut)
        self.model = model
        """The whole model on the original modules: with SplitFed, the global model."""
        original = split_model(model, cfg.cut, head_cut)
        self.global_modules = [original.front, *([original.head] if original.head else [])]
        self.cfg = cfg
        self.train = train
        self.wire = CutWire(cfg, num_classes, seed)
        self.cost = self.parts.costs(input_shape)
        self.rear_params = list(self.parts.rear.parameters())
        self.rear = RearServer(
            self.parts, self.wire, self._optimizer(self.rear_params), self.cost, _dtype(model)
        )
        self.device_opts: dict[int, torch.optim.Optimizer] = {}
        self.initial = [copy.deepcopy(m.state_dict()) for m in self.global_modules]
        self.device_state_bytes = sum(
            tensor_bytes([t for t in m.state_dict().values() if t.is_floating_point()])
            for m in self.global_modules
        )
        """A device's front (and head): what SplitFed sends up and down each step."""
        self.averaged = False
        self.num_payloads = 0

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        t = self.train
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def device_optimizer(self, k: int) -> torch.optim.Optimizer:
        if k not in self.device_opts:
            params = [p for m in self.parts.device_modules(k) for p in m.parameters()]
            self.device_opts[k] = self._optimizer(params)
        return self.device_opts[k]

    # --- what the loop asks of every strategy ----------------------------------------------

    def plan(self, members: np.ndarray, step: int) -> Plan | None:
        """Every member trains, with the runtime's balanced shares."""
        return None

    def step_cost(self, idx: np.ndarray) -> StepCost:
        """For balancing: the device's own part of the model, the fp32 bytes per sample
        crossing the cut(s), its round trips, and with SplitFed its front up and down."""
        c = self.cost
        per_sample = np.full(len(idx), float(c.cut_bytes + c.head_cut_bytes))
        return StepCost(
            up_bytes=per_sample,
            down_bytes=per_sample.copy(),
            flops_per_sample=c.front_flops + c.head_flops,
            ops=c.device_ops,
            per_sample_bytes=True,
            round_trips=1 if self.parts.heads is None else 2,
            fixed_bytes=float(self.device_state_bytes) if self.cfg.splitfed else 0.0,
        )

    def forget(self, device: int) -> None:
        """A crashed device lost its front (and head) and their optimizer state: it starts
        again from the initial weights (with SplitFed it downloads the average anyway)."""
        for m, state in zip(self.parts.device_modules(device), self.initial, strict=True):
            m.load_state_dict(state)
        self.device_opts.pop(device, None)

    # --- what a real fleet's devices share and keep -------------------------------------

    def replica_state(self) -> dict[str, Any]:
        """What a device joining a real fleet copies from a peer: with SplitFed the averaged
        front (and head); without, nothing (each front is its device's own: a new device
        starts from the initial weights, as after a crash)."""
        if not self.cfg.splitfed:
            return {}
        return {"modules": [m.state_dict() for m in self.global_modules]}

    def load_replica_state(self, state: dict[str, Any]) -> None:
        if "modules" not in state:
            return
        for m, v in zip(self.global_modules, state["modules"], strict=True):
            m.load_state_dict(v)
        for k in range(len(self.parts.fronts)):
            for part, v in zip(self.parts.device_modules(k), state["modules"], strict=True):
                part.load_state_dict(v)

    def device_state(self, device: int) -> dict[str, Any]:
        """Device `device`'s own front (and head) and their optimizer's state."""
        return {
            "modules": [m.state_dict() for m in self.parts.device_modules(device)],
            "optimizer": self.device_optimizer(device).state_dict(),
        }

    def load_device_state(self, device: int, state: dict[str, Any]) -> None:
        if not state:
            return
        for m, v in zip(self.parts.device_modules(device), state["modules"], strict=True):
            m.load_state_dict(v)
        self.device_optimizer(device).load_state_dict(state["optimizer"])

    def device_tensors(self, device: int) -> list[torch.Tensor]:
        """Device `device`'s front (and head) state, tensor by tensor (what SplitFed
        averages)."""
        return [t for m in self.parts.device_modules(device) for t in m.state_dict().values()]

    @torch.no_grad()
    def load_average(self, device: int, mean: torch.Tensor) -> None:
        """SplitFed on a real fleet: the fleet's weighted mean of `device_tensors`, flat,
        becomes device `device`'s front (and head) and the global model's."""
        at = 0
        for own, glob in zip(
            self.device_tensors(device),
            [t for m in self.global_modules for t in m.state_dict().values()],
            strict=True,
        ):
            part = mean[at : at + own.numel()].view_as(own)
            at += own.numel()
            value = part if own.is_floating_point() else part.round()
            own.copy_(value)
            glob.copy_(value)
        self.averaged = True

    def aggregation_flops(self) -> float:
        """SplitFed: adding one device's front (and head) into the average."""
        return 2.0 * self.device_state_bytes / 4 if self.cfg.splitfed else 0.0

    def update_flops(self) -> float:
        """The rear's optimizer step on the coordinator, once per step."""
        return 4.0 * sum(p.numel() for p in self.rear_params)

    def down_bytes(self, needs_model: np.ndarray) -> np.ndarray:
        """SplitFed: every device downloads the averaged front at the step's start."""
        size = self.device_state_bytes if self.cfg.splitfed and self.averaged else 0
        return np.full(len(needs_model), size, dtype=np.int64)

    def screened_at(self, step: int) -> dict[int, str]:
        """No screen: every arrived device's step counts."""
        return {}

    def evaluation_models(self, max_models: int = 8) -> list[nn.Module]:
        """SplitFed: the global model; otherwise up to `max_models` devices' own models,
        spread over the fleet (the metric is their mean)."""
        if self.cfg.splitfed:
            return [self.model]
        n = len(self.parts.fronts)
        picks = np.unique(np.linspace(0, n - 1, min(n, max_models)).round().astype(int))
        return [self.parts.whole(int(k)) for k in picks]

    # --- the conversation across a wire (a real fleet's device and coordinator) ----------

    @property
    def averages_fronts(self) -> bool:
        """SplitFed: the fronts (and heads) are averaged after every step."""
        return self.cfg.splitfed

    def converse(
        self, device: int, x: torch.Tensor, y: torch.Tensor, step: int, call: Call
    ) -> tuple[float, int]:
        """Device `device`'s step through the cut, each request answered by `call` (the
        rear, wherever it is): (mean loss, encoded bytes it sent)."""
        self.device_optimizer(device).zero_grad(set_to_none=True)
        sent = self.wire.up_bytes
        try:
            loss = device_step(self.parts, self.wire, self.cost, device, x, y, step, call)
        finally:
            self.wire.sent.clear()  # the simulator's per-step log: nothing reads it here
        return float(loss), self.wire.up_bytes - sent

    def step_device(self, device: int) -> None:
        """The device's own optimizer step on its front (and head)."""
        self.device_optimizer(device).step()

    def front_bytes(self, device: int) -> bytes:
        """Device `device`'s front (and head) as an evaluation request carries it."""
        buf = io.BytesIO()
        torch.save([m.state_dict() for m in self.parts.device_modules(device)], buf)
        return buf.getvalue()

    def answer(
        self, kind: str, device: int, step: int, count: int, payloads: list[bytes]
    ) -> tuple[bytes, float]:
        """The rear's answer to one request of a device's conversation (`CodecError` if it
        is refused: a stale step, or a malformed tensor)."""
        return self.rear.handle(kind, device, step, count, payloads)

    def check_step(self, step: int) -> None:
        """`CodecError` if the rear took step `step` already (a stale request)."""
        self.rear.check_step(step)

    def commit_rear(self, step: int, devices: list[int], counts: list[int]) -> bool:
        """The rear's step with the step's devices (once; False if it was taken already or
        is incomplete)."""
        if not self.rear.commit(step, devices, counts):
            return False
        self.num_payloads += len(devices)
        return True

    def rear_state(self) -> dict[str, Any]:
        """The rear and its optimizer (what a restarted coordinator resumes)."""
        return {"rear": self.parts.rear.state_dict(), "optimizer": self.rear.optimizer.state_dict()}

    def load_rear_state(self, state: dict[str, Any]) -> None:
        self.parts.rear.load_state_dict(state["rear"])
        self.rear.optimizer.load_state_dict(state["optimizer"])

    def whole_model(self, front: bytes) -> nn.Module:
        """The whole model from a device's front (and head) bytes and the rear."""
        modules = torch.load(io.BytesIO(front), weights_only=True, map_location="cpu")
        for m, v in zip(self.parts.device_modules(0), modules, strict=True):
            m.load_state_dict(v)
        return self.parts.whole(0)

    def request_limits(self, global_batch: int) -> tuple[int, int]:
        """(most bytes a cut request of a step can take, most a front's state can take)."""
        c = self.cost
        per_sample = max(c.cut_bytes, c.head_cut_bytes) + 16  # fp32 values, labels, scales
        return global_batch * per_sample + 4096, 4 * self.device_state_bytes + (1 << 20)

    def dense_request_bytes(self, kind: str, count: int, num_parts: int) -> int:
        """What a request's tensors take as fp32 values and int64 labels."""
        c = self.cost
        if kind == "head_gradients":
            return count * c.head_cut_bytes
        return count * (c.cut_bytes + 8 * (num_parts - 1))  # activations (and labels)

    def rear_summary(self, received: int, received_dense: int) -> dict[str, object]:
        """The run's `split` entry with the bytes as the coordinator saw them."""
        out = self.summary()
        out["cut_bytes_up"] = received
        sent = received + self.wire.down_bytes
        out["cut_bytes_per_device_step"] = sent / max(self.num_payloads, 1)
        dense = received_dense + self.wire.dense_bytes
        out["cut_compression_ratio"] = dense / sent if sent else None
        out["rear_steps"] = self.rear.steps_applied
        return out

    # --- a step ----------------------------------------------------------------------------

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], devices: np.ndarray, step: int
    ) -> StepPayloads:
        """Every device's step through the cut, each answered by the rear in turn; what
        crossed, in bytes."""
        ids = devices.tolist()
        self.wire.sent.clear()
        losses = []
        bodies: list[list[bytes]] = [[] for _ in ids]
        for i, k, xk, yk in zip(
            range(len(ids)), ids, x.split(counts), y.split(counts), strict=True
        ):
            self.device_optimizer(k).zero_grad(set_to_none=True)

            def call(kind: str, payloads: list[bytes], k: int = k, i: int = i, n: int = len(xk)):
                bodies[i] += payloads
                return self.rear.handle(kind, k, step, n, payloads)

            loss = device_step(self.parts, self.wire, self.cost, k, xk, yk, step, call)
            if not torch.isfinite(loss):
                raise TrainingDiverged(step, k)
            losses.append(loss)
        legs = self._legs(ids, np.asarray(counts, dtype=np.float64))
        up = sum(leg.amount for leg in legs if leg.kind == "up")
        return StepPayloads(
            devices=devices,
            counts=counts,
            step=step,
            up_bytes=np.asarray(up, dtype=np.int64)[None],
            updates=[
                Update(device=k, weight=float(n), loss=loss, bodies=b)
                for k, n, loss, b in zip(ids, counts, losses, bodies, strict=True)
            ],
            legs=legs,
        )

    def _legs(self, ids: list[int], n: np.ndarray) -> list[Leg]:
        """Each device's chain of work and transfers in this step, in order."""
        c, log = self.cost, self.wire.take_log
        legs = [Leg("device", n * c.front_forward_flops, ops=c.device_ops)]
        if self.parts.heads is None:
            legs += [
                Leg("up", log(ids, ("activations", "labels"))),
                Leg("coordinator", n * c.rear_flops, ops=c.rear_ops),
                Leg("down", log(ids, ("cut_gradients",))),
            ]
        else:
            legs += [
                Leg("up", log(ids, ("activations",))),
                Leg("coordinator", n * c.rear_forward_flops, ops=c.rear_ops),
                Leg("down", log(ids, ("outputs",))),
                Leg("device", n * c.head_flops),
                Leg("up", log(ids, ("head_gradients",))),
                Leg("coordinator", n * (c.rear_flops - c.rear_forward_flops)),
                Leg("down", log(ids, ("cut_gradients",))),
            ]
        legs.append(Leg("device", n * (c.front_flops - c.front_forward_flops)))
        if self.cfg.splitfed:
            legs.append(Leg("up", np.full(len(n), float(self.device_state_bytes))))
        return legs

    def commit(self, ex: StepPayloads, contributed: np.ndarray) -> torch.Tensor | None:
        """The rear's step with the arrived devices' share; each arrived front its own."""
        self.num_payloads += int(contributed.sum())
        keep = np.flatnonzero(contributed).tolist()
        ids = ex.devices.tolist()
        counts = [ex.counts[i] for i in keep]
        self.rear.commit(ex.step, [ids[i] for i in keep], counts)
        if not keep:
            return None
        w = (np.asarray(counts, dtype=np.float64) / sum(counts)).tolist()
        for i in keep:
            self.device_optimizer(ids[i]).step()
        if self.cfg.splitfed:
            self._average([ids[i] for i in keep], w)
        losses = torch.stack([ex.updates[i].loss for i in keep])
        return (losses * torch.tensor(w, dtype=losses.dtype)).sum()

    @torch.no_grad()
    def _average(self, devices: list[int], weights: list[float]) -> None:
        """SplitFed: the arrived fronts' weighted average for every device and the global
        model (a device that sat out downloads it when it next takes part)."""
        self.parts.average_devices(devices, weights)
        mean = [m.state_dict() for m in self.parts.device_modules(devices[0])]
        for k in range(len(self.parts.fronts)):
            if k not in devices:
                for m, state in zip(self.parts.device_modules(k), mean, strict=True):
                    m.load_state_dict(state)
        for m, state in zip(self.global_modules, mean, strict=True):
            m.load_state_dict(state)
        self.averaged = True

    def report(self) -> dict[str, Any]:
        """summary.json's entries: gradient compression does not apply; the cut's bytes."""
        return {"compression": {}, "split": self.summary()}

    def summary(self) -> dict[str, object]:
        """The run's `split` entry: the cut, the work on each side, the bytes at the cut."""
        c, sent = self.cost, self.wire.up_bytes + self.wire.down_bytes
        return {
            "cut": self.cfg.cut,
            "labels": self.cfg.labels,
            "head_cut": self.cfg.head_cut if self.parts.heads is not None else None,
            "splitfed": self.cfg.splitfed,
            "compressor": self.cfg.compression.compressor,
            "device_train_flops_per_sample": c.front_flops + c.head_flops,
            "coordinator_train_flops_per_sample": c.rear_flops,
            "cut_bytes_per_sample_fp32": c.cut_bytes + c.head_cut_bytes,
            "cut_bytes_up": self.wire.up_bytes,
            "cut_bytes_down": self.wire.down_bytes,
            "cut_bytes_per_device_step": sent / max(self.num_payloads, 1),
            "cut_compression_ratio": self.wire.dense_bytes / sent if sent else None,
            "splitfed_bytes_per_device_step": 2 * self.device_state_bytes
            if self.cfg.splitfed
            else 0,
        }


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
