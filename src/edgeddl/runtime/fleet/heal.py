"""Where a torchft device that joins or falls behind takes the fleet's state from.

torchft heals a replica from whichever peer its lighthouse names, and its default transport
(HTTP) unpickles what that peer sends with `weights_only=False`: anyone who can reach the
lighthouse can join as a replica, claim the highest step, and have every device load a model
of its choosing, or run code in it. Both transports here are torchft's own extension point
(`CheckpointTransport`, passed to its `Manager`):

- `SafeHTTPTransport`, every fleet's: torchft's HTTP transport, but what it receives is read
  within a size bound and loaded as tensors only (no code runs).
- `CoordinatorTransport`, a secured data-parallel fleet's: the state comes from the
  coordinator, over the device's authenticated session, not from a peer at all. The
  coordinator applies every committed aggregate to its own replica, so its state at a step is
  the fleet's; a step it has not reached (the lighthouse's "highest step" was a rogue's) is
  never served, and that heal fails instead of loading anything. Nothing is sent to peers: a
  rogue that asks to be healed learns nothing.
Details: docs/trust.md#the-lighthouse
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from torchft.checkpointing import CheckpointTransport, HTTPTransport

from edgeddl.runtime.fleet.checkpoint import await_state

STATE_KEY = "default"
"""The key torchft's Manager files the state callbacks it is given under."""


class HealError(RuntimeError):
    """The state to heal from cannot be had (torchft then fails this step, loads nothing)."""


def state_bound(replica: dict[str, Any]) -> int:
    """The most bytes a peer's state may take: twice what this device's own takes, and a
    MiB (a replica's state has the same shapes on every device)."""
    buf = io.BytesIO()
    torch.save({"user": {STATE_KEY: replica}, "torchft": {"step": 0}}, buf)
    return 2 * len(buf.getvalue()) + (1 << 20)


class SafeHTTPTransport(HTTPTransport[dict[str, Any]]):
    """torchft's HTTP transport (its server, its URLs), receiving at most `max_bytes` of
    tensors and plain values."""

    def __init__(self, timeout: timedelta, max_bytes: int) -> None:
        super().__init__(timeout=timeout, num_chunks=0)
        self.max_bytes = max_bytes

    def recv_checkpoint(
        self, src_rank: int, metadata: str, step: int, timeout: timedelta
    ) -> dict[str, Any]:
        import urllib.request

        if not metadata.startswith("http://"):  # the address is the peer's word
            raise HealError(f"a peer offered its state at {metadata[:80]!r}, not over http")
        with urllib.request.urlopen(f"{metadata}{step}/full", timeout=timeout.total_seconds()) as f:
            data = f.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise HealError(f"a peer's state is over {self.max_bytes} bytes")
        state = load_tensors(data, "a peer's state")
        if not isinstance(state, dict):
            raise HealError("a peer's state is not a state")
        return state


def load_tensors(data: bytes, where: str) -> object:
    """`data` (torchft's streaming format) loaded as tensors and plain values only;
    HealError if it is anything else."""
    from torchft.checkpointing._serialization import _streaming_load

    try:
        with warnings.catch_warnings():  # tensors over the read-only bytes: copied on load
            warnings.simplefilter("ignore", UserWarning)
            return _streaming_load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # torch raises many kinds on damaged or hostile bytes
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HealError(f"{where} is not a state of tensors ({reason[:200]})") from None


Fetch = Callable[[int], bytes | None]
"""The coordinator's state at a step, packed (`checkpoint.pack`); None while it has not
reached that step yet; an error if it never will (`checkpoint.await_state`)."""


class CoordinatorTransport(CheckpointTransport[dict[str, Any]]):
    """A secured fleet's heal: the coordinator's state, over the device's session."""

    def __init__(self, fetch: Fetch, scenario_toml: str) -> None:
        self.fetch, self.toml = fetch, scenario_toml

    def metadata(self) -> str:
        return "edgeddl-coordinator"

    def send_checkpoint(
        self, dst_ranks: list[int], step: int, state_dict: dict[str, Any], timeout: timedelta
    ) -> None:
        """Nothing goes to a peer: whoever heals takes the coordinator's state."""

    def recv_checkpoint(
        self, src_rank: int, metadata: str, step: int, timeout: timedelta
    ) -> dict[str, Any]:
        """The coordinator's state at `step` (the peers' step, as the lighthouse said),
        once the coordinator has committed the steps before it."""
        ck = await_state(self.fetch, step, timeout.total_seconds(), self.toml)
        return {
            "user": {STATE_KEY: ck["replica"]},
            "torchft": {"step": step, "batches_committed": int(ck["batches_committed"])},
        }
