"""The data-aware norm: the error a layer makes on the inputs it sees (issue 13).

A layer computes W x. On calibration inputs X (n x N) with second moment G = X Xᵀ / N, the
output error of H is ||(W - H) X||_F² / N = tr(E G Eᵀ), E = W - H. `compress_matrix` with
`InputWeights` guarantees tr(E G Eᵀ) <= T² tr(W G Wᵀ), measured in float64 on the stored H
(`activation_energy`, with a rigorous bound on its own rounding), exactly as the plain bound is.

How the budget is spent is chosen in the same norm. G is damped for planning only
(`PLANNING_DAMPING` of its mean diagonal: directions the calibration data never excites keep a
cost, as in GPTQ); the guarantee is measured on G itself. A candidate block with columns C is
judged by G_CC = S Sᵀ (S lower triangular):

- low-rank leaves are truncated SVDs of the whitened block B S (SVD-LLM), whose discarded
  squared singular values are exactly the block's weighted error; the stored factors are
  a = √σ u and b = √σ vᵀ S⁻¹;
- rows and dense leaves are rounded column by column with error feedback (GPTQ): each column's
  rounding error is compensated on the columns not yet rounded, through the Cholesky factor of
  G_CC⁻¹, which minimises the weighted error for the codes' fixed scales.

Errors between blocks (cross terms of G between column ranges) are left out of the plan's
estimate; the final measurement includes them, and a miss is rebuilt as always (`build`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import torch

from hmcompress.core.bounds import UNIT64, row_chunks
from hmcompress.core.feedback import Feedback
from hmcompress.runtime.matrix import round_to_dtype

PLANNING_DAMPING = 0.01  # share of G's mean diagonal added to it for planning (GPTQ's default)


@dataclasses.dataclass(frozen=True)
class InputWeights:
    """The second moment G (n x n, float64, symmetric positive semi-definite) of a layer's
    calibration inputs, and how many input vectors it was computed from. ``output_gram``: K (m x
    m), how the layer's outputs weigh downstream (`evaluate.output_grams`), where rows are to be
    rounded for the model's output rather than the layer's (`--model-tol`); it steers rounding
    only: the guarantee stays on G."""

    gram: torch.Tensor
    samples: int
    output_gram: torch.Tensor | None = None

    def digest(self) -> str:
        """Identifies G (and K) exactly (result keys of --resume)."""
        return _digest(self.gram, *([] if self.output_gram is None else [self.output_gram]))

    def key(self) -> list:
        """What identifies G (and K) in result keys (--resume)."""
        return [self.digest(), self.samples]

    def planning_gram(self) -> torch.Tensor:
        """G damped by `PLANNING_DAMPING` of its mean diagonal (positive definite for any nonzero G)."""
        return damped(self.gram)

    def output_feedback(self) -> Feedback | None:
        """How to round rows for K, or None without K (`rounding_feedback`)."""
        return None if self.output_gram is None else rounding_feedback(self.output_gram)


@dataclasses.dataclass(frozen=True)
class ColumnMetric:
    """For a matrix built in the plain norm (no calibration inputs: an embedding table, a position
    table), a metric M (n x n, float64, PSD) on its columns that its rows are rounded for: what a
    row's error does to the model's output (`--model-tol`: `evaluate.output_grams`). It steers
    rounding only: the guarantee stays ||W - H||_F <= tol ||W||_F."""

    metric: torch.Tensor

    def key(self) -> list:
        """What identifies it in result keys (--resume)."""
        return ["columns", _digest(self.metric)]

    def feedback(self) -> Feedback | None:
        """How to round rows for M (`rounding_feedback`)."""
        return rounding_feedback(self.metric)


def _digest(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' bytes, in turn."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(memoryview(tensor.contiguous().reshape(-1).numpy()).cast("B"))
    return digest.hexdigest()


def rounding_feedback(gram: torch.Tensor) -> Feedback | None:
    """How to round for a second moment (K or M), damped as G is for planning; None for one of
    zeros (no direction matters more than another)."""
    if not float(gram.diagonal().sum()) > 0:
        return None
    return Feedback.for_gram(damped(gram), _cholesky)


def damped(gram: torch.Tensor) -> torch.Tensor:
    """A second moment damped by `PLANNING_DAMPING` of its mean diagonal (positive definite for
    any nonzero one)."""
    n = gram.shape[0]
    damp = PLANNING_DAMPING * float(gram.diagonal().mean()) if n else 0.0
    return gram + damp * torch.eye(n, dtype=torch.float64)


def activation_energy(matrix: torch.Tensor, gram: torch.Tensor, minus: torch.Tensor | None = None,
                      rounded_to: torch.dtype | None = None) -> tuple[float, float]:
    """tr(A G Aᵀ) for A = ``matrix`` (or ``matrix - minus``, ``minus`` first rounded once to
    ``rounded_to`` if given), as computed in float64 by row chunks, and a bound on the absolute
    error of that computation.

    Each entry of A G is a sum of n products, the trace a sum of m·n more: with k terms in all,
    the computed sum errs by at most γ_k Σ_i |a_i| |G| |a_i|ᵀ <= γ_k ‖|G|‖_∞ ‖A‖_F², since |G|
    is symmetric (its 2-norm is at most its largest row sum). ‖A‖_F² is taken from the same chunks.
    Results below float64's normal range lose up to 2⁻¹⁰⁷⁵ each instead: wherever A is not zero,
    1e-300 more covers that (over 10²³ operations), so that A's whole energy cannot underflow to
    an exact-looking 0. Raises OverflowError where the figures leave float64's range.
    """
    total, squares, nonzero = 0.0, 0.0, False
    chunks = row_chunks(tuple(matrix.shape))
    for rows in chunks:
        part = matrix[rows].double()
        if minus is not None:
            part = part - (minus[rows] if rounded_to is None else round_to_dtype(minus[rows], rounded_to).double())
        total += float(((part @ gram) * part).sum())
        squares += float(part.square().sum())
        nonzero = nonzero or bool(part.any())
    if not (math.isfinite(total) and math.isfinite(squares)):
        raise OverflowError("the weighted error leaves float64's range")
    terms = gram.shape[0] + matrix.numel() + len(chunks) + 8
    gamma = 2 * terms * UNIT64 / (1 - 2 * terms * UNIT64)
    row_sum = float(gram.abs().sum(1).max()) if gram.numel() else 0.0
    return total, gamma * row_sum * squares * (1 + 1e-6) + 1e-300 * nonzero


def activation_error_bound(original: torch.Tensor, stored: torch.Tensor, gram: torch.Tensor) -> float:
    """An upper bound on sqrt(tr(E G Eᵀ)), E = W - H, for both forms of the stored matrix: H64
    (``stored``, float64) and H64 rounded once to W's dtype (what a user loads)."""
    forms = [None] if original.dtype == torch.float64 else [None, original.dtype]
    worst = 0.0
    for rounded_to in forms:
        value, slack = activation_energy(original, gram, stored, rounded_to)
        worst = max(worst, max(value, 0.0) + slack)
    return math.sqrt(worst) * (1 + 4 * UNIT64)


