"""The numerical core: every guarantee, on random, structured and adversarial matrices."""
from __future__ import annotations

import measure
import numpy as np
import pytest
import torch
from helpers import bits, reference_decoded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hmcompress.core.bounds import compute_bounds
from hmcompress.core.build import CompressionOptions, assemble, compress_matrix
from hmcompress.core.candidates import analyse, build_tree
from hmcompress.core.plans import optimal_plan, paper_plan, svd_plan
from hmcompress.errors import OptionError
from hmcompress.io.writer import packed_tensors


def smooth_kernel(n: int, seed: int = 0) -> torch.Tensor:
    """1/(1+100|x_i-y_j|) on sorted random points: the textbook H-matrix case."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.sort(torch.rand(n, generator=gen))[0]
    y = torch.sort(torch.rand(n, generator=gen))[0]
    return (1 / (1 + 100 * (x[:, None] - y[None, :]).abs())).float()


def structured(kind: str, m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(m, n, generator=gen)
    if kind == "lowrank":
        return torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)
    if kind == "decay":
        u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen))
        v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen))
        s = torch.logspace(0, -6, min(m, n))
        return (u * s) @ v.T
    if kind == "zero":
        return torch.zeros(m, n)
    if kind == "spiky":  # a few huge entries in noise: adversarial for low rank and for int codes
        w = torch.randn(m, n, generator=gen) * 1e-3
        idx = torch.randint(0, m * n, (3,), generator=gen)
        w.view(-1)[idx] = 1e3
        return w
    if kind == "scaled":  # magnitudes far from 1
        return torch.randn(m, n, generator=gen) * 1e-20
    raise ValueError(kind)


KINDS = ["random", "lowrank", "decay", "zero", "spiky", "scaled"]


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), m=st.integers(1, 150), n=st.integers(1, 150),
       rank=st.integers(1, 8), tol=st.sampled_from([0.0, 1e-6, 1e-3, 1e-2, 0.1, 0.5, 2.0]),
       precision=st.sampled_from(["auto", "keep"]), strategy=st.sampled_from(["optimal", "paper"]),
       leaf=st.sampled_from([4, 8, 16, 32]), seed=st.integers(0, 2**16))
def test_measured_error_within_budget_and_stats_true(kind, m, n, rank, tol, precision, strategy, leaf, seed):
    w = structured(kind, m, n, rank, seed)
    options = CompressionOptions(tol=tol, precision=precision, strategy=strategy, leaf=leaf)
    result = compress_matrix(w, options)
    hm = result.hmatrix
    # what the runtime reconstructs is what the independent decoder does, bit for bit
    decoded = reference_decoded(hm)
    assert np.array_equal(bits(hm.to_dense(torch.float64)), decoded.h64.view(np.uint64))
    assert np.array_equal(bits(hm.to_dense()), decoded.bits)
    # both forms, measured exactly, are within the budget and the recorded error
    exact = w.double().numpy()
    for form in (decoded.h64, decoded.loaded_matrix):
        error2 = measure.sq_fro(exact, form)
        assert error2 <= measure.sq(result.budget) and error2 <= measure.sq(result.error)
    assert result.error <= result.budget
    # the budget is tol·||W||_F, never above it
    assert measure.sq(result.budget) <= measure.sq(tol) * measure.sq_fro(exact)
    assert result.budget == pytest.approx(tol * float(torch.linalg.matrix_norm(w.double())))
    # bytes as reported are the bytes of the tensors the file stores (coded pools coded)
    tensors = packed_tensors(hm, "").values()
    assert hm.nbytes == sum(t.numel() * t.element_size() for t in tensors)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["random", "decay", "lowrank", "spiky"]), m=st.integers(2, 40),
       n=st.integers(2, 40), tol=st.sampled_from([1e-4, 1e-3, 1e-2, 0.05, 0.2]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
       seed=st.integers(0, 999))
def test_kappa_bound_holds(kind, m, n, tol, dtype, seed):
    """Weyl and the κ(H) bound, for both forms a user gets (H64 and its rounding to the source
    dtype), measured independently; float32 and narrower sources take the float32 margins."""
    w = structured(kind, m, n, 3, seed).to(dtype)
    result = compress_matrix(w, CompressionOptions(tol=tol, leaf=4))
    bounds = compute_bounds(w, result.dense, result.error, result.root_sigma)
    decoded = reference_decoded(result.hmatrix)
    exact = w.double().numpy()
    spectrum_w = measure.spectrum(exact)
    assert spectrum_w.top_range[0] <= bounds.sigma_max_upper
    assert bounds.sigma_min_lower <= spectrum_w.sigma[-1] + spectrum_w.radius
    for form in (decoded.h64, decoded.loaded_matrix):
        assert measure.spectrum(exact, form).top_range[0] <= bounds.spectral_error
        spectrum_h = measure.spectrum(form)
        # Weyl: every singular value moves by at most e2
        moved = np.abs(spectrum_h.sigma - spectrum_w.sigma) - spectrum_h.radius - spectrum_w.radius
        assert moved.max() <= bounds.spectral_error
        if bounds.kappa_h_bound is not None:
            assert measure.kappa_range(spectrum_h)[0] <= bounds.kappa_h_bound


def test_kappa_bound_is_finite_for_well_conditioned_float32_and_float64():
    """The κ(H) bound is given (not "unbounded") where Weyl allows it, in both working precisions."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 48, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen, dtype=torch.float64))
    w = (u * torch.linspace(2, 1, 48, dtype=torch.float64)) @ v.T
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        source = w.to(dtype)
        result = compress_matrix(source, CompressionOptions(tol=1e-2))
        bounds = compute_bounds(source, result.dense, result.error, result.root_sigma)
        assert bounds.kappa_h_bound is not None and bounds.kappa_h_bound < 2.2, dtype
        spectrum_h = measure.spectrum(reference_decoded(result.hmatrix).loaded_matrix)
        assert measure.kappa_range(spectrum_h)[0] <= bounds.kappa_h_bound


