"""Error norms, condition numbers and the perturbation bounds we print (all rigorous).

Every figure is about the two forms of the stored matrix a user can get (docs/FORMAT.md, "Dense
reconstruction"): H64, its float64 reconstruction (``HMatrix.to_dense(torch.float64)``), and
H, H64 rounded once to the source dtype (``to_dense()``, ``decompress``, ``hmruntime``); each
error figure is an upper bound for both.

Rounding model. u64 = 2**-53, u32 = 2**-24. A sum of N non-negative float64 numbers, in any
order, is within a relative γ_N = N·u64/(1 - N·u64) of the exact sum; rounding a number to
float32 errs by at most u32 relative plus 2**-150 absolute (subnormals). Singular values computed
by LAPACK's backward-stable SVD are the exact ones of a matrix within p·u·||A||₂ of A; we take
p = 4·max(m, n) (the usual "modest function of the size"), so |σ̂_i - σ_i| <= p·u·σ_1. Every
upper bound is widened and every lower bound narrowed by these margins, and the arithmetic that
forms a bound is itself rounded outwards, so a printed bound holds for the exact quantities.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from hmcompress.core.candidates import CHUNK_NUMBERS  # matrix entries the chunked norms handle at once
from hmcompress.runtime import CODEC
from hmcompress.runtime.matrix import round_to_dtype

# Up to this side the spectral figures come from SVDs (the residual's, and W's where the builder
# did not decompose it); beyond, from cheap rigorous bounds: an SVD of a 2048 x 2048 matrix takes
# longer than compressing it (issue 15).
SPECTRAL_EXACT_MAX_SIDE = 1024
UNIT64 = CODEC["f64"].unit_roundoff
UNIT32 = CODEC["f32"].unit_roundoff
HALF_LEAST_FLOAT32 = 2.0**-150  # the largest absolute error of rounding to float32 (subnormal range)
# The stored float64 form's spectral error is bounded by the loaded form's plus ||H - H64||_F when
# that adds at most this share; otherwise it gets its own SVD.
SHORTCUT_SHARE = 1e-2
# The builder's singular values of W come from their squares (`candidates.analyse`), which lose
# precision or vanish outside this range; there they are recomputed (`singular_values`).
SAFE_SIGMA = (2.0**-500, 2.0**500)


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Everything the report says about one matrix's error and conditioning.

    "H" is both forms of the stored matrix: H64 (float64) and H64 rounded to the source dtype.
    """

    fro_error: float  # upper bound on ||W - H||_F (measured in float64, widened by its rounding)
    rel_fro_error: float  # upper bound on ||W - H||_F / ||W||_F
    spectral_error: float  # upper bound on ||W - H||_2
    spectral_method: str  # "svd" (the residuals' SVDs, widened) or "frobenius" (fro_error)
    sigma_max_upper: float  # upper bound on sigma_max(W)
    sigma_min_lower: float  # lower bound on sigma_min(W) (the min(m, n)-th singular value), >= 0
    kappa_w: float | None  # kappa(W) from the computed singular values (an estimate); None: singular
    kappa_h_bound: float | None  # Weyl: (sigma_max_upper + e2) / (sigma_min_lower - e2); None: unbounded
    kappa_h_paper: float | None  # the paper's Theorem 1(c), for comparison (not a bound)


def up(value: float, roundings: int = 4) -> float:
    """``value`` (>= 0) widened past the error of the few float64 roundings that computed it."""
    return value * (1 + 2 * roundings * UNIT64)


def down(value: float, roundings: int = 4) -> float:
    """``value`` (>= 0) narrowed past the error of the few float64 roundings that computed it."""
    return value * (1 - 2 * roundings * UNIT64)


def working_unit(dtype: torch.dtype) -> float:
    """Unit roundoff of the arithmetic used for a matrix of ``dtype`` (float64, else float32)."""
    return UNIT64 if dtype == torch.float64 else UNIT32


def rounding_margin(shape: tuple[int, int], dtype: torch.dtype, scale: float) -> float:
    """Absolute error bound of singular values computed in ``dtype``'s working precision, for a
    matrix whose *computed* largest singular value is ``scale``: p·u·σ_1 with σ_1 <= scale/(1 - p·u)."""
    pu = 4 * max(shape) * working_unit(dtype)
    return up(pu * scale / (1 - pu)) if pu < 1 else math.inf


