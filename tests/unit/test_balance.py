"""Batch balancing: integer shares of the global batch by capability, step time, or equally."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeddl.strategy.balance import BalanceError, balance_shares

MODES = ("capability", "min_time", "equal")
BIG = 10**9


def _step_time(shares: np.ndarray, fixed: np.ndarray, per: np.ndarray) -> float:
    """The step's length: the slowest busy device (an idle device does nothing)."""
    busy = shares > 0
    return float(np.max(fixed[busy] + shares[busy] * per[busy]))


def _brute_force_min_time(total: int, fixed: np.ndarray, per: np.ndarray, cap: np.ndarray) -> float:
    best = np.inf
    n = len(per)
    for head in itertools.product(*(range(min(int(c), total) + 1) for c in cap[:-1])):
        last = total - sum(head)
        if 0 <= last <= cap[-1]:
            best = min(best, _step_time(np.array([*head, last]), fixed, per))
    assert n >= 1 and np.isfinite(best)
    return best


# --- properties of every mode -----------------------------------------------------------------

fleets = st.integers(min_value=1, max_value=6).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(min_value=1e-4, max_value=1.0), min_size=n, max_size=n),
        st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=n, max_size=n),
        st.lists(st.integers(min_value=0, max_value=300), min_size=n, max_size=n),
    )
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(fleet=fleets, total=st.integers(min_value=1, max_value=600), mode=st.sampled_from(MODES))
def test_shares_sum_to_the_batch_within_memory_caps(fleet, total, mode) -> None:
    per, fixed, cap = (np.array(a) for a in fleet)
    try:
        shares = balance_shares(total, per, fixed, cap, mode)
    except BalanceError:
        if mode == "equal":
            assert cap.sum() < total or total / len(cap) > cap.min()
        else:
            assert cap.sum() < total
        return
    assert shares.dtype.kind == "i"
    assert int(shares.sum()) == total
    assert np.all(shares >= 0) and np.all(shares <= cap)


@pytest.mark.parametrize("mode", MODES)
def test_batch_that_does_not_fit_is_a_balance_error(mode) -> None:
    with pytest.raises(BalanceError, match="global batch 100"):
        balance_shares(100, np.ones(3), np.zeros(3), np.array([30, 30, 39]), mode)


@pytest.mark.parametrize("mode", MODES)
def test_no_device_is_a_balance_error(mode) -> None:
    with pytest.raises(BalanceError):
        balance_shares(8, np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64), mode)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown balance mode"):
        balance_shares(8, np.ones(2), np.zeros(2), np.full(2, BIG), "fastest")


# --- capability -------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    per=st.lists(st.floats(min_value=1e-3, max_value=1.0), min_size=1, max_size=8),
    total=st.integers(min_value=1, max_value=5000),
)
def test_capability_is_proportional_to_speed_within_rounding(per, total) -> None:
    per = np.array(per)
    shares = balance_shares(total, per, np.zeros(len(per)), np.full(len(per), BIG), "capability")
    speed = 1.0 / per
    ideal = total * speed / speed.sum()
    assert np.all(np.abs(shares - ideal) < 1.0 + 1e-9)
    # Rounding never inverts the order of speeds by more than a sample.
    faster = speed[:, None] > speed[None, :]
    assert np.all((shares[:, None] >= shares[None, :] - 1) | ~faster)


def test_capability_by_hand() -> None:
    # Speeds 3:1 (seconds per sample 1 and 3): 75 and 25 of 100.
    shares = balance_shares(100, np.array([1.0, 3.0]), np.zeros(2), np.full(2, BIG), "capability")
    assert shares.tolist() == [75, 25]
    # Largest remainder: ideal 33.3 / 33.3 / 33.3 of 100 goes to 34 / 33 / 33.
    shares = balance_shares(100, np.ones(3), np.zeros(3), np.full(3, BIG), "capability")
    assert sorted(shares.tolist()) == [33, 33, 34]


def test_capability_ignores_fixed_costs() -> None:
    per = np.array([0.1, 0.2, 0.4])
    a = balance_shares(70, per, np.zeros(3), np.full(3, BIG), "capability")
    b = balance_shares(70, per, np.array([100.0, 0.0, 5.0]), np.full(3, BIG), "capability")
    assert a.tolist() == b.tolist() == [40, 20, 10]


def test_capability_gives_what_a_cap_cuts_to_the_others() -> None:
    # Device 0 is 10x faster but holds only 2 samples; the other two split the rest equally.
    shares = balance_shares(20, np.array([0.1, 1.0, 1.0]), np.zeros(3), np.array([2, 50, 50]))
    assert shares.tolist() == [2, 9, 9]


