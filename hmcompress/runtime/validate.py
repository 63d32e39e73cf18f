"""Validation of packed matrices: every table, range and bitmap checked before anything is used.

Each check is a vector operation over the tables (no m*n arrays, no per-block Python loops), so a
hostile file costs time in proportion to its size, never to the matrix it claims; sizes are
compared in float64 before any int64 product that could wrap, and the row bitmaps are checked
byte by byte (a few bytes of work memory per bitmap byte).
"""
from __future__ import annotations

from typing import Protocol

import torch

from hmcompress.runtime.errors import FormatError
from hmcompress.runtime.format import (
    BLOCK_COLUMNS,
    CODEC,
    CODECS,
    DENSE,
    INTEGER_CODECS,
    LOWRANK,
    MATRIX_DTYPE_NAMES,
    ROWS,
    SCALE_DTYPE,
    SEGMENT_COLUMNS,
    Kind,
)


class Packed(Protocol):
    """The tables of a packed matrix (`HMatrix` has them)."""

    shape: tuple[int, int]
    dtype: torch.dtype
    blocks: torch.Tensor
    segments: torch.Tensor
    pools: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    row_masks: torch.Tensor



def _first(mask: torch.Tensor) -> int:
    """Index of the first True of a 1-D boolean tensor."""
    return int(torch.nonzero(mask)[0, 0])


def _check_table(table: object, columns: int, what: str, fail) -> None:
    if not isinstance(table, torch.Tensor):
        fail(f"{what} table is not a tensor")
    if table.dtype != torch.int32 or table.ndim != 2 or table.shape[1] != columns:
        fail(f"{what} table must be int32 of shape (N, {columns}), got {table.dtype} {tuple(table.shape)}")


def validate_packed(hm: Packed, name: str) -> None:
    """Raise `FormatError` ("<name>: <problem>") unless ``hm`` is a well-formed packed matrix."""
    def fail(problem: str):
        raise FormatError(f"{name}: {problem}")

    shape = tuple(hm.shape)
    if len(shape) != 2 or not all(isinstance(d, int) and d >= 0 for d in shape):
        fail(f"shape must be two non-negative integers, got {hm.shape!r}")
    m, n = shape
    if m >= 2**31 or n >= 2**31:
        fail(f"shape {m}x{n} does not fit the int32 block table")
    if hm.dtype not in MATRIX_DTYPE_NAMES:
        fail(f"unsupported dtype {hm.dtype}")
    _check_table(hm.blocks, BLOCK_COLUMNS, "block", fail)
    _check_table(hm.segments, SEGMENT_COLUMNS, "segment", fail)
    for codec, pool in hm.pools.items():
        if codec not in CODEC:
            fail(f"pool of unknown codec {codec!r}")
        if not isinstance(pool, torch.Tensor) or pool.dtype != CODEC[codec].pool_dtype or pool.ndim != 1:
            fail(f"pool.{codec} must be a 1-D {CODEC[codec].pool_dtype} tensor")
    for codec, scale in hm.scales.items():
        if codec not in CODEC:
            fail(f"scales of unknown codec {codec!r}")
        if codec not in INTEGER_CODECS:
            fail(f"scales for floating-point codec {codec!r}")
        if not isinstance(scale, torch.Tensor) or scale.dtype != SCALE_DTYPE or scale.ndim != 1:
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