def activation_norm_lower(original: torch.Tensor, gram: torch.Tensor) -> float:
    """A lower bound on sqrt(tr(W G Wᵀ)), the layer's output norm on its calibration inputs."""
    value, slack = activation_energy(original, gram)
    return math.sqrt(max(value - slack, 0.0)) * (1 - 4 * UNIT64)


class Whitening:
    """Per column range C of a matrix, the factors its candidates are priced and rounded with:
    the Cholesky factor S of the damped G_CC (G_CC + damping = S Sᵀ), which whitens blocks for
    their SVDs, and the `Feedback` (column order and factor of its inverse) rows are rounded with.
    Errors are estimated in G_CC itself (`block`): the guarantee is measured on G, and the damping
    would overstate the errors that feedback moves into directions the data hardly excites."""

    def __init__(self, weights: InputWeights) -> None:
        self.gram = weights.gram
        self.damped = weights.planning_gram()
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, Feedback]] = {}

    def block(self, col0: int, cols: int) -> torch.Tensor:
        """G_CC of the columns ``col0 : col0 + cols`` (a view)."""
        return self.gram[col0:col0 + cols, col0:col0 + cols]

    def factors(self, col0: int, cols: int) -> tuple[torch.Tensor, Feedback]:
        """(S, how to round with feedback) for the columns ``col0 : col0 + cols``."""
        key = (col0, cols)
        if key not in self._cache:
            block = self.damped[col0:col0 + cols, col0:col0 + cols]
            self._cache[key] = (_cholesky(block), Feedback.for_gram(block, _cholesky))
        return self._cache[key]


def quadratic_rows(rows: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """r G rᵀ of each row (float64): its squared error in the norm of G."""
    return ((rows @ gram) * rows).sum(1)


def _cholesky(block: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of a symmetric positive definite block; if rounding made it
    indefinite, of the block with a little more on its diagonal."""
    factor, info = torch.linalg.cholesky_ex(block)
    shift = float(block.diagonal().mean()) * 1e-12 if block.numel() else 0.0
    while int(info) != 0:
        shift = max(shift * 10, 1e-300)
        factor, info = torch.linalg.cholesky_ex(block + shift * torch.eye(block.shape[0], dtype=block.dtype))
    return factor
