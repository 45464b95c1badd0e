"""PowerSGD: payload formats, reductions, warm-started convergence and the error-feedback split."""

from __future__ import annotations

import math

import pytest
import torch

from edgeddl.compress.base import Layout, Payload, PhasedResult
from edgeddl.compress.lowrank import PowerSGD

RANK = 2
SEED = 7
# At rank 2: (6, 2, 3) -> 6x6, both (8, 5) and (4, 10) are compressed (the two 8x5 share a
# batch); (3, 3), (2, 7) and (7, 1) save nothing at rank 2 (or 1), so they go dense with the
# vectors.
SHAPES: tuple[tuple[int, ...], ...] = (
    (6, 2, 3),
    (6,),
    (8, 5),
    (3, 3),
    (8, 5),
    (4, 10),
    (5,),
    (2, 7),
    (7, 1),
)
LAYOUT = Layout(SHAPES)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2])


def _plan(rank: int = RANK) -> list[tuple[int, int, int] | None]:
    """Per tensor: (rows, cols, r) when compressed, None when sent dense."""
    plan: list[tuple[int, int, int] | None] = []
    for shape in SHAPES:
        if len(shape) >= 2:
            rows, cols = shape[0], math.prod(shape[1:])
            r = min(rank, rows, cols)
            if r * (rows + cols) < rows * cols:
                plan.append((rows, cols, r))
                continue
        plan.append(None)
    return plan


PLAN = _plan()


def _values(payload: Payload) -> torch.Tensor:
    assert payload.values is not None
    return payload.values


def _inputs(devices: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(LAYOUT.numel, generator=gen) for _ in range(devices)]


def _matrices(flat: torch.Tensor) -> list[torch.Tensor | None]:
    """The compressed tensors of `flat` as matrices (None for the dense ones)."""
    return [
        None if p is None else t.reshape(p[0], p[1])
        for t, p in zip(LAYOUT.split(flat), PLAN, strict=True)
    ]


def _p_hats(result: PhasedResult) -> list[torch.Tensor | None]:
    """Orthonormalised mean P per compressed tensor, read from the phase-0 reduction."""
    values = _values(result.reductions[0])
    out: list[torch.Tensor | None] = []
    at = 0
    for p in PLAN:
        if p is None:
            out.append(None)
            continue
        rows, _, r = p
        out.append(torch.linalg.qr(values[at : at + rows * r].view(rows, r)).Q)
        at += rows * r
    return out


def _q_factors(values: torch.Tensor) -> list[torch.Tensor | None]:
    """Q per compressed tensor from a phase-1 vector."""
    out: list[torch.Tensor | None] = []
    at = 0
    for p in PLAN:
        if p is None:
            out.append(None)
            continue
        _, cols, r = p
        out.append(values[at : at + cols * r].view(cols, r))
        at += cols * r
    return out


def _dense_mask() -> torch.Tensor:
    return torch.cat(
        [torch.full((math.prod(s),), p is None) for s, p in zip(SHAPES, PLAN, strict=True)]
    )


def test_payload_sizes_match_the_example_payloads() -> None:
    c = PowerSGD(LAYOUT, RANK, SEED)
    result = c.run(_inputs(3), WEIGHTS, step=0)
    examples = c.example_payloads()
    assert len(result.payloads) == len(examples) == c.num_phases == 2
    for phase, example in zip(result.payloads, examples, strict=True):
        assert example.values is not None and example.num_sent == example.numel
        assert len(phase) == 3
        for payload in phase:
            assert payload.values is not None and payload.values.dtype == torch.float32
            assert payload.numel == payload.num_sent == example.numel
    for reduction, example in zip(result.reductions, examples, strict=True):
        assert reduction.numel == example.numel


def test_reductions_are_weighted_means_of_the_payloads() -> None:
    result = PowerSGD(LAYOUT, RANK, SEED).run(_inputs(3), WEIGHTS, step=0)
    for phase, reduction in zip(result.payloads, result.reductions, strict=True):
        manual = torch.stack([_values(p) for p in phase]).T @ WEIGHTS
        torch.testing.assert_close(_values(reduction), manual, rtol=1e-6, atol=1e-6)


