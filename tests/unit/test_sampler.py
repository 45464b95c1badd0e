"""Per-device sampling: a device only ever draws from its own shard, epoch after epoch, and
the vectorized draw for many devices equals drawing for each in turn."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeddl.data.sampler import ShardSampler

SHARDS = [np.arange(0, 10), np.arange(10, 13), np.arange(13, 40), np.arange(40, 45)]


def test_each_epoch_visits_the_shard_once() -> None:
    s = ShardSampler(SHARDS, seed=0)
    drawn = s.take(1, 3 * 4)  # four epochs of a 3-sample shard
    for epoch in drawn.reshape(4, 3):
        assert sorted(epoch.tolist()) == [10, 11, 12]
    assert s.epochs[1] == 3  # reshuffled at the start of epochs 2, 3 and 4


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 8), min_size=4, max_size=4), min_size=1, max_size=30),
    st.integers(0, 3),
)
def test_take_many_equals_take_in_turn(rounds: list[list[int]], seed: int) -> None:
    a, b = ShardSampler(SHARDS, seed), ShardSampler(SHARDS, seed)
    devices = np.arange(4)
    for counts in rounds:
        many = np.split(a.take_many(devices, np.array(counts)), np.cumsum(counts)[:-1])
        one_by_one = [b.take(d, n) for d, n in zip(range(4), counts, strict=True)]
        for got, want, shard in zip(many, one_by_one, SHARDS, strict=True):
            assert np.array_equal(got, want)
            assert set(got.tolist()) <= set(shard.tolist())  # raw data stays on its device
