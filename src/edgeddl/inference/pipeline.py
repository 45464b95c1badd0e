"""Pipelined inference across real processes, re-planned when a device leaves or crashes.

One process per device of the chain (process 0 holds the input). The driver publishes
*generations* (which processes run which layers, from which micro-batch) in a `TCPStore`,
and each generation's members pass micro-batches along a gloo group. A leave or a crash
closes gloo sockets, so the whole chain stops within milliseconds; the driver re-plans the
survivors and re-runs from the input (no activation is trusted across a failure).
Details: docs/inference.md#the-process-pipeline
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

_HEADER = 8  # int64s: ndim, then the shape (up to 7 dimensions)
_PREFIX = "edgeddl/pipe"


class WireCodec(Protocol):
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]: ...
    def decode(self, parts: list[torch.Tensor]) -> torch.Tensor: ...
    def buffers(self, shape: tuple[int, ...]) -> list[torch.Tensor]: ...
    def payload_bytes(self, shape: tuple[int, ...]) -> int: ...


StageFn = Callable[[int, int, torch.Tensor], torch.Tensor]
"""Runs layers [start, end) of the model on an activation (`inference.stages.StageRunner`)."""

Replan = Callable[[tuple[int, ...]], Sequence[tuple[int, int]]]
"""The remaining processes (chain order, process 0 first) -> the layers each runs."""


@dataclass(slots=True)
class Generation:
    """One plan in force across the processes."""

    members: tuple[int, ...]
    """Processes in pipeline order: process 0 (the input) and those that run layers."""
    segments: tuple[tuple[int, int], ...]
    """The layers each member runs ([start, end); process 0's may be empty)."""
    from_mb: int
    """The first micro-batch it streams (all before it already have their output)."""
    start_s: float = 0.0
    """When the driver published it (seconds since the first micro-batch started; the first
    generation: 0)."""
    output_s: list[float] = field(default_factory=list)
    """When each of its outputs reached the driver (seconds since the first start)."""
    num_started: int = 0
    """Micro-batches process 0 started under it."""

    @property
    def rerun(self) -> int:
        """Micro-batches started under it that produced no output (streamed again later)."""
        return self.num_started - len(self.output_s)


@dataclass(frozen=True, slots=True)
class Departure:
    process: int
    kind: str  # "left" | "crashed"
    at_s: float
    """When it left (its own clock) or its pipe closed (a crash), since the first start."""
    generation: int
    """The generation it belonged to when it went (its plan was the last it held)."""
    at_mb: int | None = None
    """The micro-batch it left right before (a requested leave of a member)."""


@dataclass(frozen=True, slots=True)
class ProcessRun:
    outputs: torch.Tensor
    wall_s: float
    """From the first micro-batch's start to the last output."""
    latency_s: list[float]
    """Each micro-batch's wall time from its last start on process 0 to its output."""
    bytes_sent: list[int]
    """Payload bytes each process sent over all generations (scales included; each
    micro-batch also sends a 64-byte shape header, not counted)."""
    generations: list[Generation]
    departures: list[Departure]

    @property
    def throughput(self) -> float:
        return len(self.outputs) / self.wall_s


def _members(segments: Sequence[tuple[int, int]], present: Sequence[int]) -> Generation:
    keep = [i for i, (s, e) in enumerate(segments) if i == 0 or e > s]
    return Generation(
        members=tuple(present[i] for i in keep),
        segments=tuple(tuple(segments[i]) for i in keep),  # type: ignore[misc]
        from_mb=0,
    )


def run_processes(
    runner: StageFn,
    segments: Sequence[tuple[int, int]],
    x: torch.Tensor,
    codec: WireCodec,
    micro_batch: int,
    *,
    max_payload_bytes: int,
    replan: Replan | None = None,
    leaves: Mapping[int, int] | None = None,
    crashes: Mapping[int, int] | None = None,
    timeout_s: float = 60.0,
    threads: int = 1,
) -> ProcessRun:
    """Stream `x` micro-batch by micro-batch through one process per entry of `segments`
    (the layers each runs in the first plan).

    `leaves[i] = b`: process i leaves right before micro-batch b (at once if it holds no
    layers then); `crashes[i] = b`: it kills itself with SIGKILL there (fault injection).
    After a departure `replan` gives the survivors' layers. A process receives no payload
    larger than `max_payload_bytes` (the largest any cut of the model sends for a
    micro-batch): a header announcing more stops the plan. Raises TimeoutError when the
    stream does not end within `timeout_s`, RuntimeError when it cannot go on.
    """
    from torch.distributed import TCPStore

    leaves, crashes = dict(leaves or {}), dict(crashes or {})
    if 0 in leaves or 0 in crashes:
        raise ValueError("process 0 holds the input: it cannot leave")
    num_mb = -(-len(x) // micro_batch)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ctx = get_context("spawn")
    conns: dict[Connection, int] = {}
    procs = []
    for i in range(len(segments)):
        recv_end, send_end = ctx.Pipe(duplex=False)
        args = (i, store.port, runner, x, codec, max_payload_bytes, micro_batch, send_end,
                timeout_s, threads, leaves.get(i), crashes.get(i))  # fmt: skip
        p = ctx.Process(target=_worker, args=args, daemon=True)
        p.start()
        send_end.close()  # the child's copy stays open: EOF here means it exited
        conns[recv_end] = i
        procs.append(p)
    deadline = time.monotonic() + timeout_s
    outputs: dict[int, torch.Tensor] = {}
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    sent = [0] * len(segments)
    gens: list[Generation] = []
    departures: list[Departure] = []
    present = list(range(len(segments)))
    ended: dict[int, str] = {}  # this generation's: process -> done, fail, left, crashed
    failures: list[str] = []

    def receive(conn: Connection, gen: Generation) -> None:
        """One message (or the end) from process `conns[conn]`, during `gen`."""
        i, g = conns[conn], len(gens) - 1
        try:
            msg = conn.recv()
        except EOFError:  # it exited: a crash if it had said nothing and the stream is on
            del conns[conn]
            if i in present and i not in ended:
                ended[i] = "crashed"
                if len(outputs) < num_mb:
                    departures.append(Departure(i, "crashed", time.monotonic(), g))
            return
        kind = msg[0]
        if kind == "start":
            starts[msg[1]] = msg[2]
            gen.num_started += 1
        elif kind == "out":
            outputs[msg[1]] = torch.from_numpy(msg[2])
            ends[msg[1]] = msg[3]
            gen.output_s.append(time.monotonic())
        elif kind == "left":
            ended[i] = "left"
            sent[i] += msg[3]
            departures.append(Departure(i, "left", msg[2], g, msg[1]))
        else:  # "done" | "fail"
            ended[i] = kind
            sent[i] += msg[1]
            if kind == "fail":
                failures.append(f"process {i}: {msg[2]}")

    def receive_until(gen: Generation, done: Callable[[], bool]) -> None:
        while not done():
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(
                    f"the pipeline processes did not finish in {timeout_s:g} s "
                    f"(plan {len(gens)}, {len(outputs)} of {num_mb} micro-batches out)"
                )
            for conn in wait(list(conns), timeout=deadline - now):
                assert isinstance(conn, Connection)
                receive(conn, gen)

    gen = _members(segments, present)
    try:
        while True:
            g = len(gens)
            gen.start_s = time.monotonic()
            gens.append(gen)
            ended.clear()
            failures.clear()
            store.set(f"{_PREFIX}/gen/{g}", json.dumps([gen.members, gen.segments, gen.from_mb]))
            receive_until(gen, lambda: all(m in ended for m in gen.members))  # noqa: B023
            gone = [i for i in present if ended.get(i) in ("left", "crashed")]
            if len(outputs) == num_mb:  # a member gone after its last micro-batch: done
                store.set(f"{_PREFIX}/gen/{g + 1}", json.dumps(None))  # the end
                receive_until(gen, lambda: not conns)  # every process exits: the last words
                break
            if not gone:
                raise RuntimeError(f"plan {g + 1} failed: {'; '.join(sorted(failures)) or '?'}")
            if 0 in gone:
                raise RuntimeError("process 0 (the input) crashed: the stream cannot go on")
            if replan is None:
                raise RuntimeError(f"process {gone[0]} {ended[gone[0]]} and there is no replan")
            present = [i for i in present if i not in gone]
            gen = _members(replan(tuple(present)), present)
            gen.from_mb = next(b for b in range(num_mb + 1) if b not in outputs)
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        for conn in conns:
            conn.close()
    t_first = min(starts.values())  # times below: since the first micro-batch started
    for gen in gens:
        gen.start_s = max(0.0, gen.start_s - t_first)
        gen.output_s = [t - t_first for t in gen.output_s]
    order = range(num_mb)
    return ProcessRun(
        outputs=torch.cat([outputs[b] for b in order]),
        wall_s=max(ends.values()) - t_first,
        latency_s=[ends[b] - starts[b] for b in order],
        bytes_sent=sent,
        generations=gens,
        departures=[replace(d, at_s=d.at_s - t_first) for d in departures],
    )


def received_shape(header: torch.Tensor, codec: WireCodec, max_bytes: int) -> tuple[int, ...]:
    """The shape a peer's header announces, once a payload of it is known to fit in
    `max_bytes` (ValueError, one line, if not): the receiver allocates what the plan's
    largest cut needs at most, never what a header claims."""
    ndim = int(header[0])
    if not 1 <= ndim < _HEADER:
        raise ValueError(f"a peer announced an activation of {ndim} dimensions (1..{_HEADER - 1})")
    shape = tuple(int(d) for d in header[1 : 1 + ndim].tolist())
    if min(shape) < 1:
        raise ValueError(f"a peer announced an activation of shape {shape}")
    size = codec.payload_bytes(shape)
    if size > max_bytes:
        raise ValueError(
            f"a peer announced an activation of shape {shape} ({size} bytes); the plan's "
            f"largest is {max_bytes} bytes"
        )
    return shape


class _Left(Exception):
    def __init__(self, micro_batch: int) -> None:
        super().__init__(f"left before micro-batch {micro_batch}")
        self.micro_batch, self.at = micro_batch, time.monotonic()


def _worker(
    index: int,
    port: int,
    runner: StageFn,
    x: torch.Tensor,
    codec: WireCodec,
    max_bytes: int,
    micro_batch: int,
    conn: Connection,
    timeout_s: float,
    threads: int,
    leave_mb: int | None,
    crash_mb: int | None,
) -> None:
    torch.set_num_threads(threads)
    from torch.distributed import PrefixStore, TCPStore

    timeout = timedelta(seconds=timeout_s)
    store = TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    g = 0
    while True:
        key = f"{_PREFIX}/gen/{g}"
        store.wait([key], timeout)
        spec = json.loads(store.get(key))
        if spec is None:
            return
        members, segments, from_mb = spec
        if index not in members:
            if leave_mb is not None:  # it holds nothing: nobody waits on it
                conn.send(("left", None, time.monotonic(), 0))
                return
            g += 1
            continue
        rank = members.index(index)
        group_store = PrefixStore(f"{_PREFIX}/{g}", store)
        dist.init_process_group(
            "gloo", store=group_store, rank=rank, world_size=len(members), timeout=timeout
        )
        sent = [0]
        try:
            _stream(rank, len(members), segments[rank], from_mb, runner, x, codec, max_bytes,
                    micro_batch, conn, sent, leave_mb, crash_mb)  # fmt: skip
            msg: tuple[Any, ...] = ("done", sent[0])
        except _Left as lv:
            msg = ("left", lv.micro_batch, lv.at, sent[0])
        except (RuntimeError, ValueError) as e:  # gloo: a peer closed, a timeout
            msg = ("fail", sent[0], str(e).splitlines()[0] if str(e) else type(e).__name__)
        finally:
            dist.destroy_process_group()  # closes its sockets: its neighbours fail at once
        conn.send(msg)
        if msg[0] == "left":
            return
        g += 1


def _stream(
    rank: int,
    world: int,
    segment: Sequence[int],
    from_mb: int,
    runner: StageFn,
    x: torch.Tensor,
    codec: WireCodec,
    max_bytes: int,
    micro_batch: int,
    conn: Connection,
    sent: list[int],
    leave_mb: int | None,
    crash_mb: int | None,
) -> None:
    start, end = segment
    last = world - 1
    num_mb = -(-len(x) // micro_batch)
    pending: list[tuple[Any, list[torch.Tensor]]] = []  # sends in flight, their tensors
    dist.barrier()
    for b in range(from_mb, num_mb):
        if leave_mb is not None and b >= leave_mb:
            raise _Left(b)
        if crash_mb is not None and b >= crash_mb:
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 0:
            conn.send(("start", b, time.monotonic()))
            act = x[b * micro_batch : (b + 1) * micro_batch]
        else:
            header = torch.empty(_HEADER, dtype=torch.int64)
            dist.recv(header, rank - 1)
            parts = codec.buffers(received_shape(header, codec, max_bytes))
            for t in parts:
                dist.recv(t, rank - 1)
            act = codec.decode(parts)
        if end > start:
            act = runner(start, end, act)
        if rank == last:
            conn.send(("out", b, np.array(act), time.monotonic()))
            continue
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[0] = act.dim()
        header[1 : 1 + act.dim()] = torch.tensor(act.shape)
        parts = [p.contiguous() for p in codec.encode(act)]
        sent[0] += sum(p.numel() * p.element_size() for p in parts)
        tensors = [header, *parts]
        pending.append(([dist.isend(t, rank + 1) for t in tensors], tensors))
        while len(pending) > 2:  # bounded: the receiver is at most two micro-batches behind
            for work in pending.pop(0)[0]:
                work.wait()
    for works, _ in pending:
        for work in works:
            work.wait()
