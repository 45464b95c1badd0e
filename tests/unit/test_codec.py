"""The wire codec: exact round trips, the sizes its format promises, and garbage rejected."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeddl.compress.base import Payload
from edgeddl.compress.codec import (
    FLAG_BITMAP,
    FLAG_CODES,
    FLAG_FP16,
    FLAG_INDICES,
    FLAG_SCALES,
    FLAG_VALUES,
    FLAG_ZSTD,
    MAX_NUMEL,
    VERSION,
    Codec,
    CodecError,
)

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CODECS = [Codec(v, z) for v in ("fp32", "fp16") for z in (False, True)]
codecs = st.sampled_from(CODECS)

# Float32 values that exercise the fp16 conversion and bit-exactness: signed zeros,
# infinities, NaN, fp16's largest finite value and its overflow, subnormals of both widths.
SPECIAL = np.array(
    [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 1e6, 6e-8, 1e-40, -3.0e-5, 1.0],
    dtype=np.float32,
)


def leb(n: int) -> bytes:
    """Unsigned LEB128, written independently of the codec for hand-built inputs."""
    out = []
    while True:
        out.append(n & 0x7F | (0x80 if n >= 0x80 else 0))
        n >>= 7
        if not n:
            return bytes(out)


def claimed_numel(data: bytes) -> int:
    """The numel `data`'s header claims (0 if none a decoder could take): what a test that
    feeds the decoder arbitrary bytes expects, so the parser past the header is exercised."""
    n = 0
    for k, b in enumerate(data[2:8]):
        n |= (b & 0x7F) << (7 * k)
        if b < 0x80:
            return n if n <= MAX_NUMEL else 0
    return 0


def floats(rng: np.random.Generator, n: int) -> torch.Tensor:
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 6, n)).astype(np.float32)
    pick = rng.random(n) < 0.1
    x[pick] = rng.choice(SPECIAL, int(pick.sum()))
    return torch.from_numpy(x)


def sorted_subset(rng: np.random.Generator, numel: int, k: int) -> torch.Tensor:
    return torch.from_numpy(np.sort(rng.choice(numel, k, replace=False)).astype(np.int64))


def wire_values(codec: Codec, values: torch.Tensor) -> torch.Tensor:
    """What the receiver gets for float32 `values` sent with `codec`."""
    return values.half().float() if codec.values == "fp16" else values


def assert_same(got: Payload, want: Payload) -> None:
    assert got.numel == want.numel
    assert got.bits == want.bits
    for name, dtype in [
        ("values", torch.float32),
        ("indices", torch.int64),
        ("codes", torch.int64),
        ("scales", torch.float32),
    ]:
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.dtype == dtype and a.device.type == "cpu", name
        b = b.to(dtype)
        if dtype == torch.float32:
            # Bit for bit (-0.0 too), except that a NaN may come back with another payload:
            # numpy and torch disagree on NaN payloads when converting to float16.
            nan = a.isnan()
            assert torch.equal(nan, b.isnan()), name
            a, b = a[~nan].view(torch.int32), b[~nan].view(torch.int32)
        assert torch.equal(a, b), name


def roundtrip(codec: Codec, p: Payload) -> Payload:
    data = codec.encode(p)
    assert isinstance(data, bytes)
    got = codec.decode(data, p.numel)
    want = Payload(
        p.numel,
        values=None if p.values is None else wire_values(codec, p.values),
        indices=p.indices,
        codes=p.codes,
        bits=p.bits,
        scales=p.scales,
    )
    assert_same(got, want)
    return got


# --- round trips ---------------------------------------------------------------------------


@FAST
@given(codec=codecs, numel=st.integers(0, 20_000), seed=st.integers(0, 2**32 - 1))
def test_dense_values_roundtrip(codec: Codec, numel: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    roundtrip(codec, Payload(numel, values=floats(rng, numel)))


@FAST
@given(
    codec=codecs,
    numel=st.integers(1, 100_000),
    density=st.sampled_from([0.0, 1e-4, 1e-3, 0.01, 0.1, 0.3, 0.9, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_sparse_roundtrip(codec: Codec, numel: int, density: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = min(numel, round(density * numel), 20_000)
    idx = sorted_subset(rng, numel, k)
    roundtrip(codec, Payload(numel, values=floats(rng, k), indices=idx))
    roundtrip(codec, Payload(numel, indices=idx))  # indices alone


@FAST
@given(
    codec=codecs,
    numel=st.integers(0, 5_000),
    bits=st.integers(1, 16),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_codes_and_scales_roundtrip(
    codec: Codec, numel: int, bits: int, frac: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    count = int(frac * numel)
    codes = torch.from_numpy(rng.integers(0, 2**bits, count))
    if count:
        codes[0] = 2**bits - 1  # the largest code fits too
    scales = floats(rng, int(rng.integers(0, 8)))
    roundtrip(codec, Payload(numel, codes=codes, bits=bits, scales=scales))
    roundtrip(codec, Payload(numel, codes=codes, bits=bits))
    roundtrip(codec, Payload(numel, scales=scales))


@FAST
@given(codec=codecs, numel=st.integers(1, 50_000), seed=st.integers(0, 2**32 - 1))
def test_all_fields_roundtrip(codec: Codec, numel: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = int(rng.integers(0, min(numel, 3_000) + 1))
    bits = int(rng.integers(1, 17))
    p = Payload(
        numel,
        values=floats(rng, k),
        indices=sorted_subset(rng, numel, k),
        codes=torch.from_numpy(rng.integers(0, 2**bits, k)),
        bits=bits,
        scales=floats(rng, 3),
    )
    roundtrip(codec, p)


@FAST
@given(codec=codecs, numel=st.integers(0, 50_000), seed=st.integers(0, 2**32 - 1))
def test_values_without_indices_any_count(codec: Codec, numel: int, seed: int) -> None:
    # Random-k: the receiver knows the positions, so only the values travel.
    rng = np.random.default_rng(seed)
    roundtrip(codec, Payload(numel, values=floats(rng, int(rng.integers(0, numel + 1)))))


def test_constant_payloads_roundtrip_and_compress() -> None:
    # Zeros compress well: the zstd flag is set and the round trip still holds.
    for p in [
        Payload(100_000, values=torch.zeros(100_000)),
        Payload(100_000, codes=torch.zeros(100_000, dtype=torch.int64), bits=3),
        Payload(100_000, indices=torch.arange(0, 100_000, 10)),
    ]:
        data = Codec(zstd=True).encode(p)
        assert data[1] & FLAG_ZSTD
        assert len(data) < len(Codec().encode(p)) // 10
        roundtrip(Codec(zstd=True), p)


def test_zstd_only_when_smaller() -> None:
    rng = np.random.default_rng(0)
    noise = np.frombuffer(rng.bytes(4000), dtype=np.float32).copy()
    p = Payload(1000, values=torch.from_numpy(noise))
    data = Codec(zstd=True).encode(p)
    assert not data[1] & FLAG_ZSTD  # random bits do not compress: the frame loses
    assert data == Codec().encode(p)
    assert Codec(zstd=True).encode(Payload(5)) == Codec().encode(Payload(5))


def test_input_tensors_are_converted() -> None:
    # A non-contiguous view with grad, int32 indices, bool codes, float64 scales.
    x = torch.arange(20, dtype=torch.float32, requires_grad=True)
    p = Payload(
        10,
        values=x[::5],
        indices=torch.tensor([1, 3, 5, 9], dtype=torch.int32),
        codes=torch.tensor([True, False, True]),
        bits=1,
        scales=torch.tensor([0.5, 2.0], dtype=torch.float64),
    )
    got = Codec().decode(Codec().encode(p), 10)
    assert torch.equal(got.values, x.detach()[::5])
    assert torch.equal(got.indices, torch.tensor([1, 3, 5, 9]))
    assert torch.equal(got.codes, torch.tensor([1, 0, 1]))
    assert torch.equal(got.scales, torch.tensor([0.5, 2.0]))
    half = Payload(4, values=torch.tensor([1.5, -2.0, 65504.0, 1e-3], dtype=torch.float16))
    back = Codec("fp16").decode(Codec("fp16").encode(half), 4).values
    assert torch.equal(back, half.values.float())
    # decode takes any bytes-like object
    data = Codec().encode(p)
    assert_same(Codec().decode(bytearray(data), 10), Codec().decode(memoryview(data), 10))


def test_decoded_tensors_are_writable_copies() -> None:
    data = Codec().encode(Payload(3, values=torch.ones(3), scales=torch.ones(1)))
    got = Codec().decode(data, 3)
    got.values.add_(1)  # would warn or fail on a read-only buffer
    assert torch.equal(Codec().decode(data, 3).values, torch.ones(3))


# --- sizes ---------------------------------------------------------------------------------


def delta_varint_size(idx: list[int]) -> int:
    """Bytes of the delta form, counted one index at a time."""
    size, prev = len(leb(len(idx))), -1
    for i in idx:
        size += len(leb(i - prev))
        prev = i
    return size


@FAST
@given(
    numel=st.integers(1, 20_000),
    density=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_index_form_is_the_smaller(numel: int, density: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    idx = sorted_subset(rng, numel, int(density * numel))
    varint, bitmap = delta_varint_size(idx.tolist()), math.ceil(numel / 8)
    data = Codec().encode(Payload(numel, indices=idx))
    header = 2 + len(leb(numel))
    assert len(data) == header + min(varint, bitmap)
    assert bool(data[1] & FLAG_BITMAP) == (bitmap < varint)


def test_bitmap_for_dense_sets_varints_for_sparse_ones() -> None:
    n = 10_000
    dense = torch.arange(0, n, 2)  # every delta 2: 1 byte each, 5000 bytes vs 1250
    sparse = torch.arange(0, n, 500)  # 20 deltas of 2 bytes vs 1250
    d, s = Codec().encode(Payload(n, indices=dense)), Codec().encode(Payload(n, indices=sparse))
    assert d[1] == FLAG_INDICES | FLAG_BITMAP and len(d) == 2 + 2 + n // 8
    assert s[1] == FLAG_INDICES and len(s) == 2 + 2 + 1 + 1 + 19 * 2


def test_header_sizes() -> None:
    assert Codec().encode(Payload(0)) == bytes([VERSION, 0, 0])
    for codec in CODECS:
        for numel in [0, 1, 127, 128, 460_000, MAX_NUMEL]:
            assert len(codec.encode(Payload(numel))) <= 8
    # Dense: header, count, 4 or 2 bytes a value and nothing else.
    n = 460_000
    assert len(Codec().encode(Payload(n, values=torch.zeros(n)))) == 2 + 3 + 3 + 4 * n
    assert len(Codec("fp16").encode(Payload(n, values=torch.zeros(n)))) == 2 + 3 + 3 + 2 * n


@FAST
@given(
    codec=st.sampled_from([Codec(), Codec(zstd=True)]),
    numel=st.integers(1, 2**21),
    k=st.integers(0, 2_000),
    seed=st.integers(0, 2**32 - 1),
)
def test_sparse_size_bound(codec: Codec, numel: int, k: int, seed: int) -> None:
    # numel <= 2**21: every delta takes at most 3 bytes, numel and counts at most 4.
    rng = np.random.default_rng(seed)
    k = min(k, numel)
    p = Payload(numel, values=floats(rng, k), indices=sorted_subset(rng, numel, k))
    assert len(codec.encode(p)) <= 4 * k + 3 * k + 16


@FAST
@given(numel=st.integers(0, 5_000), bits=st.integers(1, 16), seed=st.integers(0, 2**32 - 1))
def test_codes_are_bit_packed(numel: int, bits: int, seed: int) -> None:
    codes = torch.from_numpy(np.random.default_rng(seed).integers(0, 2**bits, numel))
    data = Codec().encode(Payload(numel, codes=codes, bits=bits))
    assert len(data) == 2 + 2 * len(leb(numel)) + 1 + math.ceil(numel * bits / 8)


# --- dense_or_sparse -----------------------------------------------------------------------


@FAST
@given(
    codec=codecs,
    numel=st.integers(0, 20_000),
    density=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_dense_or_sparse_picks_the_smaller(
    codec: Codec, numel: int, density: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    x = torch.zeros(numel)
    idx = sorted_subset(rng, numel, int(density * numel))
    x[idx] = torch.from_numpy(rng.standard_normal(idx.numel()).astype(np.float32)) + 10.0
    p = codec.dense_or_sparse(x)
    dense = Payload(numel, values=x)
    sparse = Payload(numel, values=x[idx], indices=idx)
    plain = Codec(codec.values)  # the choice is made on sizes before zstd
    sizes = len(plain.encode(dense)), len(plain.encode(sparse))
    if p.indices is None:
        assert_same(p, dense)
        assert sizes[0] <= sizes[1]
    else:
        assert_same(p, sparse)  # exact float32 values, even for an fp16 codec
        assert sizes[1] < sizes[0]
    got = codec.decode(codec.encode(p), numel)
    reconstructed = torch.zeros(numel)
    reconstructed[got.indices if got.indices is not None else slice(None)] = got.values
    assert torch.equal(reconstructed, wire_values(codec, x))


def test_dense_or_sparse_examples() -> None:
    x = torch.zeros(460_000)
    x[::1000] = 1.0
    assert Codec().dense_or_sparse(x).indices is not None
    assert Codec().dense_or_sparse(torch.ones(1000)).indices is None
    assert Codec().dense_or_sparse(torch.zeros(0)).numel == 0
    with pytest.raises(ValueError):
        Codec().dense_or_sparse(torch.zeros(2, 2))
    with pytest.raises(ValueError):
        Codec().dense_or_sparse(torch.zeros(3, dtype=torch.int64))


# --- rejecting garbage ---------------------------------------------------------------------


def valid_encodings() -> list[bytes]:
    rng = np.random.default_rng(1)
    n = 3_000
    idx = sorted_subset(rng, n, 40)
    full = Payload(
        n,
        values=floats(rng, 40),
        indices=idx,
        codes=torch.from_numpy(rng.integers(0, 8, 40)),
        bits=3,
        scales=floats(rng, 2),
    )
    payloads = [
        Payload(0),
        Payload(300),
        Payload(n, values=floats(rng, 20)),
        Payload(n, indices=sorted_subset(rng, n, 2_000)),  # bitmap
        full,
        Payload(n, values=torch.zeros(n)),  # compressible
        Payload(n, codes=torch.zeros(n, dtype=torch.int64), bits=5, scales=torch.ones(3)),
    ]
    return [c.encode(p) for c in CODECS for p in payloads]


def test_every_truncation_is_rejected() -> None:
    encodings = valid_encodings()
    assert any(e[1] & FLAG_ZSTD for e in encodings)
    for data in encodings:
        for end in range(len(data)):
            with pytest.raises(CodecError):
                Codec().decode(data[:end], claimed_numel(data))


def test_trailing_byte_is_rejected() -> None:
    for data in valid_encodings():
        with pytest.raises(CodecError):
            Codec().decode(data + b"\x00", claimed_numel(data))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=80))
def test_random_bytes_decode_or_raise_codec_error(data: bytes) -> None:
    try:
        Codec().decode(data, claimed_numel(data))
    except CodecError as e:
        assert "\n" not in str(e)


@settings(max_examples=200, deadline=None)
@given(flags=st.integers(0, 0x7F), rest=st.binary(max_size=80))
def test_random_bodies_decode_or_raise_codec_error(flags: int, rest: bytes) -> None:
    data = bytes([VERSION, flags]) + rest
    try:
        p = Codec().decode(data, claimed_numel(data))
    except CodecError:
        return
    # Whatever decodes is a payload the codec could have written.
    assert_same(Codec().decode(Codec().encode(p), p.numel), p)


_ENCODINGS: list[bytes] = []


def valid_encodings_cached() -> list[bytes]:
    if not _ENCODINGS:
        _ENCODINGS.extend(valid_encodings())
    return _ENCODINGS


@settings(max_examples=200, deadline=None)
@given(which=st.integers(0, 2**16), pos=st.integers(0, 2**16), xor=st.integers(1, 255))
def test_flipped_bytes_decode_or_raise_codec_error(which: int, pos: int, xor: int) -> None:
    encodings = valid_encodings_cached()
    data = bytearray(encodings[which % len(encodings)])
    data[pos % len(data)] ^= xor
    try:
        p = Codec().decode(bytes(data), claimed_numel(data))
    except CodecError:
        return
    assert_same(Codec().decode(Codec().encode(p), p.numel), p)


def reject(data: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match) as info:
        Codec().decode(data, claimed_numel(data))
    assert "\n" not in str(info.value)


def test_bad_headers_are_rejected() -> None:
    good = Codec().encode(Payload(10, values=torch.ones(10)))
    reject(b"", "version")
    reject(bytes([VERSION + 1]) + good[1:], "version")
    reject(bytes([0]) + good[1:], "version")
    reject(bytes([VERSION, 0x80, 10]), "flag")
    reject(bytes([VERSION, FLAG_FP16, 10]), "float16")
    reject(bytes([VERSION, FLAG_BITMAP, 10]), "bitmap")
    reject(bytes([VERSION, 0]) + b"\x80" * 6 + b"\x01", "longer")
    reject(bytes([VERSION, 0]) + leb(2**40), "overflow")
    reject(bytes([VERSION, 0]) + leb(MAX_NUMEL + 1), "numel")
    reject(bytes([VERSION, 0, 0x85, 0x00]), "minimal")


def test_bad_indices_are_rejected() -> None:
    head = bytes([VERSION, FLAG_INDICES]) + leb(10)
    assert Codec().decode(head + leb(2) + leb(3) + leb(2), 10).indices.tolist() == [2, 4]
    reject(head + leb(2) + leb(3) + leb(0), "strictly increasing")
    reject(head + leb(2) + leb(3) + leb(8), "out of range")  # index 10
    reject(head + leb(1) + leb(11), "beyond numel")
    reject(head + leb(11) + bytes(11), "numel")  # more indices than positions
    reject(head + leb(3) + leb(1) + leb(1), "truncated")
    reject(head + leb(1) + b"\x81\x00", "minimal")
    # Bitmap: bits past numel must be clear.
    reject(bytes([VERSION, FLAG_INDICES | FLAG_BITMAP]) + leb(10) + b"\x01\x04", "past numel")
    ok = bytes([VERSION, FLAG_INDICES | FLAG_BITMAP]) + leb(10) + b"\x01\x02"
    assert Codec().decode(ok, 10).indices.tolist() == [0, 9]


def test_bad_counts_are_rejected() -> None:
    idx = bytes([VERSION, FLAG_INDICES | FLAG_VALUES]) + leb(10) + leb(2) + leb(1) + leb(1)
    reject(idx + leb(3) + bytes(12), "3 values for 2 indices")
    reject(bytes([VERSION, FLAG_VALUES]) + leb(10) + leb(11) + bytes(44), "numel")
    reject(bytes([VERSION, FLAG_VALUES]) + leb(10) + leb(10) + bytes(39), "truncated values")
    reject(bytes([VERSION, FLAG_VALUES]) + leb(2**30) + leb(2**30), "truncated values")
    reject(bytes([VERSION, FLAG_SCALES]) + leb(0) + leb(2**17), "scales")
    codes = bytes([VERSION, FLAG_CODES]) + leb(10)
    reject(codes + leb(3) + bytes([0]), "bits 0")
    reject(codes + leb(3) + bytes([17]) + bytes(7), "bits 17")
    reject(codes + leb(3) + bytes([3]) + b"\xff\x02", "padding")  # bit 9 of 9 used
    reject(codes + leb(11) + bytes([1, 0, 0]), "numel")
    assert Codec().decode(codes + leb(3) + bytes([3]) + b"\xff\x00", 10).codes.tolist() == [7, 7, 3]


def zstd_frame(body: bytes, *, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=content_size).compress(body)


def test_zstd_bodies_are_checked() -> None:
    head = bytes([VERSION, FLAG_VALUES | FLAG_ZSTD]) + leb(10)
    body = leb(10) + bytes(40)
    assert Codec().decode(head + zstd_frame(body), 10).values.tolist() == [0.0] * 10
    reject(head + b"not a zstd frame", "zstd")
    reject(head + zstd_frame(body)[:-3], "zstd")
    reject(head + zstd_frame(body) + b"\x00", "unused data")
    reject(head + zstd_frame(body, content_size=False), "content size")
    reject(head + zstd_frame(body + b"\x00"), "trailing")


def test_zstd_bomb_is_refused_before_decompressing() -> None:
    # 100 MB of zeros for a 10-element payload: the frame states its size, which a 10-element
    # header cannot need.
    head = bytes([VERSION, FLAG_VALUES | FLAG_ZSTD]) + leb(10)
    reject(head + zstd_frame(bytes(100_000_000)), "at most")


def zeros_frame(size: int) -> bytes:
    """A zstd frame of `size` zero bytes that states its size, built 1 MiB at a time."""
    stream = zstandard.ZstdCompressor(level=1).compressobj(size=size)
    chunk = bytes(1 << 20)
    parts = [stream.compress(chunk) for _ in range(size >> 20)]
    return b"".join([*parts, stream.compress(bytes(size % len(chunk))), stream.flush()])


def test_a_small_frame_never_makes_a_large_allocation() -> None:
    """A 32 kB frame stating a 1 GiB body (dense values of a 2**28-value header). The bound
    is the receiver's, never the header's: its tensor's length refuses the header, and the
    configured payload limit refuses the body, both before anything near its size is
    allocated. decode has no form without a bound."""
    numel = 2**28
    bomb = bytes([VERSION, FLAG_VALUES | FLAG_ZSTD]) + leb(numel)
    bomb += zeros_frame(len(leb(numel)) + 4 * numel)
    assert len(bomb) < 64 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match=f"numel {numel} where 1000 was expected"):
            Codec().decode(bomb, 1000)
        with pytest.raises(CodecError, match=r"claims 1073741829 bytes, at most 65536 allowed$"):
            Codec().decode(bomb, numel, max_bytes=65536)
        with pytest.raises(CodecError, match=r"more than the limit of 1024$"):
            Codec().decode(bomb, numel, max_bytes=1024)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # the frame and a copy of it, nothing of the body's size
    with pytest.raises(TypeError):
        Codec().decode(bomb)  # type: ignore[call-arg]


def test_zstd_frame_that_lies_about_its_size_is_stopped() -> None:
    # A frame without a content size, then given one (300 bytes) in its header: zstd stops
    # when the output outgrows it rather than producing all 50 MB.
    frame = zstd_frame(bytes(50_000_000), content_size=False)
    assert frame[4] & 0xE0 == 0  # no content size, not single-segment: a window byte follows
    forged = frame[:4] + bytes([frame[4] | 0x40]) + frame[5:6] + (300 - 256).to_bytes(2, "little")
    forged += frame[6:]
    assert zstandard.frame_content_size(forged) == 300
    head = bytes([VERSION, FLAG_VALUES | FLAG_ZSTD]) + leb(1_000)
    reject(head + forged, "zstd")


# --- encode rejects invalid payloads -------------------------------------------------------

BAD_PAYLOADS = {
    "unsorted indices": Payload(10, values=torch.ones(2), indices=torch.tensor([5, 2])),
    "repeated index": Payload(10, values=torch.ones(2), indices=torch.tensor([2, 2])),
    "negative index": Payload(10, indices=torch.tensor([-1, 2])),
    "index == numel": Payload(10, indices=torch.tensor([3, 10])),
    "float indices": Payload(10, indices=torch.tensor([1.0, 2.0])),
    "2-D indices": Payload(10, indices=torch.tensor([[1, 2]])),
    "values vs indices": Payload(10, values=torch.ones(3), indices=torch.tensor([1, 2])),
    "values > numel": Payload(2, values=torch.ones(3)),
    "integer values": Payload(3, values=torch.ones(3, dtype=torch.int64)),
    "2-D values": Payload(4, values=torch.ones(2, 2)),
    "bits 0": Payload(3, codes=torch.tensor([0, 1, 0]), bits=0),
    "bits 17": Payload(3, codes=torch.tensor([0, 1, 0]), bits=17),
    "code == 2**bits": Payload(3, codes=torch.tensor([0, 8, 0]), bits=3),
    "negative code": Payload(3, codes=torch.tensor([0, -1, 0]), bits=3),
    "codes > numel": Payload(2, codes=torch.tensor([0, 1, 0]), bits=3),
    "bits without codes": Payload(3, bits=4),
    "negative numel": Payload(-1),
    "numel too large": Payload(MAX_NUMEL + 1),
    "float numel": Payload(3.0),
    "2-D scales": Payload(3, scales=torch.ones(1, 1)),
}


@pytest.mark.parametrize("name", list(BAD_PAYLOADS))
def test_encode_rejects_invalid_payloads(name: str) -> None:
    with pytest.raises(ValueError):
        Codec().encode(BAD_PAYLOADS[name])


def test_codec_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        Codec("bf16")


def test_float16_values_travel_as_float16_whatever_the_codec() -> None:
    x = torch.randn(1000)
    half = Codec().encode(Payload(numel=1000, values=x.half()))
    assert len(half) == len(Codec(values="fp16").encode(Payload(numel=1000, values=x)))
    assert len(half) < 0.6 * len(Codec().encode(Payload(numel=1000, values=x)))
    back = Codec().decode(half, 1000).values
    assert back is not None and torch.equal(back, x.half().float())
