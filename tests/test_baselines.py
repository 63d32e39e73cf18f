"""Baselines: each bounded method reaches its tolerance (re-measured here) with the fewest bytes of
its kind; byte counts are exact; fixed bit widths say when they miss; budgets are respected."""
from __future__ import annotations

import doctest
import math

import pytest
import torch

from hmcompress.compare import baselines
from hmcompress.compare.baselines import GroupQuantization, MagnitudePruning, TruncatedSVD, index_bytes, registry
from hmcompress.errors import OptionError

M, N = 72, 56
TOLS = (1e-1, 1e-2, 1e-3)


def weights(m: int = M, n: int = N, seed: int = 0) -> torch.Tensor:
    """A weight-like float32 matrix: decaying spectrum plus noise."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    k = min(m, n)
    return ((u[:, :k] * torch.logspace(0, -3, k, dtype=torch.float64)) @ v[:, :k].T).float()


def error(w: torch.Tensor, stored: torch.Tensor) -> float:
    """||W - Ŵ||_F in float64, for Ŵ as stored and rounded to W's dtype (the larger)."""
    exact = w.double()
    return max(float((exact - stored).norm()), float((exact - stored.to(w.dtype).double()).norm()))


def svd_stored(w: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).float().double() @ vh[:rank].float().double()


def pruned(w: torch.Tensor, kept: int) -> torch.Tensor:
    flat = w.double().reshape(-1)
    order = torch.argsort(flat.abs(), descending=True, stable=True)[:kept]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(w.shape)


def test_doctests_hold():
    assert doctest.testmod(baselines).failed == 0


@pytest.mark.parametrize("tol", TOLS)
def test_svd_reaches_the_tolerance_with_the_smallest_rank(tol):
    w = weights()
    limit = tol * float(w.double().norm())
    out = TruncatedSVD()(w).at_tol(tol)
    rank = int(out.detail.removeprefix("rank "))
    assert out.nbytes == rank * (M + N) * 4
    assert out.error == pytest.approx(error(w, svd_stored(w, rank)), rel=1e-12, abs=1e-15)
    assert out.within(tol) and error(w, svd_stored(w, rank)) <= limit
    assert error(w, svd_stored(w, rank - 1)) > limit


def test_svd_at_a_budget_keeps_the_largest_rank_that_fits():
    w = weights()
    fit = TruncatedSVD()(w)
    out = fit.at_bytes(10 * (M + N) * 4 + 3)
    assert out.detail == "rank 10" and out.nbytes == 10 * (M + N) * 4
    assert fit.at_bytes(5).detail == "rank 0" and fit.at_bytes(5).rel_error == pytest.approx(1.0)


def test_svd_says_when_rounding_to_the_dtype_alone_misses_the_tolerance():
    out = TruncatedSVD()(weights()).at_tol(1e-9)  # below float32 rounding
    assert not out.within(1e-9) and out.detail == f"rank {min(M, N)}"


@pytest.mark.parametrize("tol", TOLS)
def test_pruning_keeps_the_fewest_entries_and_counts_its_index(tol):
    w = weights()
    limit = tol * float(w.double().norm())
    out = MagnitudePruning()(w).at_tol(tol)
    kept = int(out.detail.split()[0])
    assert error(w, pruned(w, kept)) <= limit < error(w, pruned(w, kept - 1))
    assert out.error == pytest.approx(error(w, pruned(w, kept)), rel=1e-12)
    csr, bitmap = (M + 1) * 4 + kept * 1, math.ceil(M * N / 8)
    assert out.nbytes == kept * 4 + min(csr, bitmap)
    assert out.detail.endswith("csr" if csr <= bitmap else "bitmap")


def test_pruning_a_sparse_matrix_counts_csr():
    w = torch.zeros(300, 70)
    w[torch.arange(0, 300, 7), torch.arange(0, 300, 7) % 70] = torch.linspace(1, 2, 43)
    out = MagnitudePruning()(w).at_tol(1e-6)
    assert out.error == 0 and out.detail.startswith("43 kept") and out.detail.endswith("csr")
    assert out.nbytes == 43 * 4 + 301 * 4 + 43 * 1
    assert MagnitudePruning()(w).at_bytes(301 * 4 + 5 * 5 - 1).detail.startswith("4 kept")
    assert MagnitudePruning()(w).at_bytes(10) is None  # not even the row pointers fit


def test_index_bytes_is_the_narrowest_unsigned_integer():
    assert [index_bytes(n) for n in (1, 256, 257, 65536, 65537)] == [1, 1, 2, 2, 4]


