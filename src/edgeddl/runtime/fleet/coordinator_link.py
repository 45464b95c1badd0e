"""A device's link to the coordinator: requests and answers over a gloo group of two.

Split learning's rear and a secured fleet's sealed payloads need the coordinator itself, not
a sum among devices. torch.distributed moves the bytes (no socket is ours); the coordinator
serves each link on its own thread and hands each request to its `Handler`
(`split_rear.py`, `secure_coordinator.py`).
Details: docs/real-fleet.md#the-coordinator-link
"""

from __future__ import annotations

import sys
import threading
import time
from datetime import timedelta
from typing import Any, Protocol

import numpy as np
import torch

from edgeddl.compress.bitpack import CodecError

KEY_LINKS = "edgeddl/links"
"""How many links devices have opened to the coordinator; link i's device name is at
`link_key(i)`."""
OPS = ("activations", "head_gradients", "commit", "evaluate", "hello", "update", "aggregate")
HEADER = 8
"""Request: op, step, device, samples, loss, members, then the byte length of up to two
tensors. Answer: status (0 ok, 1 refused: the body is the reason), body length, loss."""
MAX_PARTS = 2


class LinkError(ConnectionError):
    """The link to the coordinator failed, or the coordinator refused a request."""


def link_key(i: int) -> str:
    return f"edgeddl/link/{i}"


def _group(store: Any, i: int, rank: int, timeout_s: float) -> Any:
    from torch.distributed import PrefixStore, ProcessGroupGloo

    return ProcessGroupGloo(
        PrefixStore(f"edgeddl/link-group/{i}", store), rank, 2, timedelta(seconds=timeout_s)
    )


def _send(pg: Any, header: list[float], body: bytes) -> None:
    pg.send([torch.tensor(header, dtype=torch.float64)], 1 - pg.rank(), 0).wait()
    if body:
        pg.send([torch.frombuffer(bytearray(body), dtype=torch.uint8)], 1 - pg.rank(), 0).wait()


def _recv(pg: Any, size: int) -> bytes:
    buf = torch.empty(size, dtype=torch.uint8)
    pg.recv([buf], 1 - pg.rank(), 0).wait()
    return buf.numpy().tobytes()


def _recv_header(pg: Any) -> list[float]:
    header = torch.zeros(HEADER, dtype=torch.float64)
    pg.recv([header], 1 - pg.rank(), 0).wait()
    return header.tolist()


class CoordinatorLink:
    """A device's end of its link to the coordinator."""

    def __init__(self, store: Any, name: str, timeout_s: float) -> None:
        i = store.add(KEY_LINKS, 1)
        store.set(link_key(i), name)
        try:
            self.pg = _group(store, i, 1, timeout_s)
        except RuntimeError as e:  # the coordinator never took the link up
            raise LinkError(f"no link to the coordinator ({_first_line(e)})") from None
        self.seconds = 0.0
        """Wall seconds spent in requests (sending, the coordinator's work, the answer)."""

    def call(
        self,
        op: str,
        step: int,
        device: int,
        count: int,
        parts: list[bytes],
        loss: float = 0.0,
        members: int = 0,
    ) -> tuple[bytes, float]:
        """One request and its answer: (body, loss). LinkError if the link failed or the
        coordinator refused the request."""
        t0 = time.perf_counter()
        lengths = [len(p) for p in parts] + [0] * (MAX_PARTS - len(parts))
        header = [OPS.index(op), step, device, count, loss, members, *lengths]
        try:
            _send(self.pg, header, b"".join(parts))
            status, size, reply_loss = _recv_header(self.pg)[:3]
            body = _recv(self.pg, int(size)) if size else b""
        except RuntimeError as e:  # gloo: the coordinator closed the link, or a timeout
            raise LinkError(f"the link to the coordinator failed ({_first_line(e)})") from None
        finally:
            self.seconds += time.perf_counter() - t0
        if status != 0:
            raise LinkError(f"the coordinator refused {op} at step {step}: {body.decode()}")
        return body, reply_loss


class Handler(Protocol):
    """What the coordinator does with the requests of its links."""

    def answer(
        self,
        name: str,
        op: str,
        step: int,
        device: int,
        count: int,
        parts: list[bytes],
        header: list[float],
    ) -> tuple[bytes, float]:
        """(body, loss) for device `name`'s request; CodecError or ValueError refuses it."""
        ...

    def max_request_bytes(self, op: str) -> int: ...


class LinkServer:
    """The coordinator's end of every link: a thread each, requests into one `Handler`."""

    def __init__(self, handler: Handler, store: Any, timeout_s: float = 3600.0) -> None:
        self.handler, self.store, self.timeout_s = handler, store, timeout_s
        self.opened = 0
        self.refused: list[str] = []

    def poll(self) -> None:
        """Serve every link opened since the last call (each on its own thread)."""
        opened = self.store.add(KEY_LINKS, 0)
        for i in range(self.opened + 1, opened + 1):
            threading.Thread(target=self._serve, args=(i,), daemon=True).start()
        self.opened = max(self.opened, opened)

    def _serve(self, i: int) -> None:
        name = self.store.get(link_key(i)).decode()
        try:
            pg = _group(self.store, i, 0, self.timeout_s)
        except RuntimeError:  # the device went before the link was up
            return
        try:
            while True:
                header = _recv_header(pg)
                op, step, device, count = (int(v) for v in header[:4])
                sizes = [int(v) for v in header[6:]]
                known = 0 <= op < len(OPS)
                limit = self.handler.max_request_bytes(OPS[op]) if known else 0
                if not known or any(n < 0 for n in sizes) or sum(sizes) > limit:
                    self._refuse(name, f"a request of {sum(sizes)} bytes (op {op})")
                    return  # the rest of its bytes cannot be skipped: the link ends
                body = _recv(pg, sum(sizes)) if sum(sizes) else b""
                parts = [
                    body[a : a + n]
                    for a, n in zip(np.cumsum([0, *sizes[:-1]]), sizes, strict=True)
                    if n
                ]
                try:
                    reply, loss = self.handler.answer(
                        name, OPS[op], step, device, count, parts, header
                    )
                except (CodecError, ValueError, RuntimeError) as e:
                    reason = _first_line(e).encode()
                    self._refuse(name, f"{OPS[op]} at step {step}: {_first_line(e)}")
                    _send(pg, [1, len(reason), 0, 0, 0, 0, 0, 0], reason)
                    continue
                # Outside the refusal's try: a device that died before reading its answer
                # ends the link (gloo's error), it was not refused.
                _send(pg, [0, len(reply), loss, 0, 0, 0, 0, 0], reply)
        except RuntimeError:  # gloo: the device closed the link (it ended, or died)
            return

    def _refuse(self, name: str, what: str) -> None:
        self.refused.append(f"{name}: {what}")
        print(f"edgeddl coordinator: refused {name}'s {what}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]
