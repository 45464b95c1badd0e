"""Federated learning: FedAvg, FedProx and adaptive server optimizers, whatever carries it.

A round (one step of the loop): a seeded `fraction` of the members is sampled
(`plan_round`); each sampled client starts from the global model and runs its local steps of
SGD on batches of its own shard (`train.momentum` and `train.weight_decay`, the optimizer
state reset every round), with FedProx's term ``mu/2 ||w - w_global||^2`` when
`proximal_mu` > 0; its update is ``delta = w_local - w_global``. The server averages the
deltas of the clients whose update arrived (weighted by shard size, FedAvg's ``n_k / n``,
or equally) and applies the mean with its optimizer (`server_opt.py`).

BatchNorm: each client's running statistics follow its local batches as on a real device;
they travel with its update as dense float32 (they are statistics, not gradients: never
compressed) and the server takes their weighted mean, outside the server optimizer;
`num_batches_tracked` takes the largest client's count.

With `[compression]`, a client's delta goes through the same pieces as a compressed
gradient (`CompressedDataParallel`: error feedback per client, compressor, wire codec; the
server uses the decoded payloads). A client whose update misses the round's deadline keeps
its error-feedback memory as it was before the round (its work is lost, as in a crash);
a client that crashes loses it (`forget`).
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
from edgeddl.strategy.compressed import CompressedDataParallel
from edgeddl.strategy.data_parallel import DataParallel, Exchange, LossFn, dense_body, tensor_bytes
from edgeddl.strategy.errors import TrainingDiverged
from edgeddl.strategy.server_opt import ServerOptimizer


@dataclasses.dataclass(slots=True)
class _Work:
    deltas: list[torch.Tensor]
    """Each client's update w_local - w_global, flat."""
    inputs: list[torch.Tensor]
    """With compression: what each client compressed (delta plus its memory)."""
    received: list
    """With compression: each client's payload as decoded at the server."""
    buffers: list[list[torch.Tensor]]
    """Each client's model buffers after its local steps."""
    losses: torch.Tensor
    """Each client's mean local training loss."""
    datas: list[bytes] = dataclasses.field(default_factory=list)
    """With compression: each client's encoded update, as sent."""


def add_proximal_grad(params: list[nn.Parameter], anchor: list[torch.Tensor], mu: float) -> None:
    """FedProx: add the gradient mu (w - w_global) of mu/2 ||w - w_global||^2 to p.grad."""
    for p, a in zip(params, anchor, strict=True):
        assert p.grad is not None
        p.grad.add_(p.detach() - a, alpha=mu)


