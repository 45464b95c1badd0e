"""edgeddl's compressors for plain PyTorch DDP: one line, `register_comm_hook`.

    from edgeddl.ddp import CompressionState, compression_hook
    model.register_comm_hook(CompressionState("two_step", density=0.01), compression_hook)

Each DDP bucket (a flat tensor of several parameters' gradients) gets a compressor of its
own, built for the bucket's layout, with its own error-feedback memory. How a bucket moves
depends on what its compressor can do:

- summable payloads (`none`, `fp16`, `randomk`: every rank sends values at the same places)
  are all-reduced, values only;
- sparse ones (`topk`, `two_step`, `dgc`, `threshold`, `qsgd`, ...) are encoded with the
  simulator's wire codec and all-gathered as bytes: each rank decodes the others' payloads
  (bounded by the bucket's size) and averages their reconstructions;
- multi-phase ones (`powersgd`) run their phases with an all-reduce between them.

The first `dense_steps` steps (at least one: DDP rebuilds its buckets after the first step)
are plain all-reduces. The hook blocks in its collectives (gloo, or NCCL) and returns a
completed future. The bytes each rank sent are counted in the state (`bytes_sent`, and the
dense equivalent `dense_bytes`).
Details: docs/compression.md#pytorch-ddp
"""

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.distributed as dist

from edgeddl.compress.base import Compressor, ErrorFeedback, Layout, PhasedCompressor
from edgeddl.compress.codec import Codec
from edgeddl.compress.registry import build_codec, build_compressor, build_feedback, build_phased
from edgeddl.config.compression import CompressorConfig

__all__ = ["CompressionState", "compression_hook"]


@dataclass
class _Bucket:
    """One bucket's compressor (or multi-phase scheme) and memory, for its layout."""

    layout: Layout
    compressor: Compressor | None
    phased: PhasedCompressor | None
    memory: ErrorFeedback


class CompressionState:
    """What `compression_hook` keeps between steps: the setting, one compressor and memory
    per DDP bucket, the step and the bytes sent. Keyword arguments are `[compression]`'s
    (`density`, `rank`, `levels`, `threshold`, `error_feedback`, `values`, `zstd`, ...);
    `dense_steps`: plain all-reduce steps first (at least 1: DDP rebuilds its buckets after
    the first step); `seed`: shared by every rank (random-k and PowerSGD draw alike);
    `momentum`: dgc's own (it keeps momentum-corrected memory: use an optimizer without)."""

    def __init__(
        self,
        compressor: str = "none",
        *,
        dense_steps: int = 1,
        seed: int = 0,
        momentum: float = 0.9,
        process_group: Any = None,
        **options: Any,
    ) -> None:
        if dense_steps < 1:
            raise ValueError(
                f"dense_steps must be >= 1 (got {dense_steps}): DDP rebuilds its buckets "
                "after the first step"
            )
        allowed = {f.name for f in fields(CompressorConfig)} - {"compressor"}  # dgc: warmup_steps
        if unknown := sorted(set(options) - allowed):
            raise ValueError(
                f"CompressionState: unknown option {unknown[0]!r}; allowed: "
                + ", ".join(sorted(allowed))
            )
        self.cfg = CompressorConfig(compressor=compressor, **options)  # one-line errors
        self.dense_steps, self.seed = dense_steps, seed
        self.momentum, self.process_group = momentum, process_group
        self.codec: Codec = build_codec(self.cfg)
        self.buckets: dict[int, _Bucket] = {}
        self.step, self.bytes_sent, self.dense_bytes = 0, 0, 0

    def bucket(self, index: int, params: list[torch.Tensor]) -> _Bucket:
        """Bucket `index`'s compressor and memory (built anew if its layout changed)."""
        layout = Layout(tuple(tuple(p.shape) for p in params))
        b = self.buckets.get(index)
        if b is None or b.layout != layout:
            phased = self.cfg.spec.num_phases > 1
            rank = dist.get_rank(self.process_group)
            b = _Bucket(
                layout,
                None if phased else build_compressor(self.cfg, layout, self.seed, rank),
                build_phased(self.cfg, layout, self.seed) if phased else None,
                build_feedback(self.cfg, self.momentum, dist.get_world_size(self.process_group)),
            )
            self.buckets[index] = b
        return b


def _done(t: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(t)
    return fut


def compression_hook(
    state: CompressionState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """A DDP communication hook: the bucket's gradient averaged over the ranks, compressed
    as `state` says."""
    group, buf = state.process_group, bucket.buffer()
    world = dist.get_world_size(group)
    step = state.step
    if bucket.is_last():
        state.step += 1
    state.dense_bytes += buf.numel() * buf.element_size()
    if step < state.dense_steps or state.cfg.compressor == "none":
        state.bytes_sent += buf.numel() * buf.element_size()
        buf.div_(world)
        dist.all_reduce(buf, group=group)
        return _done(buf)
    b = state.bucket(bucket.index(), list(bucket.parameters()))
    grad = buf.detach().float()
    compensated = b.memory.compensate(grad)
    if b.phased is not None:
        mean, sent = _phased(state, b.phased, compensated, world, step)
    else:
        assert b.compressor is not None
        mean, sent = _single(state, b.compressor, compensated, world, step)
    b.memory.commit(grad, compensated, sent)
    buf.copy_(mean.to(buf.dtype))
    return _done(buf)


def _single(
    state: CompressionState, c: Compressor, x: torch.Tensor, world: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mean over the ranks, what this rank sent) for a single-phase compressor."""
    group, payload = state.process_group, c.compress(x, step)
    sent = c.decompress(payload, step)
    if c.allreduce and payload.values is not None:  # the same places on every rank
        values = payload.values.clone()
        state.bytes_sent += values.numel() * values.element_size()
        dist.all_reduce(values, group=group)
        return c.decompress(replace(payload, values=values / world), step), sent
    data = state.codec.encode(payload)
    state.bytes_sent += len(data)
    mean = torch.zeros_like(x)
    for other in _all_gather_bytes(data, group, world):
        # every rank's payload, bounded by what a dense one of this bucket takes
        p = state.codec.decode(other, x.numel(), max_bytes=8 * x.numel() + 4096)
        mean += c.decompress(p, step)
    return mean / world, sent


def _phased(
    state: CompressionState, c: PhasedCompressor, x: torch.Tensor, world: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mean over the ranks, what this rank sent) for a multi-phase scheme: each phase
    summed by an all-reduce."""
    group = state.process_group

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous().clone()
        state.bytes_sent += t.numel() * t.element_size()
        dist.all_reduce(t, group=group)
        return t

    result = c.run([x], torch.tensor([1.0 / world]), step, reduce=reduce)
    c.commit(result)
    return result.aggregate, result.sent[0]


def _all_gather_bytes(data: bytes, group: Any, world: int) -> list[bytes]:
    """Every rank's `data` (lengths first, then the bytes padded to the longest)."""
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    out = [torch.zeros(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [o[: int(s.item())].numpy().tobytes() for o, s in zip(out, sizes, strict=True)]
