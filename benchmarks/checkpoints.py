"""Compression of the real checkpoints in ../shared/checkpoints against int8 per-row quantization.

For each checkpoint and tolerance: bytes of the compressed matrices (hmcompress, auto precision)
against float32 and against plain int8 with one float32 scale per row (about 0.4-0.9% error, no
bound), and the largest measured relative error. Usage: python -m benchmarks.checkpoints
"""
from __future__ import annotations

import pathlib
import time

from hmcompress.api import compress_checkpoint
from hmcompress.build import CompressionOptions

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "checkpoints"
SUFFIXES = (".pt", ".pth", ".tar", ".safetensors", ".npz", ".jit")


def checkpoint_files() -> list[pathlib.Path]:
    return sorted(p for p in SHARED.glob("*/*") if p.suffix in SUFFIXES)


def main() -> None:
    print("| checkpoint | tol | matrices | float32 / ours | int8 per-row / ours | max rel error | time |")
    print("|---|---|---|---|---|---|---|")
    for path in checkpoint_files():
        for tol in (1e-2, 1e-1):
            start = time.perf_counter()
            result = compress_checkpoint(path, None, CompressionOptions(tol=tol), write=False)
            elapsed = time.perf_counter() - start
            layers = [s for s in result.layers if s.compressed]
            if not layers:
                print(f"| {path.parent.name}/{path.name} | {tol:g} | 0 | - | - | - | {elapsed:.1f}s |")
                continue
            ours = sum(s.bytes_after for s in layers)
            fp32 = sum(4 * s.shape[0] * _cols(s.shape) for s in layers)
            int8 = sum(s.shape[0] * _cols(s.shape) + 4 * s.shape[0] for s in layers)
            worst = max(s.rel_error for s in layers)
            print(f"| {path.parent.name}/{path.name} | {tol:g} | {len(layers)} | {fp32 / ours:.2f} | "
                  f"{int8 / ours:.3f} | {worst:.4f} | {elapsed:.1f}s |")


def _cols(shape: list[int]) -> int:
    cols = 1
    for side in shape[1:]:
        cols *= side
    return cols


if __name__ == "__main__":
    main()
