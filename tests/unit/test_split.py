"""Split learning's maths (`models/layers.py`, `strategy/split/maths.py`): the cut, the gradients
each side gets, SplitFed's equivalence with a data-parallel step, and what crosses the cut."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from edgeddl.config.compression import CompressorConfig
from edgeddl.config.schema import TrainConfig
from edgeddl.config.split import SplitConfig
from edgeddl.models import build_model
from edgeddl.models.layers import model_layers, resolve_cut, split_model
from edgeddl.strategy.data_parallel import DataParallel
from edgeddl.strategy.split.learning import SplitLearning
from edgeddl.strategy.split.maths import SplitModels
from edgeddl.strategy.split.roles import CutWire, RearServer, device_step

CE = nn.functional.cross_entropy


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn1d", input_shape=(1, 40), num_classes=10).double()


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 40, generator=g, dtype=torch.float64), torch.randint(
        0, 10, (n,), generator=g
    )


def _grads(modules: list[nn.Module]) -> list[torch.Tensor]:
    return [p.grad.clone() for m in modules for p in m.parameters()]  # type: ignore[union-attr]


def _wire_step(
    split: SplitModels, batches: list[tuple[torch.Tensor, torch.Tensor]], step: int = 0
) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """One step of every device through a lossless wire to a rear server that applies no
    update (lr 0): the rear keeps the step's mean gradient. (The mean loss; every tensor
    that was encoded, with its kind.)"""
    wire = CutWire(SplitConfig(cut=1), 10, 0)
    sent: list[tuple[str, torch.Tensor]] = []
    encode = wire.encode

    def spying(t: torch.Tensor, kind: str, device: int, step: int) -> bytes:
        sent.append((kind, t.detach().clone()))
        return encode(t, kind, device, step)

    wire.encode = spying  # type: ignore[method-assign]
    cost = split.costs((1, 40))
    rear = RearServer(split, wire, torch.optim.SGD(split.rear.parameters(), lr=0.0), cost)
    losses = []
    for k, (x, y) in enumerate(batches):

        def call(kind: str, payloads: list[bytes], k: int = k, n: int = len(x)):
            return rear.handle(kind, k, step, n, payloads)

        losses.append(device_step(split, wire, cost, k, x, y, step, call))
    counts = [len(b[0]) for b in batches]
    assert rear.commit(step, list(range(len(batches))), counts)
    w = torch.tensor(counts, dtype=torch.float32) / sum(counts)
    return (torch.stack(losses) * w).sum(), sent


@pytest.mark.parametrize("head_cut", [None, "5"])
def test_one_device_gets_the_whole_models_gradients(head_cut: str | None) -> None:
    model = _float_cnn()
    x, y = _float_batch(16, 1)
    CE(model(x), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    split = SplitModels(copy.deepcopy(model), "1", 1, CE, head_cut=head_cut)
    for p in [*split.fronts[0].parameters(), *split.rear.parameters()]:
        p.grad = None
    loss, sent = _wire_step(split, [(x, y)])
    got = _grads([split.fronts[0], split.rear, *(split.heads or [])])
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(loss, CE(model(x), y).detach())
    # Nothing that crosses is the raw input; labels cross only when the head is not kept.
    assert all(t.shape != x.shape or not torch.equal(t, x) for _, t in sent)
    kinds = [k for k, _ in sent]
    assert ("labels" in kinds) == (head_cut is None)
    up = ["activations", "labels"] if head_cut is None else ["activations", "head_gradients"]
    assert set(kinds) == {*up, "cut_gradients", *([] if head_cut is None else ["outputs"])}


def test_splitfed_averaging_is_a_data_parallel_step() -> None:
    model, lr = _float_cnn(), 0.1
    batches = [_float_batch(12, 2), _float_batch(4, 3), _float_batch(8, 4)]
    split = SplitModels(copy.deepcopy(model), "3", 3, CE)
    _wire_step(split, batches)
    with torch.no_grad():
        for m in [*split.fronts, split.rear]:
            for p in m.parameters():
                p -= lr * p.grad  # type: ignore[operator]
    split.average_devices([0, 1, 2], [12 / 24, 4 / 24, 8 / 24])
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    CE(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad  # type: ignore[operator]
    for k in range(3):
        whole = split.whole(k)
        for a, b in zip(whole.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(a, b)


def test_cuts_by_name_and_index_and_the_errors() -> None:
    layers = model_layers(_cnn())  # conv, relu, conv, relu, conv, relu, flatten, linear
    assert resolve_cut(layers, "1") == 2 and resolve_cut(layers, 1) == 2
    assert resolve_cut(layers, -2) == 7
    with pytest.raises(ValueError, match="no layer named 'conv9'"):
        resolve_cut(layers, "conv9")
    with pytest.raises(ValueError, match="leaves no layer"):
        resolve_cut(layers, 7)
    with pytest.raises(ValueError, match="the last layer"):
        resolve_cut(layers, "7")
    with pytest.raises(ValueError, match="must come after the cut"):
        split_model(_cnn(), "3", head_cut="1")

    class Opaque(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(ValueError, match="cannot be split"):
        model_layers(Opaque())


def test_a_resnet_is_its_layers_end_to_end() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(3, 8, 8), num_classes=4, width=4).eval()
    names = [n for n, _ in model_layers(model)]
    assert names[0] == "stem" and names[-2:] == ["pool", "head"] and "block4" in names
    x = torch.randn(2, 3, 8, 8)
    parts = split_model(model, "block2")
    torch.testing.assert_close(parts.rear(parts.front(x)), model(x))


@pytest.mark.parametrize("head_cut", [None, "5"])
def test_the_parts_costs_add_up_to_the_whole_models(head_cut: str | None) -> None:
    from edgeddl.models import model_cost

    model = _cnn().float()  # as the simulator measures it
    whole = model_cost(model, (1, 40))
    cost = SplitModels(copy.deepcopy(model), "1", 2, CE, head_cut=head_cut).costs((1, 40))
    parts = cost.front_flops + cost.rear_flops + cost.head_flops
    assert parts == whole.train_flops_per_sample  # the same arithmetic, split
    assert cost.front_flops > 0 and cost.rear_flops > 0
    assert cost.cut_bytes == 25 * 19 * 4  # 25 channels x length 19 after the first conv, fp32
    assert (cost.head_cut_bytes > 0) == (head_cut is not None)


# --- the strategy: SplitLearning's steps, lost devices, the cut's wire ------------------------


def _strategy(model: nn.Module, num_devices: int, **split: Any) -> SplitLearning:
    train = TrainConfig(lr=0.1, momentum=0.0)
    cfg = SplitConfig(**split)
    return SplitLearning(model, train, cfg, num_devices, (1, 40), 10, seed=0, loss_fn=CE)


def _step(
    s: SplitLearning,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    arrived: list[bool],
    step: int = 0,
):
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    counts = [len(b[0]) for b in batches]
    ex = s.prepare(x, y, counts, np.arange(len(batches)), step)
    return ex, s.commit(ex, np.array(arrived))


def _float_cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn1d", input_shape=(1, 40), num_classes=10)


def _float_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _batch(n, seed)
    return x.float(), y


def test_splitfed_steps_equal_data_parallel_steps_of_the_whole_model() -> None:
    model = _float_cnn()
    reference = DataParallel(copy.deepcopy(model), TrainConfig(lr=0.1, momentum=0.0), CE)
    split = _strategy(model, 3, cut=3, splitfed=True)
    for step in range(2):
        batches = [_float_batch(n, 10 * step + i) for i, n in enumerate((12, 4, 8))]
        _, loss = _step(split, batches, [True] * 3, step)
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        expected = reference.step(x, y, [12, 4, 8])
        assert loss is not None
        torch.testing.assert_close(loss, expected)
    final = zip(
        split.model.state_dict().items(), reference.model.state_dict().values(), strict=True
    )
    for (name, a), b in final:
        torch.testing.assert_close(a, b, msg=name)
    for front in split.parts.fronts:  # every device starts the next step from the average
        for a, b in zip(front.parameters(), split.global_modules[0].parameters(), strict=True):
            assert torch.equal(a, b)


def test_a_lost_devices_share_is_left_out_and_its_front_unchanged() -> None:
    model = _float_cnn()
    batches = [_float_batch(6, 1), _float_batch(10, 2)]
    alone = _strategy(copy.deepcopy(model), 2, cut=3)
    _step(alone, [batches[0]], [True])
    split = _strategy(model, 2, cut=3)
    before = copy.deepcopy(split.parts.fronts[1].state_dict())
    _step(split, batches, [True, False])
    for a, b in zip(split.parts.rear.parameters(), alone.parts.rear.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(
        split.parts.fronts[0].parameters(), alone.parts.fronts[0].parameters(), strict=True
    ):
        torch.testing.assert_close(a, b)
    for name, value in split.parts.fronts[1].state_dict().items():
        assert torch.equal(value, before[name]), name
    assert (
        split.commit(split.prepare(*_cat(batches), [6, 10], np.arange(2), 1), np.zeros(2, bool))
        is None
    )


def _cat(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.mark.parametrize("labels", ["send", "u_shaped"])
def test_the_cut_wire_counts_encoded_bytes_and_compresses(labels: str) -> None:
    batches = [_float_batch(16, 5)]
    plain = _strategy(_float_cnn(), 1, cut=1, labels=labels)
    ex, _ = _step(plain, batches, [True])
    a = 16 * plain.cost.cut_bytes  # fp32 activations (and their gradient back)
    legs = {leg.kind: leg.amount for leg in ex.legs}
    if labels == "send":  # labels as 4-bit codes: 8 bytes for 16, plus codec headers
        assert a + 8 < legs["up"][0] <= a + 8 + 20
        assert [k for _, k, _ in plain.wire.sent] == ["activations", "labels", "cut_gradients"]
    else:
        assert "labels" not in [k for _, k, _ in plain.wire.sent]
    assert int(ex.up_bytes.sum()) == sum(
        leg.amount[0] for leg in ex.legs if leg.kind == "up"
    )
    int8 = _strategy(
        _float_cnn(), 1, cut=1, labels=labels, compression=CompressorConfig(compressor="int8")
    )
    ex8, loss8 = _step(int8, batches, [True])
    assert ex8.up_bytes.sum() < ex.up_bytes.sum() / 3.5  # one byte a value, a scale a sample
    assert loss8 is not None and torch.isfinite(loss8)
