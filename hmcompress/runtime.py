"""Standalone runtime for hmcompress files (format: docs/FORMAT.md).

This module imports only torch, safetensors and the standard library, so it can be copied next to a
compressed checkpoint (the writer does so, as ``hmruntime.py``) and used without hmcompress.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import struct
import time
from collections.abc import Iterator

import torch
from torch import nn

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

    def validate(self, name: str = "matrix") -> None:
        """Raise `FormatError` ("<name>: <problem>") unless this is a well-formed packed matrix.

        Everything is checked with sorting and vector operations (no m*n arrays, no per-block
        Python loops): tables' dtypes and shapes, blocks tiling the matrix exactly, each segment's
        block, kind, codec, rank, pool and scale ranges, the segments of a block, and row bitmaps.
        """
        _validate(self, name)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor this matrix occupies in a file."""
        tensors = [self.blocks, self.segments, self.row_masks, *self.pools.values(),
                   *self.scales.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def segment_values(self) -> Iterator["Segment"]:
        """Every segment decoded: values in float64 (exact for every codec) and integer scales."""
        blocks = self.blocks.tolist()
        mask_cursor = 0
        for block, kind, codec_id, rank, offset, scale_offset in self.segments.tolist():
            row0, col0, rows, cols, _level = blocks[block]
            codec = CODECS[codec_id]
            scale = self.scales.get(codec)

            def run(first_row: int, count: int, length: int, start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
                """``count`` stored rows of ``length`` from pool element ``start``, and their scales."""
                sc = scale[scale_offset + first_row:scale_offset + first_row + count] if scale is not None else None
                size = count * stored_row_length(codec, length)
                return decode_rows(codec, self.pools[codec][start:start + size], sc, length, torch.float64), sc

            if kind == LOWRANK:
                a, a_scales = run(0, rank, rows, offset)
                b, b_scales = run(rank, rank, cols, offset + rank * stored_row_length(codec, rows))
                yield Segment(row0, col0, rows, cols, kind, codec, a, b, a_scales, b_scales)
            elif kind == ROWS:
                index = mask_rows(self.row_masks[mask_cursor:mask_cursor + mask_bytes(rows)], rows)
                mask_cursor += mask_bytes(rows)
                values, scales = run(0, rank, cols, offset)
                yield Segment(row0, col0, rows, cols, kind, codec, values, index, scales, None)
            else:
                values, scales = run(0, rows, cols, offset)
                yield Segment(row0, col0, rows, cols, kind, codec, values, None, scales, None)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The stored matrix, computed in float64 and cast to ``dtype`` (default: source dtype)."""
        out = torch.zeros(self.shape, dtype=torch.float64)
        for s in self.segment_values():
            if s.kind == DENSE:
                out[s.row0:s.row0 + s.rows, s.col0:s.col0 + s.cols] = s.first
            elif s.kind == ROWS:
                out[s.row0 + s.second, s.col0:s.col0 + s.cols] = s.first
            else:
                out[s.row0:s.row0 + s.rows, s.col0:s.col0 + s.cols] += s.first.T @ s.second
        return out.to(self.dtype if dtype is None else dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``H @ x`` for x of shape (n,) or (n, k), in float64, without forming H."""
        if x.shape[0] != self.shape[1] or x.ndim not in (1, 2):
            raise ValueError(f"cannot multiply a {self.shape} H-matrix by {tuple(x.shape)}")
        product = tile_product(TilePlan.build(self).tensors(), x.double().reshape(self.shape[1], -1).T)
        return product.T.reshape(self.shape[0], *x.shape[1:])

    __matmul__ = matmul


@dataclasses.dataclass
class Segment:
    """One decoded segment of a block (``row0, col0, rows, cols``).

    Dense: ``first`` is the block. Low rank: ``first`` = A (k x rows), ``second`` = B (k x cols),
    the block being AᵀB. Rows: ``first`` holds the k stored rows (k x cols), ``second`` their row
    numbers within the block. ``first_scales``/``second_scales``: the float32 scale of each row of
    ``first``/``second`` for integer codecs, else None.
    """

    row0: int
    col0: int
    rows: int
    cols: int
    kind: int
    codec: str
    first: torch.Tensor
    second: torch.Tensor | None
    first_scales: torch.Tensor | None
    second_scales: torch.Tensor | None


def dense_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of this shape and dtype."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------
# Validation of packed matrices

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_KINDS = (DENSE, LOWRANK, ROWS)
_KIND_NAMES = {DENSE: "dense", LOWRANK: "low-rank", ROWS: "rows"}


def _first(mask: torch.Tensor) -> int:
    """Index of the first True of a 1-D boolean tensor."""
    return int(torch.nonzero(mask)[0, 0])


def _check_table(table: object, columns: int, what: str, fail) -> None:
    if not isinstance(table, torch.Tensor):
        fail(f"{what} table is not a tensor")
    if table.dtype != torch.int32 or table.ndim != 2 or table.shape[1] != columns:
        fail(f"{what} table must be int32 of shape (N, {columns}), got {table.dtype} {tuple(table.shape)}")


def _validate(hm: HMatrix, name: str) -> None:
    def fail(problem: str):
        raise FormatError(f"{name}: {problem}")

    shape = tuple(hm.shape)
    if len(shape) != 2 or not all(isinstance(d, int) and d >= 0 for d in shape):
        fail(f"shape must be two non-negative integers, got {hm.shape!r}")
    m, n = shape
    if m >= 2**31 or n >= 2**31:
        fail(f"shape {m}x{n} does not fit the int32 block table")
    if hm.dtype not in DTYPE_NAMES:
        fail(f"unsupported dtype {hm.dtype}")
    _check_table(hm.blocks, BLOCK_COLUMNS, "block", fail)
    _check_table(hm.segments, SEGMENT_COLUMNS, "segment", fail)
    for codec, pool in hm.pools.items():
        if codec not in CODEC_ID:
            fail(f"pool of unknown codec {codec!r}")
        if not isinstance(pool, torch.Tensor) or pool.dtype != POOL_DTYPE[codec] or pool.ndim != 1:
            fail(f"pool.{codec} must be a 1-D {POOL_DTYPE[codec]} tensor")
    for codec, scale in hm.scales.items():
        if codec not in CODEC_ID:
            fail(f"scales of unknown codec {codec!r}")
        if codec not in INTEGER_CODECS:
            fail(f"scales for floating-point codec {codec!r}")
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.ndim != 1:
            fail(f"scale.{codec} must be a 1-D float32 tensor")
    masks = hm.row_masks
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.uint8 or masks.ndim != 1:
        fail("row bitmaps must be a 1-D uint8 tensor")

    blocks = hm.blocks.to(torch.int64)
    count = blocks.shape[0]
    r0, c0, h, w, level = blocks.unbind(1)
    if m * n == 0 and count:
        fail(f"a zero-size {m}x{n} matrix has no blocks, found {count}")
    if count:
        bad = (r0 < 0) | (c0 < 0) | (h < 1) | (w < 1) | (r0 + h > m) | (c0 + w > n) | (level < 0)
        if bool(bad.any()):
            i = _first(bad)
            fail(f"block {i} {tuple(blocks[i].tolist())} is empty or lies outside the {m}x{n} matrix")
    areas = h * w
    if count and float(areas.double().sum()) > 2.0**62:  # the int64 sum below could wrap
        fail(f"blocks cover more than the {m}x{n} matrix (overlap)")
    area = int(areas.sum()) if count else 0
    if area != m * n:
        problem = "overlap" if area > m * n else "a hole"
        fail(f"blocks cover {area} elements, the {m}x{n} matrix has {m * n} ({problem})")
    if count:
        _check_tiling(r0, c0, h, w, m, n, fail)

    _validate_segments(hm, blocks, fail)


def _check_tiling(r0, c0, h, w, m: int, n: int, fail) -> None:
    """Blocks inside the matrix with the right total area tile it iff every lattice point is
    the corner of an even number of blocks, the matrix's four corners excepted (odd).

    (The corner parities are the mixed second difference, mod 2, of the cover count; so the cover
    count is odd, hence >= 1, on every element, and the area makes it exactly 1.) O(B log B).
    """
    r1, c1 = r0 + h, c0 + w
    stride = n + 1
    keys = torch.cat([r0 * stride + c0, r0 * stride + c1, r1 * stride + c0, r1 * stride + c1])
    points, counts = torch.unique(keys, return_counts=True)
    odd = points[counts % 2 == 1]
    expected = torch.unique(torch.tensor([0, n, m * stride, m * stride + n], dtype=torch.int64))
    if odd.shape != expected.shape or not bool((odd == expected).all()):
        wrong = torch.cat([odd, expected])
        values, times = torch.unique(wrong, return_counts=True)
        key = int(values[times == 1][0])
        fail(f"blocks do not tile the matrix: they overlap or leave a hole near ({key // stride}, "
             f"{key % stride})")


def _validate_segments(hm: HMatrix, blocks: torch.Tensor, fail) -> None:
    seg = hm.segments.to(torch.int64)
    count = seg.shape[0]
    nblocks = blocks.shape[0]
    masks = hm.row_masks
    if count == 0:
        if masks.numel():
            fail(f"row bitmaps hold {masks.numel()} bytes, rows segments need 0")
        return
    blk, kind, cid, rank, offset, scale_offset = seg.unbind(1)

    def check(bad: torch.Tensor, problem) -> None:
        if bool(bad.any()):
            i = _first(bad)
            fail(f"segment {i} {tuple(seg[i].tolist())}: {problem(i)}")

    check((blk < 0) | (blk >= nblocks), lambda i: f"block out of range (the matrix has {nblocks} blocks)")
    check((kind < 0) | (kind > ROWS), lambda i: f"unknown kind {int(kind[i])}")
    check((cid < 0) | (cid >= len(CODECS)), lambda i: f"unknown codec id {int(cid[i])}")
    rows, cols = blocks[blk, 2], blocks[blk, 3]
    check((kind == DENSE) & (rank != 0), lambda i: "a dense segment has rank 0")
    check((kind == LOWRANK) & (rank < 1), lambda i: "a low-rank segment has rank >= 1")
    check((kind == ROWS) & ((rank < 1) | (rank > rows)),
          lambda i: f"a rows segment stores between 1 and {int(rows[i])} rows")

    # The segments of one block: one dense alone, or low-rank ones, or rows ones; one per codec.
    total = torch.bincount(blk, minlength=nblocks)
    per_kind = {k: torch.bincount(blk[kind == k], minlength=nblocks) for k in _KINDS}
    bad = (per_kind[DENSE] > 0) & (total != 1)
    if bool(bad.any()):
        fail(f"block {_first(bad)}: a dense segment must be the block's only segment")
    bad = (per_kind[LOWRANK] > 0) & (per_kind[ROWS] > 0)
    if bool(bad.any()):
        fail(f"block {_first(bad)}: mixes low-rank and rows segments")
    pairs, times = torch.unique(blk * len(CODECS) + cid, return_counts=True)
    if bool((times > 1).any()):
        pair = int(pairs[times > 1][0])
        fail(f"block {pair // len(CODECS)}: two segments with codec {CODECS[pair % len(CODECS)]}")

    # Pool and scale ranges.
    bits = torch.tensor([CODE_BITS.get(c, 8) for c in CODECS], dtype=torch.int64)[cid]

    def stored(length: torch.Tensor) -> torch.Tensor:
        return torch.where(bits < 8, (length * bits + 7) // 8, length)

    size = torch.where(kind == DENSE, rows * stored(cols),
                       torch.where(kind == LOWRANK, rank * (stored(rows) + stored(cols)), rank * stored(cols)))
    stored_rows = torch.where(kind == DENSE, rows, torch.where(kind == LOWRANK, 2 * rank, rank))
    pool_len = torch.tensor([hm.pools[c].numel() if c in hm.pools else 0 for c in CODECS])[cid]
    check((offset < 0) | (offset + size > pool_len),
          lambda i: f"pool range [{int(offset[i])}, {int(offset[i] + size[i])}) outside "
                    f"pool.{CODECS[int(cid[i])]} of {int(pool_len[i])} elements")
    integer = torch.tensor([c in INTEGER_CODECS for c in CODECS])[cid]
    check(~integer & (scale_offset != -1), lambda i: "scale offset must be -1 for a floating-point codec")
    scale_len = torch.tensor([hm.scales[c].numel() if c in hm.scales else 0 for c in CODECS])[cid]
    check(integer & ((scale_offset < 0) | (scale_offset + stored_rows > scale_len)),
          lambda i: f"scale range [{int(scale_offset[i])}, {int(scale_offset[i] + stored_rows[i])}) "
                    f"outside scale.{CODECS[int(cid[i])]} of {int(scale_len[i])} elements")

    # Row bitmaps: consecutive, exactly `rank` bits among the block's rows, disjoint per block.
    is_rows = kind == ROWS
    sel = torch.nonzero(is_rows).reshape(-1)
    nbytes = (rows[sel] + 7) // 8
    need = int(nbytes.sum()) if sel.numel() else 0
    if masks.numel() != need:
        fail(f"row bitmaps hold {masks.numel()} bytes, rows segments need {need}")
    if not sel.numel():
        return
    bit = ((masks.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1).to(torch.int64)
    owner = torch.repeat_interleave(torch.arange(sel.numel()), nbytes * 8)
    starts = torch.cumsum(nbytes * 8, 0) - nbytes * 8
    position = torch.arange(bit.numel()) - starts[owner]
    setbit = bit.bool()
    outside = setbit & (position >= rows[sel][owner])
    if bool(outside.any()):
        i = int(sel[owner[_first(outside)]])
        fail(f"segment {i} {tuple(seg[i].tolist())}: row bitmap sets bits beyond the block's rows")
    counts = torch.zeros(sel.numel(), dtype=torch.int64).index_add_(0, owner, bit)
    bad = counts != rank[sel]
    if bool(bad.any()):
        i = int(sel[_first(bad)])
        j = _first(bad)
        fail(f"segment {i} {tuple(seg[i].tolist())}: row bitmap has {int(counts[j])} bits set, not the rank")
    keys = blk[sel][owner[setbit]] * (int(blocks[:, 2].max()) + 1) + position[setbit]
    unique = torch.unique(keys)
    if unique.numel() != keys.numel():
        _, times = torch.unique(keys, return_counts=True)
        key = int(unique[times > 1][0])
        stride = int(blocks[:, 2].max()) + 1
        fail(f"block {key // stride}: rows segments both store row {key % stride}")


# --------------------------------------------------------------------------------------------
# Reading files

MAX_HEADER_BYTES = 100 * 1024 * 1024  # as safetensors itself
ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int8: "I8", torch.uint8: "U8", torch.int32: "I32"}
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
               "C64": 8}


@dataclasses.dataclass
class CompressedFile:
    """A compressed checkpoint: its metadata, packed matrices and passthrough tensors."""

    path: pathlib.Path
    metadata: dict  # the parsed `hmcompress` metadata (docs/FORMAT.md)
    matrices: dict[str, HMatrix]
    passthrough: dict[str, torch.Tensor]

    def dense(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as the original checkpoint held it (a matrix expanded, in its shape)."""
        if name not in self.matrices:
            return self.passthrough[name]
        return self.matrices[name].to_dense().reshape(self.metadata["matrices"][name]["orig_shape"])


def _read_header(path: pathlib.Path) -> tuple[dict, int]:
    """The safetensors header (parsed JSON) and the size of the data section, checked."""
    def fail(problem: str):
        raise FormatError(f"{path}: {problem}")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                fail(f"{size} bytes is too short for a safetensors file")
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                fail(f"header length {length} is absurd (limit {MAX_HEADER_BYTES} bytes)")
            if length > size - 8:
                fail(f"header length {length} runs past the end of the {size}-byte file")
            raw = f.read(length)
    except OSError as err:
        raise FormatError(f"{path}: cannot read: {err.strerror or err}") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        fail("header is not UTF-8 (not a safetensors file?)")
    try:
        header = json.loads(text)
    except ValueError as err:
        fail(f"header is not valid JSON ({err})")
    if not isinstance(header, dict):
        fail("header is not a JSON object")
    return header, size - 8 - length


def _tensor_entries(path: pathlib.Path, header: dict, data_size: int) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) for every tensor of the header, each checked."""
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
              and isinstance(entry.get("shape"), list)
              and all(type(d) is int and d >= 0 for d in entry["shape"])
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(type(d) is int for d in entry["data_offsets"]))
        if not ok:
            raise FormatError(f"{path}: tensor {name!r}: malformed header entry")
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end <= data_size:
            raise FormatError(f"{path}: tensor {name!r}: data [{begin}, {end}) outside the "
                              f"{data_size}-byte data section")
        itemsize = ST_ITEMSIZE.get(entry["dtype"])
        if itemsize is not None and end - begin != math.prod(entry["shape"]) * itemsize:
            raise FormatError(f"{path}: tensor {name!r}: {end - begin} bytes for shape {entry['shape']} "
                              f"{entry['dtype']}")
        entries[name] = (entry["dtype"], entry["shape"])
    return entries


def parse_metadata(path: str | os.PathLike) -> tuple[dict, dict[str, tuple[str, list[int]]]]:
    """The `hmcompress` metadata of a file and its tensors (dtype, shape), checked, from the
    header alone: nothing is allocated for the tensors."""
    path = pathlib.Path(path)

    def fail(problem: str):
        raise FormatError(f"{path}: {problem}")

    header, data_size = _read_header(path)
    meta_strings = header.get("__metadata__")
    if not isinstance(meta_strings, dict) or "hmcompress" not in meta_strings:
        fail("no hmcompress metadata (not a file written by hmcompress?)")
    try:
        meta = json.loads(meta_strings["hmcompress"])
    except (TypeError, ValueError) as err:
        fail(f"hmcompress metadata is not valid JSON ({err})")
    if not isinstance(meta, dict):
        fail("hmcompress metadata is not a JSON object")
    if meta.get("format") != FORMAT_NAME:
        fail(f"metadata names format {meta.get('format')!r}, not {FORMAT_NAME!r}")
    version = meta.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        fail(f"format version {version!r} is not supported (this reader knows version {FORMAT_VERSION})")
    entries = _tensor_entries(path, header, data_size)
    matrices, passthrough = meta.get("matrices"), meta.get("passthrough")
    if not isinstance(matrices, dict) or not isinstance(passthrough, dict):
        fail("metadata lacks the 'matrices' and 'passthrough' tables")
    if not isinstance(meta.get("options", {}), dict):
        fail("metadata 'options' is not a JSON object")

    claimed: dict[str, tuple[str, str]] = {}  # packed tensor name -> (matrix, part)
    for name, info in matrices.items():
        where = f"matrix {name!r}"
        if not isinstance(info, dict):
            fail(f"{where}: entry is not an object")
        shape, orig, dtype, prefix = (info.get(k) for k in ("shape", "orig_shape", "dtype", "prefix"))
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d >= 0 for d in shape)):
            fail(f"{where}: shape must be two non-negative integers, got {shape!r}")
        if not (isinstance(orig, list) and all(type(d) is int and d >= 0 for d in orig)
                and math.prod(orig) == shape[0] * shape[1]):
            fail(f"{where}: orig_shape {orig!r} does not hold a {shape[0]}x{shape[1]} matrix")
        if dtype not in DTYPES:
            fail(f"{where}: unsupported dtype {dtype!r}")
        if not isinstance(prefix, str) or not prefix:
            fail(f"{where}: prefix must be a non-empty string")
        parts = ["blocks", "segments", "rows", *(f"pool.{c}" for c in CODECS),
                 *(f"scale.{c}" for c in sorted(INTEGER_CODECS))]
        for part in parts:
            other = claimed.setdefault(prefix + part, (name, part))
            if other != (name, part):
                fail(f"tensor {prefix + part!r} is claimed by matrices {other[0]!r} and {name!r}")
    for name, reason in passthrough.items():
        if not isinstance(reason, str):
            fail(f"passthrough {name!r}: reason must be a string")
        if name in claimed:
            fail(f"tensor {name!r} is both passthrough and part of matrix {claimed[name][0]!r}")
        if name not in entries:
            fail(f"passthrough tensor {name!r} is missing")

    found: dict[str, dict[str, str]] = {name: {} for name in matrices}
    for tensor, (st_dtype, shape) in entries.items():
        if tensor in passthrough:
            continue
        if tensor not in claimed:
            fail(f"tensor {tensor!r} is not explained by the metadata")
        matrix, part = claimed[tensor]
        found[matrix][part] = tensor
        if part in ("blocks", "segments"):
            columns = BLOCK_COLUMNS if part == "blocks" else SEGMENT_COLUMNS
            want, ok_shape = "I32", len(shape) == 2 and shape[1] == columns
        else:
            codec = part.partition(".")[2]
            want = "U8" if part == "rows" else "F32" if part.startswith("scale.") else ST_DTYPES[POOL_DTYPE[codec]]
            ok_shape = len(shape) == 1
        if st_dtype != want or not ok_shape:
            fail(f"tensor {tensor!r}: {st_dtype} {shape} where {want} of "
                 f"{'shape (N, %d)' % columns if part in ('blocks', 'segments') else 'one dimension'} is expected")
    for name, parts in found.items():
        for part in ("blocks", "segments"):
            if part not in parts:
                fail(f"tensor {matrices[name]['prefix'] + part!r} of matrix {name!r} is missing")
    return meta, entries


