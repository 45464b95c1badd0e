"""Split learning on a real fleet: the rear on the coordinator, and what it answers.

The rear lives on the coordinator, so a split step is a conversation over each device's link,
not a sum among devices. Requests go into the one `RearServer` in the order they come. The
rear is checkpointed, so a restarted coordinator loses fewer than `--checkpoint-every` steps.
With `[security]` the rear takes a step once most of the step's senders told it the step was
committed (`StepVotes`): a request for another step waits for that, as it needs the rear
that took the step.
Details: docs/real-fleet.md#split-learnings-rear
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeddl.config.loader import to_toml
from edgeddl.config.schema import Scenario
from edgeddl.io import write_bytes_atomic
from edgeddl.runtime.fleet.checkpoint import pack, unpack
from edgeddl.runtime.fleet.store import KEY_ROWS, row_key
from edgeddl.runtime.fleet.votes import StepVotes, Table
from edgeddl.security.ledger import model_digest
from edgeddl.security.parties import CoordinatorParty
from edgeddl.strategy.base import ConversationRear
from edgeddl.strategy.build import build_split
from edgeddl.threads import scenario_threads
from edgeddl.workload import build_workload

REAR_FILE = "rear.pt"
"""The rear's checkpoint in the run folder."""
Evaluate = Callable[[nn.Module], dict[str, float]]
"""A model's test metrics."""
VOTE_WAIT_S = 1.0
"""With `[security]`: the longest a request waits for a step members told committed to be
decided. Honest members tell together (they leave the same sum), so past it most of the
step's senders were lost before they told, and the step is dropped: fewer may not commit it.
Below the devices' `--timeout`, so a device whose request waited is still answered."""


