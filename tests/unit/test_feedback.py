"""Error-feedback memories: nothing is lost, DGC's momentum, masking and clipping."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from edgeddl.compress.base import Compressor, ErrorFeedback, Layout
from edgeddl.compress.feedback import MomentumFeedback, NoFeedback, ResidualFeedback
from edgeddl.compress.quantize import (
    FP16Compressor,
    Int8Compressor,
    NoneCompressor,
    QSGDCompressor,
    SignSGDCompressor,
)

LAYOUT = Layout(((4, 3, 3, 3), (4,), (0,), (6, 5), (7,), (2, 2)))
N = LAYOUT.numel
STEPS = 6


class TopK:
    """A stand-in sparsifier (the largest k magnitudes), so masking has zeros to leave alone."""

    name = "topk"
    fixed_size = True
    allreduce = False
    num_phases = 1

    def __init__(self, k: int) -> None:
        self.k = k

    def compress(self, x: torch.Tensor, step: int) -> torch.Tensor:
        keep = x.abs().topk(self.k).indices
        out = torch.zeros_like(x)
        out[keep] = x[keep]
        return out


def round_trip(comp: Compressor | TopK) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """What the device itself reconstructs as sent, for its memory."""
    if isinstance(comp, TopK):
        return comp.compress
    return lambda x, step: comp.decompress(comp.compress(x, step), step)


COMPRESSORS: dict[str, Callable[[], Compressor | TopK]] = {
    "none": NoneCompressor,
    "fp16": FP16Compressor,
    "int8": lambda: Int8Compressor(LAYOUT),
    "qsgd": lambda: QSGDCompressor(LAYOUT, levels=2, seed=3),
    "signsgd": lambda: SignSGDCompressor(LAYOUT),
    "topk": lambda: TopK(N // 10),
}


def grads(steps: int = STEPS, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(N, generator=gen) for _ in range(steps)]


def test_memories_satisfy_the_protocol() -> None:
    memories: list[ErrorFeedback] = [ResidualFeedback(), MomentumFeedback(0.9), NoFeedback()]
    for memory in memories:
        assert memory.residual is None


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_residual_feedback_loses_nothing(name: str) -> None:
    send = round_trip(COMPRESSORS[name]())
    memory = ResidualFeedback()
    total_sent = torch.zeros(N, dtype=torch.float64)
    gs = grads()
    for step, g in enumerate(gs):
        before = memory.residual
        c = memory.compensate(g)
        expected = g if before is None else g + before
        assert torch.equal(c, expected)
        assert torch.equal(memory.compensate(g), c)  # pure
        sent = send(c, step)
        memory.commit(g, c, sent)
        residual = memory.residual
        assert residual is not None
        torch.testing.assert_close(sent + residual, c, rtol=1e-6, atol=1e-6)
        total_sent += sent.double()
    residual = memory.residual
    assert residual is not None
    total_grad = torch.stack(gs).double().sum(0)
    torch.testing.assert_close(total_sent + residual.double(), total_grad, rtol=0, atol=1e-4)


def test_residual_feedback_does_not_alias_the_gradient() -> None:
    memory = ResidualFeedback()
    g = grads(1)[0]
    c = memory.compensate(g)
    c.zero_()
    assert g.any()


@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_momentum_feedback_loses_nothing(name: str) -> None:
    send = round_trip(COMPRESSORS[name]())
    memory = MomentumFeedback(momentum=0.9)
    for step, g in enumerate(grads()):
        c = memory.compensate(g)
        assert torch.equal(memory.compensate(g), c)  # pure
        sent = send(c, step)
        memory.commit(g, c, sent)
        residual = memory.residual
        assert residual is not None
        torch.testing.assert_close(sent + residual, c, rtol=1e-6, atol=1e-6)


def test_momentum_feedback_follows_dgc() -> None:
    m = 0.9
    comp = TopK(N // 10)
    memory = MomentumFeedback(momentum=m)
    u = torch.zeros(N)
    v = torch.zeros(N)
    for step, g in enumerate(grads()):
        c = memory.compensate(g)
        u_next = m * u + g
        torch.testing.assert_close(c, v + u_next)
        sent = comp.compress(c, step)
        memory.commit(g, c, sent)
        mask = sent != 0
        u = u_next.masked_fill(mask, 0.0)
        v = c - sent
        velocity, residual = memory.velocity, memory.residual
        assert velocity is not None and residual is not None
        # Momentum factor masking: no velocity left where a value went out ...
        assert not velocity[mask].any()
        # ... and the rest of it kept.
        torch.testing.assert_close(velocity, u)
        torch.testing.assert_close(residual, v)
        assert not residual[mask].any()


def test_momentum_feedback_does_not_touch_the_gradient() -> None:
    memory = MomentumFeedback(momentum=0.5)
    g = grads(1)[0]
    kept = g.clone()
    c = memory.compensate(g)
    memory.commit(g, c, c.clone())  # everything sent: the whole velocity is masked
    assert torch.equal(g, kept)
    assert memory.velocity is not None and not memory.velocity.any()


@pytest.mark.parametrize("num_devices", [1, 4])
def test_momentum_feedback_clips_the_gradient(num_devices: int) -> None:
    clip_norm = 2.0
    threshold = clip_norm / math.sqrt(num_devices)
    memory = MomentumFeedback(momentum=0.0, clip_norm=clip_norm, num_devices=num_devices)
    big = grads(1)[0] * 100
    clipped = memory.clip(big)
    assert float(clipped.norm()) == pytest.approx(threshold, rel=1e-5)
    # The direction is kept.
    torch.testing.assert_close(clipped / clipped.norm(), big / big.norm())
    small = big / float(big.norm()) * threshold / 2
    assert torch.equal(memory.clip(small), small)
    assert not memory.clip(torch.zeros(N)).any()
    # With no momentum and nothing held back, the compressor sees the clipped gradient.
    torch.testing.assert_close(memory.compensate(big), clipped)


def test_momentum_feedback_without_clipping_passes_the_gradient() -> None:
    memory = MomentumFeedback(momentum=0.9)
    g = grads(1)[0] * 1e6
    assert torch.equal(memory.clip(g), g)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"momentum": 1.0},
        {"momentum": -0.1},
        {"momentum": 0.9, "clip_norm": -1.0},
        {"momentum": 0.9, "num_devices": 0},
    ],
)
def test_momentum_feedback_rejects_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MomentumFeedback(**kwargs)  # type: ignore[arg-type]


def test_no_feedback_remembers_nothing() -> None:
    memory = NoFeedback()
    g = grads(1)[0]
    c = memory.compensate(g)
    assert c is g
    memory.commit(g, c, torch.zeros_like(g))
    assert memory.residual is None
    assert memory.compensate(g) is g
