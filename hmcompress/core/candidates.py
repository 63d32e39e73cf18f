"""The candidate blocks of a matrix and, for each, what every way of storing it costs and loses.

The quad-tree of candidates is the search space of both strategies. For every candidate we know
its singular values (so the error of any truncation is exact without forming anything), the
bytes and error of each dense option, and the bytes and error of each singular triplet in each
codec. Everything is kept in flat numpy arrays so the optimiser can sweep it vectorised.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from hmcompress.core.codecs import roundtrip_rows, row_bytes
from hmcompress.runtime import BLOCK_COLUMNS, CODEC, SEGMENT_COLUMNS

CHUNK_NUMBERS = 1 << 21  # factor entries whose codec errors are measured at once
BLOCK_ROW_BYTES = BLOCK_COLUMNS * 4  # int32 block table row
SEGMENT_ROW_BYTES = SEGMENT_COLUMNS * 4  # int32 segment table row


@dataclasses.dataclass
class Tree:
    """Quad-tree of candidate blocks, nodes numbered level by level (root = 0)."""

    row0: np.ndarray
    col0: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    level: np.ndarray
    parent: np.ndarray  # -1 for the root
    level_start: list[int]  # nodes of level l are level_start[l]:level_start[l+1]

    @property
    def size(self) -> int:
        return len(self.row0)

    def nodes_of_level(self, level: int) -> range:
        return range(self.level_start[level], self.level_start[level + 1])

    @property
    def depth(self) -> int:
        return len(self.level_start) - 1


def split_sizes(rows: int, cols: int, leaf: int) -> tuple[bool, bool]:
    """Whether a block splits its rows and its columns.

    A side splits while it is at least two leaves long; an oblong block (one side more than twice
    the other) splits along its long side only, so blocks tend towards squares.
    """
    split_rows = rows >= 2 * leaf and 2 * rows >= cols
    split_cols = cols >= 2 * leaf and 2 * cols >= rows
    return split_rows, split_cols


def build_tree(shape: tuple[int, int], leaf: int) -> Tree:
    """All candidate blocks of an m x n matrix for a leaf size."""
    row0, col0, rows, cols, level, parent = [0], [0], [shape[0]], [shape[1]], [0], [-1]
    level_start = [0, 1]
    while True:
        start, stop = level_start[-2], level_start[-1]
        for node in range(start, stop):
            split_rows, split_cols = split_sizes(rows[node], cols[node], leaf)
            if not (split_rows or split_cols):
                continue
            h, w = rows[node], cols[node]
            row_parts = [(0, h // 2), (h // 2, h - h // 2)] if split_rows else [(0, h)]
            col_parts = [(0, w // 2), (w // 2, w - w // 2)] if split_cols else [(0, w)]
            for r_off, r_len in row_parts:
                for c_off, c_len in col_parts:
                    row0.append(row0[node] + r_off)
                    col0.append(col0[node] + c_off)
                    rows.append(r_len)
                    cols.append(c_len)
                    level.append(level[node] + 1)
                    parent.append(node)
        if len(row0) == stop:
            break
        level_start.append(len(row0))
    as_array = lambda values: np.asarray(values, dtype=np.int64)  # noqa: E731
    return Tree(as_array(row0), as_array(col0), as_array(rows), as_array(cols), as_array(level),
                as_array(parent), level_start)


@dataclasses.dataclass
class Items:
    """Independently stored pieces of candidate blocks: singular triplets, or rows of a block.

    Item ``t`` belongs to node ``node[t]``; dropping it costs ``drop_err[t]`` (squared error) and
    nothing in bytes; keeping it in codec ``p`` costs ``nbytes[p, t]`` bytes and ``err[p, t]``.
    The items of a node are contiguous, in order (``index`` = position within the node).
    """

    node: np.ndarray
    index: np.ndarray
    drop_err: np.ndarray
    nbytes: np.ndarray
    err: np.ndarray

    @classmethod
    def from_parts(cls, n_nodes: int, drop: dict[int, torch.Tensor], err: dict[int, torch.Tensor],
                   nbytes_per_node: np.ndarray) -> "Items":
        """Flatten per-node tensors (drop (r,), err (P, r)); ``nbytes_per_node`` is (P, n_nodes)."""
        counts = np.array([len(drop[n]) if n in drop else 0 for n in range(n_nodes)], dtype=np.int64)
        node = np.repeat(np.arange(n_nodes), counts)
        index = np.arange(len(node)) - np.repeat(np.cumsum(counts) - counts, counts)
        present = [n for n in range(n_nodes) if n in drop]
        n_codecs = nbytes_per_node.shape[0]
        drop_err = torch.cat([drop[n] for n in present]).numpy() if present else np.zeros(0)
        errs = (torch.cat([err[n] for n in present], dim=1).numpy() if present
                else np.zeros((n_codecs, 0)))
        return cls(node, index, drop_err, nbytes_per_node[:, node].astype(np.float64), errs)

    def starts(self, n_nodes: int) -> np.ndarray:
        """Start of each node's run of items (plus the end)."""
        return np.concatenate([[0], np.cumsum(np.bincount(self.node, minlength=n_nodes))])


