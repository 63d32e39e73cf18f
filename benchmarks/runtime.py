"""HLinear against dense `nn.Linear`: the same layer, the same inputs, timed in one process.

For square and rectangular layers from 512 to 4096 (a smooth kernel, the H-matrix case,
compressed to 1e-4 with `--precision keep`) and batches of 1, 16 and 256: time(H) / time(dense),
and the ideal, H bytes / dense bytes (a product that only streams the stored numbers would run at
that ratio); "held" counts what the layer actually reads (factors padded to the tile layout,
index tables). Two regimes: *warm*, each layer called repeatedly on its own (the usual
micro-benchmark: an H layer of a few MB stays in cache), and *cold*, the two calls interleaved so
that each finds the other's weights in cache (as in a deep model whose weights do not fit in cache).
Usage: python -m benchmarks.runtime [--quick] [--repeat N]   (--repeat: only the 4096x4096 batch-1 case, N times)
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from benchmarks import parse_options, print_table
from hmcompress.core.build import CompressionOptions, compress_matrix
from hmcompress.runtime import HLinear

SHAPES = ((512, 512), (1024, 1024), (2048, 2048), (4096, 4096), (1024, 4096), (4096, 1024))
BATCHES = (1, 16, 256)


def kernel(m: int, n: int) -> torch.Tensor:
    """1/(1+100|x_i-y_j|) on sorted random points: smooth away from the diagonal (the issue's reference matrix)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.sort(torch.rand(m, generator=gen))[0]
    y = torch.sort(torch.rand(n, generator=gen))[0]
    return (1 / (1 + 100 * (x[:, None] - y[None, :]).abs())).float()


def warm_times(first: Callable[[], object], second: Callable[[], object], budget: float = 0.5,
               repeat: int = 20) -> tuple[float, float]:
    """Median per-call times of two calls, each timed over ``repeat`` calls in a row after an
    untimed one (so it finds its own data in cache), the runs alternating so that both see the
    same machine."""
    def per_call(fn: Callable[[], object]) -> float:
        fn()
        return seconds(lambda: [fn() for _ in range(repeat)]) / repeat

    return alternate(lambda: per_call(first), lambda: per_call(second), 4 * budget)


def paired_times(first: Callable[[], object], second: Callable[[], object], budget: float = 0.5) -> tuple[float, float]:
    """Median times of two calls, interleaved so that both see the same machine."""
    first(), second()
    return alternate(lambda: seconds(first), lambda: seconds(second), budget)


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(time_first: Callable[[], float], time_second: Callable[[], float], budget: float) -> tuple[float, float]:
    """Medians of two timings taken in turn: at least 5 pairs, then more while ``budget`` seconds
    last (at most 200)."""
    a, b = [], []
    start = time.perf_counter()
    while len(a) < 5 or (time.perf_counter() - start < budget and len(a) < 200):
        a.append(time_first())
        b.append(time_second())
    return statistics.median(a), statistics.median(b)


def layers(m: int, n: int) -> tuple[HLinear, torch.nn.Linear, float]:
    """The kernel matrix as an H layer and as a dense one (same bias), and H bytes / dense bytes."""
    w = kernel(m, n)
    hm = compress_matrix(w, CompressionOptions(tol=1e-4, precision="keep")).hmatrix
    dense = torch.nn.Linear(n, m)
    with torch.no_grad():
        dense.weight.copy_(w)
    return HLinear(hm, dense.bias), dense, hm.nbytes / (4 * m * n)


def rows(shapes: tuple[tuple[int, int], ...]) -> list[list[str]]:
    out = []
    for m, n in shapes:
        layer, dense, ideal = layers(m, n)
        with torch.no_grad():
            for batch in BATCHES:
                x = torch.randn(batch, n)
                row = [f"{m}x{n}", str(batch), f"{ideal:.4f}", f"{layer.held_bytes / (4 * m * n):.4f}"]
                for timer in (warm_times, paired_times):
                    h_time, d_time = timer(lambda: layer(x), lambda: dense(x))
                    speedup = d_time / h_time
                    row += [f"{h_time / d_time:.3f}", f"{speedup:.1f}x ({speedup * ideal:.2f})"]
                out.append(row)
    return out


def bar_runs(count: int) -> list[list[str]]:
    """The issue's bar, 4096x4096 at batch 1 warm, measured ``count`` times (run-to-run spread)."""
    layer, dense, ideal = layers(4096, 4096)
    x = torch.randn(1, 4096)
    out = []
    with torch.no_grad():
        for run in range(count):
            h_time, d_time = warm_times(lambda: layer(x), lambda: dense(x))
            out.append([str(run + 1), f"{h_time * 1e6:.0f}", f"{d_time * 1e6:.0f}",
                        f"{d_time / h_time:.1f}x", f"{d_time / h_time * ideal:.2f}"])
    return out


def main() -> None:
    options = parse_options(__doc__, "512 and 1024 only", lambda parser: parser.add_argument(
        "--repeat", type=int, metavar="N", help="only 4096x4096 at batch 1 (warm), measured N times"))
    if options.repeat:
        print_table(f"HLinear vs nn.Linear at 4096x4096, batch 1, warm ({torch.get_num_threads()} threads)",
                    ["run", "H µs", "dense µs", "speed-up", "of ideal"], bar_runs(options.repeat))
        return
    shapes = SHAPES[:2] if options.quick else SHAPES
    print_table(f"HLinear vs nn.Linear (float32, {torch.get_num_threads()} threads), kernel matrix at tol 1e-4 keep",
                ["layer", "batch", "H bytes / dense", "held / dense", "warm: H time / dense", "warm speed-up (of ideal)",
                 "cold: H time / dense", "cold speed-up (of ideal)"], rows(shapes))


if __name__ == "__main__":
    main()
