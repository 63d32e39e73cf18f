"""From a dense matrix to a packed `HMatrix` whose measured error is within the budget.

`compress_matrix` is the one entry point: candidates -> plan -> packed matrix -> measurement. A
matrix whose measured error misses the budget (the plan's figures are estimates) is rebuilt with
a tighter internal budget; as a last resort it is stored exactly, so the budget always holds.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import torch

from hmcompress.core.bounds import frobenius, frobenius_relative_error
from hmcompress.core.candidates import Candidates, analyse, block_batches, build_tree, svd
from hmcompress.core.codecs import auto_codecs, source_codec
from hmcompress.core.coded_pools import with_coded_pools
from hmcompress.core.feedback import Feedback
from hmcompress.core.packer import Packer
from hmcompress.core.plans import DROP, Plan, optimal_plan, paper_plan, svd_plan
from hmcompress.core.uniform import first_step, uniform_build
from hmcompress.core.weighted import (
    ColumnMetric,
    InputWeights,
    Whitening,
    activation_error_bound,
    activation_norm_lower,
)
from hmcompress.core.weighted_analysis import analyse_weighted, whitened_factors
from hmcompress.errors import OptionError
from hmcompress.runtime import BLOCK_COLUMNS, CODEC, DENSE, LOWRANK, ROWS, SEGMENT_COLUMNS, HMatrix, row_mask

STRATEGIES = ("optimal", "paper")
PRECISIONS = ("auto", "keep")
MAX_REBUILDS = 6
# A data-aware build whose measured error is below this share of the budget is rebuilt looser:
# its plan is priced with the damped G (`weighted.PLANNING_DAMPING`), which overstates errors.
LOOSE_SHARE = 0.9
# Share of the budget that items too small to be worth storing may hold together (candidates.analyse).
NEGLIGIBLE_SHARE = 0.01


@dataclasses.dataclass(frozen=True)
class CompressionOptions:
    """How to compress one matrix. ``tol`` is relative to ||W||_F unless ``absolute``."""

    tol: float = 1e-2
    absolute: bool = False
    strategy: str = "optimal"
    precision: str = "auto"
    leaf: int = 32
    device: str = "cpu"  # where the factorizations run ("cuda", "cuda:1", ...); the rest runs on the CPU

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise OptionError("tol", f"must be a finite number >= 0, got {self.tol}")
        if self.strategy not in STRATEGIES:
            raise OptionError("strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            raise OptionError("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.leaf < 1:
            raise OptionError("leaf", f"must be >= 1, got {self.leaf}")
        if self.device != "cpu":
            try:
                device = torch.device(self.device)
            except RuntimeError:
                raise OptionError("device", f"must be cpu or cuda[:N], got {self.device!r}") from None
            if device.type != "cuda":
                raise OptionError("device", f"must be cpu or cuda[:N], got {self.device!r}")
            if not torch.cuda.is_available():
                raise OptionError("device", f"{self.device}: no CUDA device is available here")

    def budget(self, frobenius_norm: float) -> float:
        """The allowed squared Frobenius error."""
        allowed = self.tol if self.absolute else self.tol * frobenius_norm
        return allowed * allowed


@dataclasses.dataclass(frozen=True)
class ActivationFigures:
    """The data-aware figures of a matrix built for its inputs' second moment G (`core.weighted`)."""

    error: float  # upper bound on sqrt(tr(E G Eᵀ)), E = W - H, for both forms of H
    budget: float  # allowed sqrt(tr(E G Eᵀ)): tol, or tol times `norm`
    norm: float  # lower bound on sqrt(tr(W G Wᵀ))
    samples: int  # calibration input vectors G was computed from


@dataclasses.dataclass
class Compressed:
    """A built matrix with what it took to build it."""

    hmatrix: HMatrix
    dense: torch.Tensor  # the stored matrix in float64 (exact)
    error: float  # upper bound on ||W - H||_F, H64 and its source-dtype rounding (`error_bound`)
    budget: float  # allowed ||W - H||_F (inf where the budget is on the activations' norm)
    root_sigma: np.ndarray | None  # singular values of W (float64, descending); None: not computed
    strategy: str  # planner whose plan was stored ("optimal", "svd", "paper", "uniform" or "exact")
    rebuilds: int
    activation: ActivationFigures | None = None  # built for calibration inputs: the guaranteed figures