@dataclasses.dataclass
class Candidates:
    """Costs (bytes) and squared errors of every way to store every candidate block.

    A leaf is stored densely in one codec (``dense_bytes[p, node]``, ``dense_err[p, node]``), or as
    low-rank factors (``triplets``: drop each singular triplet or keep it in some codec), or as
    rows (``rows``: drop each row or keep it in some codec; auto precision only).
    """

    tree: Tree
    codecs: tuple[str, ...]
    dense_bytes: np.ndarray
    dense_err: np.ndarray
    triplets: Items
    rows: Items
    root_sigma: np.ndarray  # singular values of the whole matrix, float64, descending


def block_batches(matrix: torch.Tensor, tree: Tree, nodes: range | list[int]):
    """Yield ``(node_ids, stacked_blocks)`` for the given nodes, grouped by block shape."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for node in nodes:
        by_shape.setdefault((int(tree.rows[node]), int(tree.cols[node])), []).append(node)
    for (h, w), ids in sorted(by_shape.items()):
        stacked = torch.stack([matrix[tree.row0[i]:tree.row0[i] + h, tree.col0[i]:tree.col0[i] + w]
                               for i in ids])
        yield ids, stacked


def _finite_or_inf(err: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(err), err.clamp_min(0), torch.full_like(err, np.inf))


def triplet_errors(codecs: tuple[str, ...], u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                   wanted: torch.Tensor) -> torch.Tensor:
    """Squared error ||a~ b~ᵀ - a bᵀ||_F² of storing each wanted triplet's factors in each codec.

    Factors are balanced, ``a = sqrt(s) u`` and ``b = sqrt(s) v``, as the builder stores them.
    With a~ = a + da, b~ = b + db the difference is da bᵀ + a~ dbᵀ, whose norm needs no
    cancellation-prone subtraction. Computed in the factors' precision with float64 sums: an
    estimate for the planner, which the final measurement of the built matrix checks. Triplets
    go in chunks of about `CHUNK_NUMBERS` factor entries, which bounds the temporaries.
    Shapes: u (k, h, r), s (k, r), vh (k, r, w), ``wanted`` (k, r) bool; result (P, k, r), inf
    where not wanted (such a triplet can only be dropped).
    """
    root = s.sqrt()
    out = torch.full((len(codecs), *s.shape), np.inf, dtype=torch.float64)
    which = wanted.nonzero()
    step = max(1, CHUNK_NUMBERS // (u.shape[1] + vh.shape[2]))
    for start in range(0, len(which), step):
        block, rank = which[start:start + step].T
        scale = root[block, rank].unsqueeze(1)
        a, b = u[block, :, rank] * scale, vh[block, rank, :] * scale
        b_norm2 = _norm2(b)
        for p, codec in enumerate(codecs):
            a_q, b_q = roundtrip_rows(codec, a), roundtrip_rows(codec, b)
            da, db = a_q - a, b_q - b
            err = (_norm2(da) * b_norm2 + _norm2(a_q) * _norm2(db)
                   + 2 * (da * a_q).sum(1, dtype=torch.float64) * (b * db).sum(1, dtype=torch.float64))
            out[p, block, rank] = _finite_or_inf(err)
    return out


def row_errors(codec: str, blocks: torch.Tensor) -> torch.Tensor:
    """Squared error of storing each row of a (k, h, w) stack in ``codec``: (k, h), float64 sums."""
    flat = blocks.reshape(-1, blocks.shape[2])
    return _finite_or_inf(_norm2(roundtrip_rows(codec, flat) - flat)).reshape(blocks.shape[:2])


def _norm2(rows: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean norm of each row, accumulated in float64."""
    return rows.square().sum(1, dtype=torch.float64)


