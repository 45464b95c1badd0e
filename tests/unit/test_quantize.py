"""Dense compressors: payload formats, error bounds, QSGD's unbiasedness, capabilities."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from edgeddl.compress.base import Compressor, Layout, Payload
from edgeddl.compress.quantize import (
    FP16Compressor,
    Int8Compressor,
    NoneCompressor,
    QSGDCompressor,
    SignSGDCompressor,
)

# A conv weight, its bias, an empty tensor, a linear weight, a layer that is all zeros in
# the test gradients, and a tiny one: every case a per-layer scale has to get right.
LAYOUT = Layout(((4, 3, 3, 3), (4,), (0,), (6, 5), (7,), (2, 2)))
ZERO_LAYER = 4
NUM_LAYERS = len(LAYOUT.shapes)

FACTORIES: dict[str, Callable[[], Compressor]] = {
    "none": NoneCompressor,
    "fp16": FP16Compressor,
    "int8": lambda: Int8Compressor(LAYOUT),
    "qsgd": lambda: QSGDCompressor(LAYOUT, levels=4, seed=0),
    "signsgd": lambda: SignSGDCompressor(LAYOUT),
}


def grad(seed: int = 0) -> torch.Tensor:
    """A flat gradient whose layers differ in magnitude by orders, one layer all zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(LAYOUT.numel, generator=gen)
    for i, layer in enumerate(LAYOUT.split(x)):
        layer.mul_(10.0 ** (i - 2))
    LAYOUT.split(x)[ZERO_LAYER].zero_()
    return x


def layers(x: torch.Tensor) -> list[torch.Tensor]:
    return [t.reshape(-1) for t in LAYOUT.split(x)]


@pytest.mark.parametrize("name", list(FACTORIES))
def test_payload_and_output_format(name: str) -> None:
    comp = FACTORIES[name]()
    x = grad()
    payload = comp.compress(x, step=0)
    assert payload.numel == LAYOUT.numel
    assert payload.num_sent == LAYOUT.numel
    assert payload.indices is None
    if payload.values is not None:
        assert payload.values.shape == (LAYOUT.numel,)
        assert payload.values.dtype in (torch.float32, torch.float16)
        assert payload.codes is None
    else:
        codes = payload.codes
        assert codes is not None
        assert codes.dtype == torch.int64 and codes.shape == (LAYOUT.numel,)
        assert 1 <= payload.bits <= 16
        assert int(codes.min()) >= 0 and int(codes.max()) < 2**payload.bits
        assert payload.scales is not None
        assert payload.scales.dtype == torch.float32 and payload.scales.shape == (NUM_LAYERS,)
    out = comp.decompress(payload, step=0)
    assert out.shape == (LAYOUT.numel,) and out.dtype == torch.float32
    assert out.device == x.device
    assert not layers(out)[ZERO_LAYER].any()


CAPABILITIES = {
    "none": (True, True),
    "fp16": (True, True),
    "int8": (True, False),
    "qsgd": (True, False),
    "signsgd": (True, False),
}


@pytest.mark.parametrize("name", list(FACTORIES))
def test_capabilities(name: str) -> None:
    comp = FACTORIES[name]()
    assert comp.name == name
    assert (comp.fixed_size, comp.allreduce) == CAPABILITIES[name]
    assert comp.num_phases == 1


@pytest.mark.parametrize("name", ["int8", "qsgd", "signsgd"])
def test_quantizers_reject_wrong_sizes(name: str) -> None:
    comp = FACTORIES[name]()
    with pytest.raises(ValueError):
        comp.compress(torch.zeros(LAYOUT.numel + 1), step=0)
    with pytest.raises(ValueError):
        comp.compress(torch.zeros(1, LAYOUT.numel), step=0)
    payload = comp.compress(grad(), step=0)
    with pytest.raises(ValueError):
        comp.decompress(Payload(numel=payload.numel - 1, codes=payload.codes), step=0)


def test_none_is_exact_and_does_not_alias() -> None:
    comp = NoneCompressor()
    x = grad()
    out = comp.decompress(comp.compress(x, step=0), step=0)
    assert torch.equal(out, x)
    out.add_(1.0)
    assert torch.equal(x, grad())


def test_fp16_error_within_rounding() -> None:
    comp = FP16Compressor()
    x = grad()
    payload = comp.compress(x, step=0)
    assert payload.values is not None and payload.values.dtype == torch.float16
    out = comp.decompress(payload, step=0)
    # Half a unit in the last place: 2^-11 relative, or 2^-25 absolute among subnormals.
    bound = x.abs() * 2.0**-11 + 2.0**-25
    assert torch.all((out - x).abs() <= bound)


def test_fp16_saturates_instead_of_overflowing() -> None:
    comp = FP16Compressor()
    x = torch.tensor([1e6, -1e6, 1.0])
    out = comp.decompress(comp.compress(x, step=0), step=0)
    assert torch.isfinite(out).all()
    assert out[0] == 65504.0 and out[1] == -65504.0 and out[2] == 1.0


