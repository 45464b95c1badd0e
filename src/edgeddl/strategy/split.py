"""Split learning's maths: each device's front, the coordinator's rear, what crosses the cut.

Per step and device k with batch (x_k, y_k), n_k of the step's N samples:

* plain (labels sent): the device computes a_k = front_k(x_k) and sends a_k and y_k; the
  coordinator computes the loss of rear(a_k) and sends back the gradient at the cut; the
  device back-propagates it through its front;
* U-shaped (labels stay): the coordinator sends back h_k = rear(a_k) instead; the device
  runs its head, computes the loss, and sends the gradient at h_k up; the coordinator
  back-propagates through the rear and sends the gradient at the cut down.

The rear accumulates the sample-weighted mean of the devices' gradients (the gradient of the
whole step's mean loss, as one model would get it); each device's front (and head) gets the
gradient of its own mean loss. Averaging the fronts weighted by samples after the step
(SplitFed) therefore gives exactly a data-parallel step of the whole model. Raw inputs never
cross the cut: `CutTraffic` records every tensor that does, for the wire and for the tests.

The strategy that runs this on a fleet is `strategy/split_learning.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from edgeddl.models.cost import model_cost
from edgeddl.models.layers import split_model

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


Send = Callable[[torch.Tensor, str, int], torch.Tensor]
"""What crossing a cut does to a tensor: (tensor as sent, kind, device) -> the receiver's
copy. Kinds:
"activations", "labels", "outputs" (U-shaped rear outputs), "head_gradients",
"cut_gradients". The default delivers it unchanged; a wire compresses and counts bytes."""


def _unchanged(t: torch.Tensor, kind: str, device: int) -> torch.Tensor:
    return t


@dataclass(slots=True)
class CutTraffic:
    """What crossed the cut(s) for one device in one step, as sent (detached)."""

    up: list[torch.Tensor] = field(default_factory=list)
    """Device to coordinator: activations at the cut, labels (plain), head gradients (U)."""
    down: list[torch.Tensor] = field(default_factory=list)
    """Coordinator to device: rear outputs (U), gradients at the cut."""
    activations: torch.Tensor | None = None
    """The coordinator's copy of the activations (detached): the rear's input."""
    rear_target: torch.Tensor | None = None
    """What the rear's backward needs again: the labels as received (plain), or the head's
    gradient as received (U-shaped)."""
    loss: torch.Tensor | None = None
    """The device's own mean loss (detached)."""

    def bytes(self, tensors: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True, slots=True)
class SplitCost:
    """Per sample: training FLOPs of each part (and forward FLOPs of front and rear), fp32
    bytes at each cut (each way); operators dispatched per batch on each side."""

    front_flops: float
    rear_flops: float
    head_flops: float
    cut_bytes: int
    head_cut_bytes: int
    front_forward_flops: float = 0.0
    rear_forward_flops: float = 0.0
    device_ops: int = 0
    """Front and head: forward, backward and their optimizer step."""
    rear_ops: int = 0