def _validate_segments(hm: Packed, blocks: torch.Tensor, fail) -> None:
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

    check((blk < 0) | (blk >= nblocks), lambda _i: f"block out of range (the matrix has {nblocks} blocks)")
    check((kind < 0) | (kind > ROWS), lambda i: f"unknown kind {int(kind[i])}")
    check((cid < 0) | (cid >= len(CODECS)), lambda i: f"unknown codec id {int(cid[i])}")
    rows, cols = blocks[blk, 2], blocks[blk, 3]
    check((kind == DENSE) & (rank != 0), lambda _i: "a dense segment has rank 0")
    check((kind == LOWRANK) & (rank < 1), lambda _i: "a low-rank segment has rank >= 1")
    check((kind == ROWS) & ((rank < 1) | (rank > rows)),
          lambda i: f"a rows segment stores between 1 and {int(rows[i])} rows")

    # The segments of one block: dense ones, or low-rank ones, or rows ones; one per codec.
    total = torch.bincount(blk, minlength=nblocks)
    per_kind = {k: torch.bincount(blk[kind == k], minlength=nblocks) for k in Kind}
    bad = (per_kind[DENSE] > 0) & (total != per_kind[DENSE])
    if bool(bad.any()):
        fail(f"block {_first(bad)}: dense segments must be the block's only segments")
    bad = (per_kind[LOWRANK] > 0) & (per_kind[ROWS] > 0)
    if bool(bad.any()):
        fail(f"block {_first(bad)}: mixes low-rank and rows segments")
    # A block of rank above min(rows, cols) needs no more terms: a few bytes of a coded pool of one
    # symbol could otherwise ask for millions of them (each a pass over the block when expanded).
    lowrank = kind == LOWRANK
    ranks = torch.zeros(nblocks, dtype=torch.int64).index_add_(0, blk[lowrank], rank[lowrank])
    caps = torch.minimum(blocks[:, 2], blocks[:, 3])
    bad = ranks > caps
    if bool(bad.any()):
        b = _first(bad)
        fail(f"block {b}: its low-rank segments' ranks sum to {int(ranks[b])}, above min(rows, cols) = {int(caps[b])}")
    pairs, times = torch.unique(blk * len(CODECS) + cid, return_counts=True)
    if bool((times > 1).any()):
        pair = int(pairs[times > 1][0])
        fail(f"block {pair // len(CODECS)}: two segments with codec {CODECS[pair % len(CODECS)]}")

    # Pool and scale ranges, compared in float64 first: a rank near 2**31 times a row length near
    # 2**31 passes int64's range (every true size below 2**53 is exact there, and a larger one
    # exceeds any pool).
    bits = torch.tensor([CODEC[c].bits if CODEC[c].packed else 8 for c in CODECS], dtype=torch.float64)[cid]

    def stored(length: torch.Tensor) -> torch.Tensor:
        return torch.where(bits < 8, torch.ceil(length * bits / 8), length)

    rows_f, cols_f, rank_f = rows.double(), cols.double(), rank.double()
    size_f = torch.where(kind == DENSE, rows_f * stored(cols_f),
                         torch.where(kind == LOWRANK, rank_f * (stored(rows_f) + stored(cols_f)),
                                     rank_f * stored(cols_f)))
    stored_rows = torch.where(kind == DENSE, rows, torch.where(kind == LOWRANK, 2 * rank, rank))
    pool_len = torch.tensor([hm.pools[c].numel() if c in hm.pools else 0 for c in CODECS])[cid]
    check((offset < 0) | (offset.double() + size_f > pool_len.double()),
          lambda i: f"pool range [{int(offset[i])}, {int(offset[i]) + int(size_f[i])}) outside "
                    f"pool.{CODECS[int(cid[i])]} of {int(pool_len[i])} elements")
    integer = torch.tensor([c in INTEGER_CODECS for c in CODECS])[cid]
    check(~integer & (scale_offset != -1), lambda _i: "scale offset must be -1 for a floating-point codec")
    scale_len = torch.tensor([hm.scales[c].numel() if c in hm.scales else 0 for c in CODECS])[cid]
    one_scale = torch.tensor([CODEC[c].segment_scale for c in CODECS])[cid]
    scale_count = torch.where(one_scale, 1, stored_rows)
    check(integer & ((scale_offset < 0) | (scale_offset + scale_count > scale_len)),
          lambda i: f"scale range [{int(scale_offset[i])}, {int(scale_offset[i] + scale_count[i])}) "
                    f"outside scale.{CODECS[int(cid[i])]} of {int(scale_len[i])} elements")

    # Row bitmaps: consecutive, exactly `rank` bits among the block's rows, disjoint per block.
    _check_row_bitmaps(seg, blk, kind == ROWS, rank, rows, masks, fail)


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _check_row_bitmaps(seg: torch.Tensor, blk: torch.Tensor, is_rows: torch.Tensor, rank: torch.Tensor,
                       rows: torch.Tensor, masks: torch.Tensor, fail) -> None:
    """Rows segments take consecutive bitmaps of ceil(rows / 8) bytes, in segment order; each sets
    exactly ``rank`` bits, none beyond the block's rows, and no two of one block share a bit.

    Work memory is a few int64 per bitmap byte (never one per bit, nor per row of the block).
    """
    sel = torch.nonzero(is_rows).reshape(-1)
    nbytes = (rows[sel] + 7) // 8
    need = int(nbytes.sum()) if sel.numel() else 0
    if masks.numel() != need:
        fail(f"row bitmaps hold {masks.numel()} bytes, rows segments need {need}")
    if not sel.numel():
        return
    ends = torch.cumsum(nbytes, 0)
    starts = ends - nbytes

    def segment_fail(j: int, problem: str) -> None:
        i = int(sel[j])
        fail(f"segment {i} {tuple(seg[i].tolist())}: {problem}")

    # Bits beyond the block's rows can only sit in a bitmap's last byte.
    spare = (8 - rows[sel] % 8) % 8
    last = masks[ends - 1].to(torch.int64)
    outside = (last >> (8 - spare)) * (spare > 0) > 0
    if bool(outside.any()):
        segment_fail(_first(outside), "row bitmap sets bits beyond the block's rows")
    ones = torch.cumsum(_POPCOUNT[masks.to(torch.int64)], 0)
    counts = ones[ends - 1] - torch.where(starts > 0, ones[(starts - 1).clamp(min=0)], 0)
    bad = counts != rank[sel]
    if bool(bad.any()):
        j = _first(bad)
        segment_fail(j, f"row bitmap has {int(counts[j])} bits set, not the rank")
    # Disjoint within a block: the segments of one block have bitmaps of one length; each byte
    # position of a block's bitmap is summed over its segments, bit plane by bit plane.
    owner = torch.searchsorted(starts, torch.arange(need), right=True) - 1
    block = blk[sel]
    order = torch.unique(block, return_inverse=True)[1]  # dense block numbers 0..k-1
    width = torch.zeros(int(order.max()) + 1, dtype=torch.int64).scatter_reduce_(0, order, nbytes, reduce="amax")
    block_start = torch.cumsum(width, 0) - width
    key = block_start[order[owner]] + (torch.arange(need) - starts[owner])
    del owner
    values = masks.to(torch.int32)
    for bit in range(8):
        plane = (values >> bit) & 1
        hits = torch.zeros(int(width.sum()), dtype=torch.int32).index_add_(0, key, plane)
        if bool((hits > 1).any()):
            k = _first(hits > 1)
            group = int(torch.searchsorted(block_start, torch.tensor(k), right=True)) - 1
            j = int(torch.nonzero(order == group)[0, 0])
            row = (k - int(block_start[group])) * 8 + bit
            fail(f"block {int(block[j])}: rows segments both store row {row}")
