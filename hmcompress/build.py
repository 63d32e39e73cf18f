"""From a dense matrix to a packed `HMatrix` whose measured error is within the budget.

`compress_matrix` is the one entry point: candidates -> plan -> packed matrix -> measurement. A
matrix whose measured error misses the budget (the plan's figures are estimates) is rebuilt with
a tighter internal budget; as a last resort it is stored exactly, so the budget always holds.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .candidates import Candidates, analyse, build_tree, block_batches
from .codecs import auto_codecs, encode_rows, source_codec
from .errors import OptionError
from .plans import DROP, Plan, optimal_plan, paper_plan, svd_plan
from .runtime import CODEC_ID, DENSE, INTEGER_CODECS, LOWRANK, HMatrix

STRATEGIES = ("optimal", "paper")
PRECISIONS = ("auto", "keep")
MAX_REBUILDS = 6


@dataclasses.dataclass(frozen=True)
class CompressionOptions:
    """How to compress one matrix. ``tol`` is relative to ||W||_F unless ``absolute``."""

    tol: float = 1e-2
    absolute: bool = False
    strategy: str = "optimal"
    precision: str = "auto"
    leaf: int = 32

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise OptionError(f"--tol must be a finite number >= 0, got {self.tol}")
        if self.strategy not in STRATEGIES:
            raise OptionError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            raise OptionError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.leaf < 1:
            raise OptionError(f"--leaf must be >= 1, got {self.leaf}")

    def budget(self, frobenius_norm: float) -> float:
        """The allowed squared Frobenius error."""
        allowed = self.tol if self.absolute else self.tol * frobenius_norm
        return allowed * allowed


@dataclasses.dataclass
class Compressed:
    """A built matrix with what it took to build it."""

    hmatrix: HMatrix
    dense: torch.Tensor  # the stored matrix in float64 (exact)
    error: float  # measured ||W - H||_F (exact stored form and its source-dtype rounding, the max)
    budget: float  # allowed ||W - H||_F
    root_sigma: np.ndarray  # singular values of W (float64, descending)
    strategy: str  # planner whose plan was stored ("optimal", "svd", "paper" or "exact")
    rebuilds: int


def compress_matrix(matrix: torch.Tensor, options: CompressionOptions) -> Compressed:
    """Compress a 2-D floating tensor so that its measured error is within the budget."""
    if matrix.ndim != 2 or not matrix.is_floating_point():
        raise OptionError(f"expected a 2-D floating-point matrix, got {tuple(matrix.shape)} {matrix.dtype}")
    exact = matrix.double()
    allowed = math.sqrt(options.budget(float(torch.linalg.matrix_norm(exact))))
    codecs = (source_codec(matrix.dtype),) if options.precision == "keep" else auto_codecs(matrix.dtype)
    if matrix.numel() == 0:
        hm = _exact_hmatrix(matrix)
        return Compressed(hm, exact, 0.0, allowed, np.zeros(0), "exact", 0)
    tree = build_tree(tuple(matrix.shape), options.leaf)
    cands = analyse(matrix, tree, codecs)
    target = allowed * allowed
    for rebuild in range(MAX_REBUILDS):
        plan = _best_plan(cands, target, options.strategy)
        hm = assemble(matrix, cands, plan)
        dense = hm.to_dense(torch.float64)
        error = measured_error(exact, dense, matrix.dtype)
        if error <= allowed:
            return Compressed(hm, dense, error, allowed, cands.root_sigma, plan.strategy, rebuild)
        target *= min(0.5, 0.9 * (allowed / error) ** 2)
    hm = _exact_hmatrix(matrix)
    return Compressed(hm, exact, 0.0, allowed, cands.root_sigma, "exact", MAX_REBUILDS)


def measured_error(exact: torch.Tensor, stored: torch.Tensor, dtype: torch.dtype) -> float:
    """||W - H||_F for the stored H and for H rounded to the source dtype; the larger."""
    direct = torch.linalg.matrix_norm(exact - stored)
    rounded = torch.linalg.matrix_norm(exact - stored.to(dtype).double())
    return float(max(direct, rounded))


def _best_plan(c: Candidates, budget: float, strategy: str) -> Plan:
    """The planner's plan; the optimal strategy also never loses to its two baselines."""
    if strategy == "paper":
        return paper_plan(c, budget)
    plans = [optimal_plan(c, budget), svd_plan(c, budget), paper_plan(c, budget)]
    feasible = [p for p in plans if p.error(c) <= budget] or plans[:1]
    return min(feasible, key=lambda p: p.nbytes(c))