def within_exactly(w: torch.Tensor, hm, bound: float) -> bool:
    """Both forms of ``hm`` (decoded independently) are within ``bound`` of ``w`` in exact ||.||_F."""
    decoded = reference_decoded(hm)
    exact = w.double().numpy()
    return all(measure.sq_fro(exact, form) <= measure.sq(bound) for form in (decoded.h64, decoded.loaded_matrix))


def test_abs_tolerance_is_absolute():
    w = structured("decay", 100, 80, 0, 1)
    result = compress_matrix(w, CompressionOptions(tol=1e-3, absolute=True))
    assert result.budget == 1e-3
    assert within_exactly(w, result.hmatrix, 1e-3)
    assert not within_exactly(w, result.hmatrix, 1e-4)  # the absolute budget is used, not wasted


@pytest.mark.slow
def test_smooth_kernel_compresses_far_better_than_one_svd():
    w = smooth_kernel(1024)
    result = compress_matrix(w, CompressionOptions(tol=1e-2, precision="keep"))
    dense_bytes = w.numel() * 4
    assert result.hmatrix.nbytes < 0.10 * dense_bytes
    c = analyse(w, build_tree(tuple(w.shape), 32), ("f32",))
    budget = result.budget**2
    assert svd_plan(c, budget).nbytes(c) > 0.5 * dense_bytes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tol", [1e-3, 1e-2, 1e-1])
def test_optimal_never_stores_more_than_svd_or_paper(kind, tol):
    w = structured(kind, 96, 160, 5, 7) if kind != "decay" else structured(kind, 128, 128, 0, 7)
    for precision in ("keep", "auto"):
        opt = compress_matrix(w, CompressionOptions(tol=tol, precision=precision))
        paper = compress_matrix(w, CompressionOptions(tol=tol, precision=precision, strategy="paper"))
        c = analyse(w, build_tree(tuple(w.shape), 32), ("f32",))
        svd_bytes = svd_plan(c, opt.budget**2).nbytes(c)
        assert opt.hmatrix.nbytes <= svd_bytes
        assert opt.hmatrix.nbytes <= paper.hmatrix.nbytes


@pytest.mark.parametrize("tol", [0.3, 0.4])
def test_the_optimal_planner_alone_matches_one_svd_across_the_lagrangian_gap(tol):
    """Trained weights, keep precision, a loose tolerance: the truncated SVD near the budget is not
    on the convex hull of (error, bytes) the Lagrangian sees (it jumps from an infeasible low rank
    to dense); the repair of the infeasible side must find it."""
    from safetensors.torch import load_file

    from sample_models.classifier import CHECKPOINT

    w = load_file(str(CHECKPOINT))["net.2.weight"]
    c = analyse(w, build_tree(tuple(w.shape), 32), ("f32",))
    budget = (tol * float(torch.linalg.matrix_norm(w.double()))) ** 2
    plan = optimal_plan(c, budget)
    assert plan.error(c) <= budget
    assert plan.nbytes(c) <= min(svd_plan(c, budget).nbytes(c), paper_plan(c, budget).nbytes(c))
    assert plan.nbytes(c) < 0.9 * c.dense_bytes[0, 0]


