"""Federated learning: FedAvg, FedProx and adaptive server optimizers, whatever carries it.

A round is one step of the loop: sampled clients train from the global model on their own
shards, and the server averages their deltas and applies the mean with its optimizer
(`server_opt.py`). BatchNorm statistics travel beside the deltas, never compressed; with
`[compression]` a delta goes through the same pieces as a compressed gradient.
Details: docs/federated.md#a-round-in-the-code
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeddl.config.federated import FederatedConfig
from edgeddl.config.schema import TrainConfig
from edgeddl.strategy.base import Aggregate, Plan, StepCost, StepPayloads, Update
from edgeddl.strategy.compressed import CompressedDataParallel
from edgeddl.strategy.data_parallel import DataParallel, LossFn, tensor_bytes
from edgeddl.strategy.errors import TrainingDiverged
from edgeddl.strategy.per_device import weighted_mean
from edgeddl.strategy.server_opt import ServerOptimizer


def add_proximal_grad(params: list[nn.Parameter], anchor: list[torch.Tensor], mu: float) -> None:
    """FedProx: add the gradient mu (w - w_global) of mu/2 ||w - w_global||^2 to p.grad."""
    for p, a in zip(params, anchor, strict=True):
        assert p.grad is not None
        p.grad.add_(p.detach() - a, alpha=mu)


class Federated(DataParallel):
    """The global model on the server; `prepare` runs the sampled clients' local training,
    `commit` applies the mean update of those whose update arrived."""

    name = "federated"
    sampled = True
    """A round's clients are a sample: a round may have none."""

    def __init__(
        self,
        model: nn.Module,
        train: TrainConfig,
        cfg: FederatedConfig,
        shard_sizes: np.ndarray,
        seed: int,
        loss_fn: LossFn = nn.functional.cross_entropy,
        wire: CompressedDataParallel | None = None,
    ) -> None:
        super().__init__(model, dataclasses.replace(train, lr=cfg.local_lr or train.lr), loss_fn)
        # Clients train a copy: the global model never changes mid-round (a real fleet's
        # engine may read it at any time to heal a joining member).
        self.client = copy.deepcopy(model)
        self.client_params = [p for p in self.client.parameters() if p.requires_grad]
        defaults = self.optimizer.defaults
        self.optimizer = torch.optim.SGD(
            self.client_params,
            lr=defaults["lr"],
            momentum=defaults["momentum"],
            weight_decay=defaults["weight_decay"],
        )
        """The clients' local SGD (reset for every client)."""
        self.cfg = cfg
        self.seed = seed
        self.shard_sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.server = ServerOptimizer(cfg)
        self.wire = wire
        self.buffers = list(model.buffers())
        self.buffer_bytes = tensor_bytes([b for b in self.buffers if b.is_floating_point()])
        """BatchNorm statistics sent up with every update (dense float32)."""
        self.dense_up_bytes += self.buffer_bytes

    # --- who takes part, with how much work -------------------------------------------------

    def plan(self, members: np.ndarray, round_index: int) -> Plan:
        """The round's sampled clients, the samples each trains on and its local steps.

        The sample is drawn from the members that hold data, seeded by the run's seed and
        the round, so it does not depend on what happened before.
        """
        candidates = np.asarray(members, dtype=np.int64)
        candidates = candidates[self.shard_sizes[candidates] > 0]
        rng = np.random.default_rng([self.seed, round_index])
        num = min(len(candidates), max(1, int(np.floor(self.cfg.fraction * len(candidates) + 0.5))))
        clients = np.sort(rng.choice(candidates, size=num, replace=False))
        batch = self.cfg.local_batch
        if self.cfg.local_epochs:
            samples = self.cfg.local_epochs * self.shard_sizes[clients]
            steps = -(-samples // batch)  # the last batch of a pass may be smaller
        else:
            steps = np.full(len(clients), self.cfg.local_steps, dtype=np.int64)
            samples = steps * batch
        return Plan(clients, samples.astype(np.int64), steps.astype(np.int64))

    def client_weight(self, device: int) -> float:
        """A client's unnormalised weight in the mean: its shard size, or 1."""
        return 1.0 if self.cfg.weighting == "uniform" else float(self.shard_sizes[device])

    def weights(self, clients: list[int]) -> torch.Tensor:
        """Each client's weight in the mean (sums to 1)."""
        w = np.array([self.client_weight(c) for c in clients])
        return torch.tensor(w / w.sum(), dtype=torch.float32)

    # --- what crosses the links ---------------------------------------------------------------

    def step_cost(self, idx: np.ndarray) -> StepCost:
        """Typical bytes per round: an update up, the model down."""
        if self.wire is not None:
            up = self.wire.up_estimate[idx] + self.buffer_bytes
        else:
            up = np.full(len(idx), float(self.dense_up_bytes))
        return StepCost(up_bytes=up, down_bytes=np.full(len(idx), float(self.state_bytes)))

    def down_bytes(self, needs_model: np.ndarray) -> np.ndarray:
        """Every sampled client downloads the global model at the round's start."""
        return np.full(len(needs_model), self.state_bytes, dtype=np.int64)

    def forget(self, device: int) -> None:
        """A crashed client's error-feedback memory and compressor state are gone."""
        if self.wire is not None:
            self.wire.forget(device)

    # --- a round --------------------------------------------------------------------------

    def flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def train_client(
        self, x: torch.Tensor, y: torch.Tensor, num_steps: int, anchor: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """One client's local training of the client copy from the global model `anchor`
        (already loaded into it): (delta, its buffers after training, its mean loss)."""
        self.client.train()
        self.optimizer.state.clear()  # a fresh local optimizer every round
        anchor_views = self.layout.split(anchor)
        losses = []
        for xb, yb in zip(x.tensor_split(num_steps), y.tensor_split(num_steps), strict=True):
            loss = self.loss_fn(self.client(xb), yb)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.proximal_mu:
                add_proximal_grad(self.client_params, anchor_views, self.cfg.proximal_mu)
            self.optimizer.step()
            losses.append(loss.detach())
        delta = torch.cat([p.detach().reshape(-1) for p in self.client_params]) - anchor
        buffers = [b.detach().clone() for b in self.client.buffers()]
        return delta, buffers, torch.stack(losses).mean()

    def client_update(
        self, x: torch.Tensor, y: torch.Tensor, num_steps: int
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """One client's round from the global model, which it leaves alone: (delta, its
        buffers after training, its mean loss)."""
        self.client.load_state_dict(self.model.state_dict())
        return self.train_client(x, y, num_steps, self.flat_params())

    def device_updates(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], ids: list[int], step: int
    ) -> list[Update]:
        """Each sampled client's round on its consecutive `counts` rows (`counts[i] /
        local_batch` rounded up local steps): its delta as its behaviour makes it, its
        float buffers beside it, and with `[compression]` the delta encoded."""
        if self.behaviors is not None:
            y = self.behaviors.poison_labels(y, counts, ids)
        updates = []
        for d, xs, ys in zip(ids, x.split(counts), y.split(counts), strict=True):
            delta, buffers, loss = self.client_update(xs, ys, -(-len(xs) // self.cfg.local_batch))
            floats = [
                b.reshape(-1)
                for b, g in zip(buffers, self.buffers, strict=True)
                if g.is_floating_point()
            ]
            updates.append(
                Update(
                    device=d, weight=self.client_weight(d), loss=loss, values=delta, stats=floats
                )
            )
        deltas = [u.values for u in updates if u.values is not None]
        if self.behaviors is not None:
            deltas = self.behaviors.tamper(deltas, ids, step)
        for u, v in zip(updates, deltas, strict=True):
            u.values = u.own = v
        if self.wire is not None:
            self.wire.encode_updates(updates, step)
        return updates

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], devices: np.ndarray, step: int
    ) -> StepPayloads:
        """Every sampled client trains locally and encodes its update."""
        ids = devices.tolist()
        updates = self.device_updates(x, y, counts, ids, step)
        if self.wire is not None:
            up = np.array([len(u.payload or b"") for u in updates], dtype=np.int64)
            up = up + self.buffer_bytes
        else:
            finite = torch.stack(
                [torch.isfinite(u.values).all() for u in updates if u.values is not None]
            )
            if self.robust is None and not bool(finite.all()):  # else the screen refuses it
                raise TrainingDiverged(step, ids[int((~finite).nonzero()[0, 0])])
            up = np.full(len(ids), self.dense_up_bytes, dtype=np.int64)
        return StepPayloads(
            devices=devices, counts=counts, step=step, up_bytes=up[None], updates=updates
        )

    # --- the aggregator's side on a real fleet -------------------------------------------

    def extras_size(self) -> int:
        """A client's float buffers (BatchNorm statistics) beside its delta."""
        return sum(b.numel() for b in self.buffers if b.is_floating_point())

    def apply_aggregate(self, agg: Aggregate, devices: list[int]) -> None:
        """The server's step with the mean delta, the buffers the clients' mean."""
        floats = [b for b in self.buffers if b.is_floating_point()]
        target = self.params[0].device
        means = list(agg.extras.to(target).split([b.numel() for b in floats]))
        self.apply_round(agg.values.to(target), means, devices)

    @torch.no_grad()
    def commit(self, ex: StepPayloads, contributed: np.ndarray) -> torch.Tensor | None:
        """Apply the mean update of the clients whose update arrived; the others' work is
        lost (their error-feedback memory is left as it was)."""
        self._count(ex, contributed)
        kept = [ex.updates[i] for i in np.flatnonzero(contributed)]
        if not kept:
            return None
        losses = torch.stack([u.loss for u in kept])
        w = self.weights([u.device for u in kept]).to(losses.device)
        mean: torch.Tensor | None
        if self.wire is not None:  # the server decodes what arrived
            received = [self.wire.decode(u.device, u.payload or b"") for u in kept]
            sent, mean = self.wire.aggregate_payloads(
                [u.device for u in kept], w.tolist(), received, ex.step
            )
            for u, s in zip(kept, sent, strict=True):
                assert u.own is not None and u.compensated is not None
                self.wire.remember(u.device, u.own, u.compensated, s)
        elif self.robust is not None:
            values = [u.values for u in kept if u.values is not None]
            mean, passed = self.robust.combine(
                ex.step, [u.device for u in kept], values, w.tolist()
            )
            kept = [kept[i] for i in passed]
            losses = losses[passed] if kept else losses
            w = self.weights([u.device for u in kept]).to(w.device) if kept else w
        else:
            values = [u.values for u in kept if u.values is not None]
            mean = torch.zeros_like(values[0])
            for wi, v in zip(w.tolist(), values, strict=True):
                mean.add_(v, alpha=wi)
        if mean is None:  # nothing usable arrived: the global model stays as it is
            return (losses * w).sum() if kept else None
        float_means = [
            weighted_mean([u.stats[k] for u in kept], w.tolist()) for k in range(len(kept[0].stats))
        ]
        self.apply_round(mean, float_means, [u.device for u in kept])
        return (losses * w).sum()

    def client_steps(self, devices: list[int]) -> np.ndarray:
        """Local steps each of `devices` takes in a round (`plan`'s, by shard size)."""
        if not self.cfg.local_epochs:
            return np.full(len(devices), self.cfg.local_steps, dtype=np.int64)
        samples = self.cfg.local_epochs * self.shard_sizes[np.asarray(devices, dtype=np.int64)]
        return -(-samples // self.cfg.local_batch)

    @torch.no_grad()
    def apply_round(
        self, mean: torch.Tensor, float_buffers: list[torch.Tensor], clients: list[int]
    ) -> None:
        """The server's step with the round's mean update; BatchNorm statistics become the
        clients' weighted mean, and `num_batches_tracked` the largest client's count (every
        client starts from the global count and adds its local steps)."""
        flat = self.flat_params()
        self.server.step(flat, mean)
        for p, v in zip(self.params, self.layout.split(flat), strict=True):
            p.copy_(v)
        floats = iter(float_buffers)
        most = int(self.client_steps(clients).max())
        for b in self.buffers:
            if b.is_floating_point():
                b.copy_(next(floats).view_as(b))
            else:
                b.add_(most)

    def replica_state(self) -> dict[str, Any]:
        """The global model and the server optimizer's moments (FedAdam, FedYogi)."""
        return {"model": self.model.state_dict(), "server": self.server.state_dict()}

    def load_replica_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.server.load_state_dict(state["server"])

    def compression_summary(self) -> dict[str, float]:
        """Update bytes per client and round (BatchNorm statistics included), against dense."""
        out = super().compression_summary()
        if self.wire is not None:
            out["empty_payloads"] = self.wire.num_empty
        return out
