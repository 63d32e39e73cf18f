"""The candidate blocks of a matrix and, for each, what every way of storing it costs and loses.

The quad-tree of candidates is the search space of both strategies. For every candidate we know
its singular values (so the error of any truncation is exact without forming anything), the
bytes and error of each dense option, and the bytes and error of each singular triplet in each
codec; integer codes are priced at their entropy-coded size (`pricing`), as the file stores them.
Everything is kept in flat numpy arrays so the optimiser can sweep it vectorised.

Given the budget, `analyse` decides before it decomposes (issue 15): the singular value
decompositions of blocks where low rank cannot win, and the row-codec trials at block widths far
from the best one, are left out (`lowrank_hopeless`, `row_levels`). The plan is then built from
the options analysed; the error of the built matrix is measured as always, so only the bytes can
differ from the full analysis (measured: tests/test_scale.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from hmcompress.core.codecs import roundtrip_rows, row_error_norms
from hmcompress.core.pricing import Pricing, estimate_pricing
from hmcompress.runtime import BLOCK_COLUMNS, CODEC, SEGMENT_COLUMNS

CHUNK_NUMBERS = 1 << 21  # factor entries whose codec errors are measured at once
ROW_CHUNK_NUMBERS = 1 << 16  # row entries whose codec errors are measured at once (in cache)
FAST_MIN_ENTRIES = 1 << 16  # smaller matrices always get the full analysis (it costs little)
SKETCH_RANK = 32  # columns of the randomized range sketch of a block (at most a quarter of its rank)
SKETCH_POWER = 1  # power iterations of the sketch
SKETCH_PROBES = 8  # random probes of the Hutchinson estimate of the residual's sum of sigma^4
HOPELESS_SHARE = 0.5  # low rank is hopeless where it needs at least this share of the break-even rank
HOPEFUL_AREA_SHARE = 0.01  # rows are measured at a few widths only where low rank may win on less area
ALLOWANCE_GAIN = 16  # a block's error allowance: this many times its area's share of the budget (at most all)
GRAM_MAX_RANK = 64  # blocks of at most this rank get their spectrum from the Gram matrix instead
EIGEN_MAX_BLOCKS = 256  # ... and its eigenvalues for at most this many blocks at once (about 0.03 s)
ROW_SAMPLE_EVERY = 32  # one row in this many estimates each block width's cost (`row_levels`)
CODEC_NEIGHBOURS = 1  # row codecs measured: those the estimate chose and this many more on each side in bits
ROW_NEIGHBOURS = 1  # row codecs are measured at the best estimated level and its cheaper neighbour(s)
BLOCK_ROW_BYTES = BLOCK_COLUMNS * 4  # int32 block table row
SEGMENT_ROW_BYTES = SEGMENT_COLUMNS * 4  # int32 segment table row


@dataclasses.dataclass
class Tree:
    """Quad-tree of candidate blocks, nodes numbered level by level (root = 0)."""

    row0: np.ndarray
    col0: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    level: np.ndarray
    parent: np.ndarray  # -1 for the root
    level_start: list[int]  # nodes of level l are level_start[l]:level_start[l+1]

    @property
    def size(self) -> int:
        return len(self.row0)

    def nodes_of_level(self, level: int) -> range:
        return range(self.level_start[level], self.level_start[level + 1])

    @property
    def depth(self) -> int:
        return len(self.level_start) - 1


def split_sizes(rows: int, cols: int, leaf: int) -> tuple[bool, bool]:
    """Whether a block splits its rows and its columns.

    A side splits while it is at least two leaves long; an oblong block (one side more than twice
    the other) splits along its long side only, so blocks tend towards squares.
    """
    split_rows = rows >= 2 * leaf and 2 * rows >= cols
    split_cols = cols >= 2 * leaf and 2 * cols >= rows
    return split_rows, split_cols


def build_tree(shape: tuple[int, int], leaf: int) -> Tree:
    """All candidate blocks of an m x n matrix for a leaf size."""
    row0, col0, rows, cols, level, parent = [0], [0], [shape[0]], [shape[1]], [0], [-1]
    level_start = [0, 1]
    while True:
        start, stop = level_start[-2], level_start[-1]
        for node in range(start, stop):
            split_rows, split_cols = split_sizes(rows[node], cols[node], leaf)
            if not (split_rows or split_cols):
                continue
            h, w = rows[node], cols[node]
            row_parts = [(0, h // 2), (h // 2, h - h // 2)] if split_rows else [(0, h)]
            col_parts = [(0, w // 2), (w // 2, w - w // 2)] if split_cols else [(0, w)]
            for r_off, r_len in row_parts:
                for c_off, c_len in col_parts:
                    row0.append(row0[node] + r_off)
                    col0.append(col0[node] + c_off)
                    rows.append(r_len)
                    cols.append(c_len)
                    level.append(level[node] + 1)
                    parent.append(node)
        if len(row0) == stop:
            break
        level_start.append(len(row0))
    as_array = lambda values: np.asarray(values, dtype=np.int64)  # noqa: E731
    return Tree(as_array(row0), as_array(col0), as_array(rows), as_array(cols), as_array(level),
                as_array(parent), level_start)


@dataclasses.dataclass
class Items:
    """Independently stored pieces of candidate blocks: singular triplets, or rows of a block.

    Item ``t`` belongs to node ``node[t]``; dropping it costs ``drop_err[t]`` (squared error) and
    nothing in bytes; keeping it in codec ``p`` costs ``nbytes[p, t]`` bytes and ``err[p, t]``.
    The items of a node are contiguous, in order (``index`` = position within the node).
    """

    node: np.ndarray
    index: np.ndarray
    drop_err: np.ndarray
    nbytes: np.ndarray
    err: np.ndarray

    @classmethod
    def from_parts(cls, n_nodes: int, drop: dict[int, torch.Tensor], err: dict[int, torch.Tensor],
                   nbytes_per_node: np.ndarray) -> "Items":
        """Flatten per-node tensors (drop (r,), err (P, r)); ``nbytes_per_node`` is (P, n_nodes)."""
        counts = np.array([len(drop[n]) if n in drop else 0 for n in range(n_nodes)], dtype=np.int64)
        node = np.repeat(np.arange(n_nodes), counts)
        index = np.arange(len(node)) - np.repeat(np.cumsum(counts) - counts, counts)
        present = [n for n in range(n_nodes) if n in drop]
        n_codecs = nbytes_per_node.shape[0]
        drop_err = torch.cat([drop[n] for n in present]).numpy() if present else np.zeros(0)
        errs = (torch.cat([err[n] for n in present], dim=1).numpy() if present
                else np.zeros((n_codecs, 0)))
        return cls(node, index, drop_err, nbytes_per_node[:, node].astype(np.float64), errs)

    def starts(self, n_nodes: int) -> np.ndarray:
        """Start of each node's run of items (plus the end)."""
        return np.concatenate([[0], np.cumsum(np.bincount(self.node, minlength=n_nodes))])


