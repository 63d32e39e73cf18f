"""Rounding for the model's output (`--model-tol`): K, the second moment of what a layer's
outputs send back (`evaluate.output_grams`), and rows rounded for tr(K E G Eᵀ)
(`feedback.two_sided_round`), with the layer's guarantee on G unchanged."""
from __future__ import annotations

import dataclasses
import math

import budget_model
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from test_build import KINDS, structured
from test_weighted import G_KINDS, second_moment
from torch import nn

from hmcompress import runtime
from hmcompress.api import compress_checkpoint
from hmcompress.calibrate import calibrate_checkpoint
from hmcompress.core.build import CompressionOptions, InputsBuilder, compress_matrix, storage_codecs
from hmcompress.core.uniform import two_sided_steps, uniform_values
from hmcompress.core.weighted import ColumnMetric, InputWeights, Whitening
from hmcompress.errors import OptionError, UserError
from hmcompress.evaluate.output_grams import collect_output_grams
from hmcompress.io.activations import ActivationStats
from hmcompress.io.pipeline import result_key
from hmcompress.runtime.matrix import round_to_dtype

K_KINDS = ["isotropic", "anisotropic", "rank_deficient", "ill_conditioned"]


def output_moment(kind: str, m: int, seed: int) -> torch.Tensor:
    """A K of a given character (float64, m x m): built like G (`second_moment`)."""
    return second_moment(kind, m, seed + 7)


def two_sided_energy(error: torch.Tensor, gram: torch.Tensor, output_gram: torch.Tensor) -> float:
    return float(((output_gram @ error @ gram) * error).sum())


def test_rows_rounded_for_the_output_lose_less_in_its_norm_on_the_same_grid():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen, dtype=torch.float64)
    gram = second_moment("anisotropic", 64, 1)
    mixing = torch.randn(12, 96, generator=gen, dtype=torch.float64)  # a downstream layer with few outputs
    output_gram = mixing.T @ mixing + 1e-3 * torch.eye(96, dtype=torch.float64)
    weights = InputWeights(gram, 400, output_gram)
    feedback = Whitening(weights).factors(0, 64)[1]
    step = float(w.abs().max()) / 40
    one = uniform_values(w, step, ("i8",), feedback, digits=True)
    row_feedback = weights.output_feedback()
    two = uniform_values(w, step, ("i8",), feedback, digits=True, row_feedback=row_feedback)
    steps, limit = two_sided_steps(w, step, row_feedback)
    assert limit == 127 and len(torch.unique(steps)) > 1  # rows have steps of their own here
    codes = torch.round(two / steps.unsqueeze(1))
    assert torch.equal(two, codes * steps.unsqueeze(1)) and float(codes.abs().max()) <= limit  # on their grids
    # At about the same codes' entropy (each step's rows coded with a table of their own), far less
    # loss in the model's norm:
    rate = sum(entropy(codes[steps == s]) * float((steps == s).double().mean()) for s in torch.unique(steps))
    assert rate < entropy(torch.round(one / float(torch.tensor(step, dtype=torch.float32)))) + 0.1
    assert two_sided_energy(w - two, gram, output_gram) < 0.25 * two_sided_energy(w - one, gram, output_gram)


def entropy(codes: torch.Tensor) -> float:
    """Bits a code of the codes' empirical distribution."""
    share = torch.unique(codes, return_counts=True)[1].double() / codes.numel()
    return float(-(share * share.log2()).sum())


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from([k for k in KINDS if k != "scaled"]), g_kind=st.sampled_from(G_KINDS),
       k_kind=st.sampled_from(K_KINDS), m=st.integers(1, 70), n=st.integers(1, 70),
       tol=st.sampled_from([0.0, 1e-3, 1e-2, 0.1, 0.5]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]), seed=st.integers(0, 2**16))
def test_rounding_for_the_output_keeps_the_guarantee_on_the_inputs(kind, g_kind, k_kind, m, n, tol, dtype, seed):
    matrix = structured(kind, m, n, 3, seed).to(dtype)
    gram = second_moment(g_kind, n, seed)
    weights = InputWeights(gram, 100, output_moment(k_kind, m, seed))
    result = compress_matrix(matrix, CompressionOptions(tol=tol), weights=weights)
    figures = result.activation
    w = matrix.double()
    for form in (result.dense, round_to_dtype(result.dense, dtype).double()):  # H64, and H as loaded
        error = w - form
        assert math.sqrt(max(float(((error @ gram) * error).sum()), 0.0)) <= figures.error * (1 + 1e-9) + 1e-300
    assert figures.error <= figures.budget
    assert figures.budget <= tol * math.sqrt(max(float(((w @ gram) * w).sum()), 0.0)) * (1 + 1e-9)
    assert result.dense.equal(result.hmatrix.to_dense(torch.float64))