class SplitModels:
    """One front (and head, U-shaped) per device, one rear on the coordinator."""

    def __init__(
        self,
        model: nn.Module,
        cut: str | int,
        num_devices: int,
        loss_fn: LossFn,
        head_cut: str | int | None = None,
    ) -> None:
        parts = split_model(model, cut, head_cut)
        self.rear = parts.rear
        self.fronts = [copy.deepcopy(parts.front) for _ in range(num_devices)]
        self.heads = (
            [copy.deepcopy(parts.head) for _ in range(num_devices)]
            if parts.head is not None
            else None
        )
        self.loss_fn = loss_fn

    @property
    def u_shaped(self) -> bool:
        return self.heads is not None

    def device_modules(self, k: int) -> list[nn.Module]:
        return [self.fronts[k], *([self.heads[k]] if self.heads is not None else [])]

    def backward(
        self,
        xs: list[torch.Tensor],
        ys: list[torch.Tensor],
        devices: list[int],
        send: Send = _unchanged,
    ) -> tuple[torch.Tensor, list[CutTraffic]]:
        """Gradients of one step into the devices' fronts (heads) and the rear; the step's
        mean loss (detached) and what crossed the cut for each device. Every crossing goes
        through `send` (compression): each side computes with what it received."""
        total = sum(len(x) for x in xs)
        loss_sum = torch.zeros(())
        traffic = []
        for x, y, k in zip(xs, ys, devices, strict=True):
            w = len(x) / total
            t = CutTraffic()
            a = self.fronts[k](x)
            t.up.append(a.detach())
            a_recv = send(a.detach(), "activations", k).requires_grad_()  # the coordinator's
            t.activations = a_recv.detach()
            h = self.rear(a_recv)
            if self.heads is None:
                t.up.append(y)  # the labels go with the activations
                t.rear_target = send(y, "labels", k)
                loss = self.loss_fn(h, t.rear_target)
                (loss * w).backward()
            else:
                t.down.append(h.detach())
                h_recv = send(h.detach(), "outputs", k).requires_grad_()  # the device's copy
                loss = self.loss_fn(self.heads[k](h_recv), y)
                loss.backward()  # the head's gradient, and the gradient at h for the way back
                assert h_recv.grad is not None
                t.up.append(h_recv.grad.detach())
                t.rear_target = send(h_recv.grad.detach(), "head_gradients", k)
                h.backward(t.rear_target * w)  # the rear takes its share of the step's mean
            assert a_recv.grad is not None
            grad_at_cut = a_recv.grad / w  # the gradient of this device's own mean loss
            t.down.append(grad_at_cut.detach())
            a.backward(send(grad_at_cut.detach(), "cut_gradients", k))
            t.loss = loss.detach()
            loss_sum = loss_sum + t.loss * w
            traffic.append(t)
        return loss_sum, traffic

    def rear_backward(self, traffic: list[CutTraffic], weights: list[float]) -> None:
        """The rear's gradient again, from what the coordinator received of some devices
        (weights summing to 1): after a device was lost, its share must not count."""
        for t, w in zip(traffic, weights, strict=True):
            assert t.activations is not None and t.rear_target is not None
            h = self.rear(t.activations)
            if self.heads is None:
                (self.loss_fn(h, t.rear_target) * w).backward()
            else:
                h.backward(t.rear_target * w)

    @torch.no_grad()
    def average_devices(self, devices: list[int], weights: list[float]) -> None:
        """SplitFed: every listed device's front (and head) becomes their weighted average."""
        for part in [self.fronts, *([self.heads] if self.heads is not None else [])]:
            states = [part[k].state_dict() for k in devices]
            mean = {
                name: sum(w * s[name].double() for s, w in zip(states, weights, strict=True))
                for name in states[0]
            }
            for k in devices:
                part[k].load_state_dict({n: v.to(states[0][n].dtype) for n, v in mean.items()})

    def costs(self, input_shape: tuple[int, ...]) -> SplitCost:
        """Per-sample training FLOPs of each part and the bytes crossing each cut (fp32):
        what the simulator charges the device, the coordinator and the links."""
        front, rear = self.fronts[0], self.rear
        probe = torch.zeros(2, *input_shape, dtype=next(front.parameters()).dtype)
        with torch.no_grad():
            a = front(probe)
            h = rear(a)
        # The rear (and head) also compute the gradient at their input, to send it back.
        parts = [
            model_cost(front, input_shape),
            model_cost(rear, tuple(a.shape[1:]), input_grad=True),
        ]
        if self.heads is not None:
            parts.append(model_cost(self.heads[0], tuple(h.shape[1:]), input_grad=True))
        return SplitCost(
            front_flops=parts[0].train_flops_per_sample,
            rear_flops=parts[1].train_flops_per_sample,
            head_flops=parts[2].train_flops_per_sample if len(parts) > 2 else 0.0,
            cut_bytes=a[0].numel() * 4,
            head_cut_bytes=h[0].numel() * 4 if self.heads is not None else 0,
            front_forward_flops=parts[0].forward_flops_per_sample,
            rear_forward_flops=parts[1].forward_flops_per_sample,
            device_ops=parts[0].ops_per_step + (parts[2].ops_per_step if len(parts) > 2 else 0),
            rear_ops=parts[1].ops_per_step,
        )

    def whole(self, k: int) -> nn.Module:
        """Device k's complete model (its front, the rear, its head), for evaluation."""
        return nn.Sequential(*self.device_modules(k)[:1], self.rear, *self.device_modules(k)[1:])