# --- equal ------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None, derandomize=True)
@given(n=st.integers(min_value=1, max_value=20), total=st.integers(min_value=1, max_value=1000))
def test_equal_shares_differ_by_at_most_one(n, total) -> None:
    per = np.linspace(0.01, 1.0, n)  # speeds do not matter
    shares = balance_shares(total, per, np.zeros(n), np.full(n, BIG), "equal")
    assert shares.sum() == total
    assert shares.max() - shares.min() <= 1
    assert shares.min() == total // n


def test_equal_share_over_a_device_cap_is_a_balance_error() -> None:
    # Enough memory in total (10 + 100 + 100), but an equal share (40) does not fit device 0.
    with pytest.raises(BalanceError, match="equal share"):
        balance_shares(120, np.ones(3), np.zeros(3), np.array([10, 100, 100]), "equal")


# --- min_time ---------------------------------------------------------------------------------


def test_min_time_equalizes_finish_times_by_hand() -> None:
    # t_i = fixed_i + b per_i: T = 1 + 0.1 b0 = 2 + 0.05 b1 with b0 + b1 = 100 gives b0 = 40,
    # b1 = 60, both finishing at 5 s.
    fixed, per = np.array([1.0, 2.0]), np.array([0.1, 0.05])
    shares = balance_shares(100, per, fixed, np.full(2, BIG), "min_time")
    assert shares.tolist() == [40, 60]
    assert _step_time(shares, fixed, per) == pytest.approx(5.0)


def test_min_time_without_fixed_costs_matches_capability() -> None:
    per = np.array([0.013, 0.05, 0.2, 0.7])
    cap = np.full(4, BIG)
    a = balance_shares(997, per, np.zeros(4), cap, "min_time")
    b = balance_shares(997, per, np.zeros(4), cap, "capability")
    assert np.all(np.abs(a - b) <= 1)


def test_min_time_gives_nothing_to_a_device_with_huge_fixed_cost() -> None:
    per = np.array([0.01, 0.01, 0.01])
    fixed = np.array([0.0, 0.0, 1000.0])  # e.g. a far device whose transfers alone take 1000 s
    shares = balance_shares(100, per, fixed, np.full(3, BIG), "min_time")
    assert shares.tolist() == [50, 50, 0]
    assert _step_time(shares, fixed, per) == pytest.approx(0.5)
    # capability would have kept it busy, and waited for it.
    shares = balance_shares(100, per, fixed, np.full(3, BIG), "capability")
    assert shares[2] > 0


def test_min_time_respects_caps() -> None:
    # The fast device could take 90 but holds only 30; the slow one takes the rest.
    per, fixed = np.array([0.01, 0.1]), np.zeros(2)
    shares = balance_shares(100, per, fixed, np.array([30, 1000]), "min_time")
    assert shares.tolist() == [30, 70]


small_fleets = st.integers(min_value=1, max_value=4).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(min_value=0.01, max_value=1.0), min_size=n, max_size=n),
        st.lists(st.floats(min_value=0.0, max_value=3.0), min_size=n, max_size=n),
        st.lists(st.integers(min_value=0, max_value=14), min_size=n, max_size=n),
    )
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(fleet=small_fleets, total=st.integers(min_value=1, max_value=14))
def test_min_time_is_within_one_sample_of_the_brute_force_optimum(fleet, total) -> None:
    per, fixed, cap = (np.array(a) for a in fleet)
    if cap.sum() < total:
        cap[-1] += total - cap.sum()  # make it fit; memory errors are tested elsewhere
    shares = balance_shares(total, per, fixed, cap, "min_time")
    best = _brute_force_min_time(total, fixed, per, cap)
    got = _step_time(shares, fixed, per)
    eps = 1e-9
    assert got >= best - eps  # sanity: the brute force is the optimum
    busy = shares > 0
    # Each busy device would finish by the optimum with one sample fewer: rounding costs at
    # most one sample's time on the device it lands on.
    assert np.all(fixed[busy] + (shares[busy] - 1) * per[busy] <= best + eps)
    assert got <= best + per[busy].max() + eps


def test_min_share_lifts_small_shares_and_keeps_the_total() -> None:
    per = np.array([0.01] + [1.0] * 9)  # one fast device, nine slow ones
    plain = balance_shares(40, per, np.zeros(10), np.full(10, BIG), "capability")
    assert plain.min() < 2  # the slow ones get 0-1 samples each
    shares = balance_shares(40, per, np.zeros(10), np.full(10, BIG), "capability", min_share=2)
    assert shares.sum() == 40
    assert shares.min() >= 2  # everyone takes part with a batch BatchNorm can normalise
    assert shares[0] == 40 - 2 * 9


def test_min_share_lets_the_slowest_sit_out_when_the_batch_is_too_small() -> None:
    per = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    shares = balance_shares(6, per, np.zeros(5), np.full(5, BIG), "equal", min_share=2)
    assert shares.sum() == 6
    assert shares.tolist()[3:] == [0, 0]  # the two slowest sit out
    assert all(s >= 2 for s in shares[:3])
