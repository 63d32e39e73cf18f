"""The format's vocabulary (docs/FORMAT.md): codecs, segment kinds, dtypes, table layouts, bits.

Everything that names a part of the file lives here once; the core, the planner, the writer, the
reports and the rest of the runtime read these tables instead of keeping their own.
"""
from __future__ import annotations

import dataclasses
import enum
import math

import torch

FORMAT_NAME = "hmcompress"
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)  # 1: no coded pools; 3: codecs u8, u8lo; 4: coded pools by row classes
BLOCK_COLUMNS = 5  # row0, col0, rows, cols, level
SEGMENT_COLUMNS = 6  # block, kind, codec, rank, offset, scale_offset


class Kind(enum.IntEnum):
    """What a segment stores of its block (the segment table's ``kind`` column)."""

    DENSE = 0  # every number of the block
    LOWRANK = 1  # factors A (k x rows) and B (k x cols): the block is AᵀB
    ROWS = 2  # k of the block's rows, named by a bitmap; the other rows are zero


DENSE, LOWRANK, ROWS = Kind.DENSE, Kind.LOWRANK, Kind.ROWS


@dataclasses.dataclass(frozen=True)
class Codec:
    """How a segment's numbers are stored: its pool's dtype, and for integer codes their width.

    Integer codecs store per-row symmetric codes with one float32 scale per stored row (one per
    segment for ``segment_scale`` codecs: a uniform quantizer's single step); codes narrower than
    8 bits are packed as offset codes (code + 2**(bits-1)) into a little-endian bit stream per row.
    Floating codecs store the numbers rounded to the pool's dtype.
    """

    name: str  # the file's pool/scale tensor suffix (``pool.i8``)
    id: int  # the segment table's codec column: part of the format, never renumbered
    bits: int  # bits per stored number
    pool_dtype: torch.dtype
    unit_roundoff: float | None  # floating codecs: |fl(x) - x| <= u |x| in range; None for integers
    segment_scale: bool = False  # one scale for all of a segment's stored rows
    since: int = 1  # the format version that introduced it

    @property
    def integer(self) -> bool:
        return self.unit_roundoff is None

    @property
    def packed(self) -> bool:
        """Codes narrower than a byte, packed into a bit stream."""
        return self.integer and self.bits < 8

    def row_length(self, length: int) -> int:
        """Pool elements one stored row of ``length`` numbers occupies."""
        return (length * self.bits + 7) // 8 if self.packed else length


CODEC_TABLE: tuple[Codec, ...] = (
    Codec("f64", 0, 64, torch.float64, 2.0**-53),
    Codec("f32", 1, 32, torch.float32, 2.0**-24),
    Codec("f16", 2, 16, torch.float16, 2.0**-11),
    Codec("bf16", 3, 16, torch.bfloat16, 2.0**-8),
    Codec("i8", 4, 8, torch.int8, None),
    Codec("i4", 5, 4, torch.uint8, None),
    Codec("i7", 6, 7, torch.uint8, None),
    Codec("i6", 7, 6, torch.uint8, None),
    Codec("i5", 8, 5, torch.uint8, None),
    Codec("u8", 9, 8, torch.int8, None, segment_scale=True, since=3),
    Codec("u8lo", 10, 8, torch.int8, None, segment_scale=True, since=3),
)
CODEC = {codec.name: codec for codec in CODEC_TABLE}
CODECS: tuple[str, ...] = tuple(codec.name for codec in CODEC_TABLE)  # names in id order
INTEGER_CODECS = frozenset(codec.name for codec in CODEC_TABLE if codec.integer)
SCALE_DTYPE = torch.float32  # one scale per stored row of an integer codec (per segment: segment_scale)


def codecs_of_version(version: int) -> tuple[str, ...]:
    """The codecs a file of this format version may use."""
    return tuple(c.name for c in CODEC_TABLE if c.since <= version)


@dataclasses.dataclass(frozen=True)
class DType:
    """A tensor dtype as the metadata names it, as safetensors names it, and its size."""

    name: str  # the metadata's ``dtype`` of a matrix (torch's name)
    code: str  # safetensors' dtype string
    torch_dtype: torch.dtype | None  # None: safetensors knows it, this torch build does not
    itemsize: int


def _dtype(name: str, code: str, itemsize: int) -> DType:
    return DType(name, code, getattr(torch, name, None), itemsize)


