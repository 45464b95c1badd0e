"""Bit-level pieces of the wire codec: LEB128 varints, index forms, bit-packed codes.

Everything is vectorized over numpy arrays (one pass per 7-bit group or per bit column),
never a Python loop per element: a payload may hold hundreds of thousands of entries.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

VARINT_LIMIT = 2**40
VARINT_MAX_BYTES = 6  # ceil(40 / 7)

Int64s = npt.NDArray[np.int64]
Bytes = npt.NDArray[np.uint8]


class CodecError(ValueError):
    """Bytes that are not a payload this codec wrote; message is one line naming what is wrong."""


# --- varints ------------------------------------------------------------------------------


def uvarint(n: int) -> bytes:
    """One varint (headers and counts: a handful per payload, so a Python loop is fine)."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def varint_lengths(x: Int64s) -> Int64s:
    """Bytes each varint of `x` (all in [0, 2**40)) takes."""
    lengths = np.ones(x.shape, dtype=np.int64)
    for k in range(1, VARINT_MAX_BYTES):
        lengths += x >= (1 << (7 * k))
    return lengths


def varints(x: Int64s, lengths: Int64s) -> Bytes:
    """The varints of `x` (with their `varint_lengths`) back to back.

    One vectorized pass per 7-bit group (at most 6), not one per element: pass k writes
    group k of every value that has one.
    """
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    for k in range(int(lengths.max()) if x.size else 0):
        has = lengths > k
        xs, at, n = (x, starts, lengths) if k == 0 else (x[has], starts[has], lengths[has])
        out[at + k] = ((xs >> (7 * k)) & 0x7F) | ((n > k + 1) << 7)  # high bit: more follow
    return out


def decode_varints(buf: Bytes, count: int, what: str) -> tuple[Int64s, int]:
    """The first `count` varints in `buf` and the bytes they take."""
    if count == 0:
        return np.zeros(0, dtype=np.int64), 0
    # A varint ends at the first byte with its high bit clear; no varint is longer than
    # VARINT_MAX_BYTES, so looking further than that cannot find a valid end.
    window = buf[: count * VARINT_MAX_BYTES]
    ends = np.flatnonzero(window < 0x80)
    if ends.size < count:
        raise CodecError(f"truncated {what}: {count} varints expected, {ends.size} found")
    ends = ends[:count]
    starts = np.zeros(count, dtype=np.int64)
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    longest = int(lengths.max())
    if longest > VARINT_MAX_BYTES:
        raise CodecError(f"{what}: varint longer than {VARINT_MAX_BYTES} bytes")
    if np.any((lengths > 1) & (window[ends] == 0)):
        raise CodecError(f"{what}: varint with a trailing zero group (not minimal)")
    values = window[starts].astype(np.int64) & 0x7F
    for k in range(1, longest):  # group k of every varint that has one
        has = lengths > k
        values[has] |= (window[starts[has] + k].astype(np.int64) & 0x7F) << (7 * k)
    if int(values.max()) >= VARINT_LIMIT:
        raise CodecError(f"{what}: varint overflows 2**40")
    return values, int(ends[-1]) + 1


# --- field packing ------------------------------------------------------------------------


def index_forms(idx: Int64s, numel: int) -> tuple[Int64s, Int64s, int, int]:
    """Deltas and their varint lengths for sorted indices `idx`, and the byte sizes of the
    delta-varint and bitmap forms."""
    deltas = np.diff(idx, prepend=-1)
    lengths = varint_lengths(deltas)
    varint_size = len(uvarint(idx.size)) + int(lengths.sum())
    return deltas, lengths, varint_size, (numel + 7) // 8


def encode_indices(idx: Int64s, numel: int) -> tuple[bool, bytes]:
    """(is bitmap, bytes) of whichever index form is shorter; ValueError unless `idx` is
    strictly increasing in [0, numel)."""
    # The range check comes first: with every index in range, no delta can overflow.
    if idx.size and (idx.min() < 0 or idx.max() >= numel):
        raise ValueError(f"indices must lie in [0, {numel}), got {idx.min()}..{idx.max()}")
    deltas, lengths, varint_size, bitmap_size = index_forms(idx, numel)
    if idx.size and deltas.min() < 1:
        raise ValueError("indices must be strictly increasing")
    if bitmap_size < varint_size:
        bitmap = np.zeros(numel, dtype=np.uint8)
        bitmap[idx] = 1
        return True, np.packbits(bitmap, bitorder="little").tobytes()
    return False, uvarint(idx.size) + varints(deltas, lengths).tobytes()


def pack_codes(codes: Int64s, bits: int) -> bytes:
    if bits == 8:  # byte-aligned widths: the bit matrix below would give the same bytes
        return codes.astype(np.uint8).tobytes()
    if bits == 16:
        return codes.astype("<u2").tobytes()
    # Each code's 16 bits, low bit first, as a row; keep `bits` columns and pack them.
    rows = codes.astype("<u2").view(np.uint8).reshape(-1, 2)
    matrix = np.unpackbits(rows, axis=1, bitorder="little")[:, :bits]
    return np.packbits(matrix.ravel(), bitorder="little").tobytes()


def unpack_codes(buf: Bytes, count: int, bits: int) -> Int64s:
    if bits == 8:
        return buf.astype(np.int64)
    if bits == 16:
        return buf.view("<u2").astype(np.int64)
    matrix = np.zeros((count, 16), dtype=np.uint8)
    matrix[:, :bits] = np.unpackbits(buf, count=count * bits, bitorder="little").reshape(
        count, bits
    )
    return np.packbits(matrix, axis=1, bitorder="little").view("<u2").ravel().astype(np.int64)


def padding_clear(buf: Bytes, nbits: int) -> bool:
    """Whether the bits of `buf` past the first `nbits` (little bit order) are all 0."""
    used = nbits % 8
    return used == 0 or int(buf[-1]) >> used == 0