def test_int8_error_at_most_half_a_step() -> None:
    comp = Int8Compressor(LAYOUT)
    x = grad()
    payload = comp.compress(x, step=0)
    assert payload.bits == 8 and payload.scales is not None and payload.codes is not None
    assert int(payload.codes.max()) <= 254
    out = comp.decompress(payload, step=0)
    for i, (xi, oi) in enumerate(zip(layers(x), layers(out), strict=True)):
        scale = float(payload.scales[i])
        if xi.numel() == 0 or i == ZERO_LAYER:
            assert scale == 0.0
            continue
        assert scale == pytest.approx(float(xi.abs().max()) / 127, rel=1e-6)
        assert float((oi - xi).abs().max()) <= scale / 2 * (1 + 1e-4)
        # The largest magnitude is a whole number of steps: it comes back (almost) exactly.
        top = int(xi.abs().argmax())
        assert float(oi[top]) == pytest.approx(float(xi[top]), rel=1e-5)


def test_signsgd_keeps_signs_and_layer_l1_norms() -> None:
    comp = SignSGDCompressor(LAYOUT)
    x = grad()
    payload = comp.compress(x, step=0)
    assert payload.bits == 1 and payload.codes is not None
    assert set(payload.codes.unique().tolist()) <= {0, 1}
    out = comp.decompress(payload, step=0)
    nonzero = x != 0
    assert torch.equal(torch.sign(out[nonzero]), torch.sign(x[nonzero]))
    for xi, oi in zip(layers(x), layers(out), strict=True):
        assert float(oi.abs().sum()) == pytest.approx(float(xi.abs().sum()), rel=1e-5)
        if xi.numel():
            # Every element of a layer has the layer's mean magnitude.
            assert torch.allclose(oi.abs(), oi.abs()[0].expand_as(oi))


@pytest.mark.parametrize(("levels", "bits"), [(1, 2), (3, 3), (4, 4), (127, 8), (128, 9)])
def test_qsgd_bits(levels: int, bits: int) -> None:
    comp = QSGDCompressor(LAYOUT, levels=levels, seed=0)
    payload = comp.compress(grad(), step=0)
    assert payload.bits == bits == math.ceil(math.log2(2 * (levels + 1)))
    assert payload.codes is not None
    assert int(payload.codes.min()) >= 0 and int(payload.codes.max()) < 2 * (levels + 1)


@pytest.mark.parametrize("levels", [0, 2**15])
def test_qsgd_rejects_bad_levels(levels: int) -> None:
    with pytest.raises(ValueError):
        QSGDCompressor(LAYOUT, levels=levels, seed=0)


def test_qsgd_is_unbiased() -> None:
    levels, draws = 2, 2000
    comp = QSGDCompressor(LAYOUT, levels=levels, seed=1)
    x = grad()
    total = torch.zeros_like(x)
    for step in range(draws):
        out = comp.decompress(comp.compress(x, step), step)
        # Each element decodes to one of the two levels of the layer's norm around it.
        for xi, oi in zip(layers(x), layers(out), strict=True):
            if xi.numel():
                assert float((oi - xi).abs().max()) <= float(xi.norm()) / levels * (1 + 1e-5)
        total += out
    mean = total / draws
    # A level is a Bernoulli draw: its decoded value has a std of at most norm / (2 s), so
    # the mean of `draws` has at most norm / (2 s sqrt(draws)); allow five of those.
    for xi, mi in zip(layers(x), layers(mean), strict=True):
        if xi.numel():
            tol = 5 * float(xi.norm()) / (2 * levels * math.sqrt(draws))
            assert float((mi - xi).abs().max()) <= tol
    assert not layers(mean)[ZERO_LAYER].any()


def test_qsgd_is_deterministic_given_the_seed() -> None:
    a, b, c = (QSGDCompressor(LAYOUT, levels=4, seed=s) for s in (7, 7, 8))
    x = grad()
    for step in range(3):
        pa, pb, pc = (comp.compress(x, step) for comp in (a, b, c))
        assert pa.codes is not None and pb.codes is not None and pc.codes is not None
        assert torch.equal(pa.codes, pb.codes)
        assert not torch.equal(pa.codes, pc.codes)
        assert torch.equal(a.decompress(pa, step), b.decompress(pb, step))


def test_qsgd_zero_tensor_decodes_to_zero() -> None:
    comp = QSGDCompressor(LAYOUT, levels=4, seed=0)
    out = comp.decompress(comp.compress(torch.zeros(LAYOUT.numel), step=0), step=0)
    assert not out.any()


def test_empty_layout() -> None:
    layout = Layout(((0,),))
    for comp in (Int8Compressor(layout), QSGDCompressor(layout, 4, 0), SignSGDCompressor(layout)):
        out = comp.decompress(comp.compress(torch.zeros(0), step=0), step=0)
        assert out.shape == (0,) and out.dtype == torch.float32
