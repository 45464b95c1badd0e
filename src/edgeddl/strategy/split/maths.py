"""Split learning's maths: each device's front, the coordinator's rear, what crosses the cut.

The rear accumulates the sample-weighted mean of the devices' gradients (what one model would
get for the whole step), each front the gradient of its own loss, so averaging the fronts
(SplitFed) gives exactly a data-parallel step. The methods are each side's part;
`strategy/split/roles.py` joins them across a wire.
Details: docs/split.md#the-maths-of-a-step
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edgeddl.models.cost import model_cost
from edgeddl.models.layers import split_model

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(slots=True)
class RearInput:
    """What the coordinator received from one device in a step: the rear's input, and what
    the rear's backward needs again (labels sent: the labels; U-shaped: the head's
    gradient), both as received."""

    activations: torch.Tensor
    target: torch.Tensor | None = None


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
    cut_shape: tuple[int, ...] = ()
    """One sample's activations at the cut (and its gradient there)."""
    head_cut_shape: tuple[int, ...] = ()
    """U-shaped: one sample's rear output (and the head's gradient at it)."""


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

    # --- the device's side ---------------------------------------------------------------

    def front_forward(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Device k's activations at the cut (its graph kept for `front_backward`)."""
        return self.fronts[k](x)

    def head_backward(
        self, k: int, h_recv: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """U-shaped: device k's head on the rear's output as received; its gradient goes
        into the head. (The gradient at the rear's output, to send up; the mean loss.)"""
        h = h_recv.detach().requires_grad_()
        loss = self.loss_fn(self.heads[k](h), y)  # type: ignore[index]
        loss.backward()
        assert h.grad is not None
        return h.grad.detach(), loss.detach()

    @staticmethod
    def front_backward(a: torch.Tensor, grad_at_cut: torch.Tensor) -> None:
        """The gradient at the cut as received, back through the device's front."""
        a.backward(grad_at_cut)

    # --- the coordinator's side ----------------------------------------------------------

    def rear_loss(
        self, a_recv: torch.Tensor, y_recv: torch.Tensor, weight: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels sent: the rear's loss on the activations and labels as received; `weight`
        times its gradient goes into the rear. (The gradient of this device's mean loss at
        the cut; that loss.)"""
        a = a_recv.detach().requires_grad_()
        loss = self.loss_fn(self.rear(a), y_recv)
        (loss * weight).backward()
        assert a.grad is not None
        return (a.grad / weight).detach(), loss.detach()

    def rear_output(self, a_recv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """U-shaped: the rear's input (a leaf) and output, the graph kept for
        `rear_backward_from`."""
        a = a_recv.detach().requires_grad_()
        return a, self.rear(a)

    @staticmethod
    def rear_backward_from(
        a: torch.Tensor, h: torch.Tensor, head_grad: torch.Tensor, weight: float
    ) -> torch.Tensor:
        """U-shaped: the head's gradient as received, `weight` times into the rear; the
        gradient of the device's mean loss at the cut."""
        h.backward(head_grad * weight)
        assert a.grad is not None
        return (a.grad / weight).detach()

    def rear_backward(self, inputs: list[RearInput], weights: list[float]) -> None:
        """The rear's gradient again, from what the coordinator received of some devices
        (with their weights): after a device was lost, its share must not count."""
        for r, w in zip(inputs, weights, strict=True):
            assert r.target is not None
            h = self.rear(r.activations)
            if self.heads is None:
                (self.loss_fn(h, r.target) * w).backward()
            else:
                h.backward(r.target * w)

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
            cut_shape=tuple(a.shape[1:]),
            head_cut_shape=tuple(h.shape[1:]) if self.heads is not None else (),
        )

    def whole(self, k: int) -> nn.Module:
        """Device k's complete model (its front, the rear, its head), for evaluation."""
        return nn.Sequential(*self.device_modules(k)[:1], self.rear, *self.device_modules(k)[1:])
