"""The wire codec: a `Payload` to the bytes that cross the link, and back.

The bytes a transfer costs are ``len(Codec(...).encode(payload))``, never an estimate.
Format version 1: a small header (version, flags, numel), then self-delimiting sections,
the body optionally one zstd frame. Any `Codec` decodes what any other wrote, and both
sides enforce limits, so a hostile payload cannot make a decoder allocate or decompress
without bound.
Details (the byte layout and every limit): docs/compression.md#the-wire-codec
"""

from __future__ import annotations

import operator
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import zstandard

from edgeddl.compress.base import Payload
from edgeddl.compress.bitpack import (
    VARINT_LIMIT,
    VARINT_MAX_BYTES,
    Bytes,
    CodecError,
    Int64s,
    decode_varints,
    encode_indices,
    index_forms,
    pack_codes,
    padding_clear,
    unpack_codes,
    uvarint,
)

__all__ = [
    "FLAG_BITMAP",
    "FLAG_CODES",
    "FLAG_FP16",
    "FLAG_INDICES",
    "FLAG_SCALES",
    "FLAG_VALUES",
    "FLAG_ZSTD",
    "MAX_NUMEL",
    "MAX_SCALES",
    "VERSION",
    "Codec",
    "CodecError",
]

VERSION = 1
FLAG_VALUES = 0x01
FLAG_FP16 = 0x02
FLAG_INDICES = 0x04
FLAG_BITMAP = 0x08
FLAG_CODES = 0x10
FLAG_SCALES = 0x20
FLAG_ZSTD = 0x40
_KNOWN_FLAGS = 0x7F

# Bounds a decoder can check before it allocates anything. numel <= 2**31 keeps every
# delta-sum below 2**62 (no int64 overflow) and is far above any edge model's gradient.
MAX_NUMEL = 2**31
MAX_SCALES = 2**16
ZSTD_LEVEL = 3


# --- checking what encode is given --------------------------------------------------------


def _flat(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(t.shape)}")
    return t.detach().cpu()


def _float32s(t: torch.Tensor, what: str) -> npt.NDArray[np.float32]:
    t = _flat(t, what)
    if not t.is_floating_point():
        raise ValueError(f"{what} must be a float tensor, got {t.dtype}")
    return t.to(torch.float32).numpy()


def _int64s(t: torch.Tensor, what: str) -> Int64s:
    t = _flat(t, what)
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{what} must be an integer tensor, got {t.dtype}")
    return t.to(torch.int64).numpy()


def _check_codes(codes: Int64s, bits: int, numel: int) -> None:
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16 with codes, got {bits}")
    if codes.size > numel:
        raise ValueError(f"{codes.size} codes for numel {numel}")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, 2**{bits}), got {codes.min()}..{codes.max()}")


# --- reading ------------------------------------------------------------------------------


