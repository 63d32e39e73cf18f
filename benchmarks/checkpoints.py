"""Compression of the real checkpoints in ../shared/checkpoints against int8 per-row quantization.

For each checkpoint and tolerance: bytes of the compressed matrices (hmcompress, auto precision)
against float32 and against plain int8 with one float32 scale per row (about 0.4-0.9% error, no
bound), and the largest measured relative error. Usage: python -m benchmarks.checkpoints
"""
from __future__ import annotations

import math
import pathlib
import time
from collections.abc import Iterator

from benchmarks import print_table
from hmcompress.api import compress_checkpoint
from hmcompress.core.build import CompressionOptions

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "checkpoints"
SUFFIXES = (".pt", ".pth", ".tar", ".safetensors", ".npz", ".jit")


def checkpoint_files() -> list[pathlib.Path]:
    return sorted(p for p in SHARED.glob("*/*") if p.suffix in SUFFIXES)


def rows() -> Iterator[list[str]]:
    for path in checkpoint_files():
        for tol in (1e-2, 1e-1):
            start = time.perf_counter()
            result = compress_checkpoint(path, None, CompressionOptions(tol=tol), write=False, workers=2)
            elapsed = f"{time.perf_counter() - start:.1f}s"
            name = f"{path.parent.name}/{path.name}"
            layers = [s for s in result.layers if s.compressed]
            if not layers:
                yield [name, f"{tol:g}", "0", "-", "-", "-", elapsed]
                continue
            ours = sum(s.bytes_after for s in layers)
            fp32 = sum(4 * math.prod(s.shape) for s in layers)
            int8 = sum(math.prod(s.shape) + 4 * s.shape[0] for s in layers)
            worst = max(s.rel_error for s in layers)
            yield [name, f"{tol:g}", str(len(layers)), f"{fp32 / ours:.2f}", f"{int8 / ours:.3f}", f"{worst:.4f}", elapsed]


def main() -> None:
    print_table("Shared checkpoints, compressed matrices only, auto precision (2 workers)",
                ["checkpoint", "tol", "matrices", "float32 / ours", "int8 per-row / ours", "max rel error", "time"],
                rows())


if __name__ == "__main__":
    main()
