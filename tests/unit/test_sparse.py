"""Sparse compressors: the payload contract, what each one selects, the sampled threshold,
two-step's threshold control and bursts, and DGC's warm-up and exact recompute."""

from __future__ import annotations

import pytest
import torch

from edgeddl.compress import significance
from edgeddl.compress.base import Compressor, Layout, Payload
from edgeddl.compress.significance import DGCCompressor, TwoStepCompressor
from edgeddl.compress.sparse import (
    RandomKCompressor,
    ThresholdCompressor,
    TopKCompressor,
    estimate_threshold,
)

N = 20_000
LAYOUT = Layout(((100, 100), (100,), (50, 150), (2400,)))
assert LAYOUT.numel == N


def _randn(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _all_kinds() -> list[Compressor]:
    return [
        TopKCompressor(0.01),
        RandomKCompressor(0.01, seed=3),
        ThresholdCompressor(2.0),
        TwoStepCompressor(LAYOUT, 0.01, "magnitude", 0.0, True, 0.01, 0),
        TwoStepCompressor(LAYOUT, 0.01, "layer_normalized", 0.0, True, 0.01, 0),
        DGCCompressor(0.01, 0, 0.01, 0),
    ]


@pytest.mark.parametrize("comp", _all_kinds(), ids=lambda c: f"{c.name}")
def test_payload_contract(comp: Compressor) -> None:
    x = _randn(N, 1)
    for step in range(3):
        payload = comp.compress(x, step)
        assert payload.numel == N
        assert payload.values is not None and payload.values.dtype == torch.float32
        if comp.name == "randomk":
            assert payload.indices is None  # receivers draw the positions themselves
            indices = comp.decompress(payload, step).nonzero().squeeze(1)
        else:
            assert payload.indices is not None
            indices = payload.indices
            assert indices.dtype == torch.int64
            assert bool((indices[1:] > indices[:-1]).all())  # sorted and distinct
            assert int(indices[0]) >= 0 and int(indices[-1]) < N
        assert torch.equal(payload.values, x[indices])
        out = comp.decompress(payload, step)
        assert out.dtype == torch.float32 and out.shape == (N,)
        assert torch.equal(out[indices], x[indices])
        rest = torch.ones(N, dtype=torch.bool)
        rest[indices] = False
        assert not out[rest].any()


def test_topk_selects_the_largest_magnitudes() -> None:
    x = _randn(N, 2)
    comp = TopKCompressor(0.013)
    payload = comp.compress(x, 0)
    assert payload.indices is not None
    k = round(0.013 * N)
    assert payload.num_sent == k
    chosen = torch.zeros(N, dtype=torch.bool)
    chosen[payload.indices] = True
    assert x.abs()[chosen].min() > x.abs()[~chosen].max()
    comp.density = 0.002  # a policy may change it between steps
    assert comp.compress(x, 1).num_sent == round(0.002 * N)
    assert TopKCompressor(1e-9).compress(x, 0).num_sent == 1  # never nothing


def test_randomk_positions_are_shared_by_seed_and_step() -> None:
    x, y = _randn(N, 3), _randn(N, 4)
    a, b = RandomKCompressor(0.01, seed=7), RandomKCompressor(0.01, seed=7)

    def pattern(comp: RandomKCompressor, x: torch.Tensor, step: int) -> torch.Tensor:
        return comp.decompress(comp.compress(x, step), step) != 0

    assert torch.equal(pattern(a, x, 5), pattern(b, y, 5))  # other device, other gradient
    assert not torch.equal(pattern(a, x, 5), pattern(a, x, 6))
    assert not torch.equal(pattern(a, x, 5), pattern(RandomKCompressor(0.01, seed=8), x, 5))
    assert int(pattern(a, x, 9).sum()) == round(0.01 * N)
    # Payloads of two devices sum: the aggregate is decompressed like one payload.
    pa, pb = a.compress(x, 11), b.compress(y, 11)
    assert pa.values is not None and pb.values is not None
    total = a.decompress(Payload(numel=N, values=pa.values + pb.values), 11)
    assert torch.allclose(total, a.decompress(pa, 11) + b.decompress(pb, 11))
    dense = RandomKCompressor(0.5, seed=7).compress(x, 0)  # the permutation path
    assert dense.num_sent == N // 2


def test_threshold_sends_exactly_the_values_past_it() -> None:
    x = _randn(N, 5)
    payload = ThresholdCompressor(1.5).compress(x, 0)
    assert payload.indices is not None
    assert torch.equal(payload.indices, (x.abs() >= 1.5).nonzero().squeeze(1))
    assert ThresholdCompressor(100.0).compress(x, 0) == Payload(numel=N)


def test_estimate_threshold_passes_about_k() -> None:
    n, k = 460_000, 4_600
    score = _randn(n, 6).abs()
    for seed in range(3):
        threshold = estimate_threshold(score, k, 0.01, torch.Generator().manual_seed(seed))
        assert threshold.dim() == 0
        assert abs(int((score >= threshold).sum()) - k) < 0.2 * k
    exact = estimate_threshold(score[:5000], 50, 1.0, torch.Generator())
    assert int((score[:5000] >= exact).sum()) == 50
    zeros = estimate_threshold(torch.zeros(5000), 50, 0.01, torch.Generator())
    assert float(zeros) > 0  # zeros never pass


def test_two_step_holds_the_target_density() -> None:
    gen = torch.Generator().manual_seed(8)
    density = 0.01
    k = density * N
    plain = TwoStepCompressor(LAYOUT, density, "magnitude", 0.0, True, 0.01, 0)
    # A fixed starting threshold far off, and error feedback's growing residual.
    fed = TwoStepCompressor(LAYOUT, density, "layer_normalized", 0.05, True, 0.01, 0)
    residual = torch.zeros(N)
    counts: dict[str, list[int]] = {"plain": [], "fed": []}
    for step in range(60):
        g = torch.randn(N, generator=gen) * (1 + step % 3)
        counts["plain"].append(plain.compress(g, step).num_sent)
        c = g + residual
        payload = fed.compress(c, step)
        residual = c - fed.decompress(payload, step)
        counts["fed"].append(payload.num_sent)
    for sent in counts.values():
        mean = sum(sent[10:]) / len(sent[10:])
        assert k / 1.5 < mean < 1.5 * k
        assert max(sent) <= 4 * k


def test_two_step_sends_only_past_a_fixed_threshold() -> None:
    comp = TwoStepCompressor(LAYOUT, 0.01, "magnitude", 1.0, False, 0.01, 0)
    small = _randn(N, 9) * 1e-3
    empty = comp.compress(small, 0)
    assert empty == Payload(numel=N)  # nothing significant: nothing is sent
    assert not comp.decompress(empty, 0).any()
    x = _randn(N, 10) * 0.4  # about 1.2 % of it passes 1.0
    payload = comp.compress(x, 1)
    assert payload.indices is not None
    assert torch.equal(payload.indices, (x.abs() >= 1.0).nonzero().squeeze(1))
    assert comp.tau == 1.0


def test_layer_normalized_gives_small_layers_a_share() -> None:
    layout = Layout(((10_000,), (10_000,)))
    x = torch.cat([_randn(10_000, 11), _randn(10_000, 12) * 1e-4])
    small = torch.arange(N) >= 10_000

    def small_share(criterion: significance.Criterion) -> float:
        comp = TwoStepCompressor(layout, 0.01, criterion, 0.0, True, 0.01, 0)
        payload = comp.compress(x, 0)
        assert payload.indices is not None
        return float(small[payload.indices].float().mean())

    assert small_share("magnitude") == 0
    assert 0.3 < small_share("layer_normalized") < 0.7


def test_two_step_cuts_a_burst() -> None:
    gen = torch.Generator().manual_seed(13)
    comp = TwoStepCompressor(LAYOUT, 0.01, "magnitude", 0.0, True, 0.01, 0)
    for step in range(20):
        comp.compress(torch.randn(N, generator=gen), step)
    assert comp.recomputes == 0
    burst = comp.compress(torch.randn(N, generator=gen) * 100, 20)
    assert 0 < burst.num_sent <= 4 * 0.01 * N
    assert comp.recomputes == 1


def test_dgc_warmup_schedule() -> None:
    comp = DGCCompressor(0.001, warmup_steps=8)
    got = [comp.density_at(s) for s in range(10)]
    assert got == [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625] + [0.00390625] * 2 + [0.001] * 2
    comp.density = 0.01  # never below the density
    assert comp.density_at(6) == 0.01 and comp.density_at(1) == 0.25
    assert DGCCompressor(0.01, warmup_steps=0).density_at(0) == 0.01


def test_dgc_sends_about_k() -> None:
    comp = DGCCompressor(0.01, 4, 0.01, 0)
    for step, density in [(0, 0.25), (2, 0.015625), (5, 0.01)]:
        k = density * N
        assert abs(comp.compress(_randn(N, 14 + step), step).num_sent - k) < 0.25 * k
    assert comp.recomputes == 0


def test_dgc_recomputes_exactly_when_too_many_pass() -> None:
    k = round(0.01 * N)
    # Clipped gradients: 3k values tie at the top, so the sampled threshold lands on the tie.
    x = _randn(N, 15) * 1e-2
    x[torch.randperm(N, generator=torch.Generator().manual_seed(16))[: 3 * k]] = -1.0
    comp = DGCCompressor(0.01, 0, 0.01, 0)
    assert comp.compress(x, 0).num_sent == k
    assert comp.recomputes == 1


def test_dgc_recompute_is_the_exact_top_k(monkeypatch: pytest.MonkeyPatch) -> None:
    def too_low(score: torch.Tensor, k: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
        return score.new_tensor(1e-6)

    monkeypatch.setattr(significance, "estimate_threshold", too_low)
    x = _randn(N, 17)
    comp = DGCCompressor(0.01, 0, 0.01, 0)
    payload = comp.compress(x, 0)
    assert comp.recomputes == 1
    assert payload.indices is not None
    assert torch.equal(payload.indices, TopKCompressor(0.01).compress(x, 0).indices)
