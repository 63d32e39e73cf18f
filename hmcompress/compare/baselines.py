"""The methods hmcompress is compared with, each answering the same two questions about a matrix W.

Every method is a small configured callable (a frozen dataclass); calling it on W returns a fit
that keeps what several questions share (one SVD, one sort of the magnitudes, one quantization,
the H-matrices already built) and answers, with figures *measured* in float64 on the matrix a user
of that storage gets back (`build.measured_error`: the stored matrix and its rounding to W's dtype):

- ``at_tol(tol)``: the fewest bytes whose error is within ``tol * ||W||_F``. Methods of a fixed bit
  width cannot aim at a tolerance: they answer with their own error, and `Outcome.within` says
  whether it happens to be within;
- ``at_bytes(budget)``: the smallest error whose storage fits in ``budget`` bytes (None when no
  storage of that method fits).

Errors are measured in a `Norm` given to the method with the matrix: the plain Frobenius norm
(`FROBENIUS`, the default), or the data-aware norm of the layer's calibration inputs
(`InputsNorm`: sqrt(tr(E G Eᵀ)), E = W - Ŵ, relative to sqrt(tr(W G Wᵀ)); `compare --activations`).
The methods of `DATA_AWARE` use G to choose what they store (SVD-LLM, GPTQ, hmcompress's
data-aware build); given the plain norm they fall back to G = I.

`registry(leaf)` maps every method's name to its configured instance (torchao-style: one table,
no if/elif chains). Bytes are exact sizes of the stored numbers and indices; hmcompress methods
count every tensor of the packed matrix (tables included).

>>> w = torch.linspace(-1, 1, 48 * 40, dtype=torch.float64).reshape(48, 40).float() ** 3
>>> out = registry()["svd"](w).at_tol(1e-3)
>>> out.within(1e-3), out.detail
(True, 'rank 2')
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar, Protocol

import numpy as np
import torch

from hmcompress.core.build import CompressionOptions, compress_matrix, measured_error
from hmcompress.core.feedback import feedback_round
from hmcompress.core.weighted import (
    InputWeights,
    Whitening,
    activation_error_bound,
    activation_norm_lower,
    quadratic_rows,
)
from hmcompress.errors import OptionError
from hmcompress.runtime import HMatrix, round_to_dtype

# ------------------------------------------------------------------------------------------------
# The norm errors are measured in


class Norm(Protocol):
    """How the error of a stored matrix is measured: ``name`` ("frobenius" or "activations"),
    ``weights`` (G, or None for the plain norm)."""

    name: str
    weights: InputWeights | None

    def of(self, matrix: torch.Tensor, exact: torch.Tensor) -> float:
        """The matrix's own norm (``exact``: it in float64)."""

    def error(self, matrix: torch.Tensor, exact: torch.Tensor, stored: torch.Tensor) -> float:
        """The error of the float64 ``stored`` matrix and of its rounding to ``matrix``'s dtype, the larger."""

    def energies(self, sigma: np.ndarray, left: torch.Tensor, right: torch.Tensor) -> np.ndarray:
        """The squared error each term of ``left @ right`` adds when left out (left's columns
        orthogonal, each of norm sqrt of its share of ``sigma``: an SVD split between its factors)."""


@dataclasses.dataclass(frozen=True)
class FrobeniusNorm:
    """||W - Ŵ||_F, relative to ||W||_F: valid for any input."""

    name: ClassVar[str] = "frobenius"
    weights: ClassVar[None] = None

    def of(self, matrix: torch.Tensor, exact: torch.Tensor) -> float:  # noqa: ARG002 - the Norm protocol
        return float(torch.linalg.matrix_norm(exact))

    def error(self, matrix: torch.Tensor, exact: torch.Tensor, stored: torch.Tensor) -> float:
        return measured_error(exact, stored, matrix.dtype)

    def energies(self, sigma: np.ndarray, left: torch.Tensor, right: torch.Tensor) -> np.ndarray:  # noqa: ARG002 - the Norm protocol
        return sigma**2


