"""The compressed data-parallel pipeline: per-device passes, payloads, aggregate, memories."""

from __future__ import annotations

import copy
import tomllib

import numpy as np
import pytest
import torch
from torch.nn.functional import cross_entropy

from edgeddl.compress.base import Payload
from edgeddl.compress.codec import Codec, CodecError
from edgeddl.config.compression import CompressionConfig, CompressorConfig
from edgeddl.config.loader import scenario_from_dict
from edgeddl.config.schema import TrainConfig
from edgeddl.models import build_model
from edgeddl.security.keys import Identity
from edgeddl.strategy.build import build_strategy
from edgeddl.strategy.compressed import CompressedDataParallel
from edgeddl.strategy.data_parallel import DataParallel

COUNTS = [5, 3, 8]


def _resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet20", input_shape=(3, 8, 8), num_classes=4, width=4).double()


def _batches(num_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    n = sum(COUNTS)
    return [
        (
            torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (n,), generator=g),
        )
        for _ in range(num_steps)
    ]


def _compressed(model: torch.nn.Module, name: str, **kw: object) -> CompressedDataParallel:
    comp = CompressionConfig(compressor=name, **kw)  # type: ignore[arg-type]
    settings = [CompressorConfig(compressor=name, **kw)] * len(COUNTS)  # type: ignore[arg-type]
    return CompressedDataParallel(model, TrainConfig(lr=0.1), comp, settings, seed=0)


def _run(strategy: DataParallel, masks: list[np.ndarray]) -> list[float]:
    devices = np.arange(len(COUNTS))
    losses = []
    for step, ((x, y), ok) in enumerate(zip(_batches(len(masks)), masks, strict=True)):
        ex = strategy.prepare(x, y, COUNTS, devices, step)
        loss = strategy.commit(ex, ok)
        assert loss is not None
        losses.append(float(loss))
    return losses


def test_none_follows_the_fused_trajectory_with_batchnorm_and_a_crash() -> None:
    """Per-device passes + codec + mean equal one fused pass (float64, a BatchNorm model)."""
    masks = [np.array([True, True, True])] * 3 + [np.array([True, False, True])] * 2
    fused_model, comp_model = _resnet(), _resnet()
    fused = _run(DataParallel(fused_model, TrainConfig(lr=0.1)), masks)
    # The compressed path aggregates in float32 on the wire: compare to float32 tolerance.
    comp = _run(_compressed(comp_model, "none"), masks)
    assert comp == pytest.approx(fused, rel=1e-5)
    for a, b in zip(
        fused_model.state_dict().values(), comp_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)


def test_topk_sends_few_bytes_and_the_sparse_union_comes_back() -> None:
    model = _resnet().float()
    s = _compressed(model, "topk", density=0.01)
    x, y = _batches(1)[0]
    ex = s.prepare(x.float(), y, COUNTS, np.arange(3), 0)
    dense = s.dense_up_bytes
    assert (ex.up_bytes < dense / 20).all()
    s.commit(ex, np.array([True, True, True]))
    # The union of three 1 % payloads is at most 3 %: the aggregate goes back sparse.
    assert 0 < s.last_down_bytes < dense / 10
    down = s.down_bytes(np.array([False, True, False]))
    # A device that missed a step fetches the model and the momentum its optimizer keeps.
    assert down[1] == s.state_bytes + 4 * s.numel and down[0] == s.last_down_bytes


def test_memory_keeps_what_was_not_sent_and_a_crash_forgets_it() -> None:
    model = _resnet().float()
    s = _compressed(model, "topk", density=0.01)
    x, y = _batches(1)[0]
    ex = s.prepare(x.float(), y, COUNTS, np.arange(3), 0)
    grads = [u.own.clone() for u in ex.updates if u.own is not None]
    received = [s.decode(u.device, u.payload or b"") for u in ex.updates]
    s.commit(ex, np.array([True, False, True]))
    assert 1 not in s.memories  # the crashed device restarts from nothing
    k = round(0.01 * s.numel)
    for d in (0, 2):
        residual = s.memories[d].residual
        assert residual is not None
        # What stays is what the decoded payload did not carry: the top 1 % left.
        sent = s.compressors[d].decompress(received[d], 0)
        assert int((sent != 0).sum()) == k
        torch.testing.assert_close(residual, grads[d] - sent)
        assert bool((residual[sent != 0] == 0).all())
        kept = residual.abs().max()
        assert bool((sent[sent != 0].abs() >= kept).all())  # it sent the largest ones
    s.forget(0)
    assert 0 not in s.memories and 0 not in s.compressors


