"""Tests for the model zoo and per-sample model cost measurement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeddl.models import MODEL_NAMES, build_model, model_cost


def _num_params(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


@pytest.mark.parametrize(
    ("name", "input_shape", "num_classes"),
    [
        ("mlp", (1, 40), 10),
        ("mlp", (3, 8, 8), 4),
        ("cnn1d", (1, 40), 10),
        ("cnn1d", (2, 17), 3),
        ("resnet20", (3, 32, 32), 10),
        ("resnet32", (3, 32, 32), 100),
        ("resnet56", (1, 8, 8), 10),
    ],
)
def test_output_shapes(name: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, input_shape=input_shape, num_classes=num_classes)
    out = model(torch.randn(3, *input_shape))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


def test_param_counts() -> None:
    cifar = {"input_shape": (3, 32, 32), "num_classes": 10}
    assert 4_000 <= _num_params(build_model("cnn1d", input_shape=(1, 40), num_classes=10)) <= 6_000
    resnet20 = _num_params(build_model("resnet20", **cifar))
    resnet32 = _num_params(build_model("resnet32", **cifar))
    resnet56 = _num_params(build_model("resnet56", **cifar))
    assert 450_000 <= resnet32 <= 470_000
    assert resnet20 < resnet32 < resnet56
    # 40 -> 128 -> 128 -> 10 with biases.
    mlp = build_model("mlp", input_shape=(1, 40), num_classes=10)
    assert _num_params(mlp) == 40 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10


def test_width_changes_capacity() -> None:
    narrow = build_model("mlp", input_shape=(1, 40), num_classes=10, width=8)
    assert _num_params(narrow) == 40 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10
    wide_cnn = build_model("cnn1d", input_shape=(1, 40), num_classes=10, width=50)
    assert _num_params(wide_cnn) > 3 * _num_params(
        build_model("cnn1d", input_shape=(1, 40), num_classes=10)
    )
    resnet = build_model("resnet20", input_shape=(3, 16, 16), num_classes=10, width=8)
    assert resnet(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert _num_params(resnet) < _num_params(
        build_model("resnet20", input_shape=(3, 16, 16), num_classes=10)
    )


def test_resnet_shortcuts_are_parameter_free() -> None:
    model = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10)
    # Option A: every parameter belongs to a conv, BatchNorm or the head, none to a shortcut.
    assert not [name for name, _ in model.named_parameters() if "shortcut" in name]


def test_build_is_seed_driven_by_caller() -> None:
    torch.manual_seed(5)
    first = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10)
    torch.manual_seed(5)
    second = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10)
    third = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10)
    first_state, second_state = first.state_dict(), second.state_dict()
    assert all(torch.equal(first_state[key], second_state[key]) for key in first_state)
    assert not torch.equal(first.head.weight, third.head.weight)


@pytest.mark.parametrize(
    ("name", "input_shape", "match"),
    [
        ("transformer", (1, 40), "mlp.*cnn1d.*resnet20.*resnet32.*resnet56"),
        ("cnn1d", (3, 32, 32), "2-D"),
        ("cnn1d", (40,), "2-D"),
        ("cnn1d", (1, 2), "too short"),
        ("resnet32", (1, 40), "3-D"),
        ("mlp", (), "input_shape"),
    ],
)
def test_build_errors(name: str, input_shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(name, input_shape=input_shape, num_classes=10)


def test_model_names_all_build() -> None:
    for name in MODEL_NAMES:
        shape = (1, 40) if name in ("mlp", "cnn1d", "cnn1d_bn", "autoencoder1d") else (3, 8, 8)
        assert isinstance(build_model(name, input_shape=shape, num_classes=2), nn.Module)


def test_model_cost_of_mlp_matches_hand_count() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 40), num_classes=10, width=16)
    cost = model_cost(model, (1, 40))
    num_macs = 40 * 16 + 16 * 16 + 16 * 10
    assert cost.num_params == _num_params(model)
    assert cost.param_bytes == 4 * cost.num_params
    assert cost.forward_flops_per_sample == 2 * num_macs
    # Backward: weight grads for all 3 layers, input grads for the 2 upper ones only.
    assert cost.train_flops_per_sample == 2 * (num_macs + num_macs + 16 * 16 + 16 * 10)
    # Leaf outputs: flatten 40, linear 16, relu 16, linear 16, relu 16, linear 10.
    assert cost.activation_bytes_per_sample == 4 * (40 + 16 * 4 + 10)


@pytest.mark.parametrize(("name", "input_shape"), [("cnn1d", (1, 40)), ("resnet32", (3, 32, 32))])
def test_model_cost_deterministic_and_train_exceeds_forward(
    name: str, input_shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model = build_model(name, input_shape=input_shape, num_classes=10)
    cost = model_cost(model, input_shape)
    assert model_cost(model, input_shape) == cost
    assert 2.0 <= cost.train_flops_per_sample / cost.forward_flops_per_sample <= 3.5
    assert cost.activation_bytes_per_sample > 0


def test_model_cost_leaves_model_untouched() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(3, 16, 16), num_classes=10)
    model.eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    rng_before = torch.get_rng_state()

    model_cost(model, (3, 16, 16))

    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)  # incl. BN running stats
    assert all(param.grad is None for param in model.parameters())
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng_before)