def test_a_result_key_tells_the_output_gram():
    w = torch.randn(8, 6)
    gram = second_moment("isotropic", 6, 0)
    plain = InputWeights(gram, 10)
    keys = {result_key(w, CompressionOptions(), weights) for weights in
            (plain, InputWeights(gram, 10, torch.eye(8, dtype=torch.float64)),
             InputWeights(gram, 10, 2 * torch.eye(8, dtype=torch.float64)))}
    assert len(keys) == 3


class Downstream(nn.Module):
    """A linear layer, then a fixed map A of it, and a conv beside: K of the layer is AᵀA."""

    def __init__(self, mixing: torch.Tensor) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 5)
        self.mix = nn.Linear(5, 3, bias=False)
        self.conv = nn.Conv1d(2, 4, 3)
        self.unused = nn.Linear(6, 6)
        with torch.no_grad():
            self.mix.weight.copy_(mixing)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        signal = x[:, :4].reshape(-1, 2, 2).repeat(1, 1, 2)
        return self.mix(self.layer(x)), 3.0 * self.conv(signal)


def test_output_grams_are_the_second_moment_of_what_the_output_sends_back():
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(3, 5, generator=gen)
    model = Downstream(mixing)
    for p in model.parameters():
        p.requires_grad_(False)
    batches = [torch.randn(2000, 6, generator=gen) for _ in range(3)]
    names = {"layer.weight", "mix.weight", "conv.weight", "unused.weight"}
    grams = collect_output_grams(model, batches, "test data", names)
    assert set(grams) == {"layer.weight", "mix.weight", "conv.weight"}  # no gradient reaches `unused`
    expected = (mixing.T @ mixing).double()
    assert torch.allclose(grams["layer.weight"], expected, atol=0.05 * float(expected.abs().max()))
    assert torch.allclose(grams["mix.weight"], torch.eye(3, dtype=torch.float64), atol=0.05)
    assert torch.allclose(grams["conv.weight"], 9 * torch.eye(4, dtype=torch.float64), atol=0.5)  # by channel
    assert not any(p.requires_grad for p in model.parameters())  # put back
    again = collect_output_grams(model, batches, "test data", names)
    assert all(torch.equal(grams[k], again[k]) for k in grams)  # the same probes: the same K


@pytest.mark.slow
def test_the_output_grams_file_reaches_the_builds_and_only_its_layers(tmp_path):
    path, stats = tmp_path / "model.safetensors", tmp_path / "stats.safetensors"
    save_file({k: v.contiguous() for k, v in budget_model.reference().state_dict().items()}, str(path))
    calibrate_checkpoint("budget_model:build", path, stats)
    model = budget_model.reference().eval()
    grams = collect_output_grams(model, budget_model.calibration_batches(), "test data", {"2.weight", "4.weight"})
    grams_file = tmp_path / "grams.safetensors"
    save_file({"2.weight": grams["2.weight"]}, str(grams_file))
    options = CompressionOptions(tol=0.02)
    built = {}
    for label, extra in (("plain", {}), ("rounded", {"output_grams": grams_file})):
        out = tmp_path / f"{label}.hm.safetensors"
        compress_checkpoint(path, out, options, activations=stats, workers=2, **extra)
        built[label] = runtime.read_file(out).matrices
    weights = ActivationStats.open(stats).weights("2.weight")
    expected = InputsBuilder(model.state_dict()["2.weight"], options, dataclasses.replace(
        weights, output_gram=grams["2.weight"]), storage_codecs(model.state_dict()["2.weight"], options)).build(0.02)
    assert torch.equal(built["rounded"]["2.weight"].to_dense(torch.float64), expected.dense)
    assert not torch.equal(built["plain"]["2.weight"].to_dense(torch.float64), expected.dense)
    assert torch.equal(built["rounded"]["4.weight"].to_dense(torch.float64),
                       built["plain"]["4.weight"].to_dense(torch.float64))  # no K for it in the file


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(_ctx, x):
        return x.clone()

    @staticmethod
    def backward(_ctx, _grad):
        raise RuntimeError("this op has no\nbackward")


class Opaque(nn.Module):
    """A model whose output cannot be differentiated, and one whose output carries no gradient."""

    def __init__(self, detached: bool) -> None:
        super().__init__()
        self.layer, self.detached = nn.Linear(4, 4), detached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        return out.detach() if self.detached else _NoBackward.apply(out)


def test_a_model_without_gradients_gives_no_output_grams_or_one_line():
    batches = [torch.randn(8, 4)]
    assert collect_output_grams(Opaque(detached=True), batches, "data", {"layer.weight"}) == {}
    with pytest.raises(UserError) as err:
        collect_output_grams(Opaque(detached=False), batches, "data", {"layer.weight"})
    assert "could not be differentiated" in str(err.value) and "\n" not in str(err.value)