@dataclasses.dataclass
class Candidates:
    """Costs (bytes) and squared errors of every way to store every candidate block.

    A leaf is stored densely in one codec (``dense_bytes[p, node]``, ``dense_err[p, node]``), or as
    low-rank factors (``triplets``: drop each singular triplet or keep it in some codec), or as
    rows (``rows``: drop each row or keep it in some codec; auto precision only).
    """

    tree: Tree
    codecs: tuple[str, ...]
    dense_bytes: np.ndarray
    dense_err: np.ndarray
    triplets: Items
    rows: Items
    root_sigma: np.ndarray | None  # singular values of the whole matrix, float64, descending (None: not computed)
    complete: bool = True  # every block's spectrum and every level's row codecs were analysed


def block_batches(matrix: torch.Tensor, tree: Tree, nodes: range | list[int]):
    """Yield ``(node_ids, stacked_blocks)`` for the given nodes, grouped by block shape."""
    by_shape: dict[tuple[int, int], list[int]] = {}
    for node in nodes:
        by_shape.setdefault((int(tree.rows[node]), int(tree.cols[node])), []).append(node)
    for (h, w), ids in sorted(by_shape.items()):
        grid = _grid(matrix, tree, ids, h, w)
        if grid is not None:  # a regular tiling of the whole matrix: one reshaping copy
            yield grid
            continue
        stacked = torch.stack([matrix[tree.row0[i]:tree.row0[i] + h, tree.col0[i]:tree.col0[i] + w]
                               for i in ids])
        yield ids, stacked


