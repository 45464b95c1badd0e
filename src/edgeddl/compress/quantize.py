"""Dense compressors: every element is sent, as a float or as a few-bit code.

`NoneCompressor`, `FP16Compressor`, `Int8Compressor`, `QSGDCompressor`, `SignSGDCompressor`.
The quantizers scale per layer, so a small bias vector is not rounded away by a large weight
next to it, and reduce per layer in one vectorized pass (a model has about a hundred layers,
and this runs every step on every device).
Details: docs/compression.md#dense-compressors
"""

from __future__ import annotations

import torch

from edgeddl.compress.base import Layout, Payload
from edgeddl.compress.segments import Segments, check_flat
from edgeddl.config.compression import CompressorConfig
from edgeddl.config.compressors import BuildContext

_INT8_MAX = 127
_MAX_BITS = 16


def _field(payload: Payload, name: str) -> torch.Tensor:
    """A payload field a decompressor needs, or an error naming it."""
    value = getattr(payload, name)
    if value is None:
        raise ValueError(f"payload has no {name}")
    assert isinstance(value, torch.Tensor)
    return value


class _CodeTable:
    """The float each code decodes to (before its layer's scale), kept on each device.

    Decoding is then one gather and one multiply, instead of a chain of integer and float
    passes over the codes.
    """

    def __init__(self, values: torch.Tensor) -> None:
        self._values = values.to(torch.float32)
        self._on: dict[torch.device, torch.Tensor] = {}

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        table = self._on.get(codes.device)
        if table is None:
            table = self._values.to(codes.device)
            self._on[codes.device] = table
        return table.index_select(0, codes.to(torch.int64))


class NoneCompressor:
    """No compression: the float32 values, dense. The baseline every other one is measured by."""

    name: str = "none"
    fixed_size: bool = True
    allreduce: bool = True
    num_phases: int = 1

    def compress(self, x: torch.Tensor, step: int) -> Payload:
        x = check_flat(x)
        return Payload(numel=x.numel(), values=x)

    def decompress(self, payload: Payload, step: int) -> torch.Tensor:
        # A copy: the payload may alias the sender's tensor, and receivers add into what
        # they get back.
        return _field(payload, "values").to(torch.float32, copy=True)


class FP16Compressor:
    """The values rounded to half precision (2 bytes each), dense."""

    name: str = "fp16"
    fixed_size: bool = True
    allreduce: bool = True
    num_phases: int = 1

    _FP16_MAX = float(torch.finfo(torch.float16).max)

    def compress(self, x: torch.Tensor, step: int) -> Payload:
        x = check_flat(x)
        # Saturate instead of overflowing to inf: an inf would poison the error-feedback
        # residual with NaN, while a saturated value leaves the excess in the residual.
        half = x.clamp(-self._FP16_MAX, self._FP16_MAX).to(torch.float16)
        return Payload(numel=x.numel(), values=half)

    def decompress(self, payload: Payload, step: int) -> torch.Tensor:
        return _field(payload, "values").to(torch.float32)


class Int8Compressor:
    """Uniform 8-bit quantization with one scale per layer.

    ``scale = max|x_layer| / 127``, ``code = round(x / scale) + 127`` in ``[0, 254]``: the
    largest magnitude of each layer is exact and every element is off by at most half a
    step. Payload: `codes` (8 bits, one per element), `scales` (one per layer). A layer of
    zeros (or an empty one) has scale 0 and decodes to zeros.
    """

    name: str = "int8"
    fixed_size: bool = True
    allreduce: bool = False
    num_phases: int = 1

    bits = 8

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._segments = Segments(layout)
        self._table = _CodeTable(torch.arange(2**self.bits) - _INT8_MAX)

    def compress(self, x: torch.Tensor, step: int) -> Payload:
        x = self._segments.check(x)
        scales = self._segments.amax(x) / _INT8_MAX
        # Dividing a zero layer by 1 instead of 0 keeps it at code 127 (zero), not NaN.
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        scaled = x / self._segments.expand(safe)
        codes = scaled.round_().clamp_(-_INT8_MAX, _INT8_MAX).add_(_INT8_MAX).to(torch.int64)
        return Payload(numel=x.numel(), codes=codes, bits=self.bits, scales=scales)

    def decompress(self, payload: Payload, step: int) -> torch.Tensor:
        self._segments.check_payload(payload)
        codes = _field(payload, "codes")
        scales = _field(payload, "scales").to(torch.float32)
        return self._table.decode(codes).mul_(self._segments.expand(scales))


