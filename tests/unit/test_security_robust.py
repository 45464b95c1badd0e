"""Robust aggregation rules and the mixing before them, on hand-made updates: honest devices
agree, hostile ones lie."""

from __future__ import annotations

import pytest
import torch

from edgeddl.aggregation.rules import (
    aggregate,
    bucket_means,
    krum_scores,
    nearest_neighbor_mixing,
    screen,
)


def _fleet(num_honest: int, hostile: list[torch.Tensor]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    honest = torch.ones(num_honest, 4, dtype=torch.float64)
    honest += 0.01 * torch.randn(num_honest, 4, generator=g, dtype=torch.float64)
    return torch.cat([honest, torch.stack(hostile).double()]) if hostile else honest


@pytest.mark.parametrize(
    ("rule", "kwargs"),
    [("median", {}), ("trimmed_mean", {"trim": 2}), ("krum", {"num_byzantine": 2}),
     ("multi_krum", {"num_byzantine": 2, "multi": 4})],
)  # fmt: skip
def test_two_hostile_of_nine_move_the_mean_but_not_the_robust_rules(
    rule: str, kwargs: dict[str, int]
) -> None:
    attacks = [torch.full((4,), 1000.0), -5.0 * torch.ones(4)]  # scaled, sign-flipped
    updates = _fleet(7, attacks)
    weights = torch.ones(len(updates))
    assert (aggregate(updates, weights, "mean") - 1.0).abs().max() > 100
    robust = aggregate(updates, weights, rule, **kwargs)  # type: ignore[arg-type]
    assert (robust - 1.0).abs().max() < 0.05


def test_mean_weights_by_samples_and_median_of_an_even_count_is_the_middle() -> None:
    updates = torch.tensor([[0.0, 2.0], [4.0, 6.0]])
    torch.testing.assert_close(
        aggregate(updates, torch.tensor([3.0, 1.0]), "mean"), torch.tensor([1.0, 3.0])
    )
    torch.testing.assert_close(
        aggregate(updates, torch.ones(2), "median"), torch.tensor([2.0, 4.0])
    )


def test_krum_scores_by_hand_and_its_precondition() -> None:
    updates = torch.tensor([[0.0], [1.0], [3.0], [10.0], [11.0]])
    # n - f - 2 = 2 nearest others (f = 1): 0 -> 1 + 9; 1 -> 1 + 4; 3 -> 4 + 9; 10 -> 1 + 49;
    # 11 -> 1 + 64.
    assert krum_scores(updates, 1).tolist() == [10.0, 5.0, 13.0, 50.0, 65.0]
    assert aggregate(updates, torch.ones(5), "krum", num_byzantine=1).tolist() == [1.0]
    with pytest.raises(ValueError, match="more than 2f"):
        krum_scores(updates, 2)


def test_screen_refuses_non_finite_and_oversized_updates_with_a_reason() -> None:
    updates = torch.tensor([[1.0, 1.0], [float("nan"), 0.0], [300.0, 400.0], [0.5, 0.0]])
    keep, reasons = screen(updates, max_norm=100.0)
    assert keep.tolist() == [True, False, False, True]
    assert reasons == {1: "non-finite values", 2: "norm 500 over 100"}
    with pytest.raises(ValueError, match="trim 2"):
        aggregate(updates, torch.ones(4), "trimmed_mean", trim=2)


def test_bucket_means_average_runs_of_the_generators_shuffle() -> None:
    updates = torch.tensor([[0.0, 1.0], [10.0, 1.0], [20.0, 1.0], [30.0, 1.0], [40.0, 1.0]])
    order = torch.randperm(5, generator=torch.Generator().manual_seed(3)).tolist()
    out = bucket_means(updates, 2, torch.Generator().manual_seed(3))
    first, second, last = order[:2], order[2:4], order[4:]
    expected = [[5.0 * (first[0] + first[1]), 1.0], [5.0 * (second[0] + second[1]), 1.0]]
    assert out.tolist() == [*expected, [10.0 * last[0], 1.0]]  # 3 buckets: 2, 2 and 1
    again = bucket_means(updates, 2, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # seeded: the same buckets again
    assert bucket_means(updates, 5, torch.Generator().manual_seed(3)).tolist() == [[20.0, 1.0]]


def test_nearest_neighbor_mixing_averages_each_row_with_its_n_minus_f_nearest() -> None:
    updates = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    # f = 2: each row and its nearest other: 0 with 1, 1 with 0, 3 with 1, 10 with 3.
    out = nearest_neighbor_mixing(updates, 2)
    assert out.tolist() == [[0.5], [0.5], [2.0], [6.5]]
    assert torch.equal(nearest_neighbor_mixing(updates, 0), updates.mean(dim=0).expand(4, 1))
    with pytest.raises(ValueError, match="more than f"):
        nearest_neighbor_mixing(updates, 4)


def test_mixing_then_the_median_returns_the_honest_mean_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    honest = 1.0 + torch.randn(7, 50, generator=g, dtype=torch.float64)  # noise ~ the signal
    updates = torch.cat([honest, -honest[:2]])  # two devices flip their update's sign
    mixed = nearest_neighbor_mixing(updates, 2)
    out = aggregate(mixed, torch.ones(9), "median")
    torch.testing.assert_close(out, honest.mean(dim=0))
    plain = aggregate(updates, torch.ones(9), "median")
    assert (plain - honest.mean(dim=0)).norm() > 0.1 * honest.mean(dim=0).norm()