def row_chunks(shape: tuple[int, ...]) -> list[slice]:
    """Row ranges of about `CHUNK_NUMBERS` entries each."""
    rows = max(1, CHUNK_NUMBERS // max(1, shape[1]))
    return [slice(start, start + rows) for start in range(0, shape[0], rows)]


def frobenius_relative_error(shape: tuple[int, ...]) -> float:
    """Bound on the relative error of `frobenius` for a matrix of ``shape``: the difference
    (u64), squares (u64), the sum of N squares (γ_N), the square root (u64) and the `math.hypot`
    of the chunks (u64 each), with room to spare."""
    count = math.prod(shape) + len(row_chunks(shape)) + 8
    return 4 * count * UNIT64


def frobenius(matrix: torch.Tensor, minus: torch.Tensor | None = None,
              rounded_to: torch.dtype | None = None) -> float:
    """||A||_F, or ||A - B||_F with B (float64) first rounded once to ``rounded_to`` if given, as
    computed (see `frobenius_relative_error` for how far from exact).

    In float64, by row chunks (no full-size temporaries), each chunk scaled by a power of two
    before squaring (no underflow or overflow of the squares), the chunks' norms combined with
    `math.hypot`.
    """
    total = 0.0
    for rows in row_chunks(matrix.shape):
        part = matrix[rows].double()
        if minus is not None:
            part = part - (minus[rows] if rounded_to is None else round_to_dtype(minus[rows], rounded_to).double())
        total = math.hypot(total, _scaled_norm(part))
    return total


def _scaled_norm(part: torch.Tensor) -> float:
    peak = float(part.abs().max()) if part.numel() else 0.0
    if not (0 < peak < math.inf):
        return peak  # 0, inf or nan
    exponent = math.frexp(peak)[1]
    return math.ldexp(float(torch.linalg.vector_norm(part * math.ldexp(1.0, -exponent))), exponent)


def frobenius_bound(matrix: torch.Tensor, minus: torch.Tensor | None = None,
                    rounded_to: torch.dtype | None = None) -> float:
    """An upper bound on the exact ||A||_F or ||A - B||_F (`frobenius`, widened)."""
    return frobenius(matrix, minus, rounded_to) * (1 + frobenius_relative_error(tuple(matrix.shape)))


def loaded_forms(stored: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """The matrices a user of the stored H64 can get: H64 rounded to ``dtype`` (what
    ``decompress`` and ``hmruntime`` return), then H64 itself if it differs."""
    if dtype == torch.float64:
        return [stored]
    loaded = round_to_dtype(stored, dtype).double()
    return [loaded] if torch.equal(loaded, stored) else [loaded, stored]


def spectral_norm_bound(original: torch.Tensor, stored: torch.Tensor | list[torch.Tensor],
                        fro: float) -> tuple[float, str]:
    """An upper bound on ||W - X||_2 for every X in ``stored`` (float64 matrices; the first is
    the one users load): the SVD's value widened by its rounding margin, or ``fro``, an upper
    bound on every ||W - X||_F.

    Each residual is formed in float64, scaled by a power of two (so that float32 neither
    overflows nor underflows on it) and its largest singular value computed in float32. A second
    form within ``SHORTCUT_SHARE`` of the first (in Frobenius norm of the difference) is bounded
    by the first's bound plus that difference; otherwise it gets its own SVD.
    """
    forms = stored if isinstance(stored, list) else [stored]
    if (max(original.shape) > SPECTRAL_EXACT_MAX_SIDE or original.numel() == 0 or not 0 < fro < math.inf):
        return fro, "frobenius"
    exponent = -math.frexp(fro)[1]  # scaled residuals have Frobenius norm < 1
    if abs(exponent) > 1000:
        return fro, "frobenius"
    first = _svd_bound(original, forms[0], exponent, fro)
    if first is None:
        return fro, "frobenius"
    bound = first
    for other in forms[1:]:
        shortcut = up(first + frobenius_bound(forms[0], other))
        if shortcut <= first * (1 + SHORTCUT_SHARE):
            bound = max(bound, shortcut)
            continue
        own = _svd_bound(original, other, exponent, fro)
        if own is None:
            return fro, "frobenius"
        bound = max(bound, own)
    return min(bound, fro), "svd"


def _svd_bound(original: torch.Tensor, form: torch.Tensor, exponent: int, fro: float) -> float | None:
    """Upper bound on ||W - X||_2 from the float32 SVD of 2**exponent·fl64(W - X) (None if the
    SVD fails).

    R = W - X exactly, R~ = fl64(R) (|R~ - R| <= u64|R|), S = 2**e R~ exactly, S32 = fl32(S)
    (|S32 - S| <= u32|S| + 2**-150); σ̂ the computed σ_1(S32): σ_1(S32) <= σ̂ / (1 - p u32), so
    ||R||_2 <= (σ̂ / (1 - p u32) + u32 ||S||_F + 2**-150 sqrt(mn)) / 2**e + u64 ||R||_F.
    """
    scale = math.ldexp(1.0, exponent)
    residual = torch.empty(tuple(original.shape), dtype=torch.float32)
    for rows in row_chunks(original.shape):
        residual[rows] = (original[rows].double() - form[rows]) * scale
    try:
        top = float(torch.linalg.svdvals(residual)[0])
    except RuntimeError:  # torch.linalg.LinAlgError: LAPACK did not converge
        return None
    if not math.isfinite(top):
        return None
    m, n = original.shape
    pu = 4 * max(m, n) * UNIT32
    scaled_fro = up(fro * scale, 2)
    scaled = up(top / (1 - pu)) + up(UNIT32 * scaled_fro) + HALF_LEAST_FLOAT32 * math.sqrt(m * n)
    return up(up(scaled) / scale + UNIT64 * up(fro))


def singular_values(matrix: torch.Tensor) -> np.ndarray:
    """Singular values of ``matrix`` (float64, descending) computed in its working precision
    (float64 for float64, else float32) on the matrix scaled by a power of two, so that magnitudes
    far from 1 neither overflow nor underflow."""
    work = matrix.double() if matrix.dtype == torch.float64 else matrix.float()
    peak = float(work.abs().max()) if work.numel() else 0.0
    if not 0 < peak < math.inf:
        return torch.linalg.svdvals(work).double().numpy()
    exponent = math.frexp(peak)[1]
    sigma = torch.linalg.svdvals(work * math.ldexp(1.0, -exponent)).double().numpy()
    return np.ldexp(sigma, exponent)


def norm_bound(matrix: torch.Tensor) -> float:
    """An upper bound on ||W||_2 without decomposing W: the smaller of ||W||_F and
    sqrt(||W||_1·||W||_inf) (absolute row and column sums in float64, widened by their rounding)."""
    fro = frobenius_bound(matrix)
    if matrix.numel() == 0:
        return fro
    rows = torch.zeros(matrix.shape[0], dtype=torch.float64)
    cols = torch.zeros(matrix.shape[1], dtype=torch.float64)
    for part in row_chunks(matrix.shape):
        block = matrix[part].abs()
        rows[part] = block.sum(1, dtype=torch.float64)
        cols += block.sum(0, dtype=torch.float64)
    sums = float(rows.max()) * float(cols.max())
    if not math.isfinite(sums):
        return fro
    roundings = sum(matrix.shape) + len(row_chunks(matrix.shape)) + 8
    return min(fro, up(math.sqrt(up(sums, roundings)), 2))


def compute_bounds(original: torch.Tensor, stored: torch.Tensor, error: float, sigma: np.ndarray | None) -> Bounds:
    """Bounds for W (original, in its source dtype) approximated by the stored H64 (float64) and
    by H64 rounded to W's dtype.

    ``error`` must be an upper bound on ||W - X||_F for both forms X (`build.error_bound`).
    ``sigma`` are the singular values of W as the builder computed them, in the working precision
    of W's dtype (float64 for float64, else float32; W converts to it exactly); None where the
    builder did not decompose W: they are then computed up to `SPECTRAL_EXACT_MAX_SIDE` a side,
    and beyond it σ_max is bounded by `norm_bound`, σ_min by 0 (κ(W) and κ(H) are not given).
    """
    norm = frobenius(original)
    norm_low = norm * (1 - frobenius_relative_error(tuple(original.shape)))
    rel = up(error / norm_low, 1) if norm_low > 0 else (0.0 if error == 0 else math.inf)
    exact = 0 < max(original.shape) <= SPECTRAL_EXACT_MAX_SIDE
    forms = loaded_forms(stored, original.dtype) if exact else [stored]  # no float64 copy where unused
    e2, method = spectral_norm_bound(original, forms, error)
    e2 = max(e2, 0.0)
    if sigma is None and exact:
        sigma = singular_values(original)
    if sigma is None:
        return Bounds(error, rel, e2, method, norm_bound(original), 0.0, None, None, None)
    if len(sigma) == 0:
        return Bounds(error, rel, e2, method, 0.0, 0.0, None, None, None)
    if not SAFE_SIGMA[0] <= float(sigma[0]) <= SAFE_SIGMA[1] and norm > 0:
        sigma = singular_values(original)
    top, last = float(sigma[0]), float(sigma[-1])
    margin = rounding_margin(tuple(original.shape), original.dtype, top)
    s_max = up(top + margin)
    s_min = max(down(last - margin), 0.0)
    kappa_w = top / last if last > 0 else None
    if down(s_min - e2) > 0:
        kappa_h = up((s_max + e2) / down(s_min - e2))
        paper = top / (last - e2) if last > e2 else None
    else:
        kappa_h = paper = None
    return Bounds(error, rel, e2, method, s_max, s_min, kappa_w, kappa_h, paper)