def compress_matrix(matrix: torch.Tensor, options: CompressionOptions, full_analysis: bool = False,
                    weights: InputWeights | ColumnMetric | None = None, planned_only: bool = False) -> Compressed:
    """Compress a 2-D floating tensor so that its measured error is within the budget.

    The optimal strategy decides before it decomposes (`candidates.analyse` with the budget);
    ``full_analysis`` analyses every option instead (the reference the tests and
    `benchmarks.scale` compare bytes with). The paper's strategy always analyses everything.
    The optimal strategy also tries the uniform quantizer (`core.uniform`) and keeps the smaller,
    unless ``planned_only`` (trainable layers want the plan's blocks and ranks, not bytes).
    With ``weights`` (the second moment of the layer's calibration inputs) the budget is on the
    error of what the layer computes, tr(E G Eᵀ) <= tol² tr(W G Wᵀ) (`compress_for_inputs`).
    With a `ColumnMetric` M instead, the budget stays plain and the matrix is the uniform
    quantizer's with rows rounded for M (GPTQ's feedback for M), where that holds.
    """
    if matrix.ndim != 2 or not matrix.is_floating_point():
        raise OptionError("matrix", f"must be a 2-D floating-point tensor, got {tuple(matrix.shape)} {matrix.dtype}")
    codecs = storage_codecs(matrix, options)
    if isinstance(weights, InputWeights):
        return compress_for_inputs(matrix, options, weights, codecs)
    allowed = allowed_error(matrix, options)
    if matrix.numel() == 0:
        hm = _exact_hmatrix(matrix)
        return Compressed(hm, matrix.double(), 0.0, allowed, np.zeros(0), "exact", 0)
    feedback = weights.feedback() if isinstance(weights, ColumnMetric) else None
    if feedback is not None and options.strategy == "optimal" and not planned_only:
        if tuple(weights.metric.shape) != (matrix.shape[1],) * 2:
            raise OptionError("columns", f"M is {tuple(weights.metric.shape)}, the matrix has {matrix.shape[1]} columns")
        uniform = uniform_build(matrix, allowed, first_step(allowed, matrix.numel()), codecs,
                                lambda dense: error_bound(matrix, dense, matrix.dtype), feedback)
        if uniform is not None:
            hm, dense, error = uniform
            return Compressed(hm, dense, error, allowed, None, "uniform", 0)
    tree = build_tree(tuple(matrix.shape), options.leaf)
    target = allowed * allowed
    decide = not full_analysis and options.strategy == "optimal"
    cands = analyse(matrix, tree, codecs, negligible=NEGLIGIBLE_SHARE * target / matrix.numel(),
                    device=options.device, budget=target if decide else None)
    built = None
    for rebuild in range(MAX_REBUILDS):
        plan = _best_plan(cands, target, options.strategy)
        hm = assemble(matrix, cands, plan, options.device)
        dense = hm.to_dense(torch.float64)
        error = error_bound(matrix, dense, matrix.dtype)
        if error <= allowed:
            built = Compressed(hm, dense, error, allowed, cands.root_sigma, plan.strategy, rebuild)
            break
        target *= 0.95 * (allowed / error) ** 2
    if built is None:
        built = Compressed(_exact_hmatrix(matrix), matrix.double(), 0.0, allowed, cands.root_sigma, "exact",
                           MAX_REBUILDS)
    if planned_only or options.strategy != "optimal":
        return built
    uniform = uniform_build(matrix, allowed, first_step(allowed, matrix.numel()), codecs,
                            lambda dense: error_bound(matrix, dense, matrix.dtype), smaller_than=built.hmatrix.nbytes)
    if uniform is None:
        return built
    hm, dense, error = uniform
    return Compressed(hm, dense, error, allowed, cands.root_sigma, "uniform", built.rebuilds)


def storage_codecs(matrix: torch.Tensor, options: CompressionOptions) -> tuple[str, ...]:
    """The codecs a matrix may be stored in: its own dtype (`--precision keep`) or every cheaper one too."""
    return (source_codec(matrix.dtype),) if options.precision == "keep" else auto_codecs(matrix.dtype)


