"""The uniform quantizer (`core.uniform`, codec u8): its measured error never exceeds the budget,
in either norm, on random and adversarial matrices; it is what Gaussian-like matrices are stored
as, within a third of a bit of the rate-distortion limit; the independent decoder reads it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import reference_decoder
import torch
from helpers import reference_decoded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_weighted import G_KINDS, second_moment

from hmcompress.core.build import CompressionOptions, allowed_error, compress_matrix, error_bound, storage_codecs
from hmcompress.core.uniform import (
    LEVELS,
    LOW_CODEC,
    SHARED_CODEC,
    first_step,
    promised_bytes,
    row_groups,
    uniform_build,
    uniform_values,
)
from hmcompress.core.weighted import InputWeights, Whitening, activation_error_bound
from hmcompress.runtime import CODEC, CompactLinear, compact_layouts
from hmcompress.runtime.matrix import round_to_dtype


def values(kind: str, m: int, n: int, seed: int) -> torch.Tensor:
    """float64 matrices of the shapes of value distributions trained layers have, and worse."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if kind == "heavy_tailed":  # Student t with 3 degrees of freedom
        w = w / torch.sqrt(torch.distributions.Chi2(3.0).sample((m, n)).double() / 3 + 1e-3)
    elif kind == "outlier_rows":  # a few rows 1000 times larger: they need steps of their own
        w[:: max(1, m // 3)] *= 1e3
    elif kind == "outlier_entries":
        w.view(-1)[:: 97] *= 1e4
    elif kind == "zero_rows":
        w[1::2] = 0
    elif kind == "tiny":
        w *= 1e-30
    elif kind == "huge":  # beyond float32's range: no float32 step holds it
        w *= 1e300
    elif kind == "constant":
        w = torch.full((m, n), 3.0, dtype=torch.float64)
    return w


KINDS = ["gaussian", "heavy_tailed", "outlier_rows", "outlier_entries", "zero_rows", "tiny", "huge", "constant"]


def frobenius(a: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double()))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), m=st.integers(1, 70), n=st.integers(1, 70),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
       tol=st.sampled_from([0.3, 0.1, 3e-2, 1e-2, 3e-3, 1e-3]), seed=st.integers(0, 2**16))
def test_uniform_build_is_within_its_budget_as_decoded(kind, m, n, dtype, tol, seed):
    """Forced, whether or not it is the smaller build: the matrix as stored (and as rounded to the
    source dtype) is within the budget, u8 rows hold their values within 127 steps, and the
    independent decoder reads the file to the same bits."""
    w = values(kind, m, n, seed)
    if dtype != torch.float64 and kind == "huge":
        return
    w = w.to(dtype)
    allowed = allowed_error(w, CompressionOptions(tol=tol))
    codecs = storage_codecs(w, CompressionOptions())
    built = uniform_build(w, allowed, first_step(allowed, w.numel()), codecs,
                          lambda dense: error_bound(w, dense, dtype))
    if built is None:
        assert kind in ("huge", "tiny", "constant") or tol <= 3e-3 or not allowed > 0, (kind, tol)
        return
    hm, dense, error = built
    assert error <= allowed
    assert torch.equal(dense, hm.to_dense(torch.float64))
    for form in (dense, round_to_dtype(dense, dtype).double()):
        assert frobenius(w.double() - form) <= allowed
    segments = hm.segments.tolist()
    shared = [s for s in segments if s[2] == CODEC[SHARED_CODEC].id]
    assert all(s[5] == i for i, s in enumerate(shared)) and hm.scales.get(SHARED_CODEC, torch.zeros(0)).numel() <= 1
    decoded = reference_decoded(hm)
    assert np.array_equal(decoded.h64, dense.numpy())