class QSGDCompressor:
    """QSGD (Alistarh et al. 2017): unbiased stochastic quantization to `levels` levels.

    Per layer, with ``norm = ||x_layer||_2`` and ``s = levels``:
    ``level = floor(|x| / norm * s + u)`` with ``u ~ U[0, 1)``, so ``E[level] = |x| / norm * s``
    and the decoded ``norm * sign(x) * level / s`` is unbiased. Payload: `codes` =
    ``2 * level + (x < 0)`` in ``[0, 2 (s + 1))``, ``ceil(log2(2 (s + 1)))`` bits each;
    `scales` = the per-layer norms.

    The rounding noise comes from a generator the instance owns (one per device the input
    lives on), seeded with `seed` and advanced by every call: a run is reproducible given the
    seed and the sequence of calls, and devices with different seeds draw independent noise.
    """

    name: str = "qsgd"
    fixed_size: bool = True
    allreduce: bool = False
    num_phases: int = 1

    def __init__(self, layout: Layout, levels: int, seed: int) -> None:
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        # Codes take values 0 .. 2 * levels + 1; that many must fit in the codec's bits.
        bits = (2 * levels + 1).bit_length()
        if bits > _MAX_BITS:
            raise ValueError(f"levels={levels} needs {bits} bits, more than {_MAX_BITS}")
        self.layout = layout
        self.levels = levels
        self.seed = seed
        self.bits = bits
        self._segments = Segments(layout)
        self._generators: dict[torch.device, torch.Generator] = {}
        # Low bit: sign (1 = negative); the rest: the level. Decodes to sign * level / s. The
        # table covers every code the bits can hold, so that a code no compressor produces
        # decodes to 0 rather than reading past the table (a device-side fault on a GPU).
        codes = torch.arange(2**bits)
        decoded = (codes >> 1) * (1 - 2 * (codes & 1)) / levels
        self._table = _CodeTable(decoded.masked_fill_(codes >= 2 * (levels + 1), 0.0))

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._generators[device] = generator
        return generator

    def compress(self, x: torch.Tensor, step: int) -> Payload:
        x = self._segments.check(x)
        norms = self._segments.norms(x, 2)
        # s / norm per layer; a zero layer gets factor 0 and so level 0, not NaN.
        factors = torch.where(norms > 0, self.levels / norms, torch.zeros_like(norms))
        noise = torch.rand(
            x.shape, generator=self._generator(x.device), device=x.device, dtype=torch.float32
        )
        scaled = x.abs().mul_(self._segments.expand(factors)).add_(noise)
        # The clamp only catches float rounding: |x| / norm <= 1 in exact arithmetic, but
        # s (1 + eps) + u can round up to s + 1.
        levels = scaled.floor_().clamp_(max=self.levels)
        codes = levels.mul_(2).add_(torch.signbit(x).to(torch.float32)).to(torch.int64)
        return Payload(numel=x.numel(), codes=codes, bits=self.bits, scales=norms)

    def decompress(self, payload: Payload, step: int) -> torch.Tensor:
        self._segments.check_payload(payload)
        codes = _field(payload, "codes")
        norms = _field(payload, "scales").to(torch.float32)
        return self._table.decode(codes).mul_(self._segments.expand(norms))


class SignSGDCompressor:
    """Scaled sign compression (EF-SignSGD, Karimireddy et al. 2019): one bit per element.

    Per layer, ``scale = ||x_layer||_1 / numel_layer`` and the decoded value is
    ``scale * sign(x)`` (``x >= 0`` counts as positive), which keeps each layer's L1 norm.
    Biased: run it with error feedback. Payload: `codes` (1 bit: 1 for ``x >= 0``), `scales`
    (one per layer).
    """

    name: str = "signsgd"
    fixed_size: bool = True
    allreduce: bool = False
    num_phases: int = 1

    bits = 1

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._segments = Segments(layout)
        self._table = _CodeTable(torch.tensor([-1.0, 1.0]))

    def compress(self, x: torch.Tensor, step: int) -> Payload:
        x = self._segments.check(x)
        scales = self._segments.norms(x, 1) / self._segments.counts(x.device)
        codes = (x >= 0).to(torch.int64)
        return Payload(numel=x.numel(), codes=codes, bits=self.bits, scales=scales)

    def decompress(self, payload: Payload, step: int) -> torch.Tensor:
        self._segments.check_payload(payload)
        codes = _field(payload, "codes")
        scales = _field(payload, "scales").to(torch.float32)
        return self._table.decode(codes).mul_(self._segments.expand(scales))


# How `config/compressors.py` builds these from a scenario's settings.


def build_none(c: CompressorConfig, at: BuildContext) -> NoneCompressor:
    return NoneCompressor()


def build_fp16(c: CompressorConfig, at: BuildContext) -> FP16Compressor:
    return FP16Compressor()


def build_int8(c: CompressorConfig, at: BuildContext) -> Int8Compressor:
    return Int8Compressor(at.layout)


def build_qsgd(c: CompressorConfig, at: BuildContext) -> QSGDCompressor:
    return QSGDCompressor(at.layout, c.levels, at.device_seed)


def build_signsgd(c: CompressorConfig, at: BuildContext) -> SignSGDCompressor:
    return SignSGDCompressor(at.layout)