def compress_for_inputs(matrix: torch.Tensor, options: CompressionOptions, weights: InputWeights,
                        codecs: tuple[str, ...]) -> Compressed:
    """`compress_matrix` in the data-aware norm (see `InputsBuilder`)."""
    return InputsBuilder(matrix, options, weights, codecs).build(options.tol)


class InputsBuilder:
    """Data-aware builds of one matrix at any tolerance from one analysis: every option priced in
    G's norm (`analyse_weighted`), each built matrix measured in it (`activation_error_bound`)
    and rebuilt until it fits; a build well within the budget is also rebuilt looser (its
    estimates used the damped G) and the smallest that fits is kept. Exact storage remains the
    last resort. ``smallest_tol``: the least tolerance `build` will be asked for (the analysis
    leaves out what is negligible at it); by default ``options.tol``.

    Where the weights carry K (`InputWeights.output_gram`: a `--model-tol` layer whose chosen
    point was rounded for the model's output), a build is the uniform quantizer rounded for the
    two-sided norm tr(K E G Eᵀ) alone, at the largest step whose error in G's norm is within the
    tolerance (the guarantee is unchanged); the planned build is the fallback."""

    def __init__(self, matrix: torch.Tensor, options: CompressionOptions, weights: InputWeights,
                 codecs: tuple[str, ...], smallest_tol: float | None = None) -> None:
        n = matrix.shape[1]
        if tuple(weights.gram.shape) != (n, n):
            raise OptionError("activations", f"G is {tuple(weights.gram.shape)}, the matrix has {n} columns")
        self.matrix, self.options, self.weights, self.codecs = matrix, options, weights, codecs
        self.norm = activation_norm_lower(matrix, weights.gram)
        self.cands = self.whitening = None
        self.row_feedback = self._output_feedback(weights)
        if matrix.numel():
            self.whitening = Whitening(weights)
            least = self._allowed(options.tol if smallest_tol is None else smallest_tol)
            self.cands = analyse_weighted(matrix, build_tree(tuple(matrix.shape), options.leaf), codecs,
                                          self.whitening, NEGLIGIBLE_SHARE * least * least / matrix.numel(),
                                          options.device)

    def for_output(self, output_gram: torch.Tensor) -> "InputsBuilder":
        """The same analysis (what it costs is the analysis), rows rounded for K as well: the
        second family of a `--model-tol` curve."""
        twin = copy.copy(self)
        twin.weights = dataclasses.replace(self.weights, output_gram=output_gram)
        twin.row_feedback = twin._output_feedback(twin.weights)
        return twin

    def _output_feedback(self, weights: InputWeights) -> Feedback | None:
        """How rows are rounded for the weights' K (checked against the matrix), or None."""
        m = self.matrix.shape[0]
        if weights.output_gram is not None and tuple(weights.output_gram.shape) != (m, m):
            raise OptionError("activations", f"K is {tuple(weights.output_gram.shape)}, the matrix has {m} rows")
        return weights.output_feedback() if self.matrix.numel() else None

    def _allowed(self, tol: float) -> float:
        return tol if self.options.absolute else tol * self.norm

    def build(self, tol: float) -> Compressed:
        """The smallest build found whose measured error is within ``tol``."""
        matrix, allowed = self.matrix, self._allowed(tol)

        def done(hm: HMatrix, dense: torch.Tensor, error: float, strategy: str, rebuilds: int) -> Compressed:
            plain = error_bound(matrix, dense, matrix.dtype)  # measured: a zero error in G's norm is not H = W
            return Compressed(hm, dense, plain, math.inf, None, strategy, rebuilds,
                              ActivationFigures(error, allowed, self.norm, self.weights.samples))

        if self.cands is None:
            return done(_exact_hmatrix(matrix), matrix.double(), 0.0, "exact", 0)
        if self.row_feedback is not None and self.options.strategy == "optimal":
            uniform = self._uniform(allowed, None, self.row_feedback)
            if uniform is not None:
                return done(*uniform, "uniform", 0)
        target = allowed * allowed
        best: Compressed | None = None
        for rebuild in range(MAX_REBUILDS):
            plan = _best_plan(self.cands, target, self.options.strategy)
            hm = assemble(matrix, self.cands, plan, self.options.device, self.whitening)
            dense = hm.to_dense(torch.float64)
            error = activation_error_bound(matrix, dense, self.weights.gram)
            if error <= allowed:
                if best is None or hm.nbytes < best.hmatrix.nbytes:
                    best = done(hm, dense, error, plan.strategy, rebuild)
                if error >= LOOSE_SHARE * allowed or error == 0:
                    break
            elif best is not None:  # a looser build missed: the last that fitted stays
                break
            target *= 0.95 * (allowed / max(error, 1e-300)) ** 2
        best = best or done(_exact_hmatrix(matrix), matrix.double(), 0.0, "exact", MAX_REBUILDS)
        if self.options.strategy != "optimal":
            return best
        uniform = self._uniform(allowed, best.hmatrix.nbytes)
        return best if uniform is None else done(*uniform, "uniform", best.rebuilds)

    def _uniform(self, allowed: float, smaller_than: int | None,
                 row_feedback: Feedback | None = None) -> tuple[HMatrix, torch.Tensor, float] | None:
        """`uniform_build` with G's feedback along the rows (and ``row_feedback`` across them)."""
        matrix = self.matrix
        m, n = matrix.shape
        step = first_step(allowed, m * float(self.weights.gram.diagonal().sum()))
        return uniform_build(matrix, allowed, step, self.codecs,
                             lambda dense: activation_error_bound(matrix, dense, self.weights.gram),
                             self.whitening.factors(0, n)[1], smaller_than, row_feedback)


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-D matrix compressed for a tensor: conv kernels become (out, in * k * ...)."""
    return tensor if tensor.ndim == 2 else tensor.reshape(tensor.shape[0], -1)


def measured_error(original: torch.Tensor, stored: torch.Tensor, dtype: torch.dtype) -> float:
    """||W - H||_F for both forms of the stored matrix, the larger: H64 (``stored``, float64) and
    H64 rounded once to the source ``dtype`` (what a user loads).

    Measured in float64 by row chunks (`bounds.frobenius`: no full-size temporaries), so within a
    relative `bounds.frobenius_relative_error` of the exact value; `error_bound` is above it.
    """
    measured = frobenius(original, stored)
    if dtype != torch.float64:
        measured = max(measured, frobenius(original, stored, rounded_to=dtype))
    return measured


def error_bound(original: torch.Tensor, stored: torch.Tensor, dtype: torch.dtype) -> float:
    """An upper bound on the exact ||W - H||_F of both forms: `measured_error` widened by the
    rounding of its own measurement. The budget holds it; the stats record it."""
    return measured_error(original, stored, dtype) * (1 + frobenius_relative_error(tuple(original.shape)))


def allowed_error(matrix: torch.Tensor, options: CompressionOptions) -> float:
    """The budget: ``tol``, or ``tol`` times a lower bound on ||W||_F (its measurement narrowed by
    its rounding), so that a matrix within it is within the tolerance of the exact norm."""
    if options.absolute:
        return options.tol
    norm = frobenius(matrix) * (1 - frobenius_relative_error(tuple(matrix.shape)))
    return options.tol * norm


def _best_plan(c: Candidates, budget: float, strategy: str) -> Plan:
    """The planner's plan; the optimal strategy also never loses to its two baselines (where the
    candidates hold what they need: a skipped SVD is a block where low rank was hopeless)."""
    if strategy == "paper":
        return paper_plan(c, budget)
    plans = [optimal_plan(c, budget)]
    if c.root_sigma is not None:  # its baselines need the spectra they use
        plans.append(svd_plan(c, budget))
    if c.complete:
        plans.append(paper_plan(c, budget))
    feasible = [p for p in plans if p.error(c) <= budget] or plans[:1]
    return min(feasible, key=lambda p: p.nbytes(c))


def _exact_hmatrix(matrix: torch.Tensor) -> HMatrix:
    """The matrix stored as one dense block in its own dtype: zero error."""
    m, n = matrix.shape
    codec = source_codec(matrix.dtype)
    if m * n == 0:
        return HMatrix((m, n), matrix.dtype, torch.zeros((0, BLOCK_COLUMNS), dtype=torch.int32),
                       torch.zeros((0, SEGMENT_COLUMNS), dtype=torch.int32), {}, {})
    blocks = torch.tensor([[0, 0, m, n, 0]], dtype=torch.int32)
    segments = torch.tensor([[0, DENSE, CODEC[codec].id, 0, 0, -1]], dtype=torch.int32)
    return HMatrix((m, n), matrix.dtype, blocks, segments,
                   {codec: matrix.contiguous().reshape(-1).clone()}, {})


def assemble(matrix: torch.Tensor, c: Candidates, plan: Plan, device: str = "cpu",
             whitening: Whitening | None = None) -> HMatrix:
    """Encode a plan's leaves into a packed HMatrix (leaves in row-major order of position), its
    integer pools also entropy-coded where that is smaller (as the file will store them). With
    ``whitening`` (data-aware candidates) factors come from whitened SVDs and rows are rounded
    with error feedback, as `analyse_weighted` priced them."""
    tree = c.tree
    work = matrix.double() if whitening is not None or matrix.dtype == torch.float64 else matrix.float()
    order = np.lexsort((tree.col0[plan.leaves], tree.row0[plan.leaves]))
    leaves, kinds, dense_codec = plan.leaves[order], plan.kind[order], plan.dense_codec[order]
    trip_starts, row_starts = c.triplets.starts(tree.size), c.rows.starts(tree.size)
    lowrank = [int(n) for n, k in zip(leaves, kinds) if k == LOWRANK]
    factors = (_factors(work, c, lowrank, device) if whitening is None else
               {n: whitened_factors(_block(work, tree, n), whitening.factors(int(tree.col0[n]), int(tree.cols[n]))[0],
                                    device) for n in lowrank})
    packer = Packer()
    block_rows = []
    for index, (node, kind, codec_index) in enumerate(zip(leaves.tolist(), kinds.tolist(),
                                                          dense_codec.tolist())):
        r0, c0, h, w = (int(tree.row0[node]), int(tree.col0[node]), int(tree.rows[node]),
                        int(tree.cols[node]))
        block_rows.append([r0, c0, h, w, int(tree.level[node])])
        block = _block(work, tree, node)
        feedback = None if whitening is None else whitening.factors(c0, w)[1]
        if kind == DENSE:
            packer.add(index, DENSE, c.codecs[codec_index], 0, [block], feedback)
        elif kind == ROWS:
            choice = plan.row_choice[row_starts[node]:row_starts[node + 1]]
            for codec, keep in _by_codec(c, choice):
                packer.add(index, ROWS, codec, len(keep), [block[keep]], feedback)
                packer.row_masks.append(row_mask(keep, h))
        else:
            choice = plan.trip_choice[trip_starts[node]:trip_starts[node + 1]]
            for codec, keep in _by_codec(c, choice):
                a, b = factors[node]
                packer.add(index, LOWRANK, codec, len(keep), [a[keep], b[keep]])
    return with_coded_pools(packer.finish(tuple(matrix.shape), matrix.dtype, block_rows))


def _block(work: torch.Tensor, tree, node: int) -> torch.Tensor:
    r0, c0 = int(tree.row0[node]), int(tree.col0[node])
    return work[r0:r0 + int(tree.rows[node]), c0:c0 + int(tree.cols[node])]


def _by_codec(c: Candidates, choice: np.ndarray):
    """``(codec, item indices)`` for each codec chosen for some items, in codec-id order."""
    used = sorted(set(choice[choice != DROP].tolist()), key=lambda k: CODEC[c.codecs[k]].id)
    for k in used:
        yield c.codecs[k], torch.from_numpy(np.flatnonzero(choice == k))


def _factors(work: torch.Tensor, c: Candidates, nodes: list[int],
             device: str) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Balanced factors (A = sqrt(s) Uᵀ, B = sqrt(s) Vᵀ) of the given blocks, batched by shape."""
    factors = {}
    for ids, blocks in block_batches(work, c.tree, nodes):
        u, s, vh = svd(blocks, device)
        root = s.sqrt()
        for j, node in enumerate(ids):
            factors[node] = ((u[j] * root[j]).T, vh[j] * root[j].unsqueeze(1))
    return factors