def test_int8_per_row_bytes_and_error():
    w = weights()
    out = registry()["int8-row"](w).at_tol(1e-2)
    assert out.nbytes == M * N + 4 * M
    scale = (w.double().abs().amax(1, keepdim=True) / 127).float().double()
    stored = torch.round(w.double() / scale).clamp(-127, 127) * scale
    assert out.error == pytest.approx(error(w, stored), rel=1e-12)
    assert out.within(1e-1) and not out.within(1e-4)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_per_group_bytes_and_error(group):
    w = weights()
    method = registry()[f"int4-g{group}"]
    out = method(w).at_tol(1e-2)
    groups = math.ceil(N / group)
    assert out.nbytes == M * math.ceil(N / 2) + M * groups * 2
    padded = torch.nn.functional.pad(w.double(), (0, groups * group - N)).reshape(M, groups, group)
    scale = (padded.abs().amax(-1, keepdim=True) / 7).half().double()
    stored = (torch.round(padded / scale).clamp(-7, 7) * scale).reshape(M, -1)[:, :N]
    assert out.error == pytest.approx(error(w, stored), rel=1e-12)
    assert not out.within(1e-3)  # four bits cannot aim at a tolerance: it is said, not hidden


def test_quantizers_of_exactly_representable_rows_have_no_error():
    w = (torch.arange(-127.0, 128.0) / 128).reshape(1, -1).repeat(3, 1)
    out = GroupQuantization("int8", 8, 0, torch.float32)(w).at_tol(1e-6)
    assert out.error == 0 and out.within(1e-6)


def test_fixed_width_at_a_budget_fits_or_says_it_does_not():
    fit = registry()["int8-row"](weights())
    size = M * N + 4 * M
    assert fit.at_bytes(size).nbytes == size and fit.at_bytes(size - 1) is None


@pytest.mark.parametrize("name", ["hm-auto", "hm-keep", "paper"])
def test_hmatrix_methods_reach_the_tolerance_and_count_every_tensor(name):
    w = weights()
    fit = registry(leaf=16)[name](w)
    for tol in (1e-1, 1e-2):
        out = fit.at_tol(tol)
        assert out.nbytes == out.hmatrix.nbytes
        assert error(w, out.hmatrix.to_dense(torch.float64)) <= tol * float(w.double().norm())
        assert out.within(tol)


def test_every_method_at_a_budget_fits_it():
    w = weights()
    methods = registry(leaf=16)
    budget = methods["hm-auto"](w).at_tol(1e-2).nbytes
    for name, method in methods.items():
        out = method(w).at_bytes(budget)
        assert out is None or out.nbytes <= budget, name
    out = methods["hm-keep"](w).at_bytes(budget)
    assert out is not None and out.error > 0


def test_select_names_methods_and_always_keeps_the_reference():
    assert list(baselines.select("svd, prune")) == ["hm-auto", "svd", "prune"]
    assert list(baselines.select(None)) == list(registry())
    with pytest.raises(OptionError, match="unknown nope"):
        baselines.select("svd,nope")


# ------------------------------------------------------------------------------------------------
# In the norm of a layer's calibration inputs (compare --activations)


def anisotropic_gram(n: int = N, samples: int = 2000, seed: int = 1) -> torch.Tensor:
    """G = X Xᵀ / N of inputs whose scales fall over three decades, correlated (as trained layers' inputs are)."""
    gen = torch.Generator().manual_seed(seed)
    mix, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    x = mix @ (torch.logspace(0, -3, n, dtype=torch.float64)[:, None]
               * torch.randn(n, samples, generator=gen, dtype=torch.float64))
    return x @ x.T / samples


def output_error(w: torch.Tensor, stored: torch.Tensor, gram: torch.Tensor) -> float:
    """sqrt(tr(E G Eᵀ)) in float64 for Ŵ as stored and rounded to W's dtype (the larger)."""
    def one(s: torch.Tensor) -> float:
        e = w.double() - s.double()
        return math.sqrt(max(float(torch.trace(e @ gram @ e.T)), 0.0))
    return max(one(stored), one(stored.to(w.dtype)))


@pytest.fixture(scope="module")
def inputs() -> baselines.InputsNorm:
    return baselines.InputsNorm(baselines.InputWeights(anisotropic_gram(), 2000))


def test_errors_in_the_inputs_norm_are_the_output_errors(inputs):
    w = weights()
    out = registry()["int8-row"](w, inputs).at_tol(1e-2)
    plain = registry()["int8-row"](w).at_tol(1e-2)
    assert out.nbytes == plain.nbytes and out.detail == plain.detail
    assert out.error == pytest.approx(output_error(w, out.stored, inputs.weights.gram), rel=1e-6)  # an upper bound
    assert out.norm == pytest.approx(math.sqrt(float(torch.trace(w.double() @ inputs.weights.gram @ w.double().T))),
                                     rel=1e-9)