class _Reader:
    """A cursor over bytes whose every read checks there is enough left."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.arr: Bytes = np.frombuffer(data, dtype=np.uint8)
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self, what: str) -> int:
        if self.left() < 1:
            raise CodecError(f"truncated: no {what} byte")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self, what: str) -> int:
        n = 0
        for k in range(VARINT_MAX_BYTES):
            b = self.byte(what)
            n |= (b & 0x7F) << (7 * k)
            if b < 0x80:
                if b == 0 and k > 0:
                    raise CodecError(f"{what}: varint with a trailing zero group (not minimal)")
                if n >= VARINT_LIMIT:
                    raise CodecError(f"{what}: varint overflows 2**40")
                return n
        raise CodecError(f"{what}: varint longer than {VARINT_MAX_BYTES} bytes")

    def varints(self, count: int, what: str) -> Int64s:
        values, used = decode_varints(self.arr[self.pos :], count, what)
        self.pos += used
        return values

    def take(self, n: int, what: str) -> Bytes:
        if n > self.left():
            raise CodecError(f"truncated {what}: needs {n} bytes, {self.left()} left")
        self.pos += n
        return self.arr[self.pos - n : self.pos]

    def floats(self, count: int, width: int, what: str) -> torch.Tensor:
        raw = self.take(count * width, what)
        dtype = "<f2" if width == 2 else "<f4"
        # astype copies into native float32, so the tensor owns writable memory.
        return torch.from_numpy(raw.view(dtype).astype(np.float32))


def _check_flags(flags: int) -> None:
    if flags & ~_KNOWN_FLAGS:
        raise CodecError(f"unknown flag bits 0x{flags & ~_KNOWN_FLAGS:02x}")
    if flags & FLAG_FP16 and not flags & FLAG_VALUES:
        raise CodecError("flags: float16 bit set without values")
    if flags & FLAG_BITMAP and not flags & FLAG_INDICES:
        raise CodecError("flags: bitmap bit set without indices")


def _max_body(flags: int, numel: int) -> int:
    """The longest body a valid payload with this header has (bounds zstd's output)."""
    size = 0
    if flags & FLAG_INDICES:
        # Deltas sum to at most numel and a delta d >= 1 takes at most d bytes.
        size += VARINT_MAX_BYTES + numel
    if flags & FLAG_VALUES:
        size += VARINT_MAX_BYTES + numel * (2 if flags & FLAG_FP16 else 4)
    if flags & FLAG_CODES:
        size += VARINT_MAX_BYTES + 1 + 2 * numel
    if flags & FLAG_SCALES:
        size += VARINT_MAX_BYTES + 4 * MAX_SCALES
    return size


_local = threading.local()  # zstd contexts are not thread-safe, and cost ~15 us to create


def _compress(body: bytes) -> bytes:
    if not hasattr(_local, "compressor"):
        _local.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    frame: bytes = _local.compressor.compress(body)
    return frame


def _decompress(frame: memoryview, limit: int) -> bytes:
    """The body in a zstd `frame`, at most `limit` bytes: a frame must state its size, and
    the output buffer is that size, so a small frame cannot make a large allocation."""
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise CodecError(f"zstd body: bad frame header ({e})") from None
    if size < 0:
        raise CodecError("zstd body: frame does not state its content size")
    if size > limit:
        raise CodecError(f"zstd body: claims {size} bytes, at most {limit} allowed")
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    # One shot into a buffer of the stated size (never more than `limit`): zstd stops with
    # an error as soon as a frame that lies about its size outgrows it.
    try:
        body: bytes = _local.decompressor.decompress(
            frame, max_output_size=limit, allow_extra_data=False
        )
    except zstandard.ZstdError as e:
        raise CodecError(f"zstd body: {str(e).splitlines()[0]}") from None
    if len(body) != size:
        raise CodecError(f"zstd body: {len(body)} bytes where the frame states {size}")
    return body


# --- the codec ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Codec:
    """Encodes payloads to bytes and back; the format: docs/compression.md#the-wire-codec."""

    values: Literal["fp32", "fp16"] = "fp32"
    """Precision of float `values` on the wire (scales are always float32)."""
    zstd: bool = False
    """zstd-compress the body when that makes it shorter."""

    def __post_init__(self) -> None:
        if self.values not in ("fp32", "fp16"):
            raise ValueError(f"values must be 'fp32' or 'fp16', got {self.values!r}")

    @property
    def value_width(self) -> int:
        """Bytes per float value on the wire."""
        return 2 if self.values == "fp16" else 4

    def encode(self, p: Payload) -> bytes:
        """The bytes of `p`; ValueError if `p` is not a valid payload."""
        try:
            numel = operator.index(p.numel)  # ints and numpy ints, not floats
        except TypeError:
            raise ValueError(f"numel must be an integer, got {p.numel!r}") from None
        if not 0 <= numel <= MAX_NUMEL:
            raise ValueError(f"numel must be in [0, {MAX_NUMEL}], got {numel}")
        flags = 0
        parts: list[bytes | memoryview] = []  # memoryviews: one copy, in the final join
        idx = None
        if p.indices is not None:
            idx = _int64s(p.indices, "indices")
            bitmap, raw = encode_indices(idx, numel)
            flags |= FLAG_INDICES | (FLAG_BITMAP if bitmap else 0)
            parts.append(raw)
        if p.values is not None:
            vals = _float32s(p.values, "values")
            if idx is not None and vals.size != idx.size:
                raise ValueError(f"{vals.size} values for {idx.size} indices")
            if vals.size > numel:
                raise ValueError(f"{vals.size} values for numel {numel}")
            # Values a compressor already rounded to float16 travel as float16.
            half = self.values == "fp16" or p.values.dtype == torch.float16
            flags |= FLAG_VALUES | (FLAG_FP16 if half else 0)
            dtype = "<f2" if half else "<f4"
            with np.errstate(over="ignore"):  # beyond float16's range is inf, as with .half()
                wire = np.ascontiguousarray(vals, dtype=dtype)
            parts += [uvarint(vals.size), wire.data]
        if p.codes is not None:
            codes = _int64s(p.codes, "codes")
            _check_codes(codes, p.bits, numel)
            flags |= FLAG_CODES
            parts += [uvarint(codes.size), bytes([p.bits]), pack_codes(codes, p.bits)]
        elif p.bits != 0:
            # decode could not give the bits back, so the round trip would differ.
            raise ValueError(f"bits is {p.bits} but there are no codes (must be 0)")
        if p.scales is not None:
            scales = _float32s(p.scales, "scales")
            if scales.size > MAX_SCALES:
                raise ValueError(f"{scales.size} scales, at most {MAX_SCALES}")
            flags |= FLAG_SCALES
            parts += [uvarint(scales.size), np.ascontiguousarray(scales, dtype="<f4").data]
        if self.zstd and parts:
            body = b"".join(parts)
            frame = _compress(body)
            if len(frame) < len(body):
                parts = [frame]
                flags |= FLAG_ZSTD
        return b"".join([bytes([VERSION, flags]), uvarint(numel), *parts])

    def decode(
        self, data: bytes | bytearray | memoryview, expected: int, max_bytes: int | None = None
    ) -> Payload:
        """The payload `data` encodes; CodecError if it is not one this codec wrote.

        Every receiver bounds what decoding may allocate: `expected` is the length of the
        tensor it receives (its model's, its cut's), and a header claiming another is
        refused before anything is allocated or decompressed, so the header never sets a
        size. `max_bytes` (the configured payload limit, `security.max_payload_bytes`)
        also bounds `data` and its body once decompressed.
        """
        if not 0 <= expected <= MAX_NUMEL:
            raise ValueError(f"expected must be in [0, {MAX_NUMEL}], got {expected}")
        if max_bytes is not None and len(data) > max_bytes:
            raise CodecError(f"{len(data)} bytes, more than the limit of {max_bytes}")
        r = _Reader(bytes(data))
        version = r.byte("version")
        if version != VERSION:
            raise CodecError(f"unknown format version {version} (this codec reads {VERSION})")
        flags = r.byte("flags")
        _check_flags(flags)
        numel = r.varint("numel")
        if numel != expected:
            raise CodecError(f"numel {numel} where {expected} was expected")
        if flags & FLAG_ZSTD:
            limit = _max_body(flags, numel)
            frame = memoryview(r.data)[r.pos :]
            r = _Reader(_decompress(frame, limit if max_bytes is None else min(limit, max_bytes)))

        indices = None
        if flags & FLAG_INDICES:
            indices = _read_indices(r, numel, bitmap=bool(flags & FLAG_BITMAP))
        values = None
        if flags & FLAG_VALUES:
            count = r.varint("values count")
            if indices is not None and count != indices.numel():
                raise CodecError(f"{count} values for {indices.numel()} indices")
            if count > numel:
                raise CodecError(f"{count} values for numel {numel}")
            values = r.floats(count, 2 if flags & FLAG_FP16 else 4, "values")
        codes, bits = None, 0
        if flags & FLAG_CODES:
            codes, bits = _read_codes(r, numel)
        scales = None
        if flags & FLAG_SCALES:
            count = r.varint("scales count")
            if count > MAX_SCALES:
                raise CodecError(f"{count} scales, at most {MAX_SCALES}")
            scales = r.floats(count, 4, "scales")
        if r.left():
            raise CodecError(f"{r.left()} trailing bytes after the payload")
        return Payload(numel, values=values, indices=indices, codes=codes, bits=bits, scales=scales)

    def dense_or_sparse(self, x: torch.Tensor) -> Payload:
        """`x` (flat, float) as dense values or as its nonzeros at indices, whichever
        encodes shorter with this codec (zstd aside: sizes before compression, exact).

        Values stay exact float32 in the payload; `encode` applies the wire precision.
        """
        if x.dim() != 1 or not x.is_floating_point():
            raise ValueError(f"x must be a 1-D float tensor, got {x.dtype} {tuple(x.shape)}")
        x = x.detach().to(torch.float32)
        numel = x.numel()
        # Counting is much cheaper than listing the nonzeros of a dense tensor.
        nnz = int(torch.count_nonzero(x))
        w = self.value_width
        dense_size = len(uvarint(numel)) + numel * w
        sparse_size = len(uvarint(nnz)) + nnz * w
        if sparse_size >= dense_size:  # index bytes can only add to that
            return Payload(numel, values=x.clone())
        idx = torch.nonzero(x).view(-1)
        sparse_size += min(index_forms(idx.cpu().numpy(), numel)[2:])
        if sparse_size < dense_size:
            return Payload(numel, values=x[idx], indices=idx)
        return Payload(numel, values=x.clone())


def _read_indices(r: _Reader, numel: int, *, bitmap: bool) -> torch.Tensor:
    if bitmap:
        raw = r.take((numel + 7) // 8, "index bitmap")
        if not padding_clear(raw, numel):
            raise CodecError(f"index bitmap has bits set past numel {numel}")
        idx = np.flatnonzero(np.unpackbits(raw, count=numel, bitorder="little"))
        return torch.from_numpy(idx.astype(np.int64))
    count = r.varint("index count")
    if count > numel:
        raise CodecError(f"{count} distinct indices cannot fit in numel {numel}")
    deltas = r.varints(count, "index deltas")
    if count == 0:
        return torch.zeros(0, dtype=torch.int64)
    if int(deltas.min()) < 1:
        raise CodecError("indices not strictly increasing (a delta of 0)")
    if int(deltas.max()) > numel:  # also keeps the sum below 2**62
        raise CodecError(f"index delta beyond numel {numel}")
    idx = np.cumsum(deltas) - 1
    if int(idx[-1]) >= numel:
        raise CodecError(f"index {int(idx[-1])} out of range for numel {numel}")
    return torch.from_numpy(idx)


def _read_codes(r: _Reader, numel: int) -> tuple[torch.Tensor, int]:
    count = r.varint("codes count")
    if count > numel:
        raise CodecError(f"{count} codes for numel {numel}")
    bits = r.byte("codes bits")
    if not 1 <= bits <= 16:
        raise CodecError(f"codes bits {bits} not in 1..16")
    raw = r.take((count * bits + 7) // 8, "codes")
    if count and not padding_clear(raw, count * bits):
        raise CodecError("codes have padding bits set")
    # Codes cannot reach 2**bits: each is read from exactly `bits` bits.
    return torch.from_numpy(unpack_codes(raw, count, bits)), bits


def dense_payload_bytes(numel: int) -> int:
    """Wire bytes of one uncompressed float32 gradient of `numel` values (any values)."""
    return len(Codec().encode(Payload(numel=numel, values=torch.zeros(numel))))


def dense_body(t: torch.Tensor) -> bytes:
    """A tensor as the wire codec sends it dense (float32): a payload's bytes."""
    flat = t.detach().reshape(-1).to(torch.float32).cpu()
    return Codec().encode(Payload(numel=flat.numel(), values=flat))


def dense_values(
    data: bytes, numel: int, finite: bool = True, max_bytes: int | None = None
) -> torch.Tensor:
    """The float32 values of a `dense_body` (CodecError if it is not one of `numel`, or,
    with `finite`, if any is not finite; `max_bytes`: as `Codec.decode`)."""
    payload = Codec().decode(data, numel, max_bytes)
    if payload.values is None or payload.values.numel() != numel or payload.indices is not None:
        raise CodecError(f"expected {numel} dense values")
    values = payload.values.float()
    if finite and not torch.isfinite(values).all():
        raise CodecError("values that are not finite")
    return values
