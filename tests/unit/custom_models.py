"""A user's own model and data set, importable as `custom_models` (pytest puts tests/unit
on the path): `edgeddl infer --model custom_models:tiny_net --data custom_models:tiny_data`."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

LENGTH = 12
NUM_CLASSES = 3


class TinyNet(nn.Sequential):
    """A classifier of (1, LENGTH) samples, built without arguments by default."""

    def __init__(
        self, num_classes: int = NUM_CLASSES, length: int = LENGTH, hidden: int = 8
    ) -> None:
        super().__init__(
            nn.Flatten(), nn.Linear(length, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )


def tiny_net() -> nn.Module:
    return TinyNet()


def wide_net() -> nn.Module:
    """Fits the data, not a TinyNet's weights."""
    return TinyNet(hidden=16)


class Signals(Dataset):
    """Seeded (1, LENGTH) series labelled by which third of the series is loudest."""

    def __init__(self, num_samples: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(num_samples, 1, LENGTH, generator=generator)
        thirds = self.x.reshape(num_samples, NUM_CLASSES, -1).square().sum(2)
        self.y = thirds.argmax(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def tiny_data() -> tuple[Dataset, Dataset]:
    return Signals(96, seed=0), Signals(48, seed=1)