@pytest.mark.parametrize("tol", TOLS)
def test_svd_llm_error_is_its_whitened_tail_and_its_rank_the_smallest(inputs, tol):
    w = weights().double()  # float64 factors: no rounding, so the tail is the error
    gram = inputs.weights.gram
    fit = registry(data_aware=True)["svd-llm"](w, inputs)
    out = fit.at_tol(tol)
    rank = int(out.detail.removeprefix("rank "))
    assert out.nbytes == rank * (M + N) * 8 and out.within(tol)
    assert out.error == pytest.approx(float(fit.tails[rank]), rel=1e-6, abs=1e-12 * out.norm)
    assert output_error(w, fit.stored(rank), gram) == pytest.approx(out.error, rel=1e-6)
    assert output_error(w, fit.stored(rank - 1), gram) > tol * out.norm
    # whitening needs no more rank than the plain SVD measured in the same norm
    plain = TruncatedSVD()(w, inputs).at_tol(tol)
    assert rank <= int(plain.detail.removeprefix("rank ")) and plain.within(tol)


def test_svd_llm_without_g_is_the_plain_svd():
    w = weights()
    assert baselines.WhitenedSVD()(w).at_tol(1e-2).detail == TruncatedSVD()(w).at_tol(1e-2).detail


@pytest.mark.parametrize(("name", "bits", "plain"), [("gptq-int8", 8, None), ("gptq-int4", 4, "int4-g128")])
def test_gptq_beats_round_to_nearest_in_the_inputs_norm(name, bits, plain):
    w = weights(m=40, n=300)
    gram = anisotropic_gram(300, 3000, 2)
    norm = baselines.InputsNorm(baselines.InputWeights(gram, 3000))
    rtn = registry()[plain] if plain else GroupQuantization("int8-g128", 8, 128, torch.float16)
    gptq = registry(data_aware=True)[name](w, norm).at_tol(1e-2)
    nearest = rtn(w, norm).at_tol(1e-2)
    assert gptq.nbytes == nearest.nbytes == 40 * math.ceil(300 * bits / 8) + 40 * 3 * 2
    assert gptq.error == pytest.approx(output_error(w, gptq.stored, gram), rel=1e-6)
    assert gptq.error < 0.8 * nearest.error  # error feedback: well below round-to-nearest at the same codes
    # every value is a code times its group's float16 scale
    scale = (torch.nn.functional.pad(w.double(), (0, 84)).reshape(40, 3, 128).abs().amax(-1) / ((1 << bits - 1) - 1))
    column_scale = scale.half().double()[:, torch.arange(300) // 128]
    codes = gptq.stored.double() / column_scale
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= (1 << bits - 1) - 1
    # without G it is round-to-nearest
    assert registry(data_aware=True)[name](w).at_tol(1e-2).error == rtn(w).at_tol(1e-2).error


@pytest.mark.parametrize("tol", (1e-1, 1e-2))
def test_hm_aware_is_within_the_output_tolerance(inputs, tol):
    w = weights()
    fit = registry(leaf=16, data_aware=True)["hm-aware"](w, inputs)
    out = fit.at_tol(tol)
    assert out.within(tol) and out.nbytes == out.hmatrix.nbytes
    measured = output_error(w, out.hmatrix.to_dense(torch.float64), inputs.weights.gram)
    assert measured <= out.error * (1 + 1e-9) and out.error <= tol * out.norm
    budget = registry(leaf=16)["hm-auto"](w).at_tol(tol).nbytes
    fits = fit.at_bytes(budget)
    assert fits is not None and fits.nbytes <= budget


def test_pruning_in_the_inputs_norm_is_within(inputs):
    w = weights()
    out = MagnitudePruning()(w, inputs).at_tol(1e-1)
    assert out.within(1e-1)
    assert output_error(w, out.stored, inputs.weights.gram) <= out.error * (1 + 1e-9)


def test_data_aware_methods_need_activations():
    assert not set(baselines.DATA_AWARE) & set(registry())
    with pytest.raises(OptionError, match="svd-llm, gptq-int4 need --activations"):
        baselines.select("svd,svd-llm,gptq-int4")
    with pytest.raises(OptionError, match="hm-aware needs --activations"):
        baselines.select("hm-aware")
    assert list(baselines.select("svd", data_aware=True)) == ["hm-auto", "hm-aware", "svd"]
    assert set(baselines.DATA_AWARE) <= set(baselines.select(None, data_aware=True))