class Federated(DataParallel):
    """The global model on the server; `prepare` runs the sampled clients' local training,
    `commit` applies the mean update of those whose update arrived."""

    name = "federated"

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

    def plan_round(
        self, members: np.ndarray, round_index: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sampled clients, samples each trains on, local steps each) for one round.

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
        return clients, samples.astype(np.int64), steps.astype(np.int64)

    def payload_bodies(self, ex: Exchange) -> list[bytes]:
        """Each client's update as sent: its encoded payload, or dense with its BatchNorm
        statistics (which also travel dense beside a compressed update)."""
        work: _Work = ex.work
        floats = [
            [b.reshape(-1) for b, g in zip(bs, self.buffers, strict=True) if g.is_floating_point()]
            for bs in work.buffers
        ]
        if work.datas:
            return [
                d + dense_body(torch.cat(f)) if f else d
                for d, f in zip(work.datas, floats, strict=True)
            ]
        return [dense_body(torch.cat([u, *f])) for u, f in zip(work.deltas, floats, strict=True)]

    def client_weight(self, device: int) -> float:
        """A client's unnormalised weight in the mean: its shard size, or 1."""
        return 1.0 if self.cfg.weighting == "uniform" else float(self.shard_sizes[device])

    def weights(self, clients: list[int]) -> torch.Tensor:
        """Each client's weight in the mean (sums to 1)."""
        w = np.array([self.client_weight(c) for c in clients])
        return torch.tensor(w / w.sum(), dtype=torch.float32)

    # --- what crosses the links ---------------------------------------------------------------

    def payload_bytes(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Typical (up, down) bytes per round: an update up, the model down."""
        if self.wire is not None:
            up = self.wire.up_estimate[idx] + self.buffer_bytes
        else:
            up = np.full(len(idx), float(self.dense_up_bytes))
        return up, np.full(len(idx), float(self.state_bytes))

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

    def local_update(
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
        return self.local_update(x, y, num_steps, self.flat_params())

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], devices: np.ndarray, step: int
    ) -> Exchange:
        """Every sampled client trains locally (consecutive `counts` rows each) and encodes
        its update; `counts[i] / local_batch` rounded up is client i's local steps."""
        ids = devices.tolist()
        if self.behaviors is not None:
            y = self.behaviors.poison_labels(y, counts, ids)
        deltas, buffers, losses = [], [], []
        for xs, ys in zip(x.split(counts), y.split(counts), strict=True):
            d, b, loss = self.client_update(xs, ys, -(-len(xs) // self.cfg.local_batch))
            deltas.append(d)
            buffers.append(b)
            losses.append(loss)
        if self.behaviors is not None:
            deltas = self.behaviors.tamper(deltas, ids, step)
        inputs: list[torch.Tensor] = []
        received: list = []
        datas: list[bytes] = []
        if self.wire is not None:
            inputs = self.wire.compensate(ids, deltas, step)
            datas = [self.wire.encode(d, c, step) for d, c in zip(ids, inputs, strict=True)]
            received = [self.wire.decode(d, b) for d, b in zip(ids, datas, strict=True)]
            up = np.array([len(b) for b in datas], dtype=np.int64) + self.buffer_bytes
        else:
            finite = torch.stack([torch.isfinite(d).all() for d in deltas])
            if self.robust is None and not bool(finite.all()):  # else the screen refuses it
                raise TrainingDiverged(step, ids[int((~finite).nonzero()[0, 0])])
            up = np.full(len(ids), self.dense_up_bytes, dtype=np.int64)
        work = _Work(deltas, inputs, received, buffers, torch.stack(losses), datas)
        return Exchange(
            devices=devices,
            counts=counts,
            step=step,
            up_bytes=up[None],
            work=work,
        )

    @torch.no_grad()
    def commit(self, ex: Exchange, contributed: np.ndarray) -> torch.Tensor | None:
        """Apply the mean update of the clients whose update arrived; the others' work is
        lost (their error-feedback memory is left as it was)."""
        work: _Work = ex.work
        self._count(ex, contributed)
        keep = np.flatnonzero(contributed).tolist()
        if not keep:
            return None
        ids = ex.devices.tolist()
        kept = [ids[i] for i in keep]
        w = self.weights(kept).to(work.deltas[0].device)
        mean: torch.Tensor | None
        if self.wire is not None:
            sent, mean = self.wire.aggregate(
                kept, w.tolist(), [work.received[i] for i in keep], ex.step
            )
            for d, i, s in zip(kept, keep, sent, strict=True):
                self.wire.remember(d, work.deltas[i], work.inputs[i], s)
        elif self.robust is not None:
            mean, passed = self.robust.combine(
                ex.step, kept, [work.deltas[i] for i in keep], w.tolist()
            )
            keep, kept = [keep[i] for i in passed], [kept[i] for i in passed]
            w = self.weights(kept).to(w.device) if kept else w
        else:
            mean = torch.zeros_like(work.deltas[0])
            for wi, i in zip(w.tolist(), keep, strict=True):
                mean.add_(work.deltas[i], alpha=wi)
        if mean is None:  # nothing usable arrived: the global model stays as it is
            return (work.losses[keep] * w).sum() if keep else None
        float_means = [
            sum(wi * work.buffers[i][k] for wi, i in zip(w.tolist(), keep, strict=True))
            for k, b in enumerate(self.buffers)
            if b.is_floating_point()
        ]
        self.apply_round(mean, float_means, kept)
        return (work.losses[keep] * w).sum()

    def client_steps(self, devices: list[int]) -> np.ndarray:
        """Local steps each of `devices` takes in a round (`plan_round`'s, by shard size)."""
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
                b.copy_(next(floats))
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
