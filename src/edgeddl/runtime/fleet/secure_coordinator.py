"""A secured real fleet: the coordinator opens, records and aggregates sealed payloads.

With `[security]` on, a device's payload goes to the coordinator, not into a sum among
devices: a sum cannot carry ciphertexts, and the coordinator is who must check each sender.
Per step it answers "update" (open, check, record), "aggregate" (computed once, sealed for
each device) and "commit" (applied to its own replica, recorded in the ledger); "state"
gives a device that heals the coordinator's replica (`heal.py`), not a peer's. Every request
comes over an authenticated session, and the coordinator trusts a request for no more than
its sender may say: an aggregate's weights are those each device's own accepted update
declared (checked against what that device may weigh), a request's table only chooses among
the step's accepted updates, and a step is committed once most of its members said so.
Details: docs/real-fleet.md#the-sealed-fleet
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeddl.compress.codec import dense_body
from edgeddl.config.loader import ConfigError, to_toml
from edgeddl.config.schema import Scenario
from edgeddl.runtime.fleet.allreduce import checksum
from edgeddl.runtime.fleet.checkpoint import pack
from edgeddl.runtime.fleet.votes import StepVotes
from edgeddl.security.ledger import model_digest
from edgeddl.security.parties import CoordinatorParty
from edgeddl.strategy.base import Aggregate, FleetStrategy
from edgeddl.strategy.build import build_strategy
from edgeddl.threads import scenario_threads
from edgeddl.workload import build_workload

NOTHING_USABLE = b""
"""The aggregate's body when a robust screen left nothing usable: the step changes nothing."""


@dataclass(frozen=True, slots=True)
class StepAggregate:
    """A step's aggregate: its body as sealed for the devices, the aggregate (None: nothing
    usable) and the updates the robust screen refused (device -> reason)."""

    body: bytes
    aggregate: Aggregate | None
    screened: dict[int, str]


@dataclass(frozen=True, slots=True)
class Accepted:
    """A device's update the coordinator accepted: decoded, its ledger entry, its weight."""

    update: Any
    entry: int
    weight: int


KEEP_STEPS = 4
"""Steps of updates and aggregates the coordinator keeps after a commit."""


