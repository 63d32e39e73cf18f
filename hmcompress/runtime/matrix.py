"""`HMatrix`: a hierarchical matrix in packed form, as the library holds it and the file stores it.

Decoding goes one segment at a time into `DenseSegment`, `LowRankSegment` or `RowsSegment`
(float64, exact for every codec); `to_dense` and `matmul` are built on them. The fast product
lives in `product.py`, validation in `validate.py`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from hmcompress.runtime.format import (
    CODEC,
    CODECS,
    DENSE,
    LOWRANK,
    ROWS,
    decode_codes,
    decode_rows,
    mask_bytes,
    mask_rows,
)
from hmcompress.runtime.validate import validate_packed


@dataclasses.dataclass
class HMatrix:
    """A hierarchical matrix in packed form: a block table, a segment table and codec pools.

    This is both the in-memory type of the library and exactly what the file stores, so what the
    library measures is what a user of the file gets.
    """

    shape: tuple[int, int]
    dtype: torch.dtype  # the source matrix's dtype (dense reconstruction is cast back to it)
    blocks: torch.Tensor  # int32 (B, 5)
    segments: torch.Tensor  # int32 (S, 6)
    pools: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    row_masks: torch.Tensor = dataclasses.field(  # uint8: one bitmap per ROWS segment, in order
        default_factory=lambda: torch.zeros(0, dtype=torch.uint8))
    # Integer pools as the file stores them, entropy-coded (FORMAT.md version 2), where they are:
    # what a file holds in place of ``pools[codec]``, which stays the decoded fixed-width pool.
    coded: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def validate(self, name: str = "matrix") -> None:
        """Raise `FormatError` ("<name>: <problem>") unless this is a well-formed packed matrix.

        Everything is checked with sorting and vector operations (no m*n arrays, no per-block
        Python loops): tables' dtypes and shapes, blocks tiling the matrix exactly, each segment's
        block, kind, codec, rank, pool and scale ranges, the segments of a block, and row bitmaps.
        """
        validate_packed(self, name)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this matrix occupies in a file (coded pools at their coded size)."""
        tensors = [self.blocks, self.segments, self.row_masks, *self.scales.values()]
        return sum(t.numel() * t.element_size() for t in tensors) + sum(map(self.pool_bytes, self.pools))

    @property
    def term_products(self) -> float:
        """Products `to_dense` computes for the low-rank segments: rank · rows · cols each (float64:
        a hostile table's would wrap int64)."""
        low = self.segments[self.segments[:, 1] == LOWRANK].to(torch.int64)
        sizes = self.blocks[low[:, 0]].double()
        return float((low[:, 3].double() * sizes[:, 2] * sizes[:, 3]).sum())

    def pool_bytes(self, codec: str) -> int:
        """Bytes the file stores for a codec's pool: coded, or else fixed-width."""
        pool = self.coded.get(codec, self.pools[codec])
        return pool.numel() * pool.element_size()

    def segment_values(self, raw: bool = False, numbers: int | None = None) -> Iterator[Segment]:
        """Every segment decoded, in table order: values in float64 (exact for every codec), or
        with ``raw`` as stored (`format.decode_codes`: integer codes, to be multiplied by their
        row's scale, or the pool's floats). With ``numbers``, rows and dense segments come in
        pieces of consecutive stored rows of about that many numbers (each a segment of the same
        kind over its rows), so a large segment is never decoded whole."""
        blocks = self.blocks.tolist()
        mask_cursor = 0
        for block, kind, codec_id, rank, offset, scale_offset in self.segments.tolist():
            row0, col0, rows, cols, _level = blocks[block]
            codec = CODECS[codec_id]
            run = _RowRun(self, codec, offset, scale_offset, raw)
            step = max(1, numbers // max(1, cols)) if numbers else None
            if kind == LOWRANK:
                a, a_scales = run.take(rank, rows)
                b, b_scales = run.take(rank, cols)
                yield LowRankSegment(row0, col0, rows, cols, codec, a, b, a_scales, b_scales)
            elif kind == ROWS:
                index = mask_rows(self.row_masks[mask_cursor:mask_cursor + mask_bytes(rows)], rows)
                mask_cursor += mask_bytes(rows)
                for start, count in _pieces(rank, step):
                    values, scales = run.take(count, cols)
                    yield RowsSegment(row0, col0, rows, cols, codec, values, index[start:start + count], scales)
            else:
                for start, count in _pieces(rows, step):
                    values, scales = run.take(count, cols)
                    yield DenseSegment(row0 + start, col0, count, cols, codec, values, scales)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stored matrix in float64, rounded once to ``dtype`` (default: the source dtype).

        The float64 matrix is computed exactly as docs/FORMAT.md prescribes ("Dense
        reconstruction"), so every reader gets the same bits: every entry starts at +0; the
        segments, in table order, add their values to their block's entries; a low-rank segment
        adds its terms ``a[j] ⊗ b[j]`` for j = 0, 1, ... in turn, each product rounded to float64
        and then added (never fused). The result is rounded once, to nearest with ties to even,
        from float64 (`round_to_dtype`).
        """
        out = torch.zeros(self.shape, dtype=torch.float64)
        for s in self.segment_values(numbers=_BAND_NUMBERS):  # rows in pieces: never a whole large segment in float64
            view = out[s.row0:s.row0 + s.rows, s.col0:s.col0 + s.cols]
            if isinstance(s, LowRankSegment):  # by row bands that stay in cache; same sums, same order
                band = max(1, _BAND_NUMBERS // max(1, s.cols))
                for start in range(0, s.rows, band):
                    part = view[start:start + band]
                    term = torch.empty_like(part)
                    a = s.a[:, start:start + band]
                    for j in range(s.a.shape[0]):  # by index: iterating a tensor makes every row's view at once
                        part += torch.mul(a[j].unsqueeze(1), s.b[j], out=term)
            elif isinstance(s, RowsSegment):  # each row once: the same sums as view[index] += values, no gathered copy
                view.index_add_(0, s.index, s.values)
            else:
                view += s.block
        return round_to_dtype(out, self.dtype if dtype is None else dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``H @ x`` for x of shape (n,) or (n, k), in float64, without forming H."""
        if x.ndim not in (1, 2) or x.shape[0] != self.shape[1]:
            raise ValueError(f"cannot multiply a {self.shape} H-matrix by {tuple(x.shape)}")
        columns = x.double().reshape(self.shape[1], -1)
        out = torch.zeros(self.shape[0], columns.shape[1], dtype=torch.float64)
        for s in self.segment_values():
            out[s.row0:s.row0 + s.rows] += s.times(columns[s.col0:s.col0 + s.cols])
        return out.reshape(self.shape[0], *x.shape[1:])

    __matmul__ = matmul


def _pieces(count: int, step: int | None) -> list[tuple[int, int]]:
    """(start, length) of consecutive pieces of ``count`` rows, ``step`` at most each; one piece
    (even of no rows) without a step, so every segment is yielded at least once."""
    if step is None or count <= step:
        return [(0, count)]
    return [(start, min(step, count - start)) for start in range(0, count, step)]


_BAND_NUMBERS = 1 << 17  # entries of a low-rank block updated term by term at once (`HMatrix.to_dense`)
# Significand bits (with the implicit one) and the exponent of the least subnormal of the dtypes
# torch cannot round to from float64 in one step: its float64 -> float16 / bfloat16 conversion
# goes through float32 and so rounds twice (1 + 2**-8 + 2**-30 becomes bfloat16 1.0, not 1.0078125).
_NARROW_FLOATS = {torch.float16: (11, -24), torch.bfloat16: (8, -133)}


def round_to_dtype(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 ``values`` rounded once to ``dtype``: to nearest, ties to even, overflow to ±inf.

    float64 and float32 are torch's own (single, IEEE) conversions. For float16 and bfloat16 each
    value is rounded in float64 to a multiple of its target spacing 2**q (q = its exponent less the
    precision, at least the least subnormal's): scaling by 2**-q, `torch.round` (ties to even) and
    scaling back are exact, and the result, representable in ``dtype`` (or beyond its range,
    hence ±inf), converts exactly.
    """
    if values.dtype != torch.float64:
        raise ValueError(f"round_to_dtype rounds float64 values, got {values.dtype}")
    if dtype not in _NARROW_FLOATS:
        return values.to(dtype)
    bits, least = _NARROW_FLOATS[dtype]
    _mantissa, exponent = torch.frexp(values)  # |values| < 2**exponent; 0 and ±inf: exponent 0
    spacing = (exponent.to(torch.int64) - bits).clamp_(min=least)
    scaled = values * _power_of_two(-spacing)  # |scaled| < 2**bits: exact, no overflow or underflow
    return (torch.round(scaled) * _power_of_two(spacing)).to(dtype)


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2.0**exponent (float64, exact) for integer exponents of normal numbers (-1022 .. 1023)."""
    return ((exponent + 1023) << 52).view(torch.float64)


class _RowRun:
    """Consecutive stored rows of one segment, read from its pool and scale offsets onwards."""

    def __init__(self, hm: HMatrix, codec: str, offset: int, scale_offset: int, raw: bool = False) -> None:
        self.pool, self.scales = hm.pools[codec], hm.scales.get(codec)
        self.codec, self.offset, self.scale_offset, self.raw = codec, offset, scale_offset, raw

    def take(self, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next ``count`` rows of ``length`` numbers (float64, or as stored if ``raw``) and
        their scales."""
        size = count * CODEC[self.codec].row_length(length)
        scales = None
        if self.scales is not None and CODEC[self.codec].segment_scale:  # every row: the segment's one
            scales = self.scales[self.scale_offset:self.scale_offset + 1].expand(count)
        elif self.scales is not None:
            scales = self.scales[self.scale_offset:self.scale_offset + count]
            self.scale_offset += count
        data = self.pool[self.offset:self.offset + size]
        values = (decode_codes(self.codec, data, length) if self.raw
                  else decode_rows(self.codec, data, scales, length, torch.float64))
        self.offset += size
        return values, scales


@dataclasses.dataclass
class Segment:
    """Where a decoded segment sits (its block ``row0, col0, rows, cols``) and its codec; each
    subclass names its `Kind` in the class attribute ``kind``.

    Scales (float32, one per stored row) are given for integer codecs and None for floating ones.
    """

    row0: int
    col0: int
    rows: int
    cols: int
    codec: str

    def block_values(self) -> torch.Tensor:
        """What this segment adds to its block (rows x cols, float64)."""
        raise NotImplementedError

    def times(self, x: torch.Tensor) -> torch.Tensor:
        """This segment's part of the block times ``x`` (cols x k): rows x k."""
        raise NotImplementedError


@dataclasses.dataclass
class DenseSegment(Segment):
    """The whole block, number by number."""

    kind = DENSE  # a class attribute, not a field (no annotation)
    block: torch.Tensor  # rows x cols
    scales: torch.Tensor | None

    def block_values(self) -> torch.Tensor:
        return self.block

    def times(self, x: torch.Tensor) -> torch.Tensor:
        return self.block @ x


@dataclasses.dataclass
class LowRankSegment(Segment):
    """Factors of the block: it equals ``a.T @ b``."""

    kind = LOWRANK
    a: torch.Tensor  # k x rows
    b: torch.Tensor  # k x cols
    a_scales: torch.Tensor | None
    b_scales: torch.Tensor | None

    def block_values(self) -> torch.Tensor:
        return self.a.T @ self.b

    def times(self, x: torch.Tensor) -> torch.Tensor:
        return self.a.T @ (self.b @ x)


@dataclasses.dataclass
class RowsSegment(Segment):
    """Some rows of the block; the block's other rows are zero (or in another rows segment)."""

    kind = ROWS
    values: torch.Tensor  # k x cols: the stored rows
    index: torch.Tensor  # (k,): their row numbers within the block
    scales: torch.Tensor | None

    def block_values(self) -> torch.Tensor:
        out = torch.zeros(self.rows, self.cols, dtype=self.values.dtype)
        out[self.index] = self.values
        return out

    def times(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.rows, x.shape[1], dtype=x.dtype)
        out[self.index] = self.values @ x
        return out