FROBENIUS = FrobeniusNorm()


@dataclasses.dataclass(frozen=True)
class InputsNorm:
    """The output error on the calibration inputs: sqrt(tr(E G Eᵀ)), E = W - Ŵ, relative to
    sqrt(tr(W G Wᵀ)). Errors are upper bounds (`activation_error_bound`: both forms of Ŵ, and
    the rounding of the float64 computation), norms lower bounds (`activation_norm_lower`), as
    in hmcompress's own data-aware guarantee."""

    weights: InputWeights
    name: ClassVar[str] = "activations"

    def of(self, matrix: torch.Tensor, exact: torch.Tensor) -> float:  # noqa: ARG002 - the Norm protocol
        return activation_norm_lower(matrix, self.weights.gram)

    def error(self, matrix: torch.Tensor, exact: torch.Tensor, stored: torch.Tensor) -> float:  # noqa: ARG002 - the Norm protocol
        return activation_error_bound(matrix, stored, self.weights.gram)

    def energies(self, sigma: np.ndarray, left: torch.Tensor, right: torch.Tensor) -> np.ndarray:  # noqa: ARG002 - the Norm protocol
        # E = L_t R_t with orthogonal columns of L: tr(E G Eᵀ) = Σ_i |l_i|² r_i G r_iᵀ, no cross terms.
        return (left.square().sum(0) * quadratic_rows(right, self.weights.gram)).clamp(min=0).numpy()


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One way of storing W: its exact bytes and its measured error ||W - Ŵ|| (in the `Norm` it was
    measured in: Frobenius, or the output error on calibration inputs)."""

    nbytes: int
    error: float
    norm: float  # ||W|| in the same norm, so that relative figures need no second pass
    detail: str  # how it was stored, e.g. "rank 12" or "5000 kept (8.1%), csr"
    hmatrix: HMatrix | None = dataclasses.field(default=None, compare=False, repr=False)
    stored: torch.Tensor | None = dataclasses.field(default=None, compare=False, repr=False)  # Ŵ, W's dtype

    def slim(self) -> "Outcome":
        """The same figures without the stored matrices (what tables and JSON need)."""
        return dataclasses.replace(self, hmatrix=None, stored=None)

    @property
    def rel_error(self) -> float:
        if self.norm > 0:
            return self.error / self.norm
        return 0.0 if self.error == 0 else math.inf

    def within(self, tol: float) -> bool:
        """Whether the measured error is within the relative tolerance."""
        return self.error <= tol * self.norm


class Fit(Protocol):
    def at_tol(self, tol: float) -> Outcome: ...

    def at_bytes(self, budget: int) -> Outcome | None: ...


class Method(Protocol):
    name: str
    bounded: ClassVar[bool]  # can aim at a tolerance
    label: str  # one line for tables and legends

    def __call__(self, matrix: torch.Tensor, norm: Norm = FROBENIUS) -> Fit: ...


@dataclasses.dataclass(frozen=True)
class _Target:
    """The matrix being approximated: in its own dtype, in float64, the norm errors are measured
    in (``metric``) and the matrix's own norm in it."""

    matrix: torch.Tensor
    exact: torch.Tensor
    norm: float
    metric: Norm = FROBENIUS

    @classmethod
    def of(cls, matrix: torch.Tensor, metric: Norm = FROBENIUS) -> "_Target":
        exact = matrix.double()
        return cls(matrix, exact, metric.of(matrix, exact), metric)

    def outcome(self, nbytes: int, stored: torch.Tensor, detail: str) -> Outcome:
        """Measure a stored approximation (float64)."""
        dtype = self.matrix.dtype
        return Outcome(int(nbytes), self.metric.error(self.matrix, self.exact, stored), self.norm, detail,
                       stored=round_to_dtype(stored, dtype))


