"""Compact and H-matrix layers against dense `nn.Linear`: the same layer, the same inputs, timed in
one process.

*Compact layers* (what `patch` runs by default): trained-like matrices (flat spectrum, uneven row
norms: integer-coded rows at tol 1e-2) of 2048 and 4096 a side, batches 1 and 16: time against a
dense float32 `nn.Linear` for the "int" layout (int8 products of the input's digits) and the
"float" one (codes decoded for each call), beside the peers' int8 weight-only kernels on the same
weights (torch's `_weight_int8pack_mm`, and torchao's `Int8WeightOnlyConfig` where torchao is
installed); bytes held in memory against the file's and the dense weight's. Then the smooth
kernel at 1e-4 in compact form, against its byte ratio.

*HLinear*:
For square and rectangular layers from 512 to 4096 (a smooth kernel, the H-matrix case,
compressed to 1e-4 with `--precision keep`) and batches of 1, 16 and 256: time(H) / time(dense),
and the ideal, H bytes / dense bytes (a product that only streams the stored numbers would run at
that ratio); "held" counts what the layer actually reads (factors padded to the tile layout,
index tables). Two regimes: *warm*, each layer called repeatedly on its own (the usual
micro-benchmark: an H layer of a few MB stays in cache), and *cold*, the two calls interleaved so
that each finds the other's weights in cache (as in a deep model whose weights do not fit in cache).
Usage: python -m benchmarks.runtime [--quick] [--repeat N]   (--quick: 512 and 1024 only, and compact layers
at 2048 only; --repeat: only the 4096x4096 batch-1 case, N times)
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from benchmarks import parse_options, print_table
from hmcompress.core.build import CompressionOptions, compress_matrix
from hmcompress.runtime import CompactLinear, HLinear

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


def trained_like(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A flat-spectrum matrix with uneven row norms (log-normal): what trained weights look like
    to the planner, which ends them as integer-coded rows at tol 1e-2."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.exp(0.5 * torch.randn(m, 1, generator=gen))
    return rows * torch.randn(m, n, generator=gen) / n ** 0.5


def int8_peers(dense: torch.nn.Linear) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The peers' int8 weight-only linear layers on the same weights (absmax per row): torch's own
    `_weight_int8pack_mm`, and torchao's where it is installed."""
    weight = dense.weight.detach()
    scales = weight.abs().amax(1) / 127
    codes = torch.round(weight / scales.unsqueeze(1)).to(torch.int8)
    peers = {"_weight_int8pack_mm": lambda x: torch._weight_int8pack_mm(x, codes, scales)}
    try:
        import copy

        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return peers
    quantized = copy.deepcopy(dense)
    quantize_(quantized, Int8WeightOnlyConfig())
    peers["torchao int8 weight-only"] = quantized
    return peers


def compact_rows(sides: tuple[int, ...]) -> list[list[str]]:
    out = []
    for side in sides:
        weight = trained_like(side, side)
        hm = compress_matrix(weight, CompressionOptions(tol=1e-2)).hmatrix
        dense = torch.nn.Linear(side, side, bias=False)
        with torch.no_grad():
            dense.weight.copy_(weight)
        layers = {layout: CompactLinear(hm, layout=layout) for layout in ("int", "float")}
        peers = int8_peers(dense)
        dense_bytes = 4 * side * side
        for batch in (1, 16):
            x = torch.randn(batch, side)
            row = [f"{side}x{side}", str(batch), f"{hm.nbytes / dense_bytes:.3f}",
                   f"{layers['int'].held_bytes / dense_bytes:.3f}"]
            with torch.no_grad():
                for fn in [*layers.values(), *peers.values()]:
                    mine, theirs = warm_times(lambda: fn(x), lambda: dense(x), repeat=10)
                    row.append(f"{mine / theirs:.2f}")
            out.append(row + ([] if len(peers) > 1 else ["not installed"]))
    return out


def kernel_compact_rows() -> list[list[str]]:
    """The smooth kernel at 1e-4 (both precisions) in compact form, batch 1: its speed-up over
    dense and that speed-up times its byte ratio (1: it runs at its byte ratio)."""
    out = []
    for precision in ("keep", "auto"):
        w = kernel(4096, 4096)
        hm = compress_matrix(w, CompressionOptions(tol=1e-4, precision=precision)).hmatrix
        dense = torch.nn.Linear(4096, 4096, bias=False)
        with torch.no_grad():
            dense.weight.copy_(w)
        layer = CompactLinear(hm)
        ideal = hm.nbytes / (4 * 4096 * 4096)
        x = torch.randn(1, 4096)
        with torch.no_grad():
            h_time, d_time = warm_times(lambda: layer(x), lambda: dense(x))
        speedup = d_time / h_time
        out.append([precision, layer.layout, f"{ideal:.4f}", f"{layer.held_bytes / (4 * 4096 ** 2):.4f}",
                    f"{h_time / d_time:.3f}", f"{speedup:.1f}x ({speedup * ideal:.2f})"])
    return out


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
    threads = torch.get_num_threads()
    print_table(f"Compact layers vs nn.Linear (float32, {threads} threads), trained-like matrices at tol 1e-2: "
                "time / dense time", ["layer", "batch", "file bytes / dense", "held / dense", "compact int",
                                      "compact float", "_weight_int8pack_mm", "torchao int8 weight-only"],
                compact_rows((2048,) if options.quick else (2048, 4096)))
    print()
    if not options.quick:
        print_table(f"Compact layers vs nn.Linear ({threads} threads), kernel matrix 4096x4096 at tol 1e-4, batch 1",
                    ["precision", "layout", "H bytes / dense", "held / dense", "time / dense", "speed-up (of ideal)"],
                    kernel_compact_rows())
        print()
    shapes = SHAPES[:2] if options.quick else SHAPES
    print_table(f"HLinear vs nn.Linear (float32, {torch.get_num_threads()} threads), kernel matrix at tol 1e-4 keep",
                ["layer", "batch", "H bytes / dense", "held / dense", "warm: H time / dense", "warm speed-up (of ideal)",
                 "cold: H time / dense", "cold speed-up (of ideal)"], rows(shapes))


if __name__ == "__main__":
    main()
