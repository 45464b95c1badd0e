"""Pipelined inference across real processes: one process per stage, point-to-point sends.

The caller opens a `TCPStore` on 127.0.0.1 (port 0: the OS picks a free one) and spawns one
process per stage; they form a gloo process group through the store. Rank r receives each
micro-batch from rank r - 1 (a fixed 8-int64 header with the tensor's shape, then the
payload's tensors as the codec encoded them), runs its stage and sends the result on
(`isend`: it computes the next micro-batch while the previous one is on the wire). The
last rank writes the outputs and its timings to a file (atomically); the caller reads it.
Every wait is bounded: a rank that dies or hangs fails the run within `timeout_s`.
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from edgeddl.report.files import write_bytes_atomic

_HEADER = 8  # int64s: ndim, then the shape (up to 7 dimensions)
_RESULT = "outputs.pt"


class WireCodec(Protocol):
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]: ...
    def decode(self, parts: list[torch.Tensor]) -> torch.Tensor: ...
    def buffers(self, shape: tuple[int, ...]) -> list[torch.Tensor]: ...


@dataclass(frozen=True, slots=True)
class ProcessRun:
    outputs: torch.Tensor
    wall_s: float
    """From the first rank starting the first micro-batch to the last rank's last output."""
    latency_s: list[float]
    """Each micro-batch's wall time from its start on rank 0 to its output on the last."""
    bytes_sent: list[int]
    """Payload bytes each rank sent (scales included; each micro-batch also sends a 64-byte
    shape header, not counted)."""

    @property
    def throughput(self) -> float:
        return len(self.outputs) / self.wall_s


def run_processes(
    stages: Sequence[nn.Module],
    x: torch.Tensor,
    codec: WireCodec,
    micro_batch: int,
    *,
    timeout_s: float = 60.0,
    threads: int = 1,
) -> ProcessRun:
    """Run `x` through `stages`, one process each, micro-batch by micro-batch."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="edgeddl-pipe-") as tmp:
        args = (store.port, stages, x, codec, micro_batch, tmp, timeout_s, threads)
        ctx = mp.start_processes(
            _worker, args=args, nprocs=len(stages), join=False, start_method="spawn"
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.05, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"the {len(stages)} pipeline processes did not finish in {timeout_s:g} s"
                    )
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        result: dict[str, Any] = torch.load(Path(tmp) / _RESULT, weights_only=True)
    starts, ends = result["starts"].tolist(), result["ends"].tolist()
    return ProcessRun(
        outputs=result["outputs"],
        wall_s=max(ends) - min(starts),
        latency_s=[e - s for s, e in zip(starts, ends, strict=True)],
        bytes_sent=result["bytes_sent"].tolist(),
    )


def _worker(
    rank: int,
    port: int,
    stages: Sequence[nn.Module],
    x: torch.Tensor,
    codec: WireCodec,
    micro_batch: int,
    out_dir: str,
    timeout_s: float,
    threads: int,
) -> None:
    torch.set_num_threads(threads)
    from torch.distributed import TCPStore

    timeout = timedelta(seconds=timeout_s)
    store = TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    world, last = len(stages), len(stages) - 1
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        stage = stages[rank].eval()
        num_mb = -(-len(x) // micro_batch)
        starts, ends, outputs = [], [], []
        pending: list[tuple[Any, list[torch.Tensor]]] = []  # sends in flight, their tensors
        sent = 0
        dist.barrier()
        for b in range(num_mb):
            if rank == 0:
                starts.append(time.monotonic())
                act = x[b * micro_batch : (b + 1) * micro_batch]
            else:
                header = torch.empty(_HEADER, dtype=torch.int64)
                dist.recv(header, rank - 1)
                shape = tuple(header[1 : 1 + int(header[0])].tolist())
                parts = codec.buffers(shape)
                for t in parts:
                    dist.recv(t, rank - 1)
                act = codec.decode(parts)
            with torch.no_grad():
                act = stage(act)
            if rank == last:
                outputs.append(act)
                ends.append(time.monotonic())
                continue
            header = torch.zeros(_HEADER, dtype=torch.int64)
            header[0] = act.dim()
            header[1 : 1 + act.dim()] = torch.tensor(act.shape)
            parts = [p.contiguous() for p in codec.encode(act)]
            sent += sum(p.numel() * p.element_size() for p in parts)
            tensors = [header, *parts]
            pending.append(([dist.isend(t, rank + 1) for t in tensors], tensors))
            while len(pending) > 2:  # bounded: the receiver is at most two micro-batches behind
                for work in pending.pop(0)[0]:
                    work.wait()
        for works, _ in pending:
            for work in works:
                work.wait()
        store.set(f"edgeddl/pipe/bytes/{rank}", str(sent))
        if world > 1:
            if rank == 0:
                dist.send(torch.tensor(starts, dtype=torch.float64), last)
            elif rank == last:
                starts_t = torch.empty(num_mb, dtype=torch.float64)
                dist.recv(starts_t, 0)
                starts = starts_t.tolist()
        if rank == last:
            per_rank = [int(store.get(f"edgeddl/pipe/bytes/{r}")) for r in range(world)]
            buf = io.BytesIO()
            torch.save(
                {
                    "outputs": torch.cat(outputs),
                    "starts": torch.tensor(starts, dtype=torch.float64),
                    "ends": torch.tensor(ends, dtype=torch.float64),
                    "bytes_sent": torch.tensor(per_rank, dtype=torch.int64),
                },
                buf,
            )
            write_bytes_atomic(Path(out_dir) / _RESULT, buf.getvalue())
        dist.barrier()
    finally:
        dist.destroy_process_group()
