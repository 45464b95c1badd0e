"""Split learning on a real fleet: the rear on the coordinator, and what it answers.

The rear lives on the coordinator, so a split step is a conversation over each device's link,
not a sum among devices. Requests go into the one `RearServer` in the order they come. The
rear is checkpointed, so a restarted coordinator loses fewer than `--checkpoint-every` steps.
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
                if seal is not None:
                    reply = (seal.seal(name, reply[0], step), reply[1])
                self.received += sum(len(p) for p in parts)
                self.received_dense += s.dense_request_bytes(op, count, len(parts))
                return reply
            if op == "commit":
                table = np.frombuffer(parts[0], dtype=np.int64) if parts else np.zeros(0, np.int64)
                if len(table) % 2:
                    raise ValueError("a commit's table of devices and samples is malformed")
                devices, counts = table[: len(table) // 2], table[len(table) // 2 :]
                if s.commit_rear(step, devices.tolist(), counts.tolist()):
                    self._keep(step + 1)  # the step counter once the step is committed
                    if seal is not None:
                        sent = self.entries.pop(step, {})
                        used = [e for d in devices.tolist() for e in sent.get(d, [])]
                        seal.aggregate(step, used, self.digest())
                        self.entries = {k: v for k, v in self.entries.items() if k > step}
                return b"", 0.0
            self._evaluate(step, parts[0] if parts else b"", header)
            return b"", 0.0

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
            return out
