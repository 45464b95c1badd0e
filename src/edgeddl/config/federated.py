"""The `[federated]` section: rounds, local training and the server's optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgeddl.config.checks import require as _require


@dataclass(kw_only=True, slots=True)
class FederatedConfig:
    """Federated learning (`train.strategy = "federated"`): FedAvg, FedProx, FedAdam, FedYogi.

    Each round a seeded `fraction` of the members trains the global model on its own shard
    for `local_steps` (or `local_epochs`); the server averages the updates that arrived by
    `deadline_s` and applies them with its optimizer (Reddi et al., "Adaptive Federated
    Optimization", ICLR 2021).
    """

    fraction: float = 1.0
    """Share of the members sampled each round (seeded; at least one client)."""
    local_steps: int = 10
    """Local SGD steps of `local_batch` samples per client and round."""
    local_epochs: int = 0
    """When > 0: passes over its whole shard per client and round instead of `local_steps`
    (FedAvg's E)."""
    local_batch: int = 32
    """Samples per local step."""
    local_lr: float = 0.0
    """Learning rate of the clients' local SGD; 0 takes train.lr (train.momentum and
    train.weight_decay apply too; the local optimizer starts afresh every round)."""
    proximal_mu: float = 0.0
    """FedProx: weight mu of the local term mu/2 ||w - w_global||^2; 0 is FedAvg."""
    weighting: Literal["samples", "uniform"] = "samples"
    """How the server weights the arrived updates: by each client's shard size (FedAvg's
    n_k / n), or equally."""
    server_optimizer: Literal["avg", "adam", "yogi"] = "avg"
    """avg: w += server_lr * mean update (server_lr 1: plain FedAvg); adam, yogi: FedAdam,
    FedYogi with the negated mean update as pseudo-gradient."""
    server_lr: float = 1.0
    """Server learning rate (adam and yogi want about 0.01-0.1)."""
    beta1: float = 0.9
    """adam, yogi: decay of the first moment."""
    beta2: float = 0.99
    """adam, yogi: decay of the second moment."""
    tau: float = 1e-3
    """adam, yogi: adaptivity tau (added to the root of the second moment, which starts at
    tau^2)."""
    deadline_s: float = 0.0
    """Virtual seconds from a round's start after which updates not yet arrived are dropped
    (and logged); the round then ends at the deadline. 0: wait for every client."""

    def __post_init__(self) -> None:
        _require(0 < self.fraction <= 1, f"fraction must be in (0, 1] (got {self.fraction})")
        _require(self.local_steps >= 1, f"local_steps must be >= 1 (got {self.local_steps})")
        _require(self.local_epochs >= 0, f"local_epochs must be >= 0 (got {self.local_epochs})")
        _require(self.local_batch >= 1, f"local_batch must be >= 1 (got {self.local_batch})")
        _require(self.local_lr >= 0, f"local_lr must be >= 0 (got {self.local_lr})")
        _require(self.proximal_mu >= 0, f"proximal_mu must be >= 0 (got {self.proximal_mu})")
        _require(self.server_lr > 0, f"server_lr must be > 0 (got {self.server_lr})")
        _require(0 <= self.beta1 < 1, f"beta1 must be in [0, 1) (got {self.beta1})")
        _require(0 <= self.beta2 < 1, f"beta2 must be in [0, 1) (got {self.beta2})")
        _require(self.tau > 0, f"tau must be > 0 (got {self.tau})")
        _require(self.deadline_s >= 0, f"deadline_s must be >= 0 (got {self.deadline_s})")
