"""Independent measurements for the tests: NumPy and the standard library only, no hmcompress.

Frobenius norms are exact (integer arithmetic on the float64 values: every float64 is an integer
times 2**-1074). Spectral norms and singular values come from NumPy's float64 SVD with a rigorous
range around them: the residual is formed exactly as a double-float pair (TwoSum), and a computed
singular value is taken to be within 4·max(m, n)·2**-53·σ_1 of the exact one. The ranges are ~1e-13
relative: a recorded figure below a range's lower end is a broken promise, whatever the rounding.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np

U64 = 2.0**-53
_SCALE = 1 << 1074


def _integers(values: np.ndarray) -> list[int]:
    """float64 values as exact integer multiples of 2**-1074."""
    out = []
    for value in np.asarray(values, dtype=np.float64).ravel().tolist():
        numerator, denominator = value.as_integer_ratio()
        out.append(numerator * (_SCALE // denominator))
    return out


def sq_fro(a: np.ndarray, b: np.ndarray | None = None) -> Fraction:
    """Exactly ||A||_F² or ||A - B||_F²."""
    xs = _integers(a)
    if b is not None:
        xs = [x - y for x, y in zip(xs, _integers(b))]
    return Fraction(sum(x * x for x in xs), _SCALE * _SCALE)


def sq(value: float) -> Fraction:
    """Exactly value²."""
    return Fraction(value) ** 2


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """Singular values as computed (float64, descending) and the half-width of the range that
    holds every exact one: |σ_i - sigma[i]| <= radius."""

    sigma: np.ndarray
    radius: float

    @property
    def top_range(self) -> tuple[float, float]:
        top = float(self.sigma[0]) if len(self.sigma) else 0.0
        return max(top - self.radius, 0.0), top + self.radius


def spectrum(a: np.ndarray, b: np.ndarray | None = None) -> Spectrum:
    """Singular values of A (or of A - B, formed exactly as hi + lo) with a rigorous radius."""
    a = np.asarray(a, dtype=np.float64)
    if b is None:
        hi, lo = a, np.zeros_like(a)
    else:
        b = np.asarray(b, dtype=np.float64)
        hi = a - b  # TwoSum: hi + lo == a - b exactly (no overflow here)
        virtual = hi - a
        lo = (a - (hi - virtual)) + (-b - virtual)
    if hi.size == 0:
        return Spectrum(np.zeros(0), 0.0)
    sigma = np.linalg.svd(hi, compute_uv=False)
    p = 4 * max(hi.shape) * U64
    top = float(sigma[0])
    lo_norm = float(np.abs(lo).max()) * np.sqrt(lo.size)  # >= ||lo||_F
    radius = (p * top / (1 - p) + lo_norm * (1 + 4 * U64)) * (1 + 8 * U64) + 1e-300
    return Spectrum(sigma, radius)


def kappa_range(s: Spectrum) -> tuple[float, float]:
    """A range holding the exact σ_1/σ_min (inf where σ_min may be 0)."""
    top, last = float(s.sigma[0]), float(s.sigma[-1])
    low = (top - s.radius) / (last + s.radius) * (1 - 8 * U64) if last + s.radius > 0 else np.inf
    high = (top + s.radius) / (last - s.radius) * (1 + 8 * U64) if last > s.radius else np.inf
    return max(low, 0.0), high


def fro_range(a: np.ndarray, b: np.ndarray | None = None) -> tuple[float, float]:
    """A rigorous range for ||A||_F or ||A - B||_F, in float64 (fast; for matrices too large for
    `sq_fro`): A - B formed exactly as hi + lo, ||hi||_F² summed with its γ_N margin."""
    a = np.asarray(a, dtype=np.float64).ravel()
    if b is None:
        hi, lo = a, np.zeros(0)
    else:
        b = np.asarray(b, dtype=np.float64).ravel()
        hi = a - b
        virtual = hi - a
        lo = (a - (hi - virtual)) + (-b - virtual)
    if hi.size == 0:
        return 0.0, 0.0
    peak = float(np.abs(hi).max())
    if peak == 0:
        hi_norm, margin = 0.0, 0.0
    else:
        scaled = hi / peak  # no overflow or underflow of the squares that matter
        gamma = (hi.size + 4) * U64 / (1 - (hi.size + 4) * U64)
        hi_norm = float(np.sqrt(np.dot(scaled, scaled))) * peak
        margin = hi_norm * gamma + peak * np.sqrt(hi.size) * 2.0**-537  # squares lost to underflow
    lo_norm = float(np.abs(lo).max()) * np.sqrt(lo.size) if lo.size else 0.0
    return max(hi_norm - margin - lo_norm, 0.0) * (1 - 4 * U64), (hi_norm + margin + lo_norm) * (1 + 4 * U64)