def _exact_hmatrix(matrix: torch.Tensor) -> HMatrix:
    """The matrix stored as one dense block in its own dtype: zero error."""
    m, n = matrix.shape
    codec = source_codec(matrix.dtype)
    if m * n == 0:
        return HMatrix((m, n), matrix.dtype, torch.zeros((0, 5), dtype=torch.int32),
                       torch.zeros((0, 6), dtype=torch.int32), {}, {})
    blocks = torch.tensor([[0, 0, m, n, 0]], dtype=torch.int32)
    segments = torch.tensor([[0, DENSE, CODEC_ID[codec], 0, 0, -1]], dtype=torch.int32)
    return HMatrix((m, n), matrix.dtype, blocks, segments,
                   {codec: matrix.contiguous().reshape(-1).clone()}, {})


class _Packer:
    """Appends encoded rows to per-codec pools and records segment table rows."""

    def __init__(self) -> None:
        self.pools: dict[str, list[torch.Tensor]] = {}
        self.scales: dict[str, list[torch.Tensor]] = {}
        self.lengths: dict[str, int] = {}
        self.scale_lengths: dict[str, int] = {}
        self.segments: list[list[int]] = []

    def add(self, block: int, kind: int, codec: str, rank: int, rows: list[torch.Tensor]) -> None:
        offset = self.lengths.get(codec, 0)
        scale_offset = self.scale_lengths.get(codec, 0) if codec in INTEGER_CODECS else -1
        for part in rows:
            data, scales = encode_rows(codec, part)
            self.pools.setdefault(codec, []).append(data)
            self.lengths[codec] = self.lengths.get(codec, 0) + data.numel()
            if scales is not None:
                self.scales.setdefault(codec, []).append(scales)
                self.scale_lengths[codec] = self.scale_lengths.get(codec, 0) + scales.numel()
        self.segments.append([block, kind, CODEC_ID[codec], rank, offset, scale_offset])

    def finish(self, shape: tuple[int, int], dtype: torch.dtype, blocks: list[list[int]]) -> HMatrix:
        return HMatrix(
            shape, dtype,
            torch.tensor(blocks, dtype=torch.int32).reshape(-1, 5),
            torch.tensor(self.segments, dtype=torch.int32).reshape(-1, 6),
            {c: torch.cat(parts) for c, parts in sorted(self.pools.items())},
            {c: torch.cat(parts) for c, parts in sorted(self.scales.items())},
        )


def assemble(matrix: torch.Tensor, c: Candidates, plan: Plan) -> HMatrix:
    """Encode a plan's leaves into a packed HMatrix (leaves in row-major order of position)."""
    tree = c.tree
    work = matrix if matrix.dtype == torch.float64 else matrix.float()
    order = np.lexsort((tree.col0[plan.leaves], tree.row0[plan.leaves]))
    leaves, dense_codec = plan.leaves[order], plan.dense_codec[order]
    starts = np.concatenate([[0], np.cumsum(np.bincount(c.trip_node, minlength=tree.size))])
    lowrank = [int(n) for n, d in zip(leaves, dense_codec)
               if d == DROP and (plan.trip_choice[starts[n]:starts[n + 1]] != DROP).any()]
    factors = {}
    for ids, blocks in block_batches(work, tree, lowrank):
        u, s, vh = torch.linalg.svd(blocks, full_matrices=False)
        root = s.sqrt()
        for j, node in enumerate(ids):
            factors[node] = ((u[j] * root[j]).T, vh[j] * root[j].unsqueeze(1))
    packer = _Packer()
    block_rows = []
    for index, (node, codec_index) in enumerate(zip(leaves.tolist(), dense_codec.tolist())):
        r0, c0, h, w = (int(tree.row0[node]), int(tree.col0[node]), int(tree.rows[node]),
                        int(tree.cols[node]))
        block_rows.append([r0, c0, h, w, int(tree.level[node])])
        if codec_index != DROP:
            packer.add(index, DENSE, c.codecs[codec_index], 0, [work[r0:r0 + h, c0:c0 + w]])
            continue
        if node not in factors:
            continue  # a zero block: no segments
        a, b = factors[node]
        choice = plan.trip_choice[starts[node]:starts[node + 1]]
        for codec_index_k in sorted(set(choice[choice != DROP].tolist()),
                                    key=lambda k: CODEC_ID[c.codecs[k]]):
            keep = torch.from_numpy(np.flatnonzero(choice == codec_index_k))
            packer.add(index, LOWRANK, c.codecs[codec_index_k], len(keep), [a[keep], b[keep]])
    return packer.finish(tuple(matrix.shape), matrix.dtype, block_rows)