def _first_within(start: int, stop: int, outcome_of: Callable[[int], Outcome],
                  limit: float) -> tuple[int, Outcome]:
    """The smallest size parameter in [start, stop] whose measured error is within ``limit``, and
    its outcome.

    ``start`` is the estimate (sizes below it miss even before rounding). Rounding to the storage
    dtype can push the measured error over, so gallop upwards, then bisect back; if even ``stop``
    misses, it is returned (its outcome says so through `Outcome.within`).
    """
    missed, step, size = start - 1, 1, start
    while True:
        out = outcome_of(size)
        if out.error <= limit or size >= stop:
            break
        missed, size, step = size, min(stop, size + step), step * 2
    if out.error > limit:
        return size, out
    return _narrow(missed, size, out, outcome_of, limit)


def _bisect_within(stop: int, outcome_of: Callable[[int], Outcome], limit: float) -> Outcome:
    """The outcome of the smallest size parameter in [0, ``stop``] whose measured error is within
    ``limit``, by bisection (errors taken to fall as the size grows); ``stop``'s if it misses."""
    best = outcome_of(stop)
    if best.error > limit:
        return best
    return _narrow(-1, stop, best, outcome_of, limit)[1]


def _narrow(missed: int, passed: int, best: Outcome, outcome_of: Callable[[int], Outcome],
            limit: float) -> tuple[int, Outcome]:
    """Bisect between a size that missed ``limit`` and one that passed (with its outcome)."""
    while passed - missed > 1:
        mid = (passed + missed) // 2
        trial = outcome_of(mid)
        if trial.error <= limit:
            passed, best = mid, trial
        else:
            missed = mid
    return passed, best


def tail_norms(energy: np.ndarray) -> np.ndarray:
    """tails[k] = sqrt(sum(energy[k:])) for k = 0..len, summed from the small end (no cancellation)."""
    return np.sqrt(np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]]))


# ------------------------------------------------------------------------------------------------
# Truncated SVD


@dataclasses.dataclass(frozen=True)
class TruncatedSVD:
    """One global rank r per matrix: W ≈ A B with A = U_r Σ_r (m x r) and B = V_rᵀ (r x n) stored
    in W's dtype, r (m + n) numbers.

    >>> gen = torch.Generator().manual_seed(0)
    >>> w = torch.randn(60, 8, generator=gen) @ torch.randn(8, 50, generator=gen)
    >>> out = TruncatedSVD()(w).at_tol(1e-4)
    >>> out.detail, out.nbytes == 8 * (60 + 50) * 4, out.within(1e-4)
    ('rank 8', True, True)

    It misses a tolerance only when rounding the factors to W's dtype alone exceeds it (tolerances
    near the dtype's unit roundoff); then the full rank is returned, marked as not within.
    """

    name: str = "svd"
    bounded: ClassVar[bool] = True
    label: str = "truncated SVD, one rank per matrix, factors in the source dtype"

    def __call__(self, matrix: torch.Tensor, norm: Norm = FROBENIUS) -> "_SVDFit":
        target = _Target.of(matrix, norm)
        u, s, vh = torch.linalg.svd(target.exact, full_matrices=False)
        return _SVDFit(target, u * s, vh, s.numpy())