def _grid(matrix: torch.Tensor, tree: Tree, ids: list[int], h: int, w: int) -> tuple[list[int], torch.Tensor] | None:
    """``(ids in row-major order, stacked blocks)`` when the blocks tile the whole matrix as an
    (m/h) x (n/w) grid, else None."""
    m, n = matrix.shape
    if m % h or n % w or len(ids) != (m // h) * (n // w):
        return None
    order = np.lexsort((tree.col0[ids], tree.row0[ids]))
    ordered = [ids[i] for i in order]
    rows, cols = m // h, n // w
    if not (np.array_equal(tree.row0[ordered], np.repeat(np.arange(rows) * h, cols))
            and np.array_equal(tree.col0[ordered], np.tile(np.arange(cols) * w, rows))):
        return None
    return ordered, matrix.reshape(rows, h, cols, w).transpose(1, 2).reshape(rows * cols, h, w)


def finite_or_inf(err: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(err), err.clamp_min(0), torch.full_like(err, np.inf))


def triplet_errors(codecs: tuple[str, ...], u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                   wanted: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error ||a~ b~ᵀ - a bᵀ||_F² of storing each wanted triplet's factors in each codec
    (with ``gram``, a w x w positive semi-definite G: the error in the norm tr(X G Xᵀ), the
    data-aware one).

    Factors are balanced, ``a = sqrt(s) u`` and ``b = sqrt(s) v``, as the builder stores them.
    With a~ = a + da, b~ = b + db the difference is da bᵀ + a~ dbᵀ, whose norm needs no
    cancellation-prone subtraction. Computed in the factors' precision with float64 sums: an
    estimate for the planner, which the final measurement of the built matrix checks. Triplets
    go in chunks of about `CHUNK_NUMBERS` factor entries, which bounds the temporaries.
    Shapes: u (k, h, r), s (k, r), vh (k, r, w), ``wanted`` (k, r) bool; result (P, k, r), inf
    where not wanted (such a triplet can only be dropped).
    """
    root = s.sqrt()
    out = torch.full((len(codecs), *s.shape), np.inf, dtype=torch.float64)
    which = wanted.nonzero()
    step = max(1, CHUNK_NUMBERS // (u.shape[1] + vh.shape[2]))
    for start in range(0, len(which), step):
        block, rank = which[start:start + step].T
        scale = root[block, rank].unsqueeze(1)
        a, b = u[block, :, rank] * scale, vh[block, rank, :] * scale
        b_seen = b if gram is None else b @ gram  # inner products <b, y>_G = (b G) · y
        b_norm2 = _norm2(b) if gram is None else (b_seen * b).sum(1, dtype=torch.float64)
        for p, codec in enumerate(codecs):
            a_q, b_q = roundtrip_rows(codec, a), roundtrip_rows(codec, b)
            da, db = a_q - a, b_q - b
            db_norm2 = _norm2(db) if gram is None else ((db @ gram) * db).sum(1, dtype=torch.float64)
            err = (_norm2(da) * b_norm2 + _norm2(a_q) * db_norm2
                   + 2 * (da * a_q).sum(1, dtype=torch.float64) * (b_seen * db).sum(1, dtype=torch.float64))
            out[p, block, rank] = finite_or_inf(err)
    return out


def row_errors(codec: str, blocks: torch.Tensor) -> torch.Tensor:
    """Squared error of storing each row of a (k, h, w) stack in ``codec``: (k, h), float64 sums."""
    flat = blocks.reshape(-1, blocks.shape[2])
    return finite_or_inf(_norm2(roundtrip_rows(codec, flat) - flat)).reshape(blocks.shape[:2])


SAFE_NORM32 = (2.0**-50, 2.0**50)  # float32 row norms in this range had no squares under- or overflow


def _norm2(rows: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean norm of each row, as float64. Float32 rows are summed in float32 (a
    relative error of about 1e-6, twenty times faster), except rows whose norm lies outside
    `SAFE_NORM32`, where squares may have under- or overflowed: those are summed in float64."""
    if rows.dtype != torch.float32 or rows.shape[1] == 0:
        return rows.square().sum(1, dtype=torch.float64)
    norms = torch.linalg.vector_norm(rows, dim=1)
    unsafe = ~((norms >= SAFE_NORM32[0]) & (norms <= SAFE_NORM32[1]))
    out = norms.double().square()
    if bool(unsafe.any()):
        out[unsafe] = rows[unsafe].double().square().sum(1)
    return out


def svd(blocks: torch.Tensor, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a stack of blocks, computed on ``device``, returned on the CPU."""
    if device == "cpu":
        return torch.linalg.svd(blocks, full_matrices=False)
    u, s, vh = torch.linalg.svd(blocks.to(device), full_matrices=False)
    return u.cpu(), s.cpu(), vh.cpu()


def analyse(matrix: torch.Tensor, tree: Tree, codecs: tuple[str, ...], negligible: float = 0.0,
            device: str = "cpu", budget: float | None = None) -> Candidates:
    """Spectra and option costs of every candidate block.

    ``codecs[0]`` must hold the matrix exactly (its own dtype). With several codecs (`--precision
    auto`) every error is measured: each triplet's on its singular vectors, each row's on the
    row. With one (`keep`) only singular values are computed and the rounding error of the factors
    is bounded by 2u²σ² (|fl(x) - x| <= u|x| on both factors), which the final measurement checks.

    ``negligible`` (squared error per matrix entry) saves work: a block's triplets whose tail
    Σ_{j>=i} σ_j² is at most ``negligible`` times the block's area are offered only for dropping.
    Over any tiling such triplets hold at most ``negligible·m·n``, so with ``negligible = δ·budget/(m·n)`` the plan is at least as small as the optimum for
    (1-δ)·budget, and its error is still counted exactly.

    With ``budget`` (squared error) and at least `FAST_MIN_ENTRIES` entries, blocks where low rank
    is hopeless get no SVD (no triplets: they are stored densely or as rows); where the other
    blocks, over all levels, cover at most `HOPEFUL_AREA_SHARE` of the matrix, row codecs are
    measured only at the block widths and for the codecs `row_levels` picks (elsewhere only the
    exact dense option is offered). Where low rank may win on more, the best plan may mix every width, and rows are
    measured at all of them.
    """
    work = matrix if matrix.dtype == torch.float64 else matrix.float()
    measured = len(codecs) > 1
    decide = budget is not None and matrix.numel() >= FAST_MIN_ENTRIES
    pricing = estimate_pricing(work, codecs, side_lengths(tree))
    dense_bytes = np.stack([SEGMENT_ROW_BYTES + tree.rows * pricing.row_bytes(codec, tree.cols)
                            for codec in codecs]).astype(np.float64)
    dense_err = np.zeros((len(codecs), tree.size))
    dense_err[1:] = np.inf  # until measured
    hopeless = np.zeros(tree.size, dtype=bool)
    if decide:  # first every block's verdict: rows are measured at every width where low rank may win
        for level in range(tree.depth):
            for ids, blocks in block_batches(work, tree, tree.nodes_of_level(level)):
                allowance = budget * min(1.0, ALLOWANCE_GAIN * blocks.shape[1] * blocks.shape[2] / matrix.numel())
                hopeless[ids] = lowrank_hopeless(blocks, allowance).numpy()
    hopeful_area = float((tree.rows * tree.cols)[~hopeless].sum()) / max(1, matrix.numel())
    windowed = decide and measured and hopeful_area <= HOPEFUL_AREA_SHARE
    levels, measured_codecs = (row_levels(work, tree, codecs, budget, pricing) if windowed
                               else (set(range(tree.depth)), set(range(len(codecs)))))
    spectra, factor_err, row_norms, row_err = {}, {}, {}, {}
    for level in range(tree.depth):
        nodes = tree.nodes_of_level(level)
        if hopeless[nodes.start:nodes.stop].all() and not (measured and level in levels):
            continue  # nothing to analyse at this level
        for ids, blocks in block_batches(work, tree, nodes):
            chosen = torch.from_numpy(np.flatnonzero(~hopeless[ids]))
            if len(chosen):
                area = blocks.shape[1] * blocks.shape[2]
                stack = blocks if len(chosen) == len(ids) else blocks[chosen]
                sigma, errs = _spectrum_and_errors(stack, codecs, measured, negligible * area, device)
                for j, index in enumerate(chosen.tolist()):
                    spectra[ids[index]] = sigma[j].square()
                    factor_err[ids[index]] = errs[:, j]
            if measured and level in levels:
                per_row = row_errors_all(codecs, blocks, measured_codecs)
                dense_err[:, ids] = per_row.sum(-1).numpy()
                norms = _norm2(blocks.reshape(-1, blocks.shape[2])).reshape(blocks.shape[:2])
                for j, node in enumerate(ids):
                    row_norms[node], row_err[node] = norms[j], per_row[:, j]
    complete = len(levels) == tree.depth and not hopeless.any()
    triplets = Items.from_parts(tree.size, spectra, factor_err, np.stack(
        [pricing.row_bytes(codec, tree.rows) + pricing.row_bytes(codec, tree.cols) for codec in codecs]))
    rows = Items.from_parts(tree.size, row_norms, row_err, np.stack(
        [pricing.row_bytes(codec, tree.cols) for codec in codecs]))
    return Candidates(tree, codecs, dense_bytes, dense_err, triplets, rows,
                      spectra[0].sqrt().numpy() if 0 in spectra else None, complete)


def row_errors_all(codecs: tuple[str, ...], blocks: torch.Tensor, which: set[int] | None = None) -> torch.Tensor:
    """Squared error of storing each row of a (k, h, w) stack in each codec: (P, k, h), codec 0
    (the source dtype) exact. Rows go in chunks of about `ROW_CHUNK_NUMBERS` entries, every codec
    on a chunk while it is in cache. Float32 rows take the codecs' own error norms (float32
    sums, `codecs.row_error_norms`): estimates like every planner figure, checked by the final
    measurement. Codecs not in ``which`` (if given) are not tried: their errors are inf."""
    flat = blocks.reshape(-1, blocks.shape[2])
    out = torch.zeros((len(codecs), flat.shape[0]), dtype=torch.float64)
    for p in range(1, len(codecs)):
        if which is not None and p not in which:
            out[p] = np.inf
    step = max(1, ROW_CHUNK_NUMBERS // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], step):
        part = flat[start:start + step]
        for p, codec in enumerate(codecs[1:], start=1):
            if which is not None and p not in which:
                continue
            if part.dtype == torch.float32:
                out[p, start:start + step] = finite_or_inf(row_error_norms(codec, part).double().square())
            else:
                out[p, start:start + step] = finite_or_inf(_norm2(roundtrip_rows(codec, part) - part))
    return out.reshape(len(codecs), *blocks.shape[:2])


def lowrank_hopeless(blocks: torch.Tensor, allowance: float) -> torch.Tensor:
    """For each block of a (k, h, w) stack: True where low rank cannot pay, so its SVD is skipped.

    A block of rank-r factors costs about r(h + w) numbers against hw for its rows: low rank pays
    only below the break-even rank hw/(h + w). The rank that leaves an error of at most
    ``allowance`` is bounded below from cheap information: a randomized range sketch Q of
    `SKETCH_RANK` columns (`SKETCH_POWER` power iterations) splits B = QZ + R (QᵀR = 0), and by Ky Fan and Cauchy-Schwarz the top r
    squared singular values sum to at most ||Z||_F² + sqrt(r·Σσ⁴(R)), so reaching ||B||_F² -
    allowance needs r >= (||R||_F² - allowance)² / Σσ⁴(R). Σσ⁴(R) = tr((RᵀR)²) is estimated
    from `SKETCH_PROBES` Gaussian probes (Hutchinson). The bound with R = B (no sketch) is tried
    first: where it settles every block of the stack, no sketch is made. A block is hopeless when that rank is at
    least `HOPELESS_SHARE` of the break-even rank: quantized factors, with two roundings per
    number, need that margin to beat rows. Blocks of rank at most `GRAM_MAX_RANK` take Σσ⁴(B)
exactly from their Gram matrix (no sketch). The sketches are seeded: the decision is deterministic.
    """
    k, h, w = blocks.shape
    rank = min(h, w)
    break_even = HOPELESS_SHARE * (h * w / (h + w))
    energy = _norm2(blocks.reshape(k, -1))
    if rank <= GRAM_MAX_RANK:  # small blocks: from the Gram matrix, no sketch
        gram = blocks.transpose(1, 2) @ blocks if w <= h else blocks @ blocks.transpose(1, 2)
        if k > EIGEN_MAX_BLOCKS:  # the Cauchy-Schwarz bound with the exact Σσ⁴
            fourth = _norm2(gram.reshape(k, -1))
            return (energy - allowance).clamp_min(0).square() / fourth.clamp_min(1e-300) >= break_even
        squares = torch.linalg.eigvalsh(gram).double().clamp_min(0)  # ascending
        tails = squares.cumsum(-1)  # tails[i]: the error of keeping the rank - 1 - i largest
        needed = rank - (tails <= allowance).sum(-1)
        return needed >= h * w / (h + w)
    sketch = max(1, min(SKETCH_RANK, rank // 4))
    gen = torch.Generator().manual_seed(0)
    omega = torch.randn(w, sketch + SKETCH_PROBES, generator=gen, dtype=blocks.dtype)
    probed = blocks @ omega[:, sketch:]  # (k, h, probes)
    # First the bound on B itself (R = B, no sketch): it settles blocks whose outliers are weak
    # (every block of a trained-like matrix), and the sketch's products are never formed.
    whole = _norm2((probed.transpose(1, 2) @ blocks).reshape(k * SKETCH_PROBES, -1))  # rows of (BᵀB·probes)ᵀ
    verdict = (energy - allowance).clamp_min(0).square() / whole.reshape(k, -1).mean(1).clamp_min(1e-300) >= break_even
    if bool(verdict.all()):
        return verdict
    q = torch.linalg.qr(blocks @ omega[:, :sketch]).Q  # (k, h, sketch)
    for _ in range(SKETCH_POWER):  # the dominant directions come out of the bulk
        q = torch.linalg.qr(blocks @ (q.transpose(1, 2) @ blocks).transpose(1, 2)).Q
    z = q.transpose(1, 2) @ blocks  # (k, sketch, w)
    residual_energy = (energy - _norm2(z.reshape(k, -1))).clamp_min(0)
    probes = probed - q @ (q.transpose(1, 2) @ probed)  # R·probes
    gram_probes = probes.transpose(1, 2) @ blocks - (probes.transpose(1, 2) @ q) @ z  # (RᵀR·probes)ᵀ
    fourth = _norm2(gram_probes.reshape(k * SKETCH_PROBES, -1)).reshape(k, -1).mean(1)
    needed = (residual_energy - allowance).clamp_min(0).square() / fourth.clamp_min(1e-300)
    return needed >= break_even


def side_lengths(tree: Tree) -> list[int]:
    """The block side lengths of a tree, each rounded to a power of two (what `Pricing` samples)."""
    sides = np.unique(np.concatenate([tree.rows, tree.cols]))
    return sorted({int(2 ** round(float(np.log2(side)))) for side in sides.tolist()})


def row_levels(work: torch.Tensor, tree: Tree, codecs: tuple[str, ...], budget: float,
               pricing: Pricing) -> tuple[set[int], set[int]]:
    """The tree levels and codecs whose row errors are worth measuring.

    Levels: the one whose uniform partition stores rows in the fewest bytes, estimated on every
    `ROW_SAMPLE_EVERY`-th row of every block (codec errors measured exactly on those rows), and
    the cheaper of its two neighbours (`ROW_NEIGHBOURS`), between which the optimiser may mix
    widths. Codecs: codec 0 (exact), and those the estimate chose at those levels, widened by one
    codec on each side in bits per number (`CODEC_NEIGHBOURS`).
    """
    costs, picks = [], []
    for level in range(tree.depth):
        nodes = tree.nodes_of_level(level)
        sample_err, sample_norm, sample_bytes, rows_total, blocks = [], [], [], 0, 0
        for (h, w), ids in _by_shape(tree, nodes).items():
            part = _sampled_rows(work, tree, ids, h, w)
            sample_err.append(row_errors_all(codecs, part).reshape(len(codecs), -1))
            sample_norm.append(_norm2(part.reshape(-1, w)))
            sample_bytes.append(np.repeat(np.stack([pricing.row_bytes(c, np.array([w])) for c in codecs]),
                                          part.shape[0] * part.shape[1], axis=1))
            rows_total += len(ids) * h
            blocks += len(ids)
        err = torch.cat(sample_err, dim=1).numpy()
        norm = torch.cat(sample_norm).numpy()
        nbytes = np.concatenate(sample_bytes, axis=1).astype(np.float64)
        share = err.shape[1] / rows_total
        overhead = blocks * (BLOCK_ROW_BYTES + SEGMENT_ROW_BYTES)
        cost, picked = _uniform_rows_bytes(nbytes, err, norm, budget * share)
        costs.append(overhead + cost / share)
        picks.append(picked)
    best = int(np.argmin(costs))
    neighbours = [level for level in (best - 1, best + 1) if 0 <= level < tree.depth]
    levels = {best, *sorted(neighbours, key=lambda level: costs[level])[:ROW_NEIGHBOURS]}
    by_bits = sorted(range(1, len(codecs)), key=lambda p: -CODEC[codecs[p]].bits)
    rank = [by_bits.index(p) for level in levels for p in picks[level] if p > 0]
    if not rank:
        return levels, {0}
    low, high = max(0, min(rank) - CODEC_NEIGHBOURS), min(len(by_bits), max(rank) + CODEC_NEIGHBOURS + 1)
    return levels, {0, *by_bits[low:high]}


def _by_shape(tree: Tree, nodes) -> dict[tuple[int, int], np.ndarray]:
    """The given nodes grouped by block shape."""
    nodes = np.asarray(nodes, dtype=np.int64)
    groups: dict[tuple[int, int], list[int]] = {}
    for node, h, w in zip(nodes.tolist(), tree.rows[nodes].tolist(), tree.cols[nodes].tolist()):
        groups.setdefault((h, w), []).append(node)
    return {shape: np.asarray(ids) for shape, ids in sorted(groups.items())}


def _sampled_rows(work: torch.Tensor, tree: Tree, ids: np.ndarray, h: int, w: int) -> torch.Tensor:
    """Every `ROW_SAMPLE_EVERY`-th row of each h x w block ``ids`` (from its first), stacked:
    (blocks, rows, w), gathered without copying the blocks."""
    offsets = torch.arange(0, h, ROW_SAMPLE_EVERY)
    rows = torch.from_numpy(tree.row0[ids]).unsqueeze(1) + offsets  # (k, s)
    cols = torch.from_numpy(tree.col0[ids]).unsqueeze(1) + torch.arange(w)  # (k, w)
    return work[rows.unsqueeze(2), cols.unsqueeze(1)]


def _uniform_rows_bytes(nbytes: np.ndarray, err: np.ndarray, norm: np.ndarray, budget: float) -> tuple[float, set[int]]:
    """Fewest bytes of rows each kept in some codec or dropped, total squared error <= ``budget``
    (Lagrangian bisection; codec 0 is exact, so a solution always exists), and the codecs kept."""
    def solve(mu: float) -> tuple[float, float, np.ndarray]:
        cost = np.vstack([mu * norm, nbytes + mu * err])
        pick = np.argmin(cost, axis=0)
        chosen_bytes = np.where(pick == 0, 0.0, nbytes[np.maximum(pick - 1, 0), np.arange(len(norm))])
        chosen_err = np.where(pick == 0, norm, err[np.maximum(pick - 1, 0), np.arange(len(norm))])
        return float(chosen_bytes.sum()), float(chosen_err.sum()), pick
    if budget <= 0:
        return float(nbytes[0].sum()), {0}
    lo, hi = np.log(1e-12 / budget), np.log(max(float(nbytes[0].sum()), 1.0) * 1e6 / budget)
    best, kept = float(nbytes[0].sum()), {0}
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        nbytes_mid, err_mid, pick = solve(float(np.exp(mid)))
        if err_mid <= budget:
            hi = mid
            if nbytes_mid < best:
                best, kept = nbytes_mid, {int(p) - 1 for p in np.unique(pick) if p > 0}
        else:
            lo = mid
    return best, kept


def _spectrum_and_errors(blocks: torch.Tensor, codecs: tuple[str, ...], measured: bool,
                         floor: float, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (as float64, descending) and per-codec factor errors (P, k, r) of a stack.

    Triplets whose tail of squared singular values is at most ``floor`` are not measured (inf).
    """
    if measured:
        u, s, vh = svd(blocks, device)
        sigma = s.double()
        tails = sigma.square().flip(-1).cumsum(-1).flip(-1)
        wanted = tails > floor
        return sigma, triplet_errors(codecs, u, s, vh, wanted)
    sigma = torch.linalg.svdvals(blocks.to(device)).double().cpu()
    bound = 2 * CODEC[codecs[0]].unit_roundoff ** 2 * sigma.square() * (1 + 1e-6)
    return sigma, bound.unsqueeze(0)
