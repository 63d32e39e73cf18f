"""Compression time and size against baselines run in the same process.

Time: compressing a 2048 x 2048 matrix (bounds included) over one `torch.linalg.svd` of it.
Size: bytes over dense float32, over the paper's algorithm and over one truncated SVD on the
same candidates. Usage: python -m benchmarks.compression [--quick]
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from benchmarks import print_table, quick_requested
from benchmarks.runtime import kernel
from hmcompress.core.bounds import compute_bounds
from hmcompress.core.build import CompressionOptions, compress_matrix
from hmcompress.core.candidates import analyse, build_tree
from hmcompress.core.plans import svd_plan


def trained_like(n: int) -> torch.Tensor:
    """A weight-like matrix: slowly decaying spectrum, random singular vectors."""
    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    return ((u * torch.linspace(1, 0.02, n)) @ v.T).float()


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def compress_with_bounds(w: torch.Tensor, options: CompressionOptions) -> None:
    result = compress_matrix(w, options)
    compute_bounds(w, result.dense, result.error, result.root_sigma)


def bench_compression_time(rows: list[list[str]], n: int, repeats: int) -> None:
    for label, w in (("smooth kernel", kernel(n, n)), ("trained-like", trained_like(n))):
        for precision in ("keep", "auto"):
            options = CompressionOptions(tol=1e-2, precision=precision)
            svd = best_of(lambda: torch.linalg.svd(w, full_matrices=False), repeats)
            ours = best_of(lambda: compress_with_bounds(w, options), repeats)
            rows.append([f"compress {label} {n}x{n} tol 1e-2 {precision} (bounds incl.)",
                         "torch.linalg.svd", f"{ours / svd:.2f}x time"])


def bench_sizes(rows: list[list[str]], n: int) -> None:
    for label, w in (("smooth kernel", kernel(n, n)), ("trained-like", trained_like(n))):
        dense = w.numel() * w.element_size()
        for precision in ("keep", "auto"):
            ours = compress_matrix(w, CompressionOptions(tol=1e-2, precision=precision))
            paper = compress_matrix(w, CompressionOptions(tol=1e-2, precision=precision, strategy="paper"))
            rows.append([f"bytes {label} {n}x{n} tol 1e-2 {precision}", "dense float32",
                         f"{ours.hmatrix.nbytes / dense:.4f}"])
            rows.append([f"bytes {label} {n}x{n} tol 1e-2 {precision}", "paper strategy",
                         f"{ours.hmatrix.nbytes / paper.hmatrix.nbytes:.4f}"])
        c = analyse(w, build_tree(tuple(w.shape), 32), ("f32",))
        svd_bytes = svd_plan(c, ours.budget ** 2).nbytes(c)
        keep = compress_matrix(w, CompressionOptions(tol=1e-2, precision="keep"))
        rows.append([f"bytes {label} {n}x{n} tol 1e-2 keep", "one truncated SVD",
                     f"{keep.hmatrix.nbytes / svd_bytes:.4f}"])


def main() -> None:
    quick = quick_requested(__doc__, "smaller matrices, one repeat")
    n, repeats = (512, 1) if quick else (2048, 3)
    rows: list[list[str]] = []
    bench_compression_time(rows, n, repeats)
    bench_sizes(rows, 1024 if not quick else 256)
    print_table(f"Compression ({torch.get_num_threads()} threads)", ["measurement", "baseline", "ours / baseline"], rows)


if __name__ == "__main__":
    main()
