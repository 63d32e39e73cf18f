"""The fast product ``x @ Hᵀ``: every segment as a term U·V, computed over tiles in a fixed handful
of batched tensor operations per call, whatever the number of blocks.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from hmcompress.runtime.matrix import HMatrix, LowRankSegment, RowsSegment

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
        if isinstance(s, LowRankSegment):
            k = s.a.shape[0]
            out.append(Term(s.row0, s.col0, s.a.T, s.b, _scales_or_nan(s.a_scales, k),
                            _scales_or_nan(s.b_scales, k)))
        elif isinstance(s, RowsSegment):
            k = s.values.shape[0]
            u = torch.zeros(s.rows, k, dtype=torch.float64)
            u[s.index, torch.arange(k)] = 1.0
            out.append(Term(s.row0, s.col0, u, s.values, torch.ones(k, dtype=torch.float64),
                            _scales_or_nan(s.scales, k)))
        else:
            u = torch.eye(s.rows, dtype=torch.float64)
            out.append(Term(s.row0, s.col0, u, s.block, torch.ones(s.rows, dtype=torch.float64),
                            _scales_or_nan(s.scales, s.rows)))
    return out


def _scales_or_nan(scales: torch.Tensor | None, count: int) -> torch.Tensor:
    return torch.full((count,), math.nan, dtype=torch.float64) if scales is None else scales.double()


def tile_intervals(edges: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiling rule, vectorised: the boundaries (every edge, 0 and ``size``, sorted, once each)
    and into how many near-equal tiles each interval between two of them is cut. Intervals longer
    than the fine ones (up to FINE_TILE_SLACK times the shortest) are split, so that padding every
    tile to the longest wastes little."""
    points = torch.unique(torch.cat([edges.reshape(-1).to(torch.int64), torch.tensor([0, size])]))
    lengths = points[1:] - points[:-1]
    if not lengths.numel():
        return points, lengths
    cap = lengths[lengths <= FINE_TILE_SLACK * lengths.min()].max()
    return points, (lengths + cap - 1) // cap


def tiles(edges: set[int], size: int) -> list[tuple[int, int]]:
    """``(start, length)`` tiles of ``range(size)`` with a boundary at every edge (`tile_intervals`)."""
    points, parts = tile_intervals(torch.tensor(sorted(edges), dtype=torch.int64), size)
    out = []
    for start, stop, count in zip(points[:-1].tolist(), points[1:].tolist(), parts.tolist()):
        length = stop - start
        for i in range(count):
            piece = length // count + (1 if i < length % count else 0)
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

