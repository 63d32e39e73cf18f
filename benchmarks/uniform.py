"""The uniform quantizer (issue 18): bits per weight against the rate-distortion limit, and the
narrow against the two-digit layout on real layers.

1. Gaussian and Student-t (3 degrees of freedom) 1024x1024 float32 matrices (seeded), at tol 1e-2
   to 1e-4: bits per weight of `compress_matrix` (with the uniform build) and of the planned build
   alone (``planned_only``), against R(D) = ½·log2(σ²/D) at the measured error.
2. At tol 1e-2, every matrix of the sample models and silero-vad: the bytes of the narrow and of
   the two-digit uniform build, each searched to its largest step (`uniform_build` keeps the smaller).

Usage: python -m benchmarks.uniform
"""
from __future__ import annotations

import math

import torch

from benchmarks import print_table
from benchmarks.architectures import SILERO_CHECKPOINT
from benchmarks.compare import sample_model_files
from hmcompress.core import uniform
from hmcompress.core.build import (
    CompressionOptions,
    allowed_error,
    as_matrix,
    compress_matrix,
    error_bound,
    storage_codecs,
)
from hmcompress.io.checkpoint import Selection, classify, open_checkpoint

TOLS = (1e-2, 3e-3, 1e-3, 1e-4)
SIZE = 1024


def test_matrix(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(SIZE, SIZE, generator=gen, dtype=torch.float64)
    if kind == "Student-t":
        chi2 = torch.randn(3, SIZE, SIZE, generator=gen, dtype=torch.float64).pow(2).sum(0)
        w = w / torch.sqrt(chi2 / 3)
    return w.float()


def bits_rows() -> list[list[str]]:
    rows = []
    for kind in ("Gaussian", "Student-t"):
        w = test_matrix(kind)
        norm = float(torch.linalg.vector_norm(w.double()))
        for tol in TOLS:
            options = CompressionOptions(tol=tol)
            chosen, planned = compress_matrix(w, options), compress_matrix(w, options, planned_only=True)
            limit = 0.5 * math.log2(1 / (chosen.error / norm) ** 2)
            rows.append([kind, f"{tol:g}", chosen.strategy, "+".join(sorted(chosen.hmatrix.pools)),
                         f"{8 * chosen.hmatrix.nbytes / w.numel():.2f}", f"{8 * planned.hmatrix.nbytes / w.numel():.2f}",
                         f"{limit:.3f}"])
    return rows


def layout_bytes(matrix: torch.Tensor, digits: bool) -> int | None:
    """Bytes of one uniform layout at tol 1e-2, searched to its largest step (None: none held)."""
    options = CompressionOptions(tol=1e-2)
    allowed, codecs = allowed_error(matrix, options), storage_codecs(matrix, options)
    work = matrix.float()

    def error_at(step: float) -> float:
        return error_bound(matrix, uniform.uniform_values(work, step, codecs, None, digits).double(), matrix.dtype)
    held = uniform.search_step(uniform.first_step(allowed, matrix.numel()), allowed, error_at)
    if held is None:
        return None
    values = uniform.uniform_values(work, held, codecs, None, digits)
    hm = uniform.digits_hmatrix(values, held, matrix.dtype) if digits else uniform.narrow_hmatrix(matrix, held, codecs)
    return hm.nbytes


def layout_rows() -> list[list[str]]:
    rows = []
    for path in [*sample_model_files(), SILERO_CHECKPOINT]:
        checkpoint = open_checkpoint(path)
        for entry in checkpoint.entries:
            if classify(entry, Selection()) is not None:
                continue
            matrix = as_matrix(entry.load()).float()
            narrow, digits = layout_bytes(matrix, False), layout_bytes(matrix, True)
            share = f"{digits / narrow:.3f}" if narrow and digits else "-"
            rows.append([path.stem, entry.name, "x".join(map(str, matrix.shape)), str(narrow), str(digits), share])
    return rows


def main() -> None:
    torch.set_num_threads(1)
    print_table(f"Uniform quantizer, {SIZE}x{SIZE} float32: bits per weight against R(D) at the measured error",
                ["matrix", "tol", "strategy", "codecs", "bits/weight", "planned only", "R(D) Gaussian"], bits_rows())
    print()
    print_table("Narrow against two-digit uniform layout at tol 1e-2 (bytes)",
                ["checkpoint", "matrix", "shape", "narrow", "two digits", "two digits / narrow"], layout_rows())


if __name__ == "__main__":
    main()
