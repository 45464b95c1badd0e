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
`num_batches_tracked` takes the largest count.

With `[compression]`, a client's delta goes through the same pieces as a compressed
gradient (`CompressedDataParallel`: error feedback per client, compressor, wire codec; the
server uses the decoded payloads). A client whose update misses the round's deadline keeps
its error-feedback memory as it was before the round (its work is lost, as in a crash);
a client that crashes loses it (`forget`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from edgeddl.config.federated import FederatedConfig
from edgeddl.config.schema import TrainConfig
from edgeddl.strategy.compressed import CompressedDataParallel
from edgeddl.strategy.data_parallel import DataParallel, Exchange, LossFn, tensor_bytes
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
        # The inherited optimizer is the clients' local SGD (reset for every client).
        super().__init__(model, dataclasses.replace(train, lr=cfg.local_lr or train.lr), loss_fn)
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

    def weights(self, clients: list[int]) -> torch.Tensor:
        """Each client's weight in the mean (sums to 1)."""
        if self.cfg.weighting == "uniform":
            w = np.ones(len(clients))
        else:
            w = self.shard_sizes[clients].astype(np.float64)
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

    @torch.no_grad()
    def _load(self, flat: torch.Tensor, buffers: list[torch.Tensor]) -> None:
        for p, v in zip(self.params, self.layout.split(flat), strict=True):
            p.copy_(v)
        for b, v in zip(self.buffers, buffers, strict=True):
            b.copy_(v)

    def local_update(
        self, x: torch.Tensor, y: torch.Tensor, num_steps: int, anchor: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """One client's local training from the global model `anchor` (already loaded):
        (delta, its buffers after training, its mean loss)."""
        self.model.train()
        self.optimizer.state.clear()  # a fresh local optimizer every round
        anchor_views = self.layout.split(anchor)
        losses = []
        for xb, yb in zip(x.tensor_split(num_steps), y.tensor_split(num_steps), strict=True):
            loss = self.loss_fn(self.model(xb), yb)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.proximal_mu:
                add_proximal_grad(self.params, anchor_views, self.cfg.proximal_mu)
            self.optimizer.step()
            losses.append(loss.detach())
        delta = self.flat_params() - anchor
        return delta, [b.detach().clone() for b in self.buffers], torch.stack(losses).mean()

    def prepare(
        self, x: torch.Tensor, y: torch.Tensor, counts: list[int], devices: np.ndarray, step: int
    ) -> Exchange:
        """Every sampled client trains locally (consecutive `counts` rows each) and encodes
        its update; `counts[i] / local_batch` rounded up is client i's local steps."""
        anchor = self.flat_params()
        start_buffers = [b.detach().clone() for b in self.buffers]
        ids = devices.tolist()
        if self.behaviors is not None:
            y = self.behaviors.poison_labels(y, counts, ids)
        deltas, buffers, losses = [], [], []
        try:
            for xs, ys in zip(x.split(counts), y.split(counts), strict=True):
                steps = -(-len(xs) // self.cfg.local_batch)
                self._load(anchor, start_buffers)
                d, b, loss = self.local_update(xs, ys, steps, anchor)
                deltas.append(d)
                buffers.append(b)
                losses.append(loss)
        finally:
            self._load(anchor, start_buffers)  # the server's model is the global one
        if self.behaviors is not None:
            deltas = self.behaviors.tamper(deltas, ids, step)
        inputs: list[torch.Tensor] = []
        received: list = []
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
        work = _Work(deltas, inputs, received, buffers, torch.stack(losses))
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
        flat = self.flat_params()
        self.server.step(flat, mean)
        for p, v in zip(self.params, self.layout.split(flat), strict=True):
            p.copy_(v)
        for k, b in enumerate(self.buffers):
            client = [work.buffers[i][k] for i in keep]
            if b.is_floating_point():
                b.copy_(sum(wi * c for wi, c in zip(w.tolist(), client, strict=True)))
            else:
                b.copy_(torch.stack(client).max())
        return (work.losses[keep] * w).sum()

    def compression_summary(self) -> dict[str, float]:
        """Update bytes per client and round (BatchNorm statistics included), against dense."""
        out = super().compression_summary()
        if self.wire is not None:
            out["empty_payloads"] = self.wire.num_empty
        return out
