"""Split learning across a wire: what a device does in a step, and the coordinator's rear.

`device_step` is a device's conversation with the coordinator. It reaches the `RearServer`
through a `Call` (a direct call in the simulator, a round trip over the device's link on a
real fleet), so both run this same code. The rear steps once per committed step, recomputes
its gradient when a device was lost or sent twice, and refuses requests for a step it took.
Details: docs/split.md#across-a-wire
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from edgeddl.compress.base import Compressor, Layout, Payload
from edgeddl.compress.bitpack import CodecError
from edgeddl.compress.registry import build_codec, build_compressor
from edgeddl.config.split import SplitConfig
from edgeddl.strategy.base import Call
from edgeddl.strategy.split.maths import RearInput, SplitCost, SplitModels

UP_KINDS = ("activations", "labels", "head_gradients")
REQUESTS = ("activations", "head_gradients")
"""What a device asks of the coordinator: its activations (with its labels, unless
U-shaped), and U-shaped the head's gradient."""

"""A device's request: (kind, encoded tensors) -> (the coordinator's encoded answer, the
device's loss as the rear computed it (labels sent), else 0)."""


class CutWire:
    """Compresses and encodes each tensor crossing a cut, decodes it on the other side;
    counts the encoded bytes."""

    def __init__(self, cfg: SplitConfig, num_classes: int, seed: int) -> None:
        self.cfg = cfg.compression
        self.codec = build_codec(self.cfg)
        self.seed = seed
        self.num_classes = num_classes
        self.label_bits = max(1, (max(num_classes, 2) - 1).bit_length())
        self._compressors: dict[tuple[int, str, tuple[int, ...]], Compressor] = {}
        self.up_bytes = 0
        self.down_bytes = 0
        self.dense_bytes = 0
        """What the same tensors take as plain fp32 (and labels as int64): the reference."""
        self.sent: list[tuple[int, str, int]] = []
        """(device, kind, bytes) of every tensor encoded since it was last cleared."""
        self.max_bytes: int | None = None
        """The configured payload limit (`security.max_payload_bytes`, when on): nothing is
        decoded past it; None: the tensor's shape bounds it."""

    def _compressor(self, device: int, kind: str, shape: tuple[int, ...]) -> Compressor:
        key = (device, kind, shape)
        if key not in self._compressors:  # one scale or norm per sample
            per_sample = int(np.prod(shape[1:], dtype=np.int64))
            layout = Layout(tuple((per_sample,) for _ in range(shape[0])))
            self._compressors[key] = build_compressor(self.cfg, layout, self.seed, device)
        return self._compressors[key]

    def encode(self, t: torch.Tensor, kind: str, device: int, step: int) -> bytes:
        """`t`'s bytes on the wire, counted by direction."""
        if kind == "labels":
            data = self.codec.encode(Payload(numel=t.numel(), codes=t, bits=self.label_bits))
        else:
            comp = self._compressor(device, kind, tuple(t.shape))
            data = self.codec.encode(comp.compress(t.detach().reshape(-1).float(), step))
        if kind in UP_KINDS:
            self.up_bytes += len(data)
        else:
            self.down_bytes += len(data)
        self.dense_bytes += t.numel() * t.element_size()
        self.sent.append((device, kind, len(data)))
        return data

    def decode(
        self,
        data: bytes,
        kind: str,
        device: int,
        step: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """What the receiver makes of `data`: a tensor of `shape`, or CodecError (a payload
        that is damaged, of the wrong size, or labels out of range)."""
        numel = int(np.prod(shape, dtype=np.int64))
        if kind == "labels":
            codes = self.codec.decode(data, numel, self.max_bytes).codes
            if codes is None or codes.numel() != numel:
                raise CodecError(f"{kind}: expected {numel} label codes")
            top = int(codes.max()) if numel else 0
            if top >= self.num_classes:
                raise CodecError(f"{kind}: a label of {top} (classes 0..{self.num_classes - 1})")
            return codes.to(torch.int64).view(shape)
        comp = self._compressor(device, kind, shape)
        payload = self.codec.decode(data, numel, self.max_bytes)
        try:
            values = comp.decompress(payload, step)
        except (ValueError, RuntimeError, IndexError) as e:  # what the compressor cannot read
            raise CodecError(f"{kind}: {e}") from None
        if values.numel() != numel or not torch.isfinite(values).all():
            raise CodecError(f"{kind}: expected {numel} finite values")
        return values.to(dtype).view(shape)

    def take_log(self, devices: list[int], kinds: tuple[str, ...]) -> np.ndarray:
        """Bytes each of `devices` sent of `kinds` since the log was last cleared (then
        forgotten)."""
        where = {k: i for i, k in enumerate(devices)}
        out = np.zeros(len(devices))
        for device, kind, size in self.sent:
            if kind in kinds:
                out[where[device]] += size
        return out


def device_step(
    parts: SplitModels,
    wire: CutWire,
    cost: SplitCost,
    k: int,
    x: torch.Tensor,
    y: torch.Tensor,
    step: int,
    call: Call,
) -> torch.Tensor:
    """Device k's side of a step on batch (x, y): its front's (and head's) gradients; its
    mean loss (detached)."""
    n = len(x)
    a = parts.front_forward(k, x)
    up = [wire.encode(a, "activations", k, step)]
    if not parts.u_shaped:
        up.append(wire.encode(y, "labels", k, step))
    reply, rear_loss = call("activations", up)
    if parts.u_shaped:
        h = wire.decode(reply, "outputs", k, step, (n, *cost.head_cut_shape), a.dtype)
        head_grad, loss = parts.head_backward(k, h, y)
        reply, _ = call("head_gradients", [wire.encode(head_grad, "head_gradients", k, step)])
    else:
        loss = torch.tensor(rear_loss, dtype=a.dtype)
    parts.front_backward(a, wire.decode(reply, "cut_gradients", k, step, tuple(a.shape), a.dtype))
    return loss


@dataclass(slots=True)
class _Pending:
    """The step the rear is gathering: what each device sent, and U-shaped graphs."""

    step: int
    buffers: list[torch.Tensor]
    inputs: dict[int, RearInput] = field(default_factory=dict)
    graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    clean: bool = True
    """Whether the rear's gradient holds exactly each input once, times its samples."""
    applied: bool = False


class RearServer:
    """The coordinator's side of split learning; docs/split.md#across-a-wire."""

    def __init__(
        self,
        parts: SplitModels,
        wire: CutWire,
        optimizer: torch.optim.Optimizer,
        cost: SplitCost,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.parts, self.wire, self.optimizer, self.cost = parts, wire, optimizer, cost
        self.dtype = dtype
        self.steps_applied = 0
        self.last_step: int | None = None
        """The last step the rear took (committed); none before it is gathered again."""
        self._pending: _Pending | None = None

    def check_step(self, step: int) -> None:
        """CodecError if step `step` is one the rear took already, or older."""
        if self.last_step is not None and step <= self.last_step:
            raise CodecError(f"step {step}: the rear took step {self.last_step} already")

    def _gathering(self, step: int) -> _Pending:
        """The pending step `step`: a new one (the rear's gradient cleared, its statistics
        kept to restore) unless it is the step being gathered and not yet applied."""
        p = self._pending
        if p is None or p.step != step or p.applied:
            self.optimizer.zero_grad(set_to_none=True)
            p = _Pending(step, [b.clone() for b in self.parts.rear.buffers()])
            self._pending = p
        return p

    def handle(
        self, kind: str, device: int, step: int, count: int, payloads: list[bytes]
    ) -> tuple[bytes, float]:
        """Answer one request of device `device` (`count` samples) in step `step`;
        CodecError for a request that cannot be read (nothing of it is kept)."""
        if kind not in REQUESTS:
            raise CodecError(f"unknown request {kind!r}")
        wanted = 1 if kind == "head_gradients" or self.parts.u_shaped else 2
        if len(payloads) != wanted:
            raise CodecError(f"{kind}: expected {wanted} tensors, got {len(payloads)}")
        self.check_step(step)
        c, wire = self.cost, self.wire
        p = self._gathering(step)
        if kind == "head_gradients":
            graph = p.graphs.pop(device, None)
            if graph is None or p.counts.get(device) != count:
                raise CodecError(f"head_gradients from device {device} before its activations")
            shape = (count, *c.head_cut_shape)
            g = wire.decode(payloads[0], kind, device, step, shape, self.dtype)
            p.inputs[device].target = g
            grad = self.parts.rear_backward_from(*graph, g, float(count))
            return wire.encode(grad, "cut_gradients", device, step), 0.0
        a = wire.decode(payloads[0], kind, device, step, (count, *c.cut_shape), self.dtype)
        y = None
        if not self.parts.u_shaped:
            y = wire.decode(payloads[1], "labels", device, step, (count,), torch.int64)
        if device in p.inputs:  # the step is tried again: its first try is in the gradient
            p.clean = False
        p.counts[device] = count
        p.inputs[device] = RearInput(a, y)
        if y is not None:
            grad, loss = self.parts.rear_loss(a, y, float(count))
            return wire.encode(grad, "cut_gradients", device, step), float(loss)
        leaf, h = self.parts.rear_output(a)
        p.graphs[device] = (leaf, h)
        return wire.encode(h.detach(), "outputs", device, step), 0.0

    def commit(self, step: int, devices: list[int], counts: list[int]) -> bool:
        """The rear's step with the sample-weighted mean of `devices`' gradients (none: the
        step is dropped). False if step `step` is not the one gathered, was applied already,
        lacks a device's complete contribution, or `counts` are not the samples each device
        sent (nothing changes then)."""
        p = self._pending
        if p is None or p.step != step or p.applied:
            return False
        if any(d not in p.inputs or p.inputs[d].target is None for d in devices):
            return False
        if list(counts) != [p.counts[d] for d in devices]:  # weights are what each sent
            return False
        total = float(sum(counts))
        if not p.clean or set(devices) != set(p.inputs):
            with torch.no_grad():
                for b, v in zip(self.parts.rear.buffers(), p.buffers, strict=True):
                    b.copy_(v)
            self.optimizer.zero_grad(set_to_none=True)
            if devices:
                self.parts.rear_backward(
                    [p.inputs[d] for d in devices], [n / total for n in counts]
                )
        else:
            with torch.no_grad():
                for q in self.parts.rear.parameters():
                    if q.grad is not None:
                        q.grad /= total
        p.applied = True
        self.last_step = step
        if devices:
            self.optimizer.step()
            self.steps_applied += 1
        return True
