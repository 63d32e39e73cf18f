"""Standalone runtime for hmcompress files (format: docs/FORMAT.md).

This module imports only torch, safetensors and the standard library, so it can be copied next to a
compressed checkpoint (the writer does so, as ``hmruntime.py``) and used without hmcompress.
"""
from __future__ import annotations

import dataclasses
import math

import torch

FORMAT_NAME = "hmcompress"
FORMAT_VERSION = 1

# Codec ids are part of the file format: never renumber.
CODECS: tuple[str, ...] = ("f64", "f32", "f16", "bf16", "i8", "i4", "i7", "i6", "i5")
CODEC_ID = {name: i for i, name in enumerate(CODECS)}
# Integer codecs: bits per code. i8 stores int8 codes; narrower ones pack offset codes
# (code + 2**(bits-1)) into a little-endian bit stream per row (i4: low nibble first).
CODE_BITS = {"i8": 8, "i7": 7, "i6": 6, "i5": 5, "i4": 4}
POOL_DTYPE = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i8": torch.int8,
    **{codec: torch.uint8 for codec, bits in CODE_BITS.items() if bits < 8},
}
INTEGER_CODECS = frozenset(CODE_BITS)
DENSE, LOWRANK, ROWS = 0, 1, 2  # segment kinds
BLOCK_COLUMNS = 5  # row0, col0, rows, cols, level
SEGMENT_COLUMNS = 6  # block, kind, codec, rank, offset, scale_offset


class FormatError(ValueError):
    """A compressed file (or packed matrix) breaks the format; the message says where and how."""


def stored_row_length(codec: str, length: int) -> int:
    """Pool elements one stored row of ``length`` numbers occupies."""
    bits = CODE_BITS.get(codec, 8)
    return (length * bits + 7) // 8 if bits < 8 else length


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Signed codes from rows of a little-endian bit stream: (k, bytes) uint8 -> (k, length) int16."""
    shifts = torch.arange(8, dtype=torch.uint8)
    stream = ((packed.unsqueeze(-1) >> shifts) & 1).reshape(packed.shape[0], -1)
    digits = stream[:, : length * bits].reshape(packed.shape[0], length, bits).to(torch.int16)
    weights = torch.tensor([1 << j for j in range(bits)], dtype=torch.int16)
    return (digits * weights).sum(-1, dtype=torch.int16) - (1 << (bits - 1))


def mask_bytes(rows: int) -> int:
    """Bytes of the bitmap naming which of a block's ``rows`` a ROWS segment stores."""
    return (rows + 7) // 8


def mask_rows(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """Row numbers whose bit is set in a little-endian bitmap (bit i of byte i // 8 = row i)."""
    bits = (mask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return torch.nonzero(bits.reshape(-1)[:rows]).reshape(-1)


def decode_rows(codec: str, data: torch.Tensor, scales: torch.Tensor | None, length: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Turn ``k`` stored rows (flat pool slice) into a ``(k, length)`` tensor of ``dtype``."""
    bits = CODE_BITS.get(codec, 8)
    if bits < 8:
        packed = data.reshape(-1, stored_row_length(codec, length))
        values = unpack_codes(packed, bits, length).to(dtype)
    else:
        values = data.reshape(-1, length).to(dtype)
    if codec in INTEGER_CODECS:
        values = values * scales.to(dtype).unsqueeze(1)
    return values


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

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this matrix occupies in a file."""
        tensors = [self.blocks, self.segments, self.row_masks, *self.pools.values(),
                   *self.scales.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def segment_values(self):
        """Yield ``(block_row0, block_col0, kind, codec, first, second)`` per segment, decoded.

        Dense: ``first`` is the block, ``second`` None. Low rank: ``A`` (k x rows) and ``B``
        (k x cols), the block being AᵀB. Rows: the k stored rows (k x cols) and their row numbers
        within the block. Values are float64, exact for every codec.
        """
        blocks = self.blocks.tolist()
        mask_cursor = 0
        for block, kind, codec_id, rank, offset, scale_offset in self.segments.tolist():
            row0, col0, rows, cols, _level = blocks[block]
            codec = CODECS[codec_id]

            def run(first_row: int, count: int, length: int, start: int) -> torch.Tensor:
                """``count`` stored rows of ``length`` from pool element ``start``."""
                scale = self.scales.get(codec)
                sc = scale[scale_offset + first_row:scale_offset + first_row + count] if scale is not None else None
                size = count * stored_row_length(codec, length)
                return decode_rows(codec, self.pools[codec][start:start + size], sc, length, torch.float64)

            if kind == LOWRANK:
                a = run(0, rank, rows, offset)
                b = run(rank, rank, cols, offset + rank * stored_row_length(codec, rows))
                yield row0, col0, kind, codec, a, b
            elif kind == ROWS:
                index = mask_rows(self.row_masks[mask_cursor:mask_cursor + mask_bytes(rows)], rows)
                mask_cursor += mask_bytes(rows)
                yield row0, col0, kind, codec, run(0, rank, cols, offset), index
            else:
                yield row0, col0, kind, codec, run(0, rows, cols, offset), None

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stored matrix, computed in float64 and cast to ``dtype`` (default: source dtype)."""
        out = torch.zeros(self.shape, dtype=torch.float64)
        for row0, col0, kind, _codec, first, second in self.segment_values():
            if kind == DENSE:
                out[row0:row0 + first.shape[0], col0:col0 + first.shape[1]] = first
            elif kind == ROWS:
                out[row0 + second, col0:col0 + first.shape[1]] = first
            else:
                out[row0:row0 + first.shape[1], col0:col0 + second.shape[1]] += first.T @ second
        return out.to(self.dtype if dtype is None else dtype)


def dense_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of this shape and dtype."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
