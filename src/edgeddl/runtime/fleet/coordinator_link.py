"""A device's link to the coordinator: requests and answers over a gloo group of two.

Split learning's rear and a secured fleet's sealed payloads need the coordinator itself, not
a sum among devices. torch.distributed moves the bytes (no socket is ours); the coordinator
serves each link on its own thread and hands each request to its `Handler`
(`split_rear.py`, `secure_coordinator.py`). With `[security]` a link starts with the session
handshake (`security/handshake.py`) and every request and answer after it is a frame of that
session; the device's name is the one its handshake proved, not the one it wrote in the store.
The store is not trusted: a link index is served only once its name is there, a bounded
number of links wait for their handshake (each a bounded time), and no more than a bounded
number of links are served at once.
Details: docs/real-fleet.md#the-coordinator-link
"""

from __future__ import annotations

import struct
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Protocol

import numpy as np
import torch

from edgeddl.compress.bitpack import CodecError
from edgeddl.security.handshake import (
    MAX_HANDSHAKE_BYTES,
    TAG_BYTES,
    FrameError,
    HandshakeError,
    Initiator,
    Responder,
    Session,
)

KEY_LINKS = "edgeddl/links"
"""How many links devices have opened to the coordinator; link i's device name is at
`link_key(i)`."""
OPS = (
    "activations",
    "head_gradients",
    "commit",
    "evaluate",
    "hello",
    "update",
    "aggregate",
    "handshake",
    "state",
)
HEADER = 8
"""Request: op, step, device, samples, loss, members, then the byte length of up to two
tensors. Answer: status (0 ok, 1 refused: the body is the reason), body length, loss."""
MAX_PARTS = 2
_INNER = struct.Struct(f">{HEADER}d")
"""A framed request's or answer's own header, inside the frame."""
HANDSHAKE_TIMEOUT_S = 10.0
"""How long a new link may take to be set up and to finish its handshake."""
MAX_WAITING = 8
"""Links the coordinator sets up at once; later ones wait for a free place, not a thread."""
LINKS_PER_DEVICE = 2
"""Links one device may have open (a new one while its last is still being torn down)."""
SCAN = 256
"""The most recent link indices the coordinator looks at: a link counter someone inflated
leaves the indices below unserved (a device whose link was one of them tries again)."""


class LinkError(ConnectionError):
    """The link to the coordinator failed, or the coordinator refused a request."""


def link_key(i: int) -> str:
    return f"edgeddl/link/{i}"


def _group(store: Any, i: int, rank: int, timeout_s: float) -> Any:
    from torch.distributed import PrefixStore, ProcessGroupGloo

    raw = getattr(store, "raw", store)  # under a SignedStore: torch's own store
    return ProcessGroupGloo(
        PrefixStore(f"edgeddl/link-group/{i}", raw), rank, 2, timedelta(seconds=timeout_s)
    )


def _send(pg: Any, header: list[float], body: bytes) -> None:
    pg.send([torch.tensor(header, dtype=torch.float64)], 1 - pg.rank(), 0).wait()
    if body:
        pg.send([torch.frombuffer(bytearray(body), dtype=torch.uint8)], 1 - pg.rank(), 0).wait()


def _recv(pg: Any, size: int, timeout_s: float) -> bytes:
    buf = torch.empty(size, dtype=torch.uint8)
    pg.recv([buf], 1 - pg.rank(), 0).wait(timedelta(seconds=timeout_s))
    return buf.numpy().tobytes()


def _recv_header(pg: Any, timeout_s: float) -> list[float]:
    header = torch.zeros(HEADER, dtype=torch.float64)
    pg.recv([header], 1 - pg.rank(), 0).wait(timedelta(seconds=timeout_s))
    return header.tolist()


def _framed(session: Session, header: list[float], body: bytes) -> bytes:
    return session.seal(_INNER.pack(*header) + body)


def _unframed(session: Session, frame: bytes) -> tuple[list[float], bytes]:
    """(inner header, body) of a frame; FrameError if it does not open or is too short."""
    data = session.open(frame)
    if len(data) < _INNER.size:
        raise FrameError("a frame shorter than its header")
    return list(_INNER.unpack_from(data)), data[_INNER.size :]


