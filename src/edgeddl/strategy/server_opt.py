"""The federated server's optimizer: how the mean client update moves the global model.

``avg`` (FedAvg with a server learning rate), ``adam`` (FedAdam) and ``yogi`` (FedYogi),
after Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2, without bias
correction. Flat float32 tensors throughout: the strategy flattens the parameters end to end.
Details (the update rules): docs/federated.md#server-optimizers
"""

from __future__ import annotations

import torch

from edgeddl.config.federated import FederatedConfig


class ServerOptimizer:
    """Applies one round's mean update to the flat global parameters (in place)."""

    def __init__(self, cfg: FederatedConfig) -> None:
        self.kind = cfg.server_optimizer
        self.lr = cfg.server_lr
        self.beta1, self.beta2, self.tau = cfg.beta1, cfg.beta2, cfg.tau
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The moments (none before the first adaptive step, and none for avg)."""
        if self.m is None or self.v is None:
            return {}
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.m, self.v = state.get("m"), state.get("v")

    def step(self, params: torch.Tensor, update: torch.Tensor) -> None:
        """Move `params` by the round's mean client update `update` (w_local - w_global)."""
        if self.kind == "avg":
            params.add_(update, alpha=self.lr)
            return
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(update)
            self.v = torch.full_like(update, self.tau**2)
        self.m.mul_(self.beta1).add_(update, alpha=1 - self.beta1)
        sq = update * update
        if self.kind == "adam":
            self.v.mul_(self.beta2).add_(sq, alpha=1 - self.beta2)
        else:  # yogi
            self.v.sub_(sq * torch.sign(self.v - sq), alpha=1 - self.beta2)
        params.addcdiv_(self.m, self.v.sqrt().add_(self.tau), value=self.lr)