@pytest.mark.parametrize("codecs, agreement", [
    pytest.param(("f32",), 1e-4, id="keep"),
    pytest.param(("f32", "f16", "bf16", "i8", "i6", "i4"), 3e-2, id="auto", marks=pytest.mark.slow),  # ~4x keep
])
def test_planners_agree_with_their_estimates(codecs, agreement):
    """Each planner's estimate of the squared error is what the built matrix measures (exactly):
    within 1e-4 when only truncation and float32 rounding count, within 3% with integer codes,
    whose rounding errors the planner adds up as if independent."""
    w = smooth_kernel(256)
    c = analyse(w, build_tree(tuple(w.shape), 16), codecs)
    budget = (1e-2 * float(torch.linalg.matrix_norm(w.double()))) ** 2
    for plan in (optimal_plan(c, budget), paper_plan(c, budget), svd_plan(c, budget)):
        estimate = plan.error(c)
        assert estimate <= budget
        measured = measure.sq_fro(w.double().numpy(), assemble(w, c, plan).to_dense(torch.float64).numpy())
        assert abs(float(measured) / estimate - 1) <= agreement, plan.strategy


def test_auto_precision_beats_int8_on_trained_like_weights():
    gen = torch.Generator().manual_seed(0)
    # trained weights: a decaying spectrum plus noise
    u, _ = torch.linalg.qr(torch.randn(256, 256, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(256, 256, generator=gen))
    w = ((u * torch.linspace(1, 0.05, 256)) @ v.T).float()
    result = compress_matrix(w, CompressionOptions(tol=1e-2, precision="auto"))
    int8_bytes = w.numel() + 4 * w.shape[0]
    assert result.hmatrix.nbytes < int8_bytes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(dtype):
    w = structured("decay", 80, 70, 0, 3).to(dtype)
    result = compress_matrix(w, CompressionOptions(tol=1e-2))
    assert result.hmatrix.dtype == dtype
    assert result.hmatrix.to_dense().dtype == dtype
    assert within_exactly(w, result.hmatrix, 1e-2 * float(torch.linalg.matrix_norm(w.double())))


def test_zero_size_and_exact_cases():
    empty = compress_matrix(torch.zeros(0, 5), CompressionOptions())
    assert empty.hmatrix.blocks.shape == (0, 5) and empty.error == 0
    zero = compress_matrix(torch.zeros(64, 64), CompressionOptions(tol=0.0))
    assert zero.error == 0 and zero.hmatrix.nbytes < 64  # one empty block
    exact = compress_matrix(structured("random", 64, 64, 0, 0), CompressionOptions(tol=0.0))
    assert exact.error == 0


def test_deterministic():
    w = smooth_kernel(300)
    a = compress_matrix(w, CompressionOptions(tol=1e-3)).hmatrix
    b = compress_matrix(w, CompressionOptions(tol=1e-3)).hmatrix
    assert torch.equal(a.blocks, b.blocks) and torch.equal(a.segments, b.segments)
    for codec in a.pools:
        assert torch.equal(a.pools[codec], b.pools[codec])


@pytest.mark.parametrize("bad", [dict(tol=-1.0), dict(tol=float("nan")), dict(strategy="x"),
                                 dict(precision="x"), dict(leaf=0), dict(device="tpu"), dict(device="cuda:x")])
def test_bad_options_are_user_errors(bad):
    with pytest.raises(OptionError):
        CompressionOptions(**bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_a_clear_user_error():
    with pytest.raises(OptionError, match="device cuda: no CUDA device is available here"):
        CompressionOptions(device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_factorizations_on_the_gpu_meet_the_same_budget():
    w = smooth_kernel(256)
    for precision in ("keep", "auto"):
        result = compress_matrix(w, CompressionOptions(tol=1e-3, precision=precision, device="cuda"))
        assert result.error <= result.budget
        assert within_exactly(w, result.hmatrix, result.budget)


def test_tree_tiles_and_splits_oblong_blocks_along_long_side():
    tree = build_tree((1024, 40), 32)
    assert set(tree.cols.tolist()) == {40}
    for level in range(tree.depth):
        nodes = tree.nodes_of_level(level)
        assert int((tree.rows[nodes.start:nodes.stop] * tree.cols[nodes.start:nodes.stop]).sum()) == 1024 * 40
    assert np.all(tree.rows >= 32)