def test_balancing_sees_the_compressed_size_before_the_first_step() -> None:
    s = _compressed(_resnet().float(), "topk", density=0.01)
    cost = s.step_cost(np.arange(3))
    up, down = cost.up_bytes, cost.down_bytes
    assert (up < s.dense_up_bytes / 20).all()
    assert (down <= up.sum()).all()  # the union of the payloads, before any aggregate


def test_dgc_weight_decay_joins_the_gradient_before_the_memory() -> None:
    model = _resnet().float()
    plain = _compressed(copy.deepcopy(model), "dgc", density=0.01)
    comp = CompressionConfig(compressor="dgc", density=0.01)
    settings = [CompressorConfig(compressor="dgc", density=0.01)] * 3
    decayed = CompressedDataParallel(
        model, TrainConfig(lr=0.1, weight_decay=0.01), comp, settings, seed=0
    )
    assert decayed.optimizer.param_groups[0]["weight_decay"] == 0.0
    x, y = _batches(1)[0]
    g0 = plain.prepare(x.float(), y, COUNTS, np.arange(3), 0).updates[0].own
    g1 = decayed.prepare(x.float(), y, COUNTS, np.arange(3), 0).updates[0].own
    assert g0 is not None and g1 is not None
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(g1, g0 + 0.01 * flat)


def test_dgc_moves_the_momentum_into_the_memory() -> None:
    s = _compressed(_resnet().float(), "dgc", density=0.01)
    assert s.optimizer.param_groups[0]["momentum"] == 0.0
    assert _compressed(_resnet().float(), "topk").optimizer.param_groups[0]["momentum"] == 0.9


def test_powersgd_runs_two_rounds_and_recomputes_without_a_crashed_device() -> None:
    model = _resnet().float()
    s = _compressed(model, "powersgd", rank=1)
    x, y = _batches(1)[0]
    ex = s.prepare(x.float(), y, COUNTS, np.arange(3), 0)
    assert ex.up_bytes.shape == (2, 3) and len(ex.mid_down_bytes) == 1
    assert (ex.up_bytes.sum(axis=0) < s.dense_up_bytes / 2).all()
    before = [p.detach().clone() for p in s.params]
    assert s.commit(ex, np.array([True, False, True])) is not None
    assert any(not torch.equal(a, p) for a, p in zip(before, s.params, strict=True))


def test_fp16_wire_values_are_what_the_aggregator_uses() -> None:
    model = _resnet().float()
    ref = copy.deepcopy(model)
    s = _compressed(model, "none", values="fp16")
    x, y = _batches(1)[0]
    ex = s.prepare(x.float(), y, COUNTS, np.arange(3), 0)
    assert (ex.up_bytes < 0.6 * s.dense_up_bytes).all()
    for u in ex.updates:
        p = s.decode(u.device, u.payload or b"")
        assert p.values is not None
        assert torch.equal(p.values, p.values.half().float())  # rounded on the wire
    s.commit(ex, np.array([True, True, True]))
    assert any(
        not torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters(), strict=True)
    )


@pytest.mark.parametrize("compression", ["", '[compression]\ncompressor = "topk"\ndensity = 0.1\n'])
def test_a_secured_strategy_decodes_no_payload_past_the_configured_limit(
    compression: str,
) -> None:
    """With [security] on, `max_payload_bytes` bounds what an update decodes to: a frame of
    a few bytes stating a dense body of 20 kB is refused (the model alone allows it)."""
    text = (
        '[[fleet.devices]]\nname = "pi"\nprofile = "rpi4"\ncount = 2\n'
        '[data]\ndataset = "mnist1d"\n[model]\nname = "cnn1d"\n' + compression
    )
    secured = text + "[security]\nenabled = true\nmax_payload_bytes = 4096\n"
    secured += Identity.generate("coordinator").public().scenario_toml()
    plain, limited = _strategy(text), _strategy(secured)
    numel = plain.numel + plain.extras_size()
    frame = Codec(zstd=True).encode(Payload(numel, values=torch.zeros(numel)))
    assert len(frame) < 100 and 4 * numel > 4096
    assert plain.decode_body(0, frame) is not None
    with pytest.raises(CodecError, match=r"at most 4096 allowed$"):
        limited.decode_body(0, frame)


def _strategy(toml: str) -> DataParallel:
    model = build_model("cnn1d", input_shape=(1, 40), num_classes=10)
    strategy, _ = build_strategy(scenario_from_dict(tomllib.loads(toml)), model, cross_entropy)
    return strategy
