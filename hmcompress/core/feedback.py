"""Rounding with error feedback (GPTQ): the codes that lose least in a weighted norm.

Rounding each number to its nearest code is optimal for the plain Frobenius norm. In the norm of
a layer's inputs (`core.weighted`) the rounding errors of a row interact through G; rounding the
columns in order and pushing each column's error onto the columns not yet rounded, through the
Cholesky factor of G⁻¹, cancels much of it (Frantar et al., 2022: GPTQ).

For the model's output rather than the layer's (`--model-tol`), errors across rows interact too,
through K, the second moment of what the layer's outputs send back (`evaluate.output_grams`):
`two_sided_round` rounds rows in blocks and compensates each block's errors on the rows after it
through the factor of K⁻¹, GPTQ's step along the other side.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

FEEDBACK_BLOCK = 64  # columns rounded between two deferred updates of the rest (GPTQ's lazy batch)
# Two-sided rounding rounds rows in blocks of at least this many (each block costs a pass over the
# columns). On the char transformer's first qkv layer, blocks of 8 rows kept 0.81 of the 0.84 bit
# that rows one by one saved at the same entropy, 32 rows 0.72 (one-off measurement).
MIN_ROW_BLOCK = 8


@dataclasses.dataclass(frozen=True)
class Feedback:
    """How to round rows with error feedback for a norm G: the column order (GPTQ's "act order":
    the most excited inputs first, while there is the most room left to compensate them) and the
    upper factor U of the inverse of G permuted to that order (G⁻¹ = Uᵀ U)."""

    upper: torch.Tensor
    order: torch.Tensor

    @classmethod
    def for_gram(cls, gram: torch.Tensor, cholesky: Callable[[torch.Tensor], torch.Tensor]) -> "Feedback":
        """For a positive definite G (``cholesky``: its lower factor, made robust by the caller)."""
        order = torch.argsort(-gram.diagonal(), stable=True)
        lower = cholesky(gram[order][:, order])
        return cls(torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True), order)


def feedback_round(rows: torch.Tensor, feedback: Feedback,
                   round_column: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Rows (k x w, float64) rounded column by column with error feedback (GPTQ).

    Columns go in ``feedback.order``; each is rounded by ``round_column(values)``, and its error,
    divided by U_jj, is removed from the columns after it along row j of U: the optimal
    compensation, for the weighted norm, of what is already rounded. Updates beyond the current
    `FEEDBACK_BLOCK` columns are deferred and applied as one product. Rows are independent.
    """
    upper = feedback.upper
    work = rows[:, feedback.order]
    out = torch.empty_like(work)
    width = work.shape[1]
    for start in range(0, width, FEEDBACK_BLOCK):
        stop = min(width, start + FEEDBACK_BLOCK)
        errors = torch.empty((work.shape[0], stop - start), dtype=work.dtype)
        for j in range(start, stop):
            rounded = round_column(work[:, j])
            out[:, j] = rounded
            error = (work[:, j] - rounded) / upper[j, j]
            errors[:, j - start] = error
            if j + 1 < stop:
                work[:, j + 1:stop].addr_(error, upper[j, j + 1:stop], alpha=-1)
        if stop < width:
            work[:, stop:].addmm_(errors, upper[start:stop, stop:], alpha=-1)
    result = torch.empty_like(out)
    result[:, feedback.order] = out
    return result


def two_sided_round(rows: torch.Tensor, feedback: Feedback | None, row_feedback: Feedback,
                    steps: torch.Tensor, limit: int, blocks: int) -> torch.Tensor:
    """A matrix (m x n, float64) rounded for the two-sided norm tr(K E G Eᵀ): G weighs the errors
    along a row (the layer's inputs, ``feedback``), K across rows (what the layer's outputs do
    downstream, ``row_feedback``). Row i is rounded to multiples of ``steps[i]``, at most
    ``limit`` of them.

    Rows go in ``row_feedback.order`` in at most ``blocks`` blocks (of at least `MIN_ROW_BLOCK`
    rows); each block's rows are rounded together with error feedback along them
    (`feedback_round`; without ``feedback``, to the nearest code), and the block's errors are
    compensated on the rows not yet rounded through the factor U of K⁻¹: the optimal
    compensation, in K's norm, of the rows already rounded. The errors U's rows need are those
    the row-by-row scheme would have compensated: a triangular solve over the block.
    """
    upper = row_feedback.upper
    targets = rows[row_feedback.order]
    ordered_steps = steps[row_feedback.order]
    out = torch.empty_like(targets)
    m = targets.shape[0]
    size = max(MIN_ROW_BLOCK, -(-m // max(blocks, 1)))
    for start in range(0, m, size):
        stop = min(m, start + size)
        block, step = targets[start:stop], ordered_steps[start:stop]

        def round_column(column: torch.Tensor, step: torch.Tensor = step) -> torch.Tensor:
            return torch.round(column / step).clamp_(-limit, limit).mul_(step)
        rounded = (feedback_round(block, feedback, round_column) if feedback is not None
                   else round_column(block, step.unsqueeze(1)))
        out[start:stop] = rounded
        if stop < m:
            errors = torch.linalg.solve_triangular(upper[start:stop, start:stop].T, block - rounded, upper=False)
            targets[stop:].addmm_(upper[start:stop, stop:].T, errors, alpha=-1)
    result = torch.empty_like(out)
    result[row_feedback.order] = out
    return result
