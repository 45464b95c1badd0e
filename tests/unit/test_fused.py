"""One fused pass over many devices' batches equals separate per-device passes, with BatchNorm."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from edgeddl.config.schema import TrainConfig
from edgeddl.strategy.data_parallel import DataParallel
from edgeddl.strategy.fused import segmented_batchnorm

COUNTS = [3, 5, 4]
N = sum(COUNTS)
NUM_CLASSES = 4


class BNNet(nn.Module):
    """Conv2d -> BatchNorm2d, then Conv1d -> BatchNorm1d on (N, C, L), Linear -> BatchNorm1d."""

    def __init__(self, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3, momentum=momentum)
        self.conv1 = nn.Conv1d(3, 4, 3, padding=1)
        self.bn1l = nn.BatchNorm1d(4, momentum=momentum)
        self.fc = nn.Linear(4 * 6 * 5, 8)
        self.bn1 = nn.BatchNorm1d(8, momentum=momentum)
        self.head = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn2(self.conv2(x)))  # (N, 3, 6, 5)
        n, c, hh, ww = h.shape
        h = torch.relu(self.bn1l(self.conv1(h.reshape(n, c, hh * ww))))  # (N, 4, 30)
        h = torch.relu(self.bn1(self.fc(h.flatten(1))))
        return self.head(h)


def _model(seed: int = 0, momentum: float | None = 0.1) -> BNNet:
    torch.manual_seed(seed)
    model = BNNet(momentum).double().train()
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Devices see different input distributions, so per-device statistics really differ.
    scale = torch.repeat_interleave(
        torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64), torch.tensor(COUNTS)
    )
    x = torch.randn(N, 2, 6, 5, generator=g, dtype=torch.float64) * scale.view(-1, 1, 1, 1)
    x = x + scale.view(-1, 1, 1, 1)
    y = torch.randint(0, NUM_CLASSES, (N,), generator=g)
    return x, y


def _bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _separate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, counts: list[int]):  # type: ignore[no-untyped-def]
    """Per-device passes on copies of `model`: the sample-weighted loss, gradient and BN state."""
    loss, grads, states, start = 0.0, None, [], 0
    for n in counts:
        replica = copy.deepcopy(model)
        out = replica(x[start : start + n])
        l_k = nn.functional.cross_entropy(out, y[start : start + n])
        l_k.backward()
        w = n / sum(counts)
        loss += w * float(l_k.detach())
        g = [w * t for t in _grads(replica)]
        grads = g if grads is None else [a + b for a, b in zip(grads, g, strict=True)]
        states.append((w, _bns(replica)))
        start += n
    return loss, grads, states


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_pass_equals_separate_per_device_passes(momentum) -> None:
    x, y = _batch()
    reference = _model(momentum=momentum)
    fused = copy.deepcopy(reference)
    for m in _bns(fused):
        m.num_batches_tracked.fill_(3)  # cumulative averaging (momentum None) uses the count
    for m in _bns(reference):
        m.num_batches_tracked.fill_(3)
    sep_loss, sep_grads, states = _separate(reference, x, y, COUNTS)

    with segmented_batchnorm(fused, COUNTS):
        loss = nn.functional.cross_entropy(fused(x), y)
    loss.backward()

    assert float(loss.detach()) == pytest.approx(sep_loss, rel=1e-12)
    for g_fused, g_sep in zip(_grads(fused), sep_grads, strict=True):
        torch.testing.assert_close(g_fused, g_sep, rtol=1e-10, atol=1e-12)
    # Running statistics: the sample-weighted mean of what each device's pass would leave.
    for k, bn in enumerate(_bns(fused)):
        mean = sum(w * bns[k].running_mean for w, bns in states)
        var = sum(w * bns[k].running_var for w, bns in states)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-10, atol=1e-12)
        assert int(bn.num_batches_tracked) == 4 == int(states[0][1][k].num_batches_tracked)


def test_fused_pass_differs_from_a_plain_pass_over_the_concatenation() -> None:
    # Guards the test above: without segmenting, BatchNorm couples the devices' samples.
    x, y = _batch()
    model = _model()
    plain = nn.functional.cross_entropy(copy.deepcopy(model)(x), y)
    with segmented_batchnorm(model, COUNTS):
        fused = nn.functional.cross_entropy(model(x), y)
    assert abs(float(plain.detach()) - float(fused.detach())) > 1e-6


def test_one_segment_is_exactly_the_plain_forward() -> None:
    x, _ = _batch()
    model = _model()
    plain_model = copy.deepcopy(model)
    with segmented_batchnorm(model, [N]):
        out = model(x)
    expected = plain_model(x)
    assert torch.equal(out, expected)
    for a, b in zip(_bns(model), _bns(plain_model), strict=True):
        assert torch.equal(a.running_mean, b.running_mean)
        assert torch.equal(a.running_var, b.running_var)


def test_forward_is_restored_after_the_block_even_on_error() -> None:
    x, _ = _batch()
    model = _model()
    plain_model = copy.deepcopy(model)
    with segmented_batchnorm(model, COUNTS):
        assert all("forward" in vars(bn) for bn in _bns(model))
    assert all("forward" not in vars(bn) for bn in _bns(model))
    with pytest.raises(RuntimeError, match="boom"), segmented_batchnorm(model, COUNTS):
        raise RuntimeError("boom")
    assert all("forward" not in vars(bn) for bn in _bns(model))
    # Back to plain BatchNorm: the same output as an untouched copy (both update statistics
    # the same way from here on).
    for a, b in zip(_bns(model), _bns(plain_model), strict=True):
        a.load_state_dict(b.state_dict())
    assert torch.equal(model(x), plain_model(x))


def test_layers_in_eval_mode_are_left_alone() -> None:
    x, _ = _batch()
    model = _model().eval()
    expected = copy.deepcopy(model)(x)
    with segmented_batchnorm(model, COUNTS):
        assert all("forward" not in vars(bn) for bn in _bns(model))
        out = model(x)
    assert torch.equal(out, expected)


# --- DataParallel -----------------------------------------------------------------------------


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, NUM_CLASSES)).double()


def test_data_parallel_step_equals_sgd_on_the_concatenated_batch() -> None:
    g = torch.Generator().manual_seed(3)
    cfg = TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.01)
    model = _mlp()
    manual = [p.detach().clone() for p in copy.deepcopy(model).parameters()]
    dp = DataParallel(model, cfg)
    bufs: list[torch.Tensor | None] = [None] * len(manual)
    for _ in range(3):
        x = torch.randn(N, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, NUM_CLASSES, (N,), generator=g)
        # By hand: mean loss over all samples, weight decay, heavy-ball momentum, one step.
        params = [p.clone().requires_grad_(True) for p in manual]
        h = torch.tanh(x @ params[0].T + params[1])
        loss = nn.functional.cross_entropy(h @ params[2].T + params[3], y)
        grads = torch.autograd.grad(loss, params)
        for i, (p, grad) in enumerate(zip(manual, grads, strict=True)):
            d = grad + cfg.weight_decay * p
            bufs[i] = d.clone() if bufs[i] is None else cfg.momentum * bufs[i] + d
            manual[i] = p - cfg.lr * bufs[i]
        got = dp.step(x, y, COUNTS)
        assert got == pytest.approx(float(loss.detach()), rel=1e-12)
    for p, q in zip(model.parameters(), manual, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-14)


def test_data_parallel_step_with_batchnorm_equals_averaged_device_gradients() -> None:
    x, y = _batch()
    cfg = TrainConfig(lr=0.5, momentum=0.0)
    model = _model()
    start = copy.deepcopy(model)
    _, sep_grads, _ = _separate(start, x, y, COUNTS)
    DataParallel(model, cfg).step(x, y, COUNTS)
    for p, p0, g in zip(model.parameters(), start.parameters(), sep_grads, strict=True):
        torch.testing.assert_close(p.detach(), p0.detach() - cfg.lr * g, rtol=1e-10, atol=1e-12)


def test_payload_bytes_counts_fp32_gradients_up_and_float_state_down() -> None:
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    cost = DataParallel(model, TrainConfig()).step_cost(np.arange(2))
    ups, downs = cost.up_bytes, cost.down_bytes
    assert ups[0] == ups[1] and downs[0] == downs[1]
    up, down = ups[0], downs[0]
    params = 5 * 7 + 7 + 7 + 7 + 7 * 3 + 3  # weights, biases, BN affine
    # fp32 values on the wire, plus the codec's bytes: version, flags, length, value count.
    assert up == 4 * params + 4
    assert down == 4 * (params + 7 + 7)  # plus running mean and var, not the int64 counter
    assert DataParallel(model, TrainConfig()).aggregation_flops() == 2.0 * params


def test_segmented_batchnorm_is_exact_when_the_mean_dwarfs_the_spread() -> None:
    # float32, offset 1000, spread 0.05: E[x^2] - mean^2 was off by up to 48 here; what is left
    # is float32's own resolution of values near 1000 (ulp 6e-5 against a spread of 0.05).
    torch.manual_seed(0)
    x = 1000.0 + 0.05 * torch.randn(12, 4, 8)
    counts = [5, 7]
    fused_bn, ref_bn = torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    with segmented_batchnorm(fused_bn, counts):
        fused = fused_bn(x)
    separate = torch.cat([ref_bn(part) for part in torch.split(x, counts)])
    torch.testing.assert_close(fused, separate, atol=1e-2, rtol=0.0)