class SecureCoordinator:
    """The coordinator's part in a secured real fleet (docs/real-fleet.md#the-sealed-fleet)."""

    def __init__(
        self,
        scenario: Scenario,
        out_dir: Path,
        run_id: str,
        resume: dict[str, Any] | None = None,
    ) -> None:
        """`run_id`: the coordinator's run, which every session's handshake names;
        `resume`: the checkpoint a restarted coordinator resumes from (`checkpoint.unpack`)."""
        self.names = scenario.fleet.device_names()
        self.toml = to_toml(scenario)
        w = build_workload(scenario)
        # the same threads as the devices: the replicas' sums must agree to the bit
        torch.set_num_threads(scenario_threads(scenario, w.cost.train_flops_per_sample))
        sizes = np.array([len(x) for x in w.shards], dtype=np.int64)
        self.strategy: FleetStrategy
        self.strategy, _ = build_strategy(scenario, w.model, w.task.loss_fn, sizes)
        if self.strategy.combine != "sum" and self.strategy.extras_size():
            raise ConfigError(
                "security.enabled: a compressed payload carries no BatchNorm statistics on a "
                "real fleet yet; use a model without BatchNorm, or no [compression]"
            )
        self.seal = CoordinatorParty(scenario, out_dir, run_id)
        self.at_step, self.batches = 0, 0
        """The step the coordinator's replica is at (its committed steps), and how many
        updates they used: what a healing device takes (`state`)."""
        if resume is not None:
            self.strategy.load_replica_state(resume["replica"])
            self.at_step, self.batches = int(resume["step"]), int(resume["batches_committed"])
        self.lock = threading.RLock()
        """Held per request, and by `serve` while it closes the run (the files, then the
        ledger's closing entry): no request changes the model in between."""
        self.updates: dict[int, dict[int, Accepted]] = {}
        """Step -> device -> its accepted update."""
        self.aggregates: dict[tuple[int, tuple[int, ...]], StepAggregate] = {}
        self.committed: set[int] = set()
        self.votes = StepVotes()
        """Who said which step was committed with which table."""
        fed = scenario.train.strategy == "federated"
        uniform = scenario.federated.weighting == "uniform"
        self.weights: list[tuple[int, int]] = [
            ((1, 1) if uniform else (int(n), int(n))) if fed else (1, scenario.train.global_batch)
            for n in sizes
        ]
        """Per device, the (least, most) weight its update may declare: a federated
        client's is fixed (1, or its shard's size), a data-parallel device's its batch."""

    def max_request_bytes(self, op: str) -> int:
        return self.seal.max_payload_bytes if op == "update" else 8 * (2 * len(self.names) + 2)

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
        if device < 0 or device >= len(self.names) or self.names[device] != name:
            raise ValueError(f"the link of {name} spoke for device {device}")
        with self.lock:
            if op == "hello":
                return self.seal.hello(name), 0.0
            if op == "update":
                least, most = self.weights[device]
                if not least <= count <= most:
                    raise ValueError(f"a weight of {count} (this device's is {least}..{most})")
                wire = parts[0] if parts else b""
                update, entry = self.seal.open(
                    name, step, wire, lambda b: self.strategy.decode_body(device, b)
                )
                self.updates.setdefault(step, {})[device] = Accepted(update, entry, count)
                return self.seal.head_json(), 0.0
            if op == "state":
                return self._state(step), 0.0
            if op in ("aggregate", "commit"):
                devices = read_table(parts, len(self.names))
                result = self._aggregate(step, devices)
                if op == "commit":
                    self._vote(step, devices, device, result)
                    return b"", 0.0
                return self.seal.seal(name, result.body, step), 0.0
        raise ValueError(f"{op} is not a request of a secured fleet")

    def _state(self, step: int) -> bytes:
        """The replica at `step` for a device that heals (torchft's quorum put it behind
        its peers); empty while the steps before it are still being committed. A negative
        step: wherever the replica is (a device back after a coordinator restart)."""
        step = self.at_step if step < 0 else step
        if step < self.at_step:
            raise ValueError(f"the fleet is past step {step} (at {self.at_step})")
        if step > self.at_step:
            return b""
        return pack(step, self.batches, self.strategy.replica_state(), self.toml)

    def checkpoint(self, have: int, every: int) -> tuple[int, bytes] | None:
        """(step, bytes) of the replica as a checkpoint, once it passed a multiple of
        `every` beyond step `have` (0: never). A secured fleet's checkpoint is the
        coordinator's own replica: a device's (signed, but by any enrolled key) is not
        what a restarted coordinator resumes from."""
        with self.lock:
            if every <= 0 or self.at_step // every <= max(have, 0) // every:
                return None
            return self.at_step, self._state(self.at_step)

    def _aggregate(self, step: int, devices: tuple[int, ...]) -> StepAggregate:
        """The step's aggregate of `devices`' updates (each once per step and devices),
        weighted as each update declared."""
        key = (step, devices)
        if key in self.aggregates:
            return self.aggregates[key]
        if step in self.committed:
            raise ValueError(f"step {step} is committed already")
        got = self.updates.get(step, {})
        missing = [self.names[d] for d in devices if d not in got]
        if missing:
            raise ValueError(f"step {step}: no accepted update from {', '.join(missing)}")
        total = float(sum(got[d].weight for d in devices))
        w = [got[d].weight / total for d in devices]
        s = self.strategy
        agg = s.aggregate(step, list(devices), w, [got[d].update for d in devices])
        body = dense_body(torch.cat([agg.values, agg.extras])) if agg else NOTHING_USABLE
        result = StepAggregate(body, agg, s.screened_at(step))
        self.aggregates = {k: v for k, v in self.aggregates.items() if k[0] > step - KEEP_STEPS}
        self.aggregates[key] = result
        return result

    def _vote(self, step: int, devices: tuple[int, ...], voter: int, result: StepAggregate) -> None:
        """A member says the step was committed with `devices`: once most of the step's
        senders (devices whose update it accepted) said so for the same table, the
        coordinator commits it too (one member, or one stolen key, cannot), after any
        earlier step still waiting (`StepVotes.add`) whose aggregate it still keeps."""
        if step in self.committed or voter not in devices:  # a member that sent nothing
            return
        for earlier, table in self.votes.add(step, devices, voter, self.updates.get(step, {})):
            kept = result if earlier == step else self.aggregates.get((earlier, table))
            if kept is not None:
                self._commit(earlier, table, kept)

    def _commit(self, step: int, devices: tuple[int, ...], result: StepAggregate) -> None:
        """Apply the step's aggregate to the coordinator's replica, once; record it."""
        used = [d for d in devices if d not in result.screened]
        if result.aggregate is not None:  # None: the model stays as it is
            # every member, screened or not, counts (a federated round's
            # num_batches_tracked): the devices apply the same without knowing who was
            self.strategy.apply_aggregate(result.aggregate, list(devices))
        self.committed.add(step)
        self.at_step, self.batches = step + 1, self.batches + len(devices)
        entry = {d: self.updates[step][d].entry for d in devices}
        screened = {entry[d]: why for d, why in result.screened.items() if d in entry}
        self.seal.aggregate(step, [entry[d] for d in used], self.digest(), screened)
        # A member that was not in this step may still ask for an older one (joins race
        # with commits): keep the last few steps' updates.
        self.updates = {k: v for k, v in self.updates.items() if k > step - KEEP_STEPS}
        self.votes.forget(step)

    def digest(self) -> str:
        with torch.no_grad():
            return model_digest(self.strategy.model.state_dict())

    def model_state(self) -> dict[str, Any]:
        """The coordinator's replica (model.pt): the model every aggregate entry names."""
        return self.strategy.model.state_dict()

    def summary(self) -> dict[str, Any]:
        """The run's `model_digest` and `security` keys (the ledger is closed by `serve`,
        once model.pt and summary.json are written)."""
        with self.lock:
            out = self.seal.summary(self.digest())
            out["security"]["coordinator_checksum"] = checksum(self.strategy.model)
            robust = self.strategy.report().get("robust")
            return out | ({"robust": robust} if robust is not None else {})


def read_table(parts: list[bytes], num_devices: int) -> tuple[int, ...]:
    """A request's table: the step's members whose updates it names (int64, each once)."""
    if not parts or len(parts[0]) % 8 or not parts[0]:
        raise ValueError("the table of devices is malformed")
    table = np.frombuffer(parts[0], dtype=np.int64).tolist()
    if len(set(table)) != len(table) or not all(0 <= d < num_devices for d in table):
        raise ValueError("the table of devices names a device twice, or one that is not")
    return tuple(table)
