"""Error norms, condition numbers and the perturbation bounds we print (all rigorous).

Singular values computed in floating point carry an error of at most p(n)·u·sigma_max (LAPACK's
backward-stable SVD); we use p(n) = 4·max(m, n) and widen every upper bound and narrow every lower
bound by that margin, so a printed bound holds for the exact quantities, not only the computed ones.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from hmcompress.core.candidates import CHUNK_NUMBERS  # matrix entries the chunked norms handle at once
from hmcompress.runtime import CODEC

SPECTRAL_EXACT_MAX_SIDE = 4096


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Everything the report says about one matrix's error and conditioning."""

    fro_error: float  # ||W - H||_F (measured)
    rel_fro_error: float  # ||W - H||_F / ||W||_F
    spectral_error: float  # upper bound on ||W - H||_2
    spectral_method: str  # "svd" (exact up to a rounding margin) or "frobenius" (upper bound)
    sigma_max: float  # upper bound on sigma_max(W)
    sigma_min: float  # lower bound on sigma_min(W) (the min(m, n)-th singular value), >= 0
    kappa_w: float | None  # kappa(W) from the computed singular values; None: singular
    kappa_h_bound: float | None  # Weyl: (sigma_max + e2) / (sigma_min - e2); None: unbounded
    kappa_h_paper: float | None  # the paper's Theorem 1(c), for comparison (not a bound)


def working_unit(dtype: torch.dtype) -> float:
    """Unit roundoff of the arithmetic used for a matrix of ``dtype`` (float64, else float32)."""
    return CODEC["f64" if dtype == torch.float64 else "f32"].unit_roundoff


def rounding_margin(shape: tuple[int, int], dtype: torch.dtype, scale: float) -> float:
    """Absolute error allowance for singular values of magnitude <= ``scale`` computed for ``dtype``."""
    unit = working_unit(dtype)
    return 4 * max(shape) * unit * scale


def row_chunks(shape: tuple[int, ...]) -> list[slice]:
    """Row ranges of about `CHUNK_NUMBERS` entries each."""
    rows = max(1, CHUNK_NUMBERS // max(1, shape[1]))
    return [slice(start, start + rows) for start in range(0, shape[0], rows)]


def frobenius(matrix: torch.Tensor, minus: torch.Tensor | None = None,
              rounded_to: torch.dtype | None = None) -> float:
    """||A||_F, or ||A - B||_F with B (float64) first rounded to ``rounded_to`` if given.

    In float64, by row chunks (no full-size temporaries), the chunks' norms combined with
    `math.hypot` (no overflow for huge entries).
    """
    total = 0.0
    for rows in row_chunks(matrix.shape):
        part = matrix[rows].double()
        if minus is not None:
            part = part - (minus[rows] if rounded_to is None else minus[rows].to(rounded_to).double())
        total = math.hypot(total, float(torch.linalg.vector_norm(part)))
    return total


def spectral_norm_bound(original: torch.Tensor, stored: torch.Tensor, fro: float) -> tuple[float, str]:
    """An upper bound on ||W - H||_2: the SVD's value widened by its rounding margin, or ``fro``,
    the measured ||W - H||_F (any upper bound of it)."""
    if max(original.shape) > SPECTRAL_EXACT_MAX_SIDE or original.numel() == 0 or fro == 0:
        return fro, "frobenius"
    dtype = torch.float32 if 1e-30 < fro < 1e30 else torch.float64
    residual = torch.empty(original.shape, dtype=dtype)
    for rows in row_chunks(original.shape):
        residual[rows] = original[rows].double() - stored[rows]
    top = float(torch.linalg.svdvals(residual)[0])
    unit = CODEC["f32" if dtype == torch.float32 else "f64"].unit_roundoff
    p = 4 * max(original.shape) * unit
    bound = top / (1 - p) + unit * fro  # the SVD's error, plus rounding R to the working dtype
    return min(bound, fro), "svd"


def compute_bounds(original: torch.Tensor, stored: torch.Tensor, error: float, sigma: np.ndarray) -> Bounds:
    """Bounds for W (original) approximated by H (stored, float64).

    ``sigma`` are the singular values of W as the builder computed them, in the working precision
    of W's dtype (float64 for float64, else float32).
    """
    norm = frobenius(original)
    rel = error / norm if norm > 0 else (0.0 if error == 0 else math.inf)
    e2, method = spectral_norm_bound(original, stored, error)
    e2 = max(e2, 0.0)
    if len(sigma) == 0:
        return Bounds(error, rel, e2, method, 0.0, 0.0, None, None, None)
    margin = rounding_margin(tuple(original.shape), original.dtype, float(sigma[0]))
    s_max = float(sigma[0]) + margin
    s_min = max(float(sigma[-1]) - margin, 0.0)
    kappa_w = float(sigma[0] / sigma[-1]) if sigma[-1] > 0 else None
    if e2 < s_min:
        kappa_h = (s_max + e2) / (s_min - e2)
        paper = float(sigma[0]) / (float(sigma[-1]) - e2) if sigma[-1] > e2 else None
    else:
        kappa_h = paper = None
    return Bounds(error, rel, e2, method, s_max, s_min, kappa_w, kappa_h, paper)
