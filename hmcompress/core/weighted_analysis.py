"""Candidate blocks priced in the data-aware norm: the `Candidates` the planners take, with every
error measured as tr(E G_CC Eᵀ) for the block's columns C (see `core.weighted`).

Every option is analysed (no early verdicts as in `candidates.analyse`): rows and dense blocks
are rounded with error feedback over whole column strips (rows are independent, so a strip's
figures hold for any block of it), and every block's whitened spectrum is computed. Work is in
float64: the whitening's triangular factors may be badly conditioned.
"""
from __future__ import annotations

import numpy as np
import torch

from hmcompress.core.candidates import (
    SEGMENT_ROW_BYTES,
    Candidates,
    Items,
    Tree,
    finite_or_inf,
    side_lengths,
    svd,
    triplet_errors,
)
from hmcompress.core.codecs import roundtrip_rows
from hmcompress.core.pricing import estimate_pricing
from hmcompress.core.weighted import Whitening, quadratic_rows


def analyse_weighted(matrix: torch.Tensor, tree: Tree, codecs: tuple[str, ...], whitening: Whitening,
                     negligible: float = 0.0, device: str = "cpu") -> Candidates:
    """Spectra and option costs of every candidate block in the weighted norm (``root_sigma``:
    the whitened matrix's singular values, whose truncation is the SVD-LLM baseline).

    ``codecs[0]`` holds the matrix exactly. ``negligible``: as in `candidates.analyse` (triplets
    whose tail holds at most this much squared error per entry are only offered for dropping).
    """
    work = matrix.double()
    pricing = estimate_pricing(matrix if matrix.dtype == torch.float64 else matrix.float(), codecs,
                               side_lengths(tree))
    dense_bytes = np.stack([SEGMENT_ROW_BYTES + tree.rows * pricing.row_bytes(codec, tree.cols)
                            for codec in codecs]).astype(np.float64)
    dense_err = np.zeros((len(codecs), tree.size))
    spectra, factor_err, row_norms, row_err = {}, {}, {}, {}
    root_sigma = None
    for level in range(tree.depth):
        for (col0, cols), ids in _by_columns(tree, tree.nodes_of_level(level)).items():
            lower, feedback = whitening.factors(col0, cols)
            gram = whitening.block(col0, cols)
            strip = work[:, col0:col0 + cols]
            seen = strip @ lower  # the whitened strip (damped G), whose blocks' SVDs give the factors
            drop = quadratic_rows(strip, gram)
            errs = torch.zeros((len(codecs), strip.shape[0]), dtype=torch.float64)
            for p, codec in enumerate(codecs[1:], start=1):
                errs[p] = finite_or_inf(quadratic_rows(strip - roundtrip_rows(codec, strip, feedback), gram))
            for node in ids:
                rows = slice(int(tree.row0[node]), int(tree.row0[node] + tree.rows[node]))
                row_norms[node], row_err[node] = drop[rows], errs[:, rows]
                dense_err[:, node] = errs[:, rows].sum(1).numpy()
            for group in _by_height(tree, ids):
                blocks = torch.stack([seen[int(tree.row0[n]):int(tree.row0[n] + tree.rows[n])] for n in group])
                u, s, vh = svd(blocks, device)
                stored = torch.linalg.solve_triangular(lower, vh, upper=False, left=False)  # vh S⁻¹
                # Dropping a triplet loses σ² in the damped norm, σ² vᵀS⁻¹ G S⁻ᵀv in G's own.
                dropped = s.square() * ((stored @ gram) * stored).sum(-1)
                tails = dropped.flip(-1).cumsum(-1).flip(-1)
                wanted = tails > negligible * blocks.shape[1] * blocks.shape[2]
                errs_f = triplet_errors(codecs, u, s, stored, wanted, gram=gram)
                for j, node in enumerate(group):
                    spectra[node], factor_err[node] = dropped[j], errs_f[:, j]
                    if node == 0:
                        root_sigma = s[j].numpy()
    triplets = Items.from_parts(tree.size, spectra, factor_err, np.stack(
        [pricing.row_bytes(codec, tree.rows) + pricing.row_bytes(codec, tree.cols) for codec in codecs]))
    rows_items = Items.from_parts(tree.size, row_norms, row_err, np.stack(
        [pricing.row_bytes(codec, tree.cols) for codec in codecs]))
    return Candidates(tree, codecs, dense_bytes, dense_err, triplets, rows_items, root_sigma, True)


def whitened_factors(block: torch.Tensor, lower: torch.Tensor,
                     device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors (A = √s Uᵀ, B = √s Vᵀ S⁻¹) of a block from the SVD of B S (float64), in
    the order `analyse_weighted` priced their triplets."""
    u, s, vh = svd((block.double() @ lower).unsqueeze(0), device)
    root = s[0].sqrt()
    stored = torch.linalg.solve_triangular(lower, vh[0], upper=False, left=False)
    return (u[0] * root).T, stored * root.unsqueeze(1)


def _by_columns(tree: Tree, nodes: range) -> dict[tuple[int, int], list[int]]:
    """The nodes grouped by their column range (col0, cols)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for node in nodes:
        groups.setdefault((int(tree.col0[node]), int(tree.cols[node])), []).append(node)
    return dict(sorted(groups.items()))


def _by_height(tree: Tree, ids: list[int]) -> list[list[int]]:
    """The nodes grouped by block height (so that their blocks stack)."""
    groups: dict[int, list[int]] = {}
    for node in ids:
        groups.setdefault(int(tree.rows[node]), []).append(node)
    return [groups[h] for h in sorted(groups)]
