"""Each device draws its batches from its own shard only: raw data never leaves a device.

A device walks through a seeded permutation of its shard and reshuffles at the end of each
local epoch, so a fast device that takes more samples per step simply sees more epochs. All
devices' current permutations sit in one flat array, so a step's draws for thousands of
devices are one gather; only a device that reaches the end of its epoch is handled alone.
"""

from __future__ import annotations

import numpy as np


class ShardSampler:
    def __init__(self, shards: list[np.ndarray], seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.shards = shards
        self.sizes = np.array([len(s) for s in shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.flat = np.concatenate([self.rng.permutation(s) for s in shards]).astype(np.int64)
        self.pos = np.zeros(len(shards), dtype=np.int64)
        self.epochs = np.zeros(len(shards), dtype=np.int64)

    def _reshuffle(self, device: int) -> None:
        start = self.offsets[device]
        self.flat[start : start + self.sizes[device]] = self.rng.permutation(self.shards[device])
        self.pos[device] = 0
        self.epochs[device] += 1

    def take(self, device: int, num_samples: int) -> np.ndarray:
        """The next `num_samples` indices (into the full data set) of `device`'s shard."""
        out = []
        while num_samples > 0:
            if self.pos[device] == self.sizes[device]:
                self._reshuffle(device)
            n = min(num_samples, int(self.sizes[device] - self.pos[device]))
            start = self.offsets[device] + self.pos[device]
            out.append(self.flat[start : start + n].copy())
            self.pos[device] += n
            num_samples -= n
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def take_many(self, devices: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """`take` for several devices at once: their draws concatenated in order, the same as
        calling `take` for each in turn.

        Devices whose epoch does not end now are served by one gather; the few that reach the
        end of their shard are served one by one (only they draw new permutations, in order).
        """
        counts = np.asarray(counts, dtype=np.int64)
        ends = np.cumsum(counts)
        total = int(ends[-1]) if len(ends) else 0
        starts = self.offsets[devices] + self.pos[devices]
        # Positions start_i .. start_i + n_i - 1 of every device, as one index array.
        positions = np.arange(total) + np.repeat(starts - ends + counts, counts)
        wraps = np.flatnonzero(self.pos[devices] + counts > self.sizes[devices])
        fits = np.ones(len(devices), dtype=bool)
        fits[wraps] = False
        self.pos[devices[fits]] += counts[fits]
        out = self.flat[np.where(np.repeat(fits, counts), positions, 0)]
        for k in wraps:
            out[ends[k] - counts[k] : ends[k]] = self.take(int(devices[k]), int(counts[k]))
        return out
