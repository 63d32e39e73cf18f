"""Rounding with error feedback (GPTQ): the codes that lose least in a weighted norm.

Rounding each number to its nearest code is optimal for the plain Frobenius norm. In the norm of
a layer's inputs (`core.weighted`) the rounding errors of a row interact through G; rounding the
columns in order and pushing each column's error onto the columns not yet rounded, through the
Cholesky factor of G⁻¹, cancels much of it (Frantar et al., 2022: GPTQ).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

FEEDBACK_BLOCK = 64  # columns rounded between two deferred updates of the rest (GPTQ's lazy batch)


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