class SplitRear:
    """The coordinator's part in split learning: the rear, its checkpoint, evaluation."""

    def __init__(
        self,
        strategy: ConversationRear,
        names: list[str],
        global_batch: int,
        store: Any = None,
        evaluate: Evaluate | None = None,
        timeout_s: float = 3600.0,
        checkpoint: tuple[Path, int, str] | None = None,
        seal: CoordinatorParty | None = None,
        vote_wait_s: float = VOTE_WAIT_S,
    ) -> None:
        self.strategy, self.names, self.global_batch = strategy, names, global_batch
        self.store, self.evaluate, self.timeout_s = store, evaluate, timeout_s
        self.checkpoint = checkpoint
        """(file, every how many steps, the scenario's TOML): the rear kept on disk."""
        self.resumed_from: int | None = None
        self.seal = seal
        """`[security]`: every tensor each way sealed, each one recorded in the ledger."""
        self.entries: dict[int, dict[int, list[int]]] = {}
        """Step -> device -> the ledger entries of what it sent."""
        self.lock = threading.RLock()
        """Held per request, and by `serve` while it closes the run."""
        self.decided = threading.Condition(self.lock)
        """Notified when a step voted on is committed or dropped."""
        self.senders: dict[int, set[int]] = {}
        """Step -> the devices whose requests the rear answered (with `[security]`: who may
        vote on it, and most of whom must)."""
        self.votes = StepVotes()
        self.told: set[int] = set()
        """With `[security]`: steps the rear gathered that a member told it were committed,
        not yet decided (a request for another step waits for them)."""
        self.vote_wait_s = vote_wait_s
        self.dropped = 0
        """With `[security]`: steps voted on that the rear did not take."""
        self.max_body, self.max_state = strategy.request_limits(global_batch)
        self.evaluated: set[int] = set()
        self.received = 0
        """Encoded bytes of the cut tensors the devices sent."""
        self.received_dense = 0
        """What the same tensors take as fp32 values and int64 labels."""

    @classmethod
    def for_scenario(
        cls, scenario: Scenario, store: Any, out_dir: Path, checkpoint_every: int, run_id: str
    ) -> SplitRear:
        """The scenario's rear (built as every device builds its front) and test set; the
        rear of `out_dir/rear.pt` if an earlier coordinator of this run left one. `run_id`:
        the coordinator's run, which every session's handshake names (`[security]`)."""
        w = build_workload(scenario)
        # the same threads as the devices: the replicas' sums must agree to the bit
        torch.set_num_threads(scenario_threads(scenario, w.cost.train_flops_per_sample))
        strategy = build_split(scenario, w.model, w.task.loss_fn, w.info)
        toml = to_toml(scenario)
        service = cls(
            strategy,
            scenario.fleet.device_names(),
            scenario.train.global_batch,
            store,
            lambda model: w.task.evaluate(model, w.x_test, w.y_test),
            checkpoint=(out_dir / REAR_FILE, checkpoint_every, toml),
            seal=CoordinatorParty(scenario, out_dir, run_id) if scenario.security.enabled else None,
        )
        path = out_dir / REAR_FILE
        if path.exists():
            ck = unpack(path.read_bytes(), toml, str(path))
            strategy.load_rear_state(ck["replica"])
            service.resumed_from = int(ck["step"])
            print(f"edgeddl coordinator: the rear resumes from step {ck['step']}", flush=True)
        return service

    def _keep(self, step: int) -> None:
        """Every `checkpoint_every` steps, the rear and its optimizer to disk (atomically):
        a restarted coordinator goes on from there (the devices keep their fronts)."""
        if self.checkpoint is None:
            return
        path, every, toml = self.checkpoint
        if every and step % every == 0:
            write_bytes_atomic(path, pack(step, step, self.strategy.rear_state(), toml))

    def max_request_bytes(self, op: str) -> int:
        envelopes = 1024 if self.seal is not None else 0  # two envelopes' headers and names
        return (self.max_state if op == "evaluate" else self.max_body) + envelopes

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
        """What device `name` gets for a request: (body, loss); CodecError or ValueError
        if the request is refused (the rear keeps nothing of it)."""
        if device < 0 or device >= len(self.names) or self.names[device] != name:
            raise ValueError(f"the link of {name} spoke for device {device}")
        s, seal = self.strategy, self.seal
        if op not in ("activations", "head_gradients", "commit", "evaluate", "hello"):
            raise ValueError(f"{op} is not a split learning request")
        with self.lock:
            if op == "hello" and seal is not None:
                return seal.hello(name), 0.0
            if seal is not None and op != "commit":
                self._wait_for_votes(step, op == "evaluate")
            if op in ("activations", "head_gradients"):
                s.check_step(step)  # before opening: a stale request leaves no entry
            if op in ("activations", "head_gradients", "evaluate") and seal is not None:
                opened = [seal.open(name, step, p) for p in parts]
                self.entries.setdefault(step, {}).setdefault(device, []).extend(
                    e for _, e in opened
                )
                parts = [p for p, _ in opened]
            if op in ("activations", "head_gradients"):
                if not 0 < count <= self.global_batch:
                    raise ValueError(f"{count} samples (global_batch {self.global_batch})")
                reply = s.answer(op, device, step, count, parts)
                self.senders.setdefault(step, set()).add(device)
                if seal is not None:
                    reply = (seal.seal(name, reply[0], step), reply[1])
                self.received += sum(len(p) for p in parts)
                self.received_dense += s.dense_request_bytes(op, count, len(parts))
                return reply
            if op == "commit":
                table = np.frombuffer(parts[0], dtype=np.int64) if parts else np.zeros(0, np.int64)
                if len(table) % 2:
                    raise ValueError("a commit's table of devices and samples is malformed")
                if seal is None:  # the first member to tell decides
                    self._commit(step, tuple(table.tolist()))
                    return b"", 0.0
                senders = self.senders.get(step, set())
                if senders:  # even a member that sent nothing: the next step waits for it
                    self.told.add(step)
                for voted, t in self.votes.add(step, tuple(table.tolist()), device, senders):
                    self._commit(voted, t)
                return b"", 0.0
            self._evaluate(step, parts[0] if parts else b"", header)
            return b"", 0.0

    def _commit(self, step: int, table: Table) -> None:
        """The rear's step with `table` (its devices, then the samples each sent), once;
        with `[security]` recorded, or counted as dropped if the rear cannot take it."""
        devices, counts = list(table[: len(table) // 2]), list(table[len(table) // 2 :])
        seal = self.seal
        if self.strategy.commit_rear(step, devices, counts):
            self._keep(step + 1)  # the step counter once the step is committed
            if seal is not None:
                sent = self.entries.get(step, {})
                used = [e for d in devices for e in sent.get(d, [])]
                seal.aggregate(step, used, self.digest())
        elif seal is None:
            return  # the next member's tell may commit it
        else:
            self.dropped += 1
            print(f"edgeddl coordinator: the rear cannot take step {step}", flush=True)
        self._decided(step)

    def _decided(self, step: int) -> None:
        """Step `step` is committed or dropped: what was kept for it and older steps goes,
        and the requests waiting for it go on."""
        self.entries = {k: v for k, v in self.entries.items() if k > step}
        self.senders = {k: v for k, v in self.senders.items() if k > step}
        self.votes.forget(step)
        self.told = {t for t in self.told if t > step}
        self.decided.notify_all()

    def _wait_for_votes(self, step: int, evaluate: bool) -> None:
        """A request for another step than one voted on waits until that step is decided
        (an evaluation: until its own step is). Past `vote_wait_s`, the steps it waited for
        are dropped: most of their senders never told (lost mid-step), and fewer cannot
        commit them (docs/real-fleet.md#split-learnings-rear)."""

        def waiting_for() -> list[int]:
            return sorted(t for t in self.told if (t <= step if evaluate else t != step))

        if self.decided.wait_for(lambda: not waiting_for(), self.vote_wait_s):
            return
        for v in waiting_for():
            self.dropped += 1
            print(
                f"edgeddl coordinator: the rear drops step {v}: most of its senders did not "
                f"tell it committed within {self.vote_wait_s} s",
                flush=True,
            )
            self._decided(v)

    def _evaluate(self, step: int, state: bytes, header: list[float]) -> None:
        """The whole model from the lead's front (and head) and the rear: a metrics row."""
        if step in self.evaluated or self.evaluate is None or self.store is None:
            return
        row = {
            "step": step,
            "at": time.time(),
            "train_loss": header[4],
            **self.evaluate(self.strategy.whole_model(state)),
            "num_members": int(header[5]),
        }
        i = self.store.add(KEY_ROWS, 1)
        self.store.set(row_key(i), json.dumps(row))
        self.evaluated.add(step)

    def digest(self) -> str:
        """The rear's digest: what the coordinator's ledger vouches for."""
        with torch.no_grad():
            return model_digest(self.model_state())

    def model_state(self) -> dict[str, Any]:
        """The rear (model.pt with `[security]`): the part of the model the coordinator holds
        and vouches for; the fronts are the devices'."""
        return dict(self.strategy.rear_state()["rear"])

    def sealed_summary(self) -> dict[str, Any]:
        """`[security]`: the run's `model_digest` and `security` keys (the ledger is closed
        by `serve`, once model.pt and summary.json are written); {} without."""
        with self.lock:
            return self.seal.summary(self.digest()) if self.seal is not None else {}

    def summary(self) -> dict[str, Any]:
        """The run's `split` entry, with the bytes as the coordinator saw them."""
        with self.lock:
            out = self.strategy.rear_summary(self.received, self.received_dense)
            out["rear_resumed_from_step"] = self.resumed_from
            out["rear_steps_dropped"] = self.dropped
            return out