@dataclasses.dataclass(frozen=True)
class WhitenedSVD:
    """Activation-whitened truncated SVD (SVD-LLM, Wang et al. 2024): with S the Cholesky factor of
    G damped by 1% of its mean diagonal (`InputWeights.planning_gram`), W S = U Σ Vᵀ and
    W ≈ (U_r Σ_r^½)(Σ_r^½ V_rᵀ S⁻¹), both factors stored in W's dtype, r (m + n) numbers. Its
    truncation error in G's norm is Σ_{i>r} σ_i² v_iᵀ S⁻¹ G S⁻ᵀ v_i (no cross terms), which
    sets the starting rank; every figure is then measured on the stored factors. Given the plain
    norm (no G for the matrix) it is the plain truncated SVD with the factors split evenly.

    >>> gen = torch.Generator().manual_seed(0)
    >>> w = torch.randn(40, 8, generator=gen) @ torch.randn(8, 30, generator=gen)
    >>> x = torch.randn(30, 500, generator=gen, dtype=torch.float64)
    >>> norm = InputsNorm(InputWeights(x @ x.T / 500, 500))
    >>> out = WhitenedSVD()(w, norm).at_tol(1e-4)
    >>> out.detail, out.nbytes == 8 * (40 + 30) * 4, out.within(1e-4)
    ('rank 8', True, True)
    """

    name: str = "svd-llm"
    bounded: ClassVar[bool] = True
    label: str = "activation-whitened truncated SVD (SVD-LLM), factors in the source dtype"

    def __call__(self, matrix: torch.Tensor, norm: Norm = FROBENIUS) -> "_SVDFit":
        target = _Target.of(matrix, norm)
        whitening = Whitening(norm.weights).factors(0, matrix.shape[1])[0] if norm.weights is not None else None
        u, s, vh = torch.linalg.svd(target.exact if whitening is None else target.exact @ whitening,
                                    full_matrices=False)
        root = s.sqrt()
        right = root[:, None] * vh
        if whitening is not None:  # (Σ^½ Vᵀ) S⁻¹
            right = torch.linalg.solve_triangular(whitening, right, upper=False, left=False)
        return _SVDFit(target, u * root, right, s.numpy())