class Lookup(nn.Module):
    """An embedding table, then a fixed map A: M of the table is proportional to AᵀA."""

    def __init__(self, mixing: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Embedding(10, 5)
        self.mix = nn.Linear(5, 3, bias=False)
        with torch.no_grad():
            self.mix.weight.copy_(mixing)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mix(self.table(tokens))


def test_a_tables_column_metric_is_what_its_rows_errors_do_downstream():
    gen = torch.Generator().manual_seed(1)
    mixing = torch.randn(3, 5, generator=gen)
    # A row's gradient sums its lookups in a batch: one sample of M a row, batch and probe.
    batches = [torch.randint(0, 10, (4, 8), generator=gen) for _ in range(400)]
    metric = collect_output_grams(Lookup(mixing), batches, "data", set(), {"table.weight"})["table.weight"]
    expected = (mixing.T @ mixing).double()
    assert torch.allclose(metric / metric.trace(), expected / expected.trace(), atol=0.03)


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from([k for k in KINDS if k != "scaled"]), m_kind=st.sampled_from(K_KINDS),
       m=st.integers(1, 70), n=st.integers(1, 70), tol=st.sampled_from([0.0, 1e-3, 1e-2, 0.1, 0.5]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]), seed=st.integers(0, 2**16))
def test_rounding_rows_for_a_column_metric_keeps_the_plain_guarantee(kind, m_kind, m, n, tol, dtype, seed):
    matrix = structured(kind, m, n, 3, seed).to(dtype)
    result = compress_matrix(matrix, CompressionOptions(tol=tol), weights=ColumnMetric(output_moment(m_kind, n, seed)))
    w = matrix.double()
    for form in (result.dense, round_to_dtype(result.dense, dtype).double()):  # H64, and H as loaded
        assert float(torch.linalg.vector_norm(w - form)) <= result.error * (1 + 1e-9) + 1e-300
    assert result.error <= result.budget <= tol * float(torch.linalg.vector_norm(w)) * (1 + 1e-9) + 1e-300
    assert result.dense.equal(result.hmatrix.to_dense(torch.float64))


def test_rows_rounded_for_a_column_metric_lose_less_in_it_for_their_bytes():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(128, 64, generator=gen) * 0.02
    metric = second_moment("anisotropic", 64, 3)
    plain = compress_matrix(w, CompressionOptions(tol=1e-2))
    rounded = compress_matrix(w, CompressionOptions(tol=1e-2), weights=ColumnMetric(metric))
    assert rounded.strategy == "uniform"

    def loss(result) -> float:
        error = w.double() - result.dense
        return float(((error @ metric) * error).sum())
    def bits(result) -> float:
        return 8 * result.hmatrix.nbytes / w.numel()
    # A bit a number more buys a quarter of the loss (the uniform quantizer's exchange rate):
    assert loss(rounded) * 4 ** bits(rounded) < 0.5 * loss(plain) * 4 ** bits(plain)
    assert result_key(w, CompressionOptions(), ColumnMetric(metric)) != result_key(w, CompressionOptions())


def test_a_builder_for_the_output_shares_the_analysis_and_builds_the_same():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(48, 40, generator=gen) * 0.1
    gram, output_gram = second_moment("anisotropic", 40, 5), output_moment("anisotropic", 48, 6)
    options = CompressionOptions()
    shared = InputsBuilder(w, options, InputWeights(gram, 100), storage_codecs(w, options), smallest_tol=1e-3)
    twin = shared.for_output(output_gram)
    fresh = InputsBuilder(w, options, InputWeights(gram, 100, output_gram), storage_codecs(w, options),
                          smallest_tol=1e-3)
    assert twin.cands is shared.cands
    for tol in (1e-3, 1e-2, 0.1):
        assert torch.equal(twin.build(tol).dense, fresh.build(tol).dense)
        assert shared.build(tol).dense.equal(compress_matrix(w, dataclasses.replace(options, tol=tol),
                                                             weights=InputWeights(gram, 100)).dense)
    with pytest.raises(OptionError):
        shared.for_output(torch.eye(3, dtype=torch.float64))


class WithExtras(nn.Module):
    """A model whose output carries a None and an integer tensor beside its logits."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple:
        out = self.layer(x)
        return out, None, out.argmax(-1)


def test_output_grams_skip_what_carries_no_gradient_in_an_output():
    grams = collect_output_grams(WithExtras(), [torch.randn(500, 4)], "data", {"layer.weight"})
    assert torch.allclose(grams["layer.weight"], torch.eye(3, dtype=torch.float64), atol=0.15)
