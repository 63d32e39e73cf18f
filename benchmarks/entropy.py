"""Entropy-coded pools (FORMAT.md version 2): decoding speed on one core, and coded size.

The codes are those the builder stores for a trained-like matrix (per-row symmetric codes of
i8 and i6, absmax scales). Decoding speed is MB of decoded fixed-width pool per second on one
thread, against two baselines timed in the same process: torch copying the same bytes, and
turning the fixed-width pool into int16 codes (unpacking the bit streams; what a version-1 pool
costs to read for compute).
A whole file's pools decode in one lockstep pass, so a file of many pools decodes faster than
one pool of the same size; both are timed. Then a pool coded by row classes (layout 2): the
uniform quantizer's codes (one step, `u8`) of a matrix whose rows differ in spread (a log-normal
factor per row, σ = 0.7, as trained layers' row norms spread), its sections' bytes and decoding
speed against the same pool with one table. Usage: python -m benchmarks.entropy [--quick]
"""
from __future__ import annotations

import numpy as np
import torch

from benchmarks import print_table, quick_requested
from benchmarks.compression import best_of, trained_like
from hmcompress.core.codecs import encode_rows
from hmcompress.core.coded_pools import row_classes, sectioned_blob
from hmcompress.core.entropy import coded_blob
from hmcompress.runtime import CODEC, decode_codes, decode_pools, parse_coded, pool_symbols

REPEATS = 3


def coded_pools(codec: str, matrix: torch.Tensor, parts: int) -> tuple[list, torch.Tensor, int, int]:
    """The matrix's rows as ``parts`` pools of ``codec``: (parsed coded pools, one fixed-width
    pool of them all, its row length, the coded pools' bytes)."""
    pool, _scales = encode_rows(codec, matrix)
    length = matrix.shape[1]
    row_size = CODEC[codec].row_length(length)
    rows_per_part = matrix.shape[0] // parts
    parsed, nbytes = [], 0
    for part in range(parts):
        piece = pool[part * rows_per_part * row_size:(part + 1) * rows_per_part * row_size]
        runs = np.array([[rows_per_part, length]])
        symbols = pool_symbols(codec, piece, torch.from_numpy(runs)).numpy()
        blob = coded_blob(codec, symbols, runs)
        parsed.append(parse_coded(codec, blob, "benchmark"))
        nbytes += blob.numel()
    return parsed, pool, length, nbytes


def bench_decoding(rows: list[list[str]], n: int) -> None:
    matrix = trained_like(n)
    for codec in ("i8", "i6"):
        for parts in (1, 64):
            parsed, pool, length, coded = coded_pools(codec, matrix, parts)
            decoded = torch.cat(decode_pools(parsed))
            assert torch.equal(decoded, pool), "decoding must give the fixed-width pool"
            seconds = best_of(lambda: decode_pools(parsed), REPEATS)
            copy = best_of(lambda: pool.clone(), REPEATS)
            unpack = best_of(lambda: decode_codes(codec, pool, length).to(torch.int16), REPEATS)
            megabytes = pool.numel() / 1e6
            label = f"decode {codec}, {n}x{n} codes in {parts} pool{'s' * (parts > 1)}"
            speed = f"{megabytes / seconds:.0f} MB/s, {n * n / seconds / 1e6:.0f} M codes/s"
            rows.append([label, "torch copy of the pool", f"{copy / seconds:.4f}x speed ({speed})"])
            rows.append([label, "fixed-width pool to int16 codes", f"{unpack / seconds:.3f}x speed"])
            symbols = pool_symbols(codec, pool, torch.tensor([[n, n]])).numpy()
            p = np.bincount(symbols) / symbols.size
            entropy = -(p[p > 0] * np.log2(p[p > 0])).sum() * symbols.size / 8
            rows.append([f"coded bytes {codec} {n}x{n}, {parts} pool{'s' * (parts > 1)} (tables incl.)",
                         "empirical entropy of the codes", f"{coded / entropy:.4f}x bytes"])


def bench_row_classes(rows: list[list[str]], n: int) -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.exp(0.7 * torch.randn(n, 1, generator=gen)) * torch.randn(n, n, generator=gen)
    step = 1e-2 * float(w.norm()) * (12 / w.numel()) ** 0.5  # rounding error alone: 1e-2 of ‖W‖_F
    codes = torch.round(w / step).clamp(-127, 127).to(torch.int8).reshape(-1)
    pool_runs = np.array([[1, codes.numel()]])
    symbols = pool_symbols("u8", codes, torch.from_numpy(pool_runs)).numpy()
    classes = row_classes(symbols, n, 8)
    label = f"u8 {n}x{n} codes, rows of log-normal spread"
    if classes is None:
        rows.append([label, "one table", "the encoder keeps one table: nothing to time"])
        return
    one, sectioned = coded_blob("u8", symbols, pool_runs), sectioned_blob("u8", symbols, pool_runs, classes)
    assert torch.equal(decode_pools([parse_coded("u8", sectioned, "benchmark")])[0], codes)
    plain = best_of(lambda: decode_pools([parse_coded("u8", one, "benchmark")]), REPEATS)
    by_class = best_of(lambda: decode_pools([parse_coded("u8", sectioned, "benchmark")]), REPEATS)
    count = int(classes.max()) + 1
    rows.append([f"coded bytes, {label}, {count} row classes", "one table", f"{sectioned.numel() / one.numel():.4f}x bytes"])
    rows.append([f"decode {label}, {count} row classes", "one table",
                 f"{plain / by_class:.3f}x speed ({codes.numel() / 1e6 / by_class:.0f} MB/s)"])


def main() -> None:
    quick = quick_requested(__doc__, "a 1024 x 1024 matrix instead of 4096 x 4096")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows: list[list[str]] = []
        bench_decoding(rows, 1024 if quick else 4096)
        bench_row_classes(rows, 1024 if quick else 4096)
    finally:
        torch.set_num_threads(threads)
    print_table("Entropy-coded pools (1 thread)", ["measurement", "baseline", "ours / baseline"], rows)


if __name__ == "__main__":
    main()
