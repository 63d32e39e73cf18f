"""What the file stores for each integer pool: entropy-coded with one frequency table, or with a
table per class of rows (docs/FORMAT.md, coded layout 2), where that is smaller.

One table for a whole pool codes the mixture of its rows' distributions. Rows differ in spread,
and a row whose codes are narrow pays for the wide ones' tails. Sorting a pool's rows into
classes by the RMS of their codes, and coding each class with a table of its own, spends about the
entropy of the codes given their class: 5.4% fewer bytes on a 4096² matrix whose rows' scales
spread log-normally with σ = 0.7 (`python -m benchmarks.entropy`). The trained layers of the shared
checkpoints differ less from row to row (g2p-en-gru's: the RMS of a layer's rows within a factor
of 1.3 to 2.5, a one-off count), and save 0.2% over them at tol 1e-2. The tables' own bytes (a few hundred each) and the
slower decoding decide whether it pays: the encoder estimates each choice of 1, 2, 4 or 8 classes
from the symbol counts and writes classes only where they save `CLASS_GAIN`. Pools whose rows
are not all of one length keep one table.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from hmcompress.core.entropy import (
    LANE_SYMBOLS,
    PRECISION,
    coded_blob,
    pool_runs,
    quantise_frequencies,
    stored_rows,
    symbol_counts,
)
from hmcompress.runtime import CODEC, INTEGER_CODECS, HMatrix, pool_symbols
from hmcompress.runtime.entropy import HEADER_BYTES, LAYOUT_UNIT, MAX_SECTIONS, PRECISIONS, SECTIONED

# The estimate leaves out the state's headroom, which finer tables shrink: above `PRECISION` it
# picked 15 where 14 coded smaller (a 2048² trained-like matrix: 0.02% more bytes), so only
# coarser tables than the default are chosen (for small pools, where the table's bytes weigh).
CHOSEN_PRECISIONS = tuple(p for p in PRECISIONS if p <= PRECISION)
CLASS_COUNTS = (2, 4, 8)  # nested: each count's classes split the previous count's in two
FINEST = CLASS_COUNTS[-1]
SPREAD_SLICE = 1 << 20  # symbols whose squares are taken at once
# Sections decode at 0.84 of one table's speed (`python -m benchmarks.entropy`: their lanes look
# up several tables): row classes are written only where they save at least this share.
CLASS_GAIN = 0.01
assert FINEST <= MAX_SECTIONS and all(FINEST % c == 0 for c in CLASS_COUNTS)


def row_length(hm: HMatrix, codec: str) -> int | None:
    """The length of every stored row of the codec's pool, if they all have one (and the pool holds
    whole rows of codes); else None."""
    lengths = {length for _offset, parts in stored_rows(hm, codec) for _count, length in parts}
    return lengths.pop() if len(lengths) == 1 else None


def row_classes(symbols: np.ndarray, length: int, bits: int) -> np.ndarray | None:
    """The class (0 .. c - 1, uint8) of each row of ``length`` symbols for the number of classes c
    whose sectioned pool is estimated smallest, rows ranked by the RMS of their codes and cut into
    c groups of equal row counts; None where none is estimated `CLASS_GAIN` smaller than one table."""
    rows = len(symbols) // length
    if rows < 2 or rows * length != len(symbols):
        return None
    grid = symbols.reshape(rows, length)
    centre = 1 << (bits - 1)
    step = max(1, SPREAD_SLICE // length)  # rows at a time: no float64 copy of a large pool
    spread = np.concatenate([np.sqrt(((grid[r:r + step].astype(np.float64) - centre) ** 2).mean(1))
                             for r in range(0, rows, step)])
    order = np.argsort(spread, kind="stable")
    finest = np.empty(rows, dtype=np.int64)
    finest[order] = np.arange(rows) * FINEST // rows
    alphabet = 1 << bits
    counts = np.stack([symbol_counts(grid[finest == g].reshape(-1), alphabet) for g in range(FINEST)])
    best, best_bytes = None, (1 - CLASS_GAIN) * estimated_bytes(counts.sum(0))
    for classes in (c for c in CLASS_COUNTS if 2 * c <= rows):
        merged = counts.reshape(classes, FINEST // classes, alphabet).sum(1)
        estimate = sum(estimated_bytes(c) for c in merged) + rows + 4 * classes + 8
        if estimate < best_bytes:
            best, best_bytes = classes, estimate
    if best is None:
        return None
    return (finest // (FINEST // best)).astype(np.uint8)


def estimated_bytes(counts: np.ndarray, precision: int | None = None) -> float:
    """About the bytes of a layout-1 coded stream of symbols with these counts at this table
    precision (by default the best of `PRECISIONS`): its empirical entropy at the quantised table,
    the table's varints, the header and one run, the lanes."""
    total = int(counts.sum())
    if total == 0:
        return HEADER_BYTES
    if precision is None:
        return min(estimated_bytes(counts, p) for p in CHOSEN_PRECISIONS)
    freqs = quantise_frequencies(counts, precision)
    used = counts > 0
    bits = float((counts[used] * (precision - np.log2(freqs[used]))).sum())
    first, last = np.flatnonzero(used)[[0, -1]]
    table = int(np.where(freqs[first:last + 1] < 0x80, 1, np.where(freqs[first:last + 1] < 0x4000, 2, 3)).sum())
    return bits / 8 + table + HEADER_BYTES + 8 + 4 * -(-total // LANE_SYMBOLS)


def best_precision(counts: np.ndarray) -> int:
    """The table precision (one of `CHOSEN_PRECISIONS`) whose coded stream of symbols with these
    counts is estimated smallest: coarser tables cost fewer bytes (smaller varints), finer ones
    code closer to the counts; a small pool's table weighs more."""
    return min(CHOSEN_PRECISIONS, key=lambda p: estimated_bytes(counts, p))


def one_table_blob(codec: str, symbols: np.ndarray, runs: np.ndarray) -> torch.Tensor:
    """A layout-1 coded pool of ``symbols`` at its `best_precision`."""
    return coded_blob(codec, symbols, runs, best_precision(symbol_counts(symbols, 1 << CODEC[codec].bits)))


def sectioned_blob(codec: str, symbols: np.ndarray, runs: np.ndarray, classes: np.ndarray) -> torch.Tensor:
    """A coded pool of layout 2: its rows (``len(classes)`` of equal length) coded class by class,
    each class a layout-1 coded stream of its rows' symbols in order (docs/FORMAT.md)."""
    rows = len(classes)
    length = len(symbols) // rows
    grid = symbols.reshape(rows, length)
    count = int(classes.max()) + 1
    sections = []
    for c in range(count):
        part = grid[classes == c].reshape(-1)
        sections.append(one_table_blob(codec, part, np.array([[1, len(part)]] if len(part) else [], dtype=np.int64)
                                       .reshape(-1, 2)).numpy().tobytes())
    header = np.asarray([count, SECTIONED * LAYOUT_UNIT, length, rows, len(runs)], dtype="<u4").tobytes()
    sizes = np.asarray([len(s) for s in sections], dtype="<u4").tobytes()
    blob = b"".join([header, np.asarray(runs, dtype="<u4").tobytes(), classes.astype(np.uint8).tobytes(), sizes,
                     *sections])
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def with_coded_pools(hm: HMatrix) -> HMatrix:
    """``hm`` with each integer pool also in coded form where that is smaller (what the file
    stores; `HMatrix.nbytes` counts it)."""
    coded = {}
    for codec in sorted(INTEGER_CODECS & set(hm.pools)):
        runs = pool_runs(hm, codec)
        if runs is None:
            continue
        symbols = pool_symbols(codec, hm.pools[codec], torch.from_numpy(runs)).numpy()
        length = row_length(hm, codec)
        classes = None if length is None else row_classes(symbols, length, CODEC[codec].bits)
        blob = one_table_blob(codec, symbols, runs) if classes is None else sectioned_blob(codec, symbols, runs, classes)
        if blob.numel() < hm.pools[codec].numel() * hm.pools[codec].element_size():
            coded[codec] = blob
    return dataclasses.replace(hm, coded=coded)