DTYPE_TABLE: tuple[DType, ...] = (
    _dtype("float64", "F64", 8), _dtype("float32", "F32", 4), _dtype("float16", "F16", 2),
    _dtype("bfloat16", "BF16", 2), _dtype("int64", "I64", 8), _dtype("int32", "I32", 4),
    _dtype("int16", "I16", 2), _dtype("int8", "I8", 1), _dtype("uint8", "U8", 1),
    _dtype("bool", "BOOL", 1), _dtype("uint16", "U16", 2), _dtype("uint32", "U32", 4),
    _dtype("uint64", "U64", 8), _dtype("float8_e4m3fn", "F8_E4M3", 1),
    _dtype("float8_e5m2", "F8_E5M2", 1), _dtype("complex64", "C64", 8),
)
SAFETENSORS_DTYPES = {d.code: d for d in DTYPE_TABLE}  # safetensors' dtype string -> DType
SAFETENSORS_CODE = {d.torch_dtype: d.code for d in DTYPE_TABLE if d.torch_dtype is not None}
# Source dtypes a compressed matrix may have (its reconstruction is rounded to it).
MATRIX_DTYPES = {name: getattr(torch, name) for name in ("float64", "float32", "float16", "bfloat16")}
MATRIX_DTYPE_NAMES = {dtype: name for name, dtype in MATRIX_DTYPES.items()}


def dense_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of this shape and dtype."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


UNPACK_CODES = 1 << 18  # codes of a bit stream unpacked at once (`unpack_codes`)

# Bits: every bitmap and bit stream of the format is little-endian (bit j of byte i is bit
# 8 i + j of the stream), so one pair of helpers packs and unpacks them all.

def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """(..., bytes) uint8 -> (..., 8 * bytes) uint8 of 0/1, least significant bit first."""
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., n) 0/1 values -> (..., ceil(n / 8)) uint8, least significant bit first (zero-padded)."""
    padded = torch.nn.functional.pad(bits.to(torch.int16), (0, (-bits.shape[-1]) % 8))
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.int16, device=bits.device)
    grouped = padded.reshape(*bits.shape[:-1], -1, 8)
    return (grouped * weights).sum(-1).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (k, L) -> rows of a bit stream of offset codes, (k, bytes) uint8."""
    offset = (codes + (1 << (bits - 1))).to(torch.int16)
    digits = (offset.unsqueeze(-1) >> torch.arange(bits, dtype=torch.int16)) & 1
    return pack_bits(digits.reshape(codes.shape[0], -1))


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Signed codes from rows of a bit stream: (k, bytes) uint8 -> (k, length) int16.

    A slice of rows at a time (`UNPACK_CODES` codes): the bits of a code take ``bits`` bytes
    and then ``2·bits`` while they are summed, so a whole large pool at once would cost some
    thirty times its codes."""
    out = torch.empty(packed.shape[0], length, dtype=torch.int16)
    weights = torch.tensor([1 << j for j in range(bits)], dtype=torch.int16)
    rows = max(1, UNPACK_CODES // max(1, length))
    for start in range(0, packed.shape[0], rows):
        part = packed[start:start + rows]
        digits = unpack_bits(part)[:, : length * bits].reshape(part.shape[0], length, bits).to(torch.int16)
        torch.sum(digits * weights, -1, dtype=torch.int16, out=out[start:start + rows])
    return out.sub_(1 << (bits - 1))


def mask_bytes(rows: int) -> int:
    """Bytes of the bitmap naming which of a block's ``rows`` a ROWS segment stores."""
    return (rows + 7) // 8


def mask_rows(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """Row numbers whose bit is set in a bitmap (bit i of byte i // 8 = row i)."""
    return torch.nonzero(unpack_bits(mask)[:rows]).reshape(-1)


def row_mask(rows: torch.Tensor, count: int) -> torch.Tensor:
    """The bitmap of ``count`` bits with the given rows set (format: ROWS segments)."""
    bits = torch.zeros(count, dtype=torch.uint8)
    bits[rows] = 1
    return pack_bits(bits)


def decode_codes(codec: str, data: torch.Tensor, length: int) -> torch.Tensor:
    """``k`` stored rows (flat pool slice) as stored: ``(k, length)`` integer codes (int8, or int16
    unpacked from a bit stream) for integer codecs, the pool's floats for floating ones."""
    spec = CODEC[codec]
    if spec.packed:
        return unpack_codes(data.reshape(-1, spec.row_length(length)), spec.bits, length)
    return data.reshape(-1, length)


def decode_rows(codec: str, data: torch.Tensor, scales: torch.Tensor | None, length: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Turn ``k`` stored rows (flat pool slice) into a ``(k, length)`` tensor of ``dtype``."""
    values = decode_codes(codec, data, length).to(dtype)
    if CODEC[codec].integer:  # codes converted to a float dtype: a tensor of its own, scaled in place
        values.mul_(scales.to(dtype).unsqueeze(1))
    return values
