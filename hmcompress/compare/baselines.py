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
from hmcompress.errors import OptionError
from hmcompress.runtime import HMatrix, round_to_dtype


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One way of storing W: its exact bytes and its measured error ||W - Ŵ||_F."""

    nbytes: int
    error: float
    norm: float  # ||W||_F, so that relative figures need no second pass
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

    def __call__(self, matrix: torch.Tensor) -> Fit: ...


@dataclasses.dataclass(frozen=True)
class _Target:
    """The matrix being approximated: in its own dtype, in float64, and its norm."""

    matrix: torch.Tensor
    exact: torch.Tensor
    norm: float

    @classmethod
    def of(cls, matrix: torch.Tensor) -> "_Target":
        exact = matrix.double()
        return cls(matrix, exact, float(torch.linalg.matrix_norm(exact)))

    def outcome(self, nbytes: int, stored: torch.Tensor, detail: str) -> Outcome:
        """Measure a stored approximation (float64)."""
        dtype = self.matrix.dtype
        return Outcome(int(nbytes), measured_error(self.exact, stored, dtype), self.norm, detail,
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
    passed, best = size, out
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

    def __call__(self, matrix: torch.Tensor) -> "_SVDFit":
        return _SVDFit(_Target.of(matrix))


class _SVDFit:
    def __init__(self, target: _Target) -> None:
        self.target = target
        u, s, vh = torch.linalg.svd(target.exact, full_matrices=False)
        self.left, self.right = u * s, vh
        self.sigma = s.numpy()
        m, n = target.matrix.shape
        self.rank_bytes = (m + n) * target.matrix.element_size()
        self.tails = tail_norms(self.sigma**2)
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
        """The smallest rank whose stored matrix is within ``limit`` (absolute Frobenius error), or
        the full rank if none is (see the class)."""
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

    def __call__(self, matrix: torch.Tensor) -> "_PruneFit":
        return _PruneFit(_Target.of(matrix))


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

    def __call__(self, matrix: torch.Tensor) -> "_FixedFit":
        target = _Target.of(matrix)
        m, n = matrix.shape
        group = self.group or max(n, 1)
        groups = math.ceil(n / group)
        padded = torch.nn.functional.pad(target.exact, (0, groups * group - n)).reshape(m, groups, group)
        levels = (1 << (self.bits - 1)) - 1
        largest = torch.finfo(self.scale_dtype).max
        scale = (padded.abs().amax(-1, keepdim=True) / levels).clamp(max=largest).to(self.scale_dtype).double()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.where(scale > 0, torch.round(padded / safe).clamp(-levels, levels), 0.0)
        stored = (codes * scale).reshape(m, groups * group)[:, :n]
        scale_bytes = torch.empty((), dtype=self.scale_dtype).element_size()
        nbytes = m * ((n * self.bits + 7) // 8) + m * groups * scale_bytes
        return _FixedFit(target.outcome(nbytes, stored, self.label))


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


@dataclasses.dataclass(frozen=True)
class HMatrixMethod:
    """`compress_matrix` with a strategy and a precision; measured by the builder itself.

    At a byte budget the tolerance is bisected (in log scale, ``bisection_steps`` builds, starting
    from the tolerances already built) and the smallest measured error that fits is returned.
    """

    name: str
    strategy: str
    precision: str
    label: str
    leaf: int = 32
    bisection_steps: int = 6
    bounded: ClassVar[bool] = True

    def __call__(self, matrix: torch.Tensor) -> "_HMatrixFit":
        return _HMatrixFit(self, _Target.of(matrix))


class _HMatrixFit:
    def __init__(self, method: HMatrixMethod, target: _Target) -> None:
        self.method, self.target = method, target
        self.built: dict[float, Outcome] = {}

    def at_tol(self, tol: float) -> Outcome:
        if tol not in self.built:
            m = self.method
            result = compress_matrix(self.target.matrix, CompressionOptions(
                tol=tol, strategy=m.strategy, precision=m.precision, leaf=m.leaf))
            hm = result.hmatrix
            detail = f"{result.strategy}, {hm.blocks.shape[0]} leaves, {'+'.join(hm.pools) or 'zero'}"
            self.built[tol] = Outcome(hm.nbytes, result.error, self.target.norm, detail, hm,
                                      round_to_dtype(result.dense, self.target.matrix.dtype))
        return self.built[tol]

    def at_bytes(self, budget: int) -> Outcome | None:
        if not self.at_tol(TOL_CEILING).nbytes <= budget:
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


def registry(leaf: int = 32) -> dict[str, Method]:
    """Every method by name, in the order tables show them (hmcompress auto, the reference, first)."""
    methods: list[Method] = [
        HMatrixMethod("hm-auto", "optimal", "auto", "hmcompress optimal, auto precision", leaf),
        HMatrixMethod("hm-keep", "optimal", "keep", "hmcompress optimal, source dtype (keep)", leaf),
        # The paper stores every block in the source dtype: precision keep is its setting.
        HMatrixMethod("paper", "paper", "keep", "the paper's Algorithm 1 (uniform threshold), source dtype", leaf),
        TruncatedSVD(),
        MagnitudePruning(),
        GroupQuantization("int8-row", 8, 0, torch.float32),
        GroupQuantization("int4-g128", 4, 128, torch.float16),
        GroupQuantization("int4-g64", 4, 64, torch.float16),
        GroupQuantization("int4-g32", 4, 32, torch.float16),
    ]
    return {method.name: method for method in methods}



def select(names: str | None, leaf: int = 32) -> dict[str, Method]:
    """The methods named in a comma-separated list (all when None), the reference always included."""
    methods = registry(leaf)
    if names is None:
        return methods
    wanted = {REFERENCE, *(n.strip() for n in names.split(",") if n.strip())}
    unknown = sorted(wanted - set(methods))
    if unknown:
        raise OptionError("methods", f"names unknown {', '.join(unknown)}; choose from {', '.join(methods)}")
    return {name: method for name, method in methods.items() if name in wanted}
