"""Decide before you decompose (issue 15): the fast analysis skips SVDs and row-codec trials that
cannot win, stores at most 1% more bytes than the full analysis, and every bound still holds."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from helpers import random_checkpoint, reference_decoded

from benchmarks.scale import trained
from hmcompress.core import candidates
from hmcompress.core.bounds import SPECTRAL_EXACT_MAX_SIDE, compute_bounds
from hmcompress.core.build import CompressionOptions, as_matrix, compress_matrix
from hmcompress.io.checkpoint import Selection, classify, open_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "checkpoints"
SUFFIXES = {".pt", ".pth", ".tar", ".safetensors", ".npz", ".jit"}
GROWTH = 1.01  # the limit on the fast analysis's bytes against the full one


def smooth_kernel(n: int) -> torch.Tensor:
    """1/(1 + 100|x_i - y_j|) on a uniform grid: low rank away from the diagonal."""
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    return (1 / (1 + 100 * (x[:, None] - x[None, :]).abs())).float()


def eligible_matrices(path: pathlib.Path) -> list[torch.Tensor]:
    """The matrices `compress` would compress with default options that are large enough for
    the fast analysis (smaller ones take the full analysis either way)."""
    out = []
    for entry in open_checkpoint(path).entries:
        if classify(entry, Selection()) is None:
            matrix = as_matrix(entry.load())
            if matrix.numel() >= candidates.FAST_MIN_ENTRIES:
                out.append(matrix)
    return out


def stored_bytes(matrices: list[torch.Tensor], tol: float, full: bool) -> int:
    options = CompressionOptions(tol=tol)
    return sum(compress_matrix(m, options, full_analysis=full).hmatrix.nbytes for m in matrices)


def checkpoints() -> list[pathlib.Path]:
    shared = sorted(p for p in SHARED.glob("*/*") if p.suffix in SUFFIXES) if SHARED.is_dir() else []
    return shared + sorted((ROOT / "sample_models").glob("*/*.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("path", checkpoints(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fast_analysis_stores_at_most_one_percent_more_on_real_checkpoints(path):
    matrices = eligible_matrices(path)
    if not matrices:
        pytest.skip("no matrix large enough for the fast analysis")
    fast, full = stored_bytes(matrices, 1e-2, False), stored_bytes(matrices, 1e-2, True)
    assert fast <= GROWTH * full, (fast, full)


@pytest.mark.parametrize("precision", ["auto", "keep"])
@pytest.mark.parametrize("side", [256, pytest.param(1024, marks=pytest.mark.slow)])
def test_fast_analysis_on_smooth_kernels(side, precision):
    """Low rank wins on most of a smooth kernel: its SVDs are kept and the bytes stay."""
    w = smooth_kernel(side)
    options = CompressionOptions(tol=1e-2, precision=precision)
    fast = compress_matrix(w, options).hmatrix.nbytes
    full = compress_matrix(w, options, full_analysis=True).hmatrix.nbytes
    assert fast <= GROWTH * full


def test_trained_like_matrix_skips_every_svd_and_keeps_its_bound(monkeypatch):
    """On a trained-like spectrum (noise bulk and a few spikes) no block is decomposed, row codecs
    are tried at a few widths only, the bytes are those of the full analysis within 1%, and the
    measured error holds for both decoded forms (independent decoder)."""
    w = trained(3, 512, 384)
    decomposed = []
    original = candidates._spectrum_and_errors
    monkeypatch.setattr(candidates, "_spectrum_and_errors",
                        lambda blocks, *a: decomposed.append(len(blocks)) or original(blocks, *a))
    result = compress_matrix(w, CompressionOptions(tol=1e-2))
    assert decomposed == [] and result.root_sigma is None
    monkeypatch.setattr(candidates, "_spectrum_and_errors", original)
    full = compress_matrix(w, CompressionOptions(tol=1e-2), full_analysis=True)
    assert result.hmatrix.nbytes <= GROWTH * full.hmatrix.nbytes
    decoded = reference_decoded(result.hmatrix)
    exact = w.double().numpy()
    for form in (decoded.h64, decoded.loaded_matrix):
        assert float(np.linalg.norm(exact - form)) <= result.error <= result.budget


def test_hopeless_verdicts_follow_the_spectrum():
    """Noise is hopeless for low rank, a rank-4 block is not, whichever test decides (the sketch
    for large blocks, the Gram matrix's eigenvalues or its exact fourth moment for small ones)."""
    gen = torch.Generator().manual_seed(0)
    for side, count in ((256, 2), (48, 4), (32, 2000)):
        noise = torch.randn(count, side, side, generator=gen)
        low = torch.randn(count, side, 4, generator=gen) @ torch.randn(count, 4, side, generator=gen)
        allowance = 1e-4 * float(noise[0].square().sum())
        assert candidates.lowrank_hopeless(noise, allowance).all()
        assert not candidates.lowrank_hopeless(low, allowance).any()


def test_bounds_beyond_the_exact_side_hold_without_decomposing():
    """Past `SPECTRAL_EXACT_MAX_SIDE` the spectral figures are cheap rigorous bounds: ‖W − H‖₂ by
    the Frobenius error, σ_max(W) by min(‖W‖_F, sqrt(‖W‖₁‖W‖∞)), σ_min(W) by 0, no κ."""
    w = trained(5, SPECTRAL_EXACT_MAX_SIDE + 76, 96)
    result = compress_matrix(w, CompressionOptions(tol=1e-2))
    bounds = compute_bounds(w, result.dense, result.error, result.root_sigma)
    sigma = torch.linalg.svdvals(w.double())
    assert bounds.spectral_method == "frobenius" and bounds.spectral_error == result.error
    assert float(sigma[0]) <= bounds.sigma_max_upper <= float(torch.linalg.matrix_norm(w.double())) * (1 + 1e-9)
    assert bounds.sigma_min_lower == 0.0 and bounds.kappa_h_bound is None and bounds.kappa_w is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sources(dtype):
    """bfloat16 and float16 matrices take the fast analysis (in float32) within their bound."""
    w = trained(7, 384, 256).to(dtype)
    result = compress_matrix(w, CompressionOptions(tol=1e-2))
    assert result.hmatrix.dtype == dtype
    decoded = reference_decoded(result.hmatrix)
    exact = w.double().numpy()
    assert float(np.linalg.norm(exact - decoded.loaded_matrix)) <= result.budget


def test_throughput_in_the_json_and_the_progress_line(tmp_path, cli):
    """`compress --json` reports the source bytes of the matrices, the seconds and their ratio in
    MB/s; the progress lines (not a terminal) show the running rate."""
    source = random_checkpoint(tmp_path / "model.safetensors", 2, 96)
    run = cli("compress", source, "--json")
    assert run.code == 0, run.stderr
    throughput = json.loads(run.stdout)["results"][0]["throughput"]
    assert throughput["matrix_bytes"] == 2 * 96 * 96 * 4 and throughput["seconds"] > 0
    assert throughput["mb_per_s"] == pytest.approx(throughput["matrix_bytes"] / throughput["seconds"] / 1e6, rel=1e-2)
    assert "MB/s" in run.stderr.splitlines()[-1]