def svd(blocks: torch.Tensor, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a stack of blocks, computed on ``device``, returned on the CPU."""
    if device == "cpu":
        return torch.linalg.svd(blocks, full_matrices=False)
    u, s, vh = torch.linalg.svd(blocks.to(device), full_matrices=False)
    return u.cpu(), s.cpu(), vh.cpu()


def analyse(matrix: torch.Tensor, tree: Tree, codecs: tuple[str, ...], negligible: float = 0.0,
            device: str = "cpu") -> Candidates:
    """Spectra and option costs of every candidate block.

    ``codecs[0]`` must hold the matrix exactly (its own dtype). With several codecs (`--precision
    auto`) every error is measured: each triplet's on its singular vectors, each row's on the
    row. With one (`keep`) only singular values are computed and the rounding error of the factors
    is bounded by 2u²σ² (|fl(x) - x| <= u|x| on both factors), which the final measurement checks.

    ``negligible`` (squared error per matrix entry) saves work: a block's triplets whose tail
    Σ_{j>=i} σ_j² is at most ``negligible`` times the block's area are offered only for dropping.
    Over any tiling such triplets hold at most ``negligible·m·n``, so with ``negligible = δ·budget/(m·n)`` the plan is at least as small as the optimum for
    (1-δ)·budget, and its error is still counted exactly.
    """
    work = matrix if matrix.dtype == torch.float64 else matrix.float()
    measured = len(codecs) > 1
    dense_bytes = np.stack([SEGMENT_ROW_BYTES + tree.rows * _row_bytes(codec, tree.cols)
                            for codec in codecs]).astype(np.float64)
    dense_err = np.zeros((len(codecs), tree.size))
    spectra, factor_err, row_norms, row_err = {}, {}, {}, {}
    for level in range(tree.depth):
        for ids, blocks in block_batches(work, tree, tree.nodes_of_level(level)):
            area = blocks.shape[1] * blocks.shape[2]
            sigma, errs = _spectrum_and_errors(blocks, codecs, measured, negligible * area, device)
            if measured:
                per_row = torch.stack([torch.zeros(blocks.shape[:2], dtype=torch.float64)]
                                      + [row_errors(codec, blocks) for codec in codecs[1:]])
                dense_err[:, ids] = per_row.sum(-1).numpy()
                norms = blocks.double().square().sum(-1)
            for j, node in enumerate(ids):
                spectra[node] = sigma[j].square()
                factor_err[node] = errs[:, j]
                if measured:
                    row_norms[node], row_err[node] = norms[j], per_row[:, j]
    triplets = Items.from_parts(tree.size, spectra, factor_err, np.stack(
        [_row_bytes(codec, tree.rows) + _row_bytes(codec, tree.cols) for codec in codecs]))
    rows = Items.from_parts(tree.size, row_norms, row_err, np.stack(
        [_row_bytes(codec, tree.cols) for codec in codecs]))
    return Candidates(tree, codecs, dense_bytes, dense_err, triplets, rows,
                      spectra[0].sqrt().numpy())


def _spectrum_and_errors(blocks: torch.Tensor, codecs: tuple[str, ...], measured: bool,
                         floor: float, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (as float64, descending) and per-codec factor errors (P, k, r) of a stack.

    Triplets whose tail of squared singular values is at most ``floor`` are not measured (inf).
    """
    if measured:
        u, s, vh = svd(blocks, device)
        sigma = s.double()
        tails = sigma.square().flip(-1).cumsum(-1).flip(-1)
        wanted = tails > floor
        return sigma, triplet_errors(codecs, u, s, vh, wanted)
    sigma = torch.linalg.svdvals(blocks.to(device)).double().cpu()
    bound = 2 * CODEC[codecs[0]].unit_roundoff ** 2 * sigma.square() * (1 + 1e-6)
    return sigma, bound.unsqueeze(0)


def _row_bytes(codec: str, lengths: np.ndarray) -> np.ndarray:
    """Bytes of one stored row for each length (vectorised `codecs.row_bytes`)."""
    return row_bytes(codec, np.asarray(lengths, dtype=np.int64))
