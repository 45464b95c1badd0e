"""Each device draws its batches from its own shard only: raw data never leaves a device.

A device walks through a seeded permutation of its shard and reshuffles at the end of each
local epoch, so a fast device that takes more samples per step simply sees more epochs.
"""

from __future__ import annotations

import numpy as np


class ShardSampler:
    def __init__(self, shards: list[np.ndarray], seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.shards = shards
        self.order = [self.rng.permutation(s) for s in shards]
        self.pos = [0] * len(shards)
        self.epochs = [0] * len(shards)

    def take(self, device: int, num_samples: int) -> np.ndarray:
        """The next `num_samples` indices (into the full data set) of `device`'s shard."""
        order, pos, out = self.order[device], self.pos[device], []
        while num_samples > 0:
            if pos == len(order):
                order = self.order[device] = self.rng.permutation(self.shards[device])
                pos = 0
                self.epochs[device] += 1
            n = min(num_samples, len(order) - pos)
            out.append(order[pos : pos + n])
            pos += n
            num_samples -= n
        self.pos[device] = pos
        return out[0] if len(out) == 1 else np.concatenate(out) if out else order[:0]