@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed", "outlier_rows"])
def test_row_groups_share_the_step_where_it_holds_the_row(kind):
    w = values(kind, 40, 64, 0).float()
    step = first_step(1e-2 * frobenius(w), w.numel())
    groups = dict(row_groups(w, step, ("f32", "f16", "i8")))
    peak = w.abs().amax(dim=1)
    assert bool((peak[groups[SHARED_CODEC]] <= LEVELS * step * (1 + 1e-6)).all())
    others = torch.cat([rows for codec, rows in groups.items() if codec != SHARED_CODEC] or [torch.zeros(0, dtype=torch.long)])
    assert bool((peak[others] > LEVELS * step).all())
    assert sorted(torch.cat(list(groups.values())).tolist()) == list(range(40))
    if kind == "outlier_rows":
        assert others.numel() > 0


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["gaussian", "heavy_tailed", "outlier_rows", "zero_rows"]),
       g_kind=st.sampled_from(G_KINDS), m=st.integers(1, 60), n=st.integers(1, 60),
       tol=st.sampled_from([0.1, 3e-2, 1e-2, 3e-3]), seed=st.integers(0, 2**16))
def test_uniform_build_with_error_feedback_is_within_the_weighted_budget(kind, g_kind, m, n, tol, seed):
    """Rounded with error feedback for G (any G: rank-deficient, ill-conditioned, huge), the
    weighted error of the stored matrix is within tol·sqrt(tr(W G Wᵀ))."""
    w = values(kind, m, n, seed).float()
    gram = second_moment(g_kind, n, seed)
    energy = float(((w.double() @ gram) * w.double()).sum())
    allowed = tol * math.sqrt(max(energy, 0.0))
    feedback = Whitening(InputWeights(gram, 100)).factors(0, n)[1]
    built = uniform_build(w, allowed, first_step(allowed, m * float(gram.diagonal().sum())), ("f32", "f16", "i8"),
                          lambda dense: activation_error_bound(w, dense, gram), feedback)
    if built is None:
        return
    hm, dense, error = built
    e = w.double() - hm.to_dense(torch.float64)
    assert math.sqrt(max(float(((e @ gram) * e).sum()), 0.0)) <= error * (1 + 1e-9) + 1e-300
    assert error <= allowed


def test_gaussian_matrices_are_stored_uniform_near_the_rate_distortion_limit():
    """At 1e-2 a Gaussian matrix is stored as the uniform build, in fewer bytes than the planned
    build, within a third of a bit of R(D) = ½·log2(σ²/D) (the entropy-coded uniform quantizer's
    gap is 0.254 bit; the rest is the coded pools' tables and lane states)."""
    w = torch.randn(512, 384, generator=torch.Generator().manual_seed(0))
    options = CompressionOptions(tol=1e-2)
    chosen, planned = compress_matrix(w, options), compress_matrix(w, options, planned_only=True)
    assert chosen.strategy == "uniform" and planned.strategy == "optimal"
    assert chosen.hmatrix.nbytes < planned.hmatrix.nbytes
    relative = chosen.error / frobenius(w)
    limit = 0.5 * math.log2(1 / relative**2)
    bits = 8 * chosen.hmatrix.nbytes / w.numel()
    assert limit < bits <= limit + 1 / 3, (bits, limit)
    assert chosen.error <= chosen.budget and set(chosen.hmatrix.coded) <= {SHARED_CODEC, LOW_CODEC}