def test_payloads_carry_the_power_iteration_factors() -> None:
    xs = _inputs(3)
    result = PowerSGD(LAYOUT, RANK, SEED).run(xs, WEIGHTS, step=0)
    # The documented initial warm start: standard normal draws, matrix by matrix.
    gen = torch.Generator().manual_seed(SEED)
    q0 = [
        None if p is None else torch.randn(p[1] * p[2], generator=gen).view(p[1], p[2])
        for p in PLAN
    ]
    p_hats = _p_hats(result)
    for i, x in enumerate(xs):
        p_values, q_values = _values(result.payloads[0][i]), _values(result.payloads[1][i])
        mats = _matrices(x)
        p_want = [m @ q for m, q in zip(mats, q0, strict=True) if m is not None and q is not None]
        dense = x[_dense_mask()]
        torch.testing.assert_close(p_values, torch.cat([*(p.flatten() for p in p_want), dense]))
        q_want = [
            m.T @ ph for m, ph in zip(mats, p_hats, strict=True) if m is not None and ph is not None
        ]
        torch.testing.assert_close(q_values, torch.cat([q.flatten() for q in q_want]))


def test_sent_and_aggregate_are_the_rank_r_reconstructions() -> None:
    xs = _inputs(3)
    result = PowerSGD(LAYOUT, RANK, SEED).run(xs, WEIGHTS, step=0)
    p_hats = _p_hats(result)
    q_mean = _values(result.reductions[1])
    for k, (ph, qm) in enumerate(zip(p_hats, _q_factors(q_mean), strict=True)):
        if ph is None or qm is None:
            continue
        torch.testing.assert_close(result.aggregate.split(LAYOUT.sizes())[k], (ph @ qm.T).flatten())
        for i, sent in enumerate(result.sent):
            qi = _q_factors(_values(result.payloads[1][i]))[k]
            assert qi is not None
            torch.testing.assert_close(sent.split(LAYOUT.sizes())[k], (ph @ qi.T).flatten())