class _SVDFit:
    """Truncations of W ≈ left @ right (an SVD, whitened or not, split between the two factors)."""

    def __init__(self, target: _Target, left: torch.Tensor, right: torch.Tensor, sigma: np.ndarray) -> None:
        self.target = target
        self.left, self.right = left, right
        self.sigma = sigma
        m, n = target.matrix.shape
        self.rank_bytes = (m + n) * target.matrix.element_size()
        self.tails = tail_norms(target.metric.energies(sigma, left, right))
        self._measured: dict[int, Outcome] = {}

    def stored(self, rank: int) -> torch.Tensor:
        """The rank-``rank`` matrix as stored: factors rounded to W's dtype, multiplied in float64."""
        dtype = self.target.matrix.dtype
        return self.left[:, :rank].to(dtype).double() @ self.right[:rank].to(dtype).double()

    def outcome(self, rank: int) -> Outcome:
        if rank not in self._measured:
            self._measured[rank] = self.target.outcome(rank * self.rank_bytes, self.stored(rank), f"rank {rank}")
        return self._measured[rank]

    def at_tol(self, tol: float) -> Outcome:
        return self.outcome(self.rank_at_limit(tol * self.target.norm))

    def rank_at_limit(self, limit: float) -> int:
        """The smallest rank whose stored matrix is within ``limit`` (absolute error in the target's
        norm), or the full rank if none is (see the class)."""
        start = int(np.flatnonzero(self.tails <= limit)[0])
        return _first_within(start, len(self.sigma), self.outcome, limit)[0]

    def at_bytes(self, budget: int) -> Outcome:
        return self.outcome(min(len(self.sigma), budget // self.rank_bytes) if self.rank_bytes else 0)


# ------------------------------------------------------------------------------------------------
# Magnitude pruning

CSR_POINTER_BYTES = 4  # int32 row pointers


def index_bytes(cols: int) -> int:
    """Bytes of one CSR column index: the narrowest unsigned integer holding cols - 1."""
    return 1 if cols <= 1 << 8 else 2 if cols <= 1 << 16 else 4


@dataclasses.dataclass(frozen=True)
class MagnitudePruning:
    """Keep the k entries of largest magnitude (values in W's dtype, exact), zero the rest.

    Index storage is the smaller of CSR (int32 row pointers, m + 1 of them, and one column index
    per kept entry in the narrowest unsigned integer that holds n - 1) and a bitmap (one bit per
    entry); ``detail`` names the one counted.

    >>> w = torch.zeros(64, 64); w[3, 5] = 2.0; w[10, 7] = -1.0; w[0, 0] = 1e-3
    >>> out = MagnitudePruning()(w).at_tol(1e-2)
    >>> out.detail, out.nbytes == 2 * 4 + 65 * 4 + 2 * 1
    ('2 kept (0.0488%), csr', True)
    """

    name: str = "prune"
    bounded: ClassVar[bool] = True
    label: str = "magnitude pruning, values in the source dtype, index min(CSR, bitmap)"

    def __call__(self, matrix: torch.Tensor, norm: Norm = FROBENIUS) -> "_PruneFit":
        return _PruneFit(_Target.of(matrix, norm))


class _PruneFit:
    def __init__(self, target: _Target) -> None:
        self.target = target
        flat = target.exact.reshape(-1)
        self.order = torch.argsort(flat.abs(), descending=True, stable=True)
        self.tails = tail_norms(flat[self.order].square().numpy())
        m, n = target.matrix.shape
        kept = np.arange(m * n + 1, dtype=np.int64)
        self.csr = (m + 1) * CSR_POINTER_BYTES + kept * index_bytes(n)
        self.bitmap = (m * n + 7) // 8
        self.nbytes = kept * target.matrix.element_size() + np.minimum(self.csr, self.bitmap)

    def outcome(self, kept: int) -> Outcome:
        stored = torch.zeros_like(self.target.exact).reshape(-1)
        index = self.order[:kept]
        stored[index] = self.target.exact.reshape(-1)[index]
        layout = "csr" if self.csr[kept] <= self.bitmap else "bitmap"
        share = 100 * kept / max(len(self.tails) - 1, 1)
        return self.target.outcome(self.nbytes[kept], stored.reshape(self.target.exact.shape),
                                   f"{kept} kept ({share:.3g}%), {layout}")

    def at_tol(self, tol: float) -> Outcome:
        limit = tol * self.target.norm
        if self.target.metric.weights is not None:
            # In G's norm the dropped entries interact: no tail gives a starting count. Bisect on
            # the measured error (more kept entries lose less, up to those interactions).
            return _bisect_within(len(self.tails) - 1, self.outcome, limit)
        start = int(np.flatnonzero(self.tails <= limit)[0])
        return _first_within(start, len(self.tails) - 1, self.outcome, limit)[1]

    def at_bytes(self, budget: int) -> Outcome | None:
        kept = int(np.searchsorted(self.nbytes, budget, side="right")) - 1
        return self.outcome(kept) if kept >= 0 else None


# ------------------------------------------------------------------------------------------------
# Integer quantization of a fixed bit width


@dataclasses.dataclass(frozen=True)
class GroupQuantization:
    """Symmetric absmax integer codes, one scale per group of ``group`` consecutive entries of a
    row (``group`` 0: one scale per row); codes packed per row, ``bits`` each.

    Scales are absmax / (2^(bits-1) - 1) rounded to ``scale_dtype``; codes are computed with the
    rounded scale. A fixed bit width cannot aim at a tolerance: its one outcome answers both
    questions (at a byte budget, only if it fits).

    >>> w = torch.arange(-63.0, 65.0).reshape(2, 64)
    >>> out = GroupQuantization("i8", 8, 0, torch.float32)(w).at_tol(1e-2)
    >>> out.nbytes == 2 * 64 + 2 * 4, out.within(1e-2)
    (True, True)
    """

    name: str
    bits: int
    group: int
    scale_dtype: torch.dtype
    bounded: ClassVar[bool] = False

    @property
    def label(self) -> str:
        scale = str(self.scale_dtype).removeprefix("torch.")
        per = "per row" if self.group == 0 else f"per group of {self.group}"
        return f"int{self.bits} absmax {per}, {scale} scales"

    def __call__(self, matrix: torch.Tensor, norm: Norm = FROBENIUS) -> "_FixedFit":
        target = _Target.of(matrix, norm)
        m, n = matrix.shape
        group, groups, levels, scale = _group_scales(target.exact, self.bits, self.group, self.scale_dtype)
        padded = torch.nn.functional.pad(target.exact, (0, groups * group - n)).reshape(m, groups, group)
        stored = _rounded(padded, scale, levels).reshape(m, groups * group)[:, :n]
        return _FixedFit(target.outcome(_quantized_bytes(m, n, self.bits, groups, self.scale_dtype), stored,
                                        self.label))


def _group_scales(exact: torch.Tensor, bits: int, group: int,
                  scale_dtype: torch.dtype) -> tuple[int, int, int, torch.Tensor]:
    """(group, groups, levels, scales): symmetric absmax scales of each group of ``group``
    consecutive entries of a row (0: the whole row), rounded to ``scale_dtype``; scales are
    m x groups x 1 (float64)."""
    m, n = exact.shape
    group = group or max(n, 1)
    groups = math.ceil(n / group)
    padded = torch.nn.functional.pad(exact, (0, groups * group - n)).reshape(m, groups, group)
    levels = (1 << (bits - 1)) - 1
    largest = torch.finfo(scale_dtype).max
    scale = (padded.abs().amax(-1, keepdim=True) / levels).clamp(max=largest).to(scale_dtype).double()
    return group, groups, levels, scale


def _rounded(values: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    """``values`` rounded to the nearest code of ``scale`` (codes clamped to ±levels; 0 where the scale is 0)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.where(scale > 0, torch.round(values / safe).clamp(-levels, levels), 0.0)
    return codes * scale


def _quantized_bytes(m: int, n: int, bits: int, groups: int, scale_dtype: torch.dtype) -> int:
    """Codes packed per row at ``bits`` each, and one scale per group of each row."""
    scale_bytes = torch.empty((), dtype=scale_dtype).element_size()
    return m * ((n * bits + 7) // 8) + m * groups * scale_bytes


@dataclasses.dataclass(frozen=True)
class GPTQ:
    """GPTQ (Frantar et al., 2022): the same codes and storage as `GroupQuantization` (symmetric
    absmax scales per group of ``group`` entries of a row, from W, in ``scale_dtype``), but the
    columns are rounded with error feedback in G's norm (`feedback_round`: G damped by 1% of its
    mean diagonal, the most excited inputs first, like GPTQ's act order with static groups).
    Given the plain norm (no G for the matrix) it is round-to-nearest. Fixed width: its one
    measured outcome answers both questions.

    >>> gen = torch.Generator().manual_seed(0)
    >>> w = torch.randn(16, 256, generator=gen)
    >>> x = torch.randn(256, 1000, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, 256)[:, None]
    >>> norm = InputsNorm(InputWeights(x @ x.T / 1000, 1000))
    >>> gptq, plain = GPTQ("gptq-int4", 4)(w, norm).at_tol(1e-2), GroupQuantization("int4", 4, 128, torch.float16)(w, norm).at_tol(1e-2)
    >>> gptq.nbytes == plain.nbytes == 16 * 128 + 16 * 2 * 2, gptq.error < plain.error
    (True, True)
    """

    name: str
    bits: int
    group: int = 128
    scale_dtype: torch.dtype = torch.float16
    bounded: ClassVar[bool] = False

    @property
    def label(self) -> str:
        scale = str(self.scale_dtype).removeprefix("torch.")
        return (f"GPTQ int{self.bits}, error feedback on the calibration inputs, {scale} scales per group "
                f"of {self.group}")

    def __call__(self, matrix: torch.Tensor, norm: Norm = FROBENIUS) -> "_FixedFit":
        target = _Target.of(matrix, norm)
        m, n = matrix.shape
        group, groups, levels, scale = _group_scales(target.exact, self.bits, self.group, self.scale_dtype)
        column_scale = scale.reshape(m, groups)[:, torch.arange(n) // group]  # m x n
        if norm.weights is None or not matrix.numel():
            stored = _rounded(target.exact, column_scale, levels)
        else:
            feedback = Whitening(norm.weights).factors(0, n)[1]
            columns = iter(feedback.order.tolist())  # feedback_round visits the columns in this order

            def round_column(values: torch.Tensor) -> torch.Tensor:
                return _rounded(values, column_scale[:, next(columns)], levels)

            stored = feedback_round(target.exact.clone(), feedback, round_column)
        return _FixedFit(target.outcome(_quantized_bytes(m, n, self.bits, groups, self.scale_dtype), stored,
                                        self.label))


@dataclasses.dataclass(frozen=True)
class _FixedFit:
    outcome: Outcome

    def at_tol(self, _tol: float) -> Outcome:
        return self.outcome

    def at_bytes(self, budget: int) -> Outcome | None:
        return self.outcome if self.outcome.nbytes <= budget else None


# ------------------------------------------------------------------------------------------------
# hmcompress itself and the paper's algorithm

REFERENCE = "hm-auto"  # hmcompress auto: the method the others are compared with
TOL_CEILING = 1.0  # at tol 1 every block may be dropped: the smallest storage there is
# In G's norm a zero matrix cannot be proven within tol 1 (its error bound is above the norm's
# lower bound), and near it the data-aware build can end in exact storage (measured on the
# classifier sample: exact at 0.9, 3.3 kB at 0.8 of 1 MB): its small end is probed at 0.5.
AWARE_CEILING = 0.5


@dataclasses.dataclass(frozen=True)
class HMatrixMethod:
    """`compress_matrix` with a strategy and a precision; measured by the builder itself (in G's
    norm, the stored matrix is measured in it). ``data_aware``: built for the layer's inputs
    (`compress_matrix(weights=G)`, whose figures are the guaranteed ones) where the norm has G.

    At a byte budget the tolerance is bisected (in log scale, ``bisection_steps`` builds, starting
    from the tolerances already built) and the smallest measured error that fits is returned.
    """

    name: str
    strategy: str
    precision: str
    label: str
    leaf: int = 32
    bisection_steps: int = 6
    data_aware: bool = False
    bounded: ClassVar[bool] = True

    def __call__(self, matrix: torch.Tensor, norm: Norm = FROBENIUS) -> "_HMatrixFit":
        return _HMatrixFit(self, _Target.of(matrix, norm))


class _HMatrixFit:
    def __init__(self, method: HMatrixMethod, target: _Target) -> None:
        self.method, self.target = method, target
        self.built: dict[float, Outcome] = {}

    def at_tol(self, tol: float) -> Outcome:
        if tol not in self.built:
            m, target = self.method, self.target
            weights = target.metric.weights if m.data_aware else None
            result = compress_matrix(target.matrix, CompressionOptions(
                tol=tol, strategy=m.strategy, precision=m.precision, leaf=m.leaf), weights=weights)
            if result.activation is not None:  # the builder's own guaranteed figures
                error, norm = result.activation.error, result.activation.norm
            elif target.metric.weights is None:
                error, norm = result.error, target.norm
            else:
                error, norm = target.metric.error(target.matrix, target.exact, result.dense), target.norm
            hm = result.hmatrix
            detail = f"{result.strategy}, {hm.blocks.shape[0]} leaves, {'+'.join(hm.pools) or 'zero'}"
            self.built[tol] = Outcome(hm.nbytes, error, norm, detail, hm,
                                      round_to_dtype(result.dense, target.matrix.dtype))
        return self.built[tol]

    def at_bytes(self, budget: int) -> Outcome | None:
        if not self.at_tol(AWARE_CEILING if self.method.data_aware else TOL_CEILING).nbytes <= budget:
            return None
        fitting = [t for t, out in self.built.items() if out.nbytes <= budget]
        over = [t for t, out in self.built.items() if out.nbytes > budget]
        high = min(fitting)
        low = max((t for t in over if t < high), default=high / 1e3)
        for _ in range(self.method.bisection_steps):
            mid = math.sqrt(low * high)
            if self.at_tol(mid).nbytes <= budget:
                high = mid
            else:
                low = mid
        fits = [out for out in self.built.values() if out.nbytes <= budget]
        return min(fits, key=lambda out: (out.error, out.nbytes))


AWARE = "hm-aware"  # hmcompress's data-aware build: always within, so always run beside the reference
DATA_AWARE = (AWARE, "svd-llm", "gptq-int8", "gptq-int4")  # need calibration statistics (--activations)


def registry(leaf: int = 32, data_aware: bool = False) -> dict[str, Method]:
    """Every method by name, in the order tables show them (hmcompress auto, the reference, first);
    the methods of `DATA_AWARE` only with ``data_aware``, each beside its plain counterpart."""
    methods: list[Method] = [
        HMatrixMethod("hm-auto", "optimal", "auto", "hmcompress optimal, auto precision", leaf),
        HMatrixMethod(AWARE, "optimal", "auto", "hmcompress optimal, auto precision, built for the "
                      "calibration inputs (--activations)", leaf, data_aware=True),
        HMatrixMethod("hm-keep", "optimal", "keep", "hmcompress optimal, source dtype (keep)", leaf),
        # The paper stores every block in the source dtype: precision keep is its setting.
        HMatrixMethod("paper", "paper", "keep", "the paper's Algorithm 1 (uniform threshold), source dtype", leaf),
        TruncatedSVD(),
        WhitenedSVD(),
        MagnitudePruning(),
        GroupQuantization("int8-row", 8, 0, torch.float32),
        GPTQ("gptq-int8", 8),
        GroupQuantization("int4-g128", 4, 128, torch.float16),
        GPTQ("gptq-int4", 4),
        GroupQuantization("int4-g64", 4, 64, torch.float16),
        GroupQuantization("int4-g32", 4, 32, torch.float16),
    ]
    return {method.name: method for method in methods if data_aware or method.name not in DATA_AWARE}


# With --activations and no --methods: each data-aware method beside its plain counterpart (the
# other plain methods on request: a table of every method is too wide to read).
ACTIVATIONS_DEFAULT = ("hm-auto", AWARE, "svd", "svd-llm", "prune", "int8-row", "gptq-int8", "int4-g128", "gptq-int4")


def select(names: str | None, leaf: int = 32, data_aware: bool = False) -> dict[str, Method]:
    """The methods named in a comma-separated list (all when None), the reference always included
    (and with ``data_aware``, hm-aware too). The methods of `DATA_AWARE` need ``data_aware``."""
    methods = registry(leaf, data_aware=True)
    if names is None:
        return {n: m for n, m in methods.items() if n in ACTIVATIONS_DEFAULT} if data_aware else registry(leaf)
    listed = [n.strip() for n in names.split(",") if n.strip()]
    wanted = {REFERENCE, *listed, *([AWARE] if data_aware else [])}
    unknown = sorted(wanted - set(methods))
    if unknown:
        raise OptionError("methods", f"names unknown {', '.join(unknown)}; choose from {', '.join(methods)}")
    if not data_aware and (needs := [n for n in dict.fromkeys(listed) if n in DATA_AWARE]):
        raise OptionError("methods", f"{', '.join(needs)} {'needs' if len(needs) == 1 else 'need'} --activations "
                          "(a stats file of hmcompress calibrate)")
    return {name: method for name, method in methods.items() if name in wanted}