@pytest.mark.parametrize("tol", [3e-3, 1e-3, 1e-4])
def test_two_digit_codes_reach_below_int8s_reach(tol):
    """Below what 127 steps hold, the codes split into a u8 high digit and a u8lo low digit, two
    dense segments that add: still within 0.35 bit of R(D) where 8-bit rows need float16,
    and every reader (the compact layers, the tile product, the reference decoder) computes it."""
    w = torch.randn(512, 384, generator=torch.Generator().manual_seed(3))
    chosen = compress_matrix(w, CompressionOptions(tol=tol))
    hm = chosen.hmatrix
    assert chosen.strategy == "uniform" and set(hm.pools) == {SHARED_CODEC, LOW_CODEC}
    assert (hm.segments[:, 1] == 0).all() and hm.segments.shape[0] == 2  # two dense segments, one block
    bits = 8 * hm.nbytes / w.numel()
    limit = 0.5 * math.log2(1 / (chosen.error / frobenius(w)) ** 2)
    assert limit < bits <= limit + 0.35, (bits, limit)
    assert chosen.error <= chosen.budget
    weight = hm.to_dense(torch.float64)
    assert np.array_equal(reference_decoded(hm).h64, weight.numpy())
    x = torch.randn(5, 384)
    exact = x.double() @ weight.T
    for layout in compact_layouts(hm):
        with torch.no_grad():
            y = CompactLinear(hm, layout=layout)(x).double()
        assert torch.allclose(y, exact, rtol=0, atol=1e-4 * float(exact.abs().max())), layout


def test_data_aware_builds_use_it_too():
    w = torch.randn(128, 96, generator=torch.Generator().manual_seed(1))
    gram = second_moment("isotropic", 96, 1)
    result = compress_matrix(w, CompressionOptions(tol=1e-2), weights=InputWeights(gram, 100))
    assert result.strategy == "uniform"
    e = w.double() - result.dense
    assert math.sqrt(float(((e @ gram) * e).sum())) <= result.activation.error <= result.activation.budget


def test_trainable_layers_keep_the_planned_structure():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(2))
    assert compress_matrix(w, CompressionOptions(tol=1e-2), planned_only=True).strategy != "uniform"


def test_reference_decoder_refuses_u8_in_a_version_2_file(tmp_path):
    import corpus

    path = corpus.HOSTILE_COMPRESSED[[c.name for c in corpus.HOSTILE_COMPRESSED].index("u8_in_version_2")].make(tmp_path)
    with pytest.raises(reference_decoder.Invalid, match="are new in version 3"):
        reference_decoder.decode_file(path)


def test_a_layout_that_promises_more_than_the_plan_is_not_searched():
    """The codes' entropy at the first step prices a layout (within a few percent of what it
    stores); one that cannot beat the planned build costs one measurement, not a search."""
    w = torch.randn(256, 192, generator=torch.Generator().manual_seed(4))
    allowed = allowed_error(w, CompressionOptions(tol=1e-2))
    step = first_step(allowed, w.numel())
    calls = []

    def measure(dense: torch.Tensor) -> float:
        calls.append(1)
        return error_bound(w, dense, w.dtype)

    assert uniform_build(w, allowed, step, ("f32", "f16", "i8"), measure, smaller_than=1000) is None
    assert len(calls) <= 2  # one a layout
    calls.clear()
    hm, _dense, error = uniform_build(w, allowed, step, ("f32", "f16", "i8"), measure, smaller_than=10**9)
    assert len(calls) > 2 and error <= allowed
    values = uniform_values(w.float(), step, ("f32", "f16", "i8"))
    promised = promised_bytes(values, step, error_bound(w, values.double(), w.dtype), allowed)
    assert 0.9 * hm.nbytes < promised < 1.02 * hm.nbytes


def test_a_search_that_creeps_down_without_holding_still_finds_a_step():
    """One row of 21 Gaussian numbers at tol 0.3 (a case hypothesis found): at a step of about
    one level the error is far from proportional to the step, and the first eight tries crept
    down by about a percent each, all missing; the further tries shrink by `MISS_SHRINK`."""
    w = values("gaussian", 1, 21, 1215).to(torch.float32)
    allowed = allowed_error(w, CompressionOptions(tol=0.3))
    built = uniform_build(w, allowed, first_step(allowed, w.numel()), storage_codecs(w, CompressionOptions()),
                          lambda dense: error_bound(w, dense, torch.float32))
    assert built is not None and built[2] <= allowed
