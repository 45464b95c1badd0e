"""Seeded random generators, independent per key (run seed, step, device, ...)."""

from __future__ import annotations

import numpy as np
import torch


def seeded_generator(*keys: int) -> torch.Generator:
    """A generator seeded by (run seed, step, ...): reproducible, independent per key."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(keys).generate_state(1)[0]))