def hmatrix_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int],
                         dtype: torch.dtype) -> HMatrix:
    """The packed matrix whose tensors are named ``prefix + part`` (docs/FORMAT.md); not validated."""
    pools = {c: tensors[prefix + f"pool.{c}"] for c in CODECS if prefix + f"pool.{c}" in tensors}
    scales = {c: tensors[prefix + f"scale.{c}"] for c in CODECS if prefix + f"scale.{c}" in tensors}
    masks = tensors.get(prefix + "rows", torch.zeros(0, dtype=torch.uint8))
    return HMatrix(shape, dtype, tensors[prefix + "blocks"], tensors[prefix + "segments"], pools, scales, masks)


def read_file(path: str | os.PathLike) -> CompressedFile:
    """Read and validate a compressed file; every problem is a `FormatError` naming it."""
    from safetensors import safe_open

    path = pathlib.Path(path)
    meta, entries = parse_metadata(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in entries}
    except Exception as err:  # safetensors raises its own error types
        raise FormatError(f"{path}: cannot load tensors: {err}") from err
    matrices = {}
    for name, info in meta["matrices"].items():
        hm = hmatrix_from_tensors(tensors, info["prefix"], tuple(info["shape"]), DTYPES[info["dtype"]])
        hm.validate(f"{path}: {name}")
        matrices[name] = hm
    passthrough = {name: tensors[name] for name in meta["passthrough"]}
    return CompressedFile(path, meta, matrices, passthrough)


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a compressed file, dense, under its original name, shape and dtype.

    A drop-in for ``model.load_state_dict(...)``.
    """
    compressed = read_file(path)
    return {name: compressed.dense(name) for name in sorted({*compressed.matrices, *compressed.passthrough})}


# --------------------------------------------------------------------------------------------
# Computing with H-matrices
#
# Every segment is a term U·V on its block: low rank (U = Aᵀ, V = B), dense (U = I, V = the
# block) or rows (U puts the k stored rows in place, V = the rows). H x = Σ U (V x[cols]) is
# computed over *tiles*, partitions of the columns and of the rows that refine every block's range:
#   1. each column tile multiplies the V rows of every term touching it, all tiles in one `bmm`;
#      a term spanning several column tiles has a partial product in each: one `index_add_` adds
#      them into the first (its *home*), so the homes hold T = V x (a row per rank);
#   2. each row tile gathers the home rows of the terms touching it and multiplies their U
#      columns, all tiles in one `bmm`.
# A fixed handful of tensor operations per call, whatever the number of blocks.

FINE_TILE_SLACK = 1.25  # intervals up to this much longer than the shortest are not split


@dataclasses.dataclass
class Term:
    """One segment as ``U @ V`` with its top-left corner at ``(row0, col0)``: U (h, k), V (k, w).

    ``u_scale``/``v_scale`` (k,): the scale of each column of U / row of V whose values are
    integer codes times it (1 for the 0/1 entries of dense and rows terms); NaN where the piece
    is stored in a floating codec.
    """

    row0: int
    col0: int
    u: torch.Tensor
    v: torch.Tensor
    u_scale: torch.Tensor
    v_scale: torch.Tensor


def terms(hm: HMatrix) -> list[Term]:
    """The segments of ``hm`` as terms, decoded exactly (float64)."""
    out = []
    for s in hm.segment_values():
        k = s.first.shape[0]
        if s.kind == LOWRANK:
            out.append(Term(s.row0, s.col0, s.first.T, s.second, _scales_or_nan(s.first_scales, k),
                            _scales_or_nan(s.second_scales, k)))
            continue
        if s.kind == DENSE:
            u = torch.eye(s.rows, dtype=torch.float64)
        else:
            u = torch.zeros(s.rows, k, dtype=torch.float64)
            u[s.second, torch.arange(k)] = 1.0
        out.append(Term(s.row0, s.col0, u, s.first, torch.ones(u.shape[1], dtype=torch.float64),
                        _scales_or_nan(s.first_scales, k)))
    return out


def _scales_or_nan(scales: torch.Tensor | None, count: int) -> torch.Tensor:
    return torch.full((count,), math.nan, dtype=torch.float64) if scales is None else scales.double()


def tiles(edges: set[int], size: int) -> list[tuple[int, int]]:
    """``(start, length)`` tiles of ``range(size)`` with a boundary at every edge, of near-equal length.

    Intervals between edges that are longer than the fine ones are split, so that padding every
    tile to the longest wastes little.
    """
    points = sorted({0, size, *edges})
    intervals = [(a, b - a) for a, b in zip(points, points[1:]) if b > a]
    if not intervals:
        return []
    shortest = min(length for _, length in intervals)
    cap = max(length for _, length in intervals if length <= FINE_TILE_SLACK * shortest)
    out = []
    for start, length in intervals:
        parts = -(-length // cap)
        for i in range(parts):
            piece = length // parts + (1 if i < length % parts else 0)
            out.append((start, piece))
            start += piece
    return out


@dataclasses.dataclass
class Stage:
    """One stage of the tile product, laid out per tile.

    ``factors`` (tiles, tile length, slots): the pieces of every term overlapping each tile, side
    by side; ``scales`` (tiles, slots): each slot's scale (see `Term`; 0 for padding slots);
    ``slot_rank`` (tiles, slots): the row of T each slot belongs to (padding: the spare last row);
    ``index`` (tiles, tile length): the matrix row/column at each tile position (padding: ``size``).
    """

    factors: torch.Tensor
    scales: torch.Tensor
    slot_rank: torch.Tensor
    index: torch.Tensor

    @classmethod
    def lay_out(cls, tile_list: list[tuple[int, int]], pieces: list[tuple[int, torch.Tensor, torch.Tensor]],
                first_rank: list[int], size: int) -> "Stage":
        """``pieces``: per term, (first row/column, factor (length, k), scales (k,))."""
        starts = torch.tensor([start for start, _ in tile_list], dtype=torch.int64)
        slots: list[list[tuple[int, int]]] = [[] for _ in tile_list]  # (term, offset in its factor)
        for p, (start, factor, _scales) in enumerate(pieces):
            j = int(torch.searchsorted(starts, start, right=True)) - 1
            while j < len(tile_list) and tile_list[j][0] < start + factor.shape[0]:
                slots[j].append((p, tile_list[j][0] - start))
                j += 1
        width = max((length for _, length in tile_list), default=0)
        depth = max((sum(pieces[p][1].shape[1] for p, _ in s) for s in slots), default=0)
        factors = torch.zeros(len(tile_list), width, depth, dtype=torch.float64)
        scales = torch.zeros(len(tile_list), depth, dtype=torch.float64)
        slot_rank = torch.full((len(tile_list), depth), first_rank[-1], dtype=torch.int64)
        index = torch.full((len(tile_list), width), size, dtype=torch.int64)
        for j, ((tile_start, tile_len), tile_slots) in enumerate(zip(tile_list, slots)):
            index[j, :tile_len] = torch.arange(tile_start, tile_start + tile_len)
            cursor = 0
            for p, offset in tile_slots:
                _start, factor, piece_scales = pieces[p]
                k = factor.shape[1]
                factors[j, :tile_len, cursor:cursor + k] = factor[offset:offset + tile_len]
                scales[j, cursor:cursor + k] = piece_scales
                slot_rank[j, cursor:cursor + k] = torch.arange(first_rank[p], first_rank[p] + k)
                cursor += k
        return cls(factors, scales, slot_rank, index)


@dataclasses.dataclass
class TilePlan:
    """Both stages of the tile product of one H-matrix (see the comment above).

    Stage 1: x gathered by ``col_index`` times ``v`` (column tiles, tile width, slots); the slot
    results at ``extra_from`` are added into those at ``extra_to`` (their terms' homes). Stage 2:
    the slot results gathered by ``t_index`` times ``u`` (row tiles, slots, tile height); output
    column r is column ``out_index[r]`` of the flattened result. Padding positions meet zero
    factors.
    """

    shape: tuple[int, int]
    ranks: int  # rows of T
    columns: Stage
    rows: Stage

    @classmethod
    def build(cls, hm: HMatrix) -> "TilePlan":
        m, n = hm.shape
        parts = terms(hm)
        col_tiles = tiles({t.col0 for t in parts} | {t.col0 + t.v.shape[1] for t in parts}, n)
        row_tiles = tiles({t.row0 for t in parts} | {t.row0 + t.u.shape[0] for t in parts}, m)
        first_rank = [0]
        for t in parts:
            first_rank.append(first_rank[-1] + t.v.shape[0])
        columns = Stage.lay_out(col_tiles, [(t.col0, t.v.T, t.v_scale) for t in parts], first_rank, n)
        rows = Stage.lay_out(row_tiles, [(t.row0, t.u, t.u_scale) for t in parts], first_rank, m)
        return cls((m, n), first_rank[-1], columns, rows)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The flat index tables and float64 factors `tile_product` takes.

        ``col_index`` and ``out_index`` are left out where they are the identity (the tiles cover
        the columns / rows in order without padding): a gather that moves nothing costs as much
        as one that does.
        """
        m, n = self.shape
        home, extra_from, extra_to = _homes(self.columns.slot_rank.reshape(-1), self.ranks)
        flat_rows = self.rows.index.reshape(-1)
        real = flat_rows < m
        out_index = torch.zeros(m, dtype=torch.int64)
        out_index[flat_rows[real]] = torch.arange(flat_rows.numel())[real]
        columns = self.columns.index.reshape(-1)
        out = {"v": self.columns.factors, "u": self.rows.factors.mT.contiguous(),
               "extra_from": extra_from, "extra_to": extra_to, "t_index": home[self.rows.slot_rank.reshape(-1)]}
        if not torch.equal(columns, torch.arange(n)):
            out["col_index"] = torch.where(columns < n, columns, 0)
        if not torch.equal(out_index, torch.arange(flat_rows.numel())):
            out["out_index"] = out_index
        return out

    def scales(self) -> dict[str, torch.Tensor]:
        """Slot scales shaped to broadcast against ``v`` and ``u`` of `tensors`."""
        return {"v": self.columns.scales.unsqueeze(1), "u": self.rows.scales.unsqueeze(2)}


def _homes(slot_rank: torch.Tensor, ranks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each row of T is summed, given the T row of every stage-1 slot (``ranks``: padding).

    Returns ``home`` (ranks + 1,): the first slot of each row (the padding row: slot 0, read only
    through zero factors), and the row's other slots ``extra_from`` with the home each adds into,
    ``extra_to``, in slot order (so each row sums its pieces in the order of its column tiles).
    """
    slots = torch.arange(slot_rank.numel())
    real = slot_rank < ranks
    order = torch.argsort(slot_rank[real], stable=True)
    row, slot = slot_rank[real][order], slots[real][order]
    first = torch.ones_like(row, dtype=torch.bool)
    first[1:] = row[1:] != row[:-1]
    home = torch.zeros(ranks + 1, dtype=torch.int64)
    home[row[first]] = slot[first]
    return home, slot[~first], home[row[~first]]


SMALL_BATCH = 16  # up to this many input rows the batch is the middle bmm dimension


def tile_product(plan: dict[str, torch.Tensor], x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ Hᵀ + bias`` for x (N, n) with the tensors of a `TilePlan` (any dtype and device): (N, m).

    Three layouts of the same computation: one input row runs on flat vectors (the fewest and
    cheapest operations: token-by-token decoding lives here); for other small N the batch is the
    middle `bmm` dimension; for large N features come first, so that every gather and `index_add_`
    moves contiguous rows of N numbers. Where the row tiles are the output rows in order, the bias
    rides in the second product (`baddbmm`) instead of costing an operation of its own. Padding
    reads column 0 and slot 0 through zero factors (so, as in a dense product, inf or NaN in x
    spreads to every output).
    """
    batch = x.shape[0]
    v, u, t_index = plan["v"], plan["u"], plan["t_index"]
    col_tiles, width, _ = v.shape
    row_tiles, depth, _ = u.shape
    col_index, out_index = plan.get("col_index"), plan.get("out_index")
    fused = bias is not None and out_index is None
    if batch > SMALL_BATCH:
        xt = x.T if col_index is None else x.T.index_select(0, col_index)
        slots = torch.bmm(v.mT, xt.reshape(col_tiles, width, batch)).view(-1, batch)
        slots.index_add_(0, plan["extra_to"], slots.index_select(0, plan["extra_from"]))
        gathered = slots.index_select(0, t_index).view(row_tiles, depth, batch)
        rows = (torch.baddbmm(bias.view(row_tiles, -1, 1), u.mT, gathered) if fused
                else torch.bmm(u.mT, gathered)).view(-1, batch)
        y = (rows if out_index is None else rows.index_select(0, out_index)).T
    elif batch == 1:
        xg = x.reshape(-1) if col_index is None else x.reshape(-1).index_select(0, col_index)
        slots = torch.bmm(xg.view(col_tiles, 1, width), v).view(-1)
        slots.index_add_(0, plan["extra_to"], slots.index_select(0, plan["extra_from"]))
        gathered = slots.index_select(0, t_index).view(row_tiles, 1, depth)
        rows = (torch.baddbmm(bias.view(row_tiles, 1, -1), gathered, u) if fused
                else torch.bmm(gathered, u)).view(1, -1)
        y = rows if out_index is None else rows.index_select(1, out_index)
    else:
        xg = x if col_index is None else x.index_select(1, col_index)
        slots = torch.bmm(xg.reshape(batch, col_tiles, width).transpose(0, 1), v)  # (column tiles, N, slots)
        slots = slots.transpose(0, 1).reshape(batch, -1)
        slots.index_add_(1, plan["extra_to"], slots.index_select(1, plan["extra_from"]))
        gathered = slots.index_select(1, t_index).view(batch, row_tiles, depth).transpose(0, 1)
        rows = (torch.baddbmm(bias.view(row_tiles, 1, -1), gathered, u) if fused
                else torch.bmm(gathered, u))  # (row tiles, N, tile height)
        rows = rows.transpose(0, 1).reshape(batch, -1)
        y = rows if out_index is None else rows.index_select(1, out_index)
    return y if bias is None or fused else y + bias


def compact_planes(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Factors as int8 codes times float32 scales, plus a plane for floating-coded pieces.

    The float plane takes the narrowest of float16, bfloat16 and ``dtype`` that holds its values
    exactly; planes with nothing in them are left out. `decode_planes` inverts this.
    """
    integer = ~torch.isnan(scales)
    safe = torch.where(integer & (scales != 0), scales, torch.ones_like(scales))
    codes = torch.where(integer, torch.round(values / safe), torch.zeros_like(values))
    floats = torch.where(integer, torch.zeros_like(values), values)
    planes = {}
    if bool(codes.any()):
        planes["codes"] = codes.to(torch.int8)
        planes["scale"] = torch.where(integer, scales, torch.zeros_like(scales)).to(torch.float32)
    if bool(floats.any()):
        narrow = [d for d in (torch.float16, torch.bfloat16) if torch.equal(floats.to(d).double(), floats)]
        planes["float"] = floats.to(narrow[0] if narrow else dtype)
    return planes


def decode_planes(planes: dict[str, torch.Tensor], dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """The factors in ``dtype`` from `compact_planes` (codes times scales rounded once, in float32
    or float64, as decoding straight into ``dtype`` would)."""
    out = torch.zeros(shape, dtype=dtype, device=planes["anchor"].device)
    if "codes" in planes:
        wide = torch.promote_types(dtype, torch.float32)
        out = out + (planes["codes"].to(wide) * planes["scale"].to(wide)).to(dtype)
    if "float" in planes:
        out = out + planes["float"].to(dtype)
    return out


class HLinear(nn.Module):
    """``y = x @ Hᵀ + bias`` for a packed H-matrix H, without forming H.

    The two-stage tile product (see `TilePlan`) costs a fixed handful of tensor operations per
    call, whatever the number of blocks. Factors are decoded once into ``dtype``; with
    ``keep_compact`` they stay as int8 codes with float32 scales (plus a float16, bfloat16 or
    ``dtype`` plane for pieces stored in floating codecs) and are decoded on every call: less
    memory, more time. All tensors are (non-persistent) buffers, so ``.to()`` moves them; ``bias``
    stays a trainable parameter.
    """

    def __init__(self, hmatrix: HMatrix, bias: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 keep_compact: bool = False) -> None:
        super().__init__()
        dtype = dtype or torch.float32
        self.out_features, self.in_features = hmatrix.shape
        self.blocks = int(hmatrix.blocks.shape[0])
        self.stored_bytes = hmatrix.nbytes
        self.keep_compact = keep_compact
        plan = TilePlan.build(hmatrix)
        tensors, scales = plan.tensors(), plan.scales()
        # Buffers are named as `tile_product` names its tensors, so that (unless compact) the
        # buffer dict is the plan: nothing to assemble per call.
        self._factor_shapes = {name: tensors[name].shape for name in ("u", "v")}
        self._planes: dict[str, tuple[str, ...]] = {}  # with keep_compact: each factor's planes
        for name, tensor in tensors.items():
            if name not in self._factor_shapes:
                self.register_buffer(name, tensor.to(device), persistent=False)
            elif keep_compact:
                planes = compact_planes(tensor, scales[name], dtype)
                self._planes[name] = tuple(planes)
                for part, plane in planes.items():
                    self.register_buffer(f"{name}_{part}", plane.to(device), persistent=False)
            else:
                self.register_buffer(name, tensor.to(device=device, dtype=dtype), persistent=False)
        if bias is not None:
            trainable = bias.requires_grad if isinstance(bias, nn.Parameter) else True
            bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype).clone(),
                                requires_grad=trainable)
        self.register_parameter("bias", bias)  # None too: `forward` reads `_parameters`
        self.register_buffer("anchor", torch.zeros(0, dtype=dtype, device=device), persistent=False)

    def _decoded_plan(self) -> dict[str, torch.Tensor]:
        """With keep_compact: the buffers plus ``u`` and ``v`` decoded from their planes."""
        buffers = self._buffers
        anchor = buffers["anchor"]
        plan = dict(buffers)
        for name, parts in self._planes.items():
            planes = {part: buffers[f"{name}_{part}"] for part in parts}
            plan[name] = decode_planes({**planes, "anchor": anchor}, anchor.dtype, self._factor_shapes[name])
        return plan

    @property
    def held_bytes(self) -> int:
        """Bytes of the tensors held for the product (factors or their codes, scales, index tables)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if shape[-1] != self.in_features:
            raise ValueError(f"HLinear expects inputs with {self.in_features} features, got {tuple(shape)}")
        plan = self._decoded_plan() if self.keep_compact else self._buffers  # not `Module.__getattr__`: ~1 us a name
        dtype = plan["anchor"].dtype
        rows = x if len(shape) == 2 else x.reshape(-1, self.in_features)
        y = tile_product(plan, rows if rows.dtype == dtype else rows.to(dtype), self._parameters["bias"])
        if len(shape) != 2:
            y = y.reshape(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"blocks={self.blocks}, bytes={self.stored_bytes}, held={self.held_bytes}, "
                f"bias={self.bias is not None}, dtype={str(self.anchor.dtype).removeprefix('torch.')}"
                f"{', compact' if self.keep_compact else ''}")


PATCH_MODES = ("hmatrix", "dense", "auto")


@dataclasses.dataclass
class LayerChoice:
    """How `patch` runs one compressed `nn.Linear`, and the probe timings behind an "auto" choice."""

    name: str
    mode: str  # "hmatrix" or "dense"
    hmatrix_seconds: float | None = None
    dense_seconds: float | None = None


class Patched(list):
    """The names of the modules `patch` replaced by `HLinear` (a plain list of str), with every
    compressed linear layer's `LayerChoice` in ``choices``."""

    def __init__(self, choices: list[LayerChoice]) -> None:
        super().__init__(sorted(c.name for c in choices if c.mode == "hmatrix"))
        self.choices = sorted(choices, key=lambda c: c.name)


def patch(model: nn.Module, path: str | os.PathLike, mode: str = "hmatrix", *,
          keep_compact: bool = False, probe_batch: int = 16) -> Patched:
    """Load a compressed file into ``model``, running compressed `nn.Linear` layers as `HLinear`.

    ``mode="hmatrix"`` replaces every `nn.Linear` whose weight is compressed; ``"dense"`` loads
    dense weights only; ``"auto"`` times both on a random probe of ``probe_batch`` rows and keeps
    the faster per layer (see ``.choices`` of the result). ``keep_compact`` keeps integer-coded
    factors compact (see `HLinear`). Keys are checked strictly, as by ``model.load_state_dict``.
    """
    if mode not in PATCH_MODES:
        raise ValueError(f"mode must be one of {', '.join(PATCH_MODES)}, got {mode!r}")
    compressed = read_file(path)
    file_keys = {*compressed.matrices, *compressed.passthrough}
    model_keys = set(model.state_dict().keys())
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and _key(name, "weight") in compressed.matrices}
    # Biases of replaced layers may be absent from the file (then the layer's own is kept).
    optional = {_key(name, "bias") for name in linears} if mode != "dense" else set()
    missing = sorted(model_keys - file_keys - optional)
    unexpected = sorted(file_keys - model_keys)
    if missing or unexpected:
        raise RuntimeError(f"{path}: does not match the model: missing keys {missing}, "
                           f"unexpected keys {unexpected}")
    if "" in linears and mode != "dense":
        raise ValueError("cannot replace the model itself by an HLinear; patch a module containing it")
    choices, new_modules = [], {}
    for name, module in linears.items():
        hm = compressed.matrices[_key(name, "weight")]
        if tuple(hm.shape) != (module.out_features, module.in_features):
            raise RuntimeError(f"{path}: {name}.weight has shape {tuple(hm.shape)}, the model's "
                               f"{(module.out_features, module.in_features)}")
        if mode == "dense":
            choices.append(LayerChoice(name, "dense"))
            continue
        layer = HLinear(hm, module.bias, dtype=module.weight.dtype, device=module.weight.device,
                        keep_compact=keep_compact)
        choice = LayerChoice(name, "hmatrix")
        if mode == "auto":
            choice = _faster(name, layer, hm, module, probe_batch)
        choices.append(choice)
        if choice.mode == "hmatrix":
            new_modules[id(module)] = layer
    replaced = {c.name for c in choices if c.mode == "hmatrix"}
    dense = {name: compressed.dense(name) for name in sorted(file_keys - {_key(n, "weight") for n in replaced})}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in new_modules:
                setattr(parent, child_name, new_modules[id(child)])
    result = model.load_state_dict(dense, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"{path}: unexpected keys {sorted(result.unexpected_keys)}")
    return Patched(choices)


def _key(module_name: str, tensor: str) -> str:
    return f"{module_name}.{tensor}" if module_name else tensor


def _faster(name: str, layer: HLinear, hm: HMatrix, module: nn.Linear, probe_batch: int) -> LayerChoice:
    """Time `layer` against a dense `nn.Linear` holding H on the same probe; the faster wins."""
    weight = module.weight
    dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(hm.to_dense(weight.dtype))
        probe = torch.randn(probe_batch, module.in_features, generator=torch.Generator().manual_seed(0))
        probe = probe.to(device=weight.device, dtype=weight.dtype)
        h_time, d_time = _seconds(layer, probe), _seconds(dense, probe)
    return LayerChoice(name, "hmatrix" if h_time <= d_time else "dense", h_time, d_time)


def _seconds(fn: nn.Module, probe: torch.Tensor, budget: float = 0.02, most: int = 50) -> float:
    """The best of several timed calls (after a warm-up), within about ``budget`` seconds."""
    sync = torch.cuda.synchronize if probe.is_cuda else (lambda: None)
    fn(probe)
    sync()
    best, spent, calls = math.inf, 0.0, 0
    while calls < 3 or (spent < budget and calls < most):
        start = time.perf_counter()
        fn(probe)
        sync()
        elapsed = time.perf_counter() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return best