def test_exactly_low_rank_matrices_are_reconstructed_after_warm_starts() -> None:
    gen = torch.Generator().manual_seed(3)
    parts = []
    for shape, p in zip(SHAPES, PLAN, strict=True):
        if p is None:
            parts.append(torch.randn(math.prod(shape), generator=gen))
        else:
            rows, cols, r = p
            a, b = torch.randn(rows, r, generator=gen), torch.randn(r, cols, generator=gen)
            parts.append((a @ b).flatten())
    x = torch.cat(parts)
    c = PowerSGD(LAYOUT, RANK, SEED)
    for step in range(3):
        result = c.run([x], torch.ones(1), step)
        c.commit(result)
        torch.testing.assert_close(result.aggregate, x, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(result.sent[0], x, rtol=1e-4, atol=1e-4)


def test_warm_start_converges_to_the_best_rank_r_approximation() -> None:
    # A full-rank matrix with a spectral gap after the second singular value: one power step
    # from a random start misses the top-2 subspace, warm-started steps converge to it.
    layout = Layout(((30, 20),))
    gen = torch.Generator().manual_seed(5)
    u = torch.linalg.qr(torch.randn(30, 20, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(20, 20, generator=gen)).Q
    s = torch.tensor([10.0, 6.0] + [1.0 / (k + 1) for k in range(18)])
    m = u @ torch.diag(s) @ v.T
    best = float(torch.linalg.norm(s[2:]))  # Eckart-Young: the optimal rank-2 error
    c = PowerSGD(layout, 2, SEED)
    errors = []
    for step in range(8):
        result = c.run([m.flatten()], torch.ones(1), step)
        c.commit(result)
        errors.append(float(torch.linalg.norm(result.aggregate.view(30, 20) - m)))
    assert errors[0] > 1.05 * best
    assert errors[-1] == pytest.approx(best, rel=1e-3)


def test_aggregate_is_the_weighted_mean_of_sent() -> None:
    result = PowerSGD(LAYOUT, RANK, SEED).run(_inputs(3), WEIGHTS, step=0)
    mean = sum(float(w) * s for w, s in zip(WEIGHTS, result.sent, strict=True))
    assert isinstance(mean, torch.Tensor)
    torch.testing.assert_close(result.aggregate, mean, rtol=1e-5, atol=1e-5)


def test_dense_tensors_pass_through_exactly() -> None:
    xs = _inputs(3)
    dense = _dense_mask()
    assert dense.any() and not dense.all()
    result = PowerSGD(LAYOUT, RANK, SEED).run(xs, WEIGHTS, step=0)
    for x, sent in zip(xs, result.sent, strict=True):
        assert torch.equal(sent[dense], x[dense])
    mean = sum(float(w) * x[dense] for w, x in zip(WEIGHTS, xs, strict=True))
    assert isinstance(mean, torch.Tensor)
    torch.testing.assert_close(result.aggregate[dense], mean, rtol=1e-6, atol=1e-6)
    # A single device of weight one gets its dense tensors back bit for bit.
    single = PowerSGD(LAYOUT, RANK, SEED).run(xs[:1], torch.ones(1), step=0)
    assert torch.equal(single.aggregate[dense], xs[0][dense])


def test_residual_has_no_component_in_the_span_of_p_hat() -> None:
    xs = _inputs(3)
    result = PowerSGD(LAYOUT, RANK, SEED).run(xs, WEIGHTS, step=0)
    p_hats = _p_hats(result)
    for x, sent in zip(xs, result.sent, strict=True):
        residuals = _matrices(x - sent)
        for ph, res in zip(p_hats, residuals, strict=True):
            if ph is None or res is None:
                continue
            projection = ph.T @ res
            torch.testing.assert_close(projection, torch.zeros_like(projection), atol=1e-5, rtol=0)
            # ... and the residual is not trivially zero: rank 2 does not capture noise.
            assert float(res.norm()) > 0.1


def test_run_is_pure_and_commit_changes_the_next_step() -> None:
    xs = _inputs(3)
    copies = [x.clone() for x in xs]
    c = PowerSGD(LAYOUT, RANK, SEED)
    first, second = c.run(xs, WEIGHTS, step=0), c.run(xs, WEIGHTS, step=0)
    assert all(torch.equal(a, b) for a, b in zip(xs, copies, strict=True))
    assert torch.equal(first.aggregate, second.aggregate)
    for a, b in zip(first.sent, second.sent, strict=True):
        assert torch.equal(a, b)
    for pa, pb in zip(first.payloads, second.payloads, strict=True):
        for x, y in zip(pa, pb, strict=True):
            assert torch.equal(_values(x), _values(y))
    # Same seed, same start; another seed, another start.
    assert torch.equal(PowerSGD(LAYOUT, RANK, SEED).run(xs, WEIGHTS, 0).aggregate, first.aggregate)
    other = PowerSGD(LAYOUT, RANK, SEED + 1).run(xs, WEIGHTS, 0).aggregate
    assert not torch.equal(other, first.aggregate)

    c.commit(first)
    third = c.run(xs, WEIGHTS, step=1)
    assert not torch.equal(third.aggregate, first.aggregate)
    # The warm start is a copy: changing the committed result afterwards changes nothing.
    _values(first.reductions[1]).zero_()
    assert torch.equal(c.run(xs, WEIGHTS, step=1).aggregate, third.aggregate)


def test_commit_rejects_a_result_of_another_layout() -> None:
    c = PowerSGD(LAYOUT, RANK, SEED)
    wrong = PowerSGD(Layout(((9, 9),)), RANK, SEED).run([torch.ones(81)], torch.ones(1), 0)
    with pytest.raises(ValueError):
        c.commit(wrong)


def test_floats_sent_per_device_are_the_factors_plus_dense() -> None:
    c = PowerSGD(LAYOUT, RANK, SEED)
    result = c.run(_inputs(2), torch.tensor([0.25, 0.75]), step=0)
    factors = sum(r * (rows + cols) for p in PLAN if p is not None for rows, cols, r in [p])
    dense = sum(math.prod(s) for s, p in zip(SHAPES, PLAN, strict=True) if p is None)
    assert dense == 6 + 9 + 5 + 14 + 7
    for i in range(2):
        assert sum(phase[i].numel for phase in result.payloads) == factors + dense
    assert c.floats_per_device == factors + dense < LAYOUT.numel


def test_rank_is_validated() -> None:
    with pytest.raises(ValueError):
        PowerSGD(LAYOUT, 0, SEED)
