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

from .codecs import UNIT_ROUNDOFF, roundtrip_rows, row_bytes
from .runtime import BLOCK_COLUMNS, SEGMENT_COLUMNS

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
class Candidates:
    """Costs (bytes) and squared errors of every way to store every candidate block.

    Dense options: ``dense_bytes[p, node]``, ``dense_err[p, node]`` for codec ``codecs[p]``.
    Triplets (one per singular value of each node): ``trip_node[t]``, ``trip_sigma2[t]`` (the
    error of dropping it), ``trip_bytes[p, t]`` and ``trip_err[p, t]`` (keeping it in codec p).
    """

    tree: Tree
    codecs: tuple[str, ...]
    dense_bytes: np.ndarray
    dense_err: np.ndarray
    trip_node: np.ndarray
    trip_index: np.ndarray  # position of the triplet in its node's spectrum (0 = largest)
    trip_sigma2: np.ndarray
    trip_bytes: np.ndarray
    trip_err: np.ndarray
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


def triplet_errors(codec: str, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """Exact squared error ||a~ b~ᵀ - a bᵀ||² of storing each triplet's factors in ``codec``.

    Factors are balanced, ``a = sqrt(s) u`` and ``b = sqrt(s) v``, as the builder stores them.
    Shapes: u (k, h, r), s (k, r), vh (k, r, w); result (k, r) float64.
    """
    root = s.sqrt().unsqueeze(-1)
    a = (u.mT * root).reshape(-1, u.shape[1]).double()
    b = (vh * root).reshape(-1, vh.shape[2]).double()
    a_q = roundtrip_rows(codec, a)
    b_q = roundtrip_rows(codec, b)
    cross = (a_q * a).sum(1) * (b_q * b).sum(1)
    err = (a_q.square().sum(1) * b_q.square().sum(1) - 2 * cross
           + a.square().sum(1) * b.square().sum(1))
    err = torch.where(torch.isfinite(err), err.clamp_min(0), torch.full_like(err, np.inf))
    return err.reshape(s.shape)


def dense_errors(codec: str, blocks: torch.Tensor) -> torch.Tensor:
    """Exact squared error of storing each block of a (k, h, w) stack densely in ``codec``."""
    flat = blocks.reshape(-1, blocks.shape[2]).double()
    diff = (roundtrip_rows(codec, flat) - flat).square().reshape(blocks.shape[0], -1).sum(1)
    return torch.where(torch.isfinite(diff), diff, torch.full_like(diff, np.inf))


def analyse(matrix: torch.Tensor, tree: Tree, codecs: tuple[str, ...]) -> Candidates:
    """Spectra and option costs of every candidate block.

    ``codecs[0]`` must hold the matrix exactly (its own dtype). With several codecs (`--precision
    auto`) each triplet's error in each codec is measured on its singular vectors; with one (`keep`)
    only singular values are computed and the rounding error of the factors is bounded by 2u²σ²
    (|fl(x) - x| <= u|x| on both factors), which the final measurement then checks.
    """
    work = matrix if matrix.dtype == torch.float64 else matrix.float()
    measured = len(codecs) > 1
    dense_bytes = np.stack([SEGMENT_ROW_BYTES + tree.rows * _row_bytes(codec, tree.cols)
                            for codec in codecs]).astype(np.float64)
    dense_err = np.zeros((len(codecs), tree.size))
    spectra: dict[int, torch.Tensor] = {}
    factor_err: dict[int, torch.Tensor] = {}
    for level in range(tree.depth):
        for ids, blocks in block_batches(work, tree, tree.nodes_of_level(level)):
            sigma, errs = _spectrum_and_errors(blocks, codecs, measured, exact_sigma=level == 0)
            if measured:
                for p, codec in enumerate(codecs[1:], start=1):
                    dense_err[p, ids] = dense_errors(codec, blocks).numpy()
            for j, node in enumerate(ids):
                spectra[node] = sigma[j]
                factor_err[node] = errs[:, j]
    counts = np.array([len(spectra[n]) for n in range(tree.size)])
    trip_node = np.repeat(np.arange(tree.size), counts)
    trip_index = np.arange(len(trip_node)) - np.repeat(np.cumsum(counts) - counts, counts)
    trip_sigma2 = torch.cat([spectra[n] for n in range(tree.size)]).square().numpy()
    trip_err = torch.cat([factor_err[n] for n in range(tree.size)], dim=1).numpy()
    trip_bytes = np.stack([(_row_bytes(codec, tree.rows) + _row_bytes(codec, tree.cols))[trip_node]
                           for codec in codecs]).astype(np.float64)
    return Candidates(tree, codecs, dense_bytes, dense_err, trip_node, trip_index, trip_sigma2,
                      trip_bytes, trip_err, spectra[0].numpy())


def _spectrum_and_errors(blocks: torch.Tensor, codecs: tuple[str, ...], measured: bool,
                         exact_sigma: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (float64, descending) and per-codec factor errors (P, k, r) of a stack.

    ``exact_sigma`` computes the singular values in float64 (the root's: they give sigma_min and
    kappa, which must be accurate even for ill-conditioned matrices).
    """
    if measured:
        u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
        sigma = torch.linalg.svdvals(blocks.double()) if exact_sigma else s.double()
        errs = torch.stack([triplet_errors(codec, u, s, vh) for codec in codecs])
    else:
        sigma = torch.linalg.svdvals(blocks.double() if exact_sigma else blocks).double()
        bound = 2 * UNIT_ROUNDOFF[codecs[0]] ** 2 * sigma.square() * (1 + 1e-6)
        errs = bound.unsqueeze(0)
    return sigma, errs


def _row_bytes(codec: str, lengths: np.ndarray) -> np.ndarray:
    """Bytes of one stored row for each length."""
    return np.array([row_bytes(codec, int(n)) for n in lengths], dtype=np.int64)