class CoordinatorLink:
    """A device's end of its link to the coordinator; with `handshake`, a session."""

    def __init__(
        self, store: Any, name: str, timeout_s: float, handshake: Initiator | None = None
    ) -> None:
        i = store.add(KEY_LINKS, 1)
        store.set(link_key(i), name)
        self.timeout_s = timeout_s
        try:
            self.pg = _group(store, i, 1, max(timeout_s, HANDSHAKE_TIMEOUT_S))
        except RuntimeError as e:  # the coordinator never took the link up
            raise LinkError(f"no link to the coordinator ({_first_line(e)})") from None
        self.session: Session | None = None
        self.seconds = 0.0
        """Wall seconds spent in requests (sending, the coordinator's work, the answer)."""
        if handshake is not None:
            self.session = self._handshake(handshake)

    def _handshake(self, handshake: Initiator) -> Session:
        wait = max(self.timeout_s, HANDSHAKE_TIMEOUT_S)
        op = OPS.index("handshake")
        try:
            hello = handshake.hello()
            _send(self.pg, [op, 0, 0, 0, 0, 0, len(hello), 0], hello)
            reply = self._answer(wait)
            confirm, session = handshake.confirm(reply)
            _send(self.pg, [op, 0, 0, 0, 0, 0, len(confirm), 0], confirm)
            self._answer(wait)
        except RuntimeError as e:
            raise LinkError(f"the session handshake failed ({_first_line(e)})") from None
        except HandshakeError as e:
            raise LinkError(f"the coordinator is not who it should be: {e}") from None
        return session

    def _answer(self, wait: float) -> bytes:
        status, size = _recv_header(self.pg, wait)[:2]
        if not 0 <= size <= MAX_HANDSHAKE_BYTES:
            raise LinkError("the coordinator's handshake answer is too long")
        body = _recv(self.pg, int(size), wait) if size else b""
        if status != 0:
            raise LinkError(f"the coordinator refused the link: {body.decode(errors='replace')}")
        return body

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
        session, body = self.session, b"".join(parts)
        try:
            if session is not None:
                body = _framed(session, header, body)
                header = [OPS.index(op), 0, 0, 0, 0, 0, len(body), 0]
            _send(self.pg, header, body)
            status, size, reply_loss = _recv_header(self.pg, self.timeout_s)[:3]
            reply = _recv(self.pg, int(size), self.timeout_s) if size else b""
            if session is not None:
                (status, _, reply_loss, *_), reply = _unframed(session, reply)
        except RuntimeError as e:  # gloo: the coordinator closed the link, or a timeout
            raise LinkError(f"the link to the coordinator failed ({_first_line(e)})") from None
        except FrameError as e:
            raise LinkError(f"the coordinator's answer does not open: {e}") from None
        finally:
            self.seconds += time.perf_counter() - t0
        if status != 0:
            raise LinkError(f"the coordinator refused {op} at step {step}: {reply.decode()}")
        return reply, reply_loss


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
    """The coordinator's end of every link: a thread each, requests into one `Handler`.

    `sessions` makes each link's responder: every link must then finish a handshake first.
    """

    def __init__(
        self,
        handler: Handler,
        store: Any,
        timeout_s: float = 3600.0,
        sessions: Callable[[], Responder] | None = None,
        max_links: int = 64,
        client: Callable[[], Any] | None = None,
    ) -> None:
        """`client` opens a store connection of a link's own for its set-up (a store
        client answers one call at a time: a link whose device never comes must not hold
        up the coordinator's other reads); default: `store` itself."""
        self.handler, self.store, self.timeout_s = handler, store, timeout_s
        self.sessions = sessions
        self.client = client or (lambda: store)
        self.opened = 0
        self.refused: list[str] = []
        self._seen = 0  # the highest link index looked at
        self._waiting: dict[int, float] = {}  # index -> when first seen without its name
        self._setting_up = threading.BoundedSemaphore(MAX_WAITING)
        self._lock = threading.Lock()
        self._per_name: dict[str, int] = {}
        self._serving = threading.BoundedSemaphore(max_links)

    def poll(self) -> None:
        """Serve every link opened since the last call whose name is in the store, each on
        its own thread, within the bounds (the module docstring)."""
        counter = int(self.store.add(KEY_LINKS, 0))
        now = time.monotonic()
        for i in range(max(self._seen + 1, counter - SCAN + 1), counter + 1):
            self._waiting.setdefault(i, now)
        self._seen = max(self._seen, counter)
        for i, since in sorted(self._waiting.items()):
            if now - since > HANDSHAKE_TIMEOUT_S:  # nobody wrote its name: forget it
                del self._waiting[i]
            elif self.store.check([link_key(i)]):
                if not self._setting_up.acquire(blocking=False):
                    break  # the others wait for a place
                if not self._serving.acquire(blocking=False):
                    self._setting_up.release()
                    break
                del self._waiting[i]
                threading.Thread(target=self._serve, args=(i,), daemon=True).start()
                self.opened += 1

    def _serve(self, i: int) -> None:
        try:
            pg, name, session = self._set_up(i)
            if pg is None:
                return
            try:
                self._serve_requests(pg, name, session)
            finally:
                with self._lock:
                    self._per_name[name] -= 1
        finally:
            self._serving.release()

    def _set_up(self, i: int) -> tuple[Any, str, Session | None]:
        """The link's group, its device's name and (with sessions) its session; the group
        is None if the link failed or was refused."""
        name = ""
        try:
            name = self.store.get(link_key(i)).decode(errors="replace")[:255]
            pg = _group(self.client(), i, 0, HANDSHAKE_TIMEOUT_S)
            session = None
            if self.sessions is not None:
                session = self._handshake(pg, name)
                if session is None:
                    return None, name, None
                name = session.peer
            with self._lock:
                self._per_name[name] = self._per_name.get(name, 0) + 1
            return pg, name, session
        except RuntimeError:  # the device went (or never came) before the link was up
            return None, name, None
        finally:
            self._setting_up.release()

    def _handshake(self, pg: Any, claimed: str) -> Session | None:
        """The link's session once its device proved who it is (None: refused)."""
        assert self.sessions is not None
        responder = self.sessions()
        try:
            reply = responder.reply(self._handshake_message(pg))
            _send(pg, [0, len(reply), 0, 0, 0, 0, 0, 0], reply)
            session = responder.accept(self._handshake_message(pg))
            with self._lock:
                if self._per_name.get(session.peer, 0) >= LINKS_PER_DEVICE:
                    raise HandshakeError(f"{session.peer} has {LINKS_PER_DEVICE} links already")
        except HandshakeError as e:
            self._refuse(claimed, f"session handshake: {e}")
            reason = str(e).encode()
            _send(pg, [1, len(reason), 0, 0, 0, 0, 0, 0], reason)
            return None
        _send(pg, [0, 0, 0, 0, 0, 0, 0, 0], b"")
        return session

    def _handshake_message(self, pg: Any) -> bytes:
        header = _recv_header(pg, HANDSHAKE_TIMEOUT_S)
        size = header[6]
        if header[0] != OPS.index("handshake") or not 0 < size <= MAX_HANDSHAKE_BYTES:
            raise HandshakeError("the link did not start with a session handshake")
        return _recv(pg, int(size), HANDSHAKE_TIMEOUT_S)

    def _serve_requests(self, pg: Any, name: str, session: Session | None) -> None:
        try:
            while True:
                header = _recv_header(pg, self.timeout_s)
                op = int(header[0])
                sizes = [int(v) for v in header[6:]]
                known = 0 <= op < len(OPS) and OPS[op] != "handshake"
                limit = self.handler.max_request_bytes(OPS[op]) if known else 0
                if session is not None:
                    limit += _INNER.size + TAG_BYTES
                if not known or any(n < 0 for n in sizes) or sum(sizes) > limit:
                    self._refuse(name, f"a request of {sum(sizes)} bytes (op {op})")
                    return  # the rest of its bytes cannot be skipped: the link ends
                body = _recv(pg, sum(sizes), self.timeout_s) if sum(sizes) else b""
                if session is not None:
                    try:
                        header, body = _unframed(session, body)
                    except FrameError as e:
                        self._refuse(name, str(e))
                        return  # the session is broken: the device must start a new one
                    sizes = [int(v) for v in header[6:]]
                    if int(header[0]) != op or any(n < 0 for n in sizes) or sum(sizes) != len(body):
                        self._refuse(name, "a frame whose header does not match its request")
                        return
                self._answer(pg, name, OPS[op], header, sizes, body, session)
        except RuntimeError:  # gloo: the device closed the link (it ended, or died)
            return

    def _answer(
        self,
        pg: Any,
        name: str,
        op: str,
        header: list[float],
        sizes: list[int],
        body: bytes,
        session: Session | None,
    ) -> None:
        step, device, count = (int(v) for v in header[1:4])
        parts = [
            body[a : a + n] for a, n in zip(np.cumsum([0, *sizes[:-1]]), sizes, strict=True) if n
        ]
        status, loss = 0, 0.0
        try:
            reply, loss = self.handler.answer(name, op, step, device, count, parts, header)
        except (CodecError, ValueError, RuntimeError) as e:
            reply, status = _first_line(e).encode(), 1
            self._refuse(name, f"{op} at step {step}: {_first_line(e)}")
        answer = [status, len(reply), loss, 0, 0, 0, 0, 0]
        if session is not None:
            reply = _framed(session, answer, reply)
            answer = [0, len(reply), 0, 0, 0, 0, 0, 0]
        # A device that died before reading its answer ends the link (gloo's error)
        _send(pg, answer, reply)

    def _refuse(self, name: str, what: str) -> None:
        self.refused.append(f"{name}: {what}")
        print(f"edgeddl coordinator: refused {name}'s {what}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]
