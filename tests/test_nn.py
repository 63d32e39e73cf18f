"""Trainable H-matrix layers: products, gradients, packing, recompression, penalty, optimizer."""
from __future__ import annotations

import math

import measure
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hmcompress import runtime
from hmcompress.core.build import CompressionOptions
from hmcompress.train.layers import (
    TrainableHLinear,
    _LowRankLeaves,
    footprint,
    hlinear_layers,
    rank_penalty,
    rebuild_optimizer,
    recompress,
    replace_linears,
)


def structured(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A kernel matrix with a zero quadrant and two loud rows: low-rank, dense, rows and zero
    leaves at the tolerances used here."""
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(0, 1, m, dtype=torch.float64)[:, None]
    y = torch.linspace(0, 1.3, n, dtype=torch.float64)[None, :]
    w = 1.0 / (0.05 + (x - y).abs())
    w[: m // 2, n // 2:] = 0.0
    w[m // 2 + 3: m // 2 + 5] *= 50
    return (w + 1e-4 * torch.randn(m, n, generator=g, dtype=torch.float64)).float()


def layer_of(weight: torch.Tensor, tol: float, precision: str = "keep", dtype=torch.float32) -> TrainableHLinear:
    options = CompressionOptions(tol=tol, precision=precision, leaf=8)
    bias = torch.linspace(-1, 1, weight.shape[0])
    return TrainableHLinear.from_matrix(weight.to(dtype), bias.to(dtype), options)


def kinds(layer: TrainableHLinear) -> set[int]:
    return set(layer.to_hmatrix().segments[:, 1].tolist())


def test_layers_cover_every_leaf_kind() -> None:
    """The fixtures below exercise low-rank, dense, rows and zero leaves (not vacuous)."""
    keep, auto = layer_of(structured(64, 48), 1e-3), layer_of(structured(64, 48), 1e-3, "auto")
    assert kinds(keep) >= {runtime.LOWRANK, runtime.DENSE} and keep.empty
    assert runtime.ROWS in kinds(auto)


@pytest.mark.parametrize("precision", ["keep", "auto"])
@pytest.mark.parametrize("tol", [1e-1, 1e-2, 1e-3])
def test_from_matrix_is_within_tolerance(tol: float, precision: str) -> None:
    weight = structured(64, 48)
    layer = layer_of(weight, tol, precision)
    error = torch.linalg.matrix_norm(weight.double() - layer.to_dense(torch.float64))
    assert error <= tol * torch.linalg.matrix_norm(weight.double())
    assert layer.stored_numbers < weight.numel()
    assert all(p.dtype == torch.float32 for p in layer.parameters())


@pytest.mark.parametrize("precision", ["keep", "auto"])
def test_forward_is_x_times_dense_equivalent(precision: str) -> None:
    layer = layer_of(structured(64, 48), 1e-3, precision, torch.float64)
    x = torch.randn(3, 5, 48, dtype=torch.float64)
    expected = x @ layer.to_dense().T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert layer(x.float()).dtype == torch.float32  # inputs keep their dtype


@pytest.mark.parametrize("precision", ["keep", "auto"])
def test_gradients_match_autograd_on_the_dense_equivalent(precision: str) -> None:
    """d loss / d (x, every factor, dense leaf, bias) through the blocked product equals autograd
    through ``x @ to_dense()ᵀ + b`` (which differentiates the leaves' products in turn)."""
    layer = layer_of(structured(64, 48), 1e-3, precision, torch.float64)
    x = torch.randn(7, 48, dtype=torch.float64, requires_grad=True)
    target = torch.randn(7, 64, dtype=torch.float64)
    params = [x, *layer.parameters()]

    blocked = torch.autograd.grad((torch.tanh(layer(x)) - target).square().sum(), params)
    dense = torch.autograd.grad((torch.tanh(x @ layer.to_dense().T + layer.bias) - target).square().sum(), params)
    assert len(params) >= 4  # x, bias and factors of several leaf groups
    for got, expected in zip(blocked, dense):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_gradcheck_against_finite_differences() -> None:
    layer = layer_of(structured(16, 12), 1e-2, "keep", torch.float64)
    names = [name for name, _ in layer.named_parameters()]
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    values = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]

    def forward(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(forward, (x, *values))


@pytest.mark.parametrize("precision", ["keep", "auto"])
def test_to_hmatrix_packs_the_parameters_exactly(precision: str) -> None:
    torch.manual_seed(0)
    layer = layer_of(structured(64, 48), 1e-3, precision)
    with torch.no_grad():  # trained parameters, not the ones compress_matrix produced
        for p in layer.parameters():
            p.add_(0.01 * torch.randn_like(p))
    hm = layer.to_hmatrix()
    hm.validate("trained")
    assert hm.dtype == torch.float32 and set(hm.pools) == {"f32"}
    assert torch.equal(hm.to_dense(torch.float64), layer.to_dense(torch.float64).detach())
    inference = runtime.HLinear(hm, layer.bias)
    x = torch.randn(5, 48)
    # Both float32 products are within a few units of roundoff of the exact one, in |x| |H|^T terms.
    dense = hm.to_dense(torch.float64)
    exact = x.double() @ dense.T + layer.bias.double()
    scale = float((x.double().abs() @ dense.abs().T).max()) + float(layer.bias.detach().abs().max())
    for y in (inference(x), layer(x)):
        assert float((y.double() - exact).abs().max()) <= 48 * 2**-24 * scale
    again = TrainableHLinear(hm, layer.bias)  # the packed form loads back into the same structure
    assert torch.equal(again.to_dense(torch.float64), layer.to_dense(torch.float64))
    assert again.stored_numbers == layer.stored_numbers


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), tol=st.sampled_from([1e-1, 1e-2, 1e-3, 1e-9]),
       precision=st.sampled_from(["keep", "auto"]), noise=st.sampled_from([0.0, 1e-3, 1e-1]),
       seed=st.integers(0, 2**16))
def test_recompress_never_raises_the_error_above_tolerance(m, n, tol, precision, noise, seed) -> None:
    """After a training-like change of the parameters, the rebuilt layer is within tol of the
    dense equivalent it had just before (measured here, independently of the layer's report)."""
    torch.manual_seed(seed)
    weight = torch.randn(m, 3) @ torch.randn(3, n) + noise * torch.randn(m, n)
    layer = TrainableHLinear.from_matrix(weight, torch.zeros(m), CompressionOptions(tol=1e-2, precision=precision, leaf=4))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(noise * torch.randn_like(p))
    before = layer.to_dense(torch.float64).detach()
    report = layer.recompress(CompressionOptions(tol=tol, precision=precision, leaf=4))
    error = float(torch.linalg.matrix_norm(before - layer.to_dense(torch.float64).detach()))
    assert error <= tol * float(torch.linalg.matrix_norm(before))
    assert report.error == pytest.approx(error, rel=1e-12, abs=1e-300)
    assert report.rel_error <= tol


def test_recompress_finds_lower_rank_and_keeps_the_bias() -> None:
    torch.manual_seed(0)
    layer = TrainableHLinear.from_matrix(torch.randn(32, 32), torch.randn(32), CompressionOptions(tol=1e-2, precision="keep"))
    bias = layer.bias
    assert layer.stored_numbers == 32 * 32  # a random matrix: dense
    with torch.no_grad():  # training made it rank 2
        layer.leaves[0].weight.copy_((torch.randn(32, 2) @ torch.randn(2, 32)).unsqueeze(0))
    report = layer.recompress()
    assert report.numbers_before == 1024 and report.numbers_after == layer.stored_numbers == 2 * 64
    assert layer.bias is bias


def test_rank_penalty_is_the_sum_of_leaf_nuclear_norms() -> None:
    layer = layer_of(structured(64, 48), 1e-3, "keep", torch.float64)
    expected = 0.0
    for s in layer.to_hmatrix().segment_values():
        block = s.block_values()
        expected += float(torch.linalg.svdvals(block).sum())
    assert layer.rank_penalty("nuclear").item() == pytest.approx(expected, rel=1e-10)
    # factors from compress_matrix are balanced (sqrt(s) on each side): the surrogate is equal
    assert layer.rank_penalty("factor").item() == pytest.approx(expected, rel=1e-10)
    with torch.no_grad():
        for group in layer.leaves:
            if hasattr(group, "u"):
                group.u.mul_(3.0)
                group.v.div_(3.0)
    assert layer.rank_penalty("factor").item() > 1.5 * layer.rank_penalty("nuclear").item()
    with pytest.raises(ValueError, match="kind must be one of"):
        layer.rank_penalty("rank")


@pytest.mark.parametrize("padded", [False, True])
def test_low_rank_nuclear_norm_from_the_core_matches_the_dense_one(padded) -> None:
    """Value and gradient of the rank x rank core form equal those of svdvals(U V) formed densely,
    with zero padding columns (a leaf of smaller rank in the group) too."""
    gen = torch.Generator().manual_seed(0)
    factors = [(torch.randn(40, 5, generator=gen, dtype=torch.float64),
                torch.randn(5, 36, generator=gen, dtype=torch.float64)) for _ in range(3)]
    if padded:
        factors[1] = (factors[1][0][:, :2], factors[1][1][:2])
    corners = [(0, 0, 1), (40, 0, 1), (0, 36, 1)]
    leaves = [_LowRankLeaves(corners, 40, 36, factors, torch.float64) for _ in range(2)]
    core = leaves[0].nuclear()
    dense = torch.linalg.svdvals(leaves[1].values()).sum()
    assert core.item() == pytest.approx(dense.item(), rel=1e-12)
    core.backward()
    dense.backward()
    for name in ("u", "v"):
        assert torch.isfinite(getattr(leaves[0], name).grad).all()
        torch.testing.assert_close(getattr(leaves[0], name).grad, getattr(leaves[1], name).grad, rtol=1e-9, atol=1e-10)


def test_rank_penalty_creates_low_rank_structure() -> None:
    """Fitting a rank-4 map plus a small full-rank part: plain training keeps the full rank (the
    layer stays dense at 1e-2); with the nuclear penalty the next recompression stores < 1/4."""
    torch.manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(48, 4))
    right, _ = torch.linalg.qr(torch.randn(48, 4))
    target = left @ torch.diag(torch.tensor([3.0, 2.0, 1.5, 1.0])) @ right.T + 0.02 * torch.randn(48, 48)
    x = torch.randn(256, 48)
    stored = {}
    for lam in (0.0, 1.0):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(48, 48))
        replace_linears(model, 1e-2, leaf=16)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.97**step)
        for _ in range(150):
            optimizer.zero_grad()
            loss = (model(x) - x @ target.T).square().sum(1).mean() + lam * rank_penalty(model)
            loss.backward()
            optimizer.step()
            schedule.step()
        recompress(model)
        stored[lam] = footprint(model).stored_fraction
    assert stored[0.0] == 1.0
    assert stored[1.0] < 0.25


def test_rank_penalty_over_a_model() -> None:
    model = nn.Sequential(nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 8))
    assert float(rank_penalty(model)) == 0.0  # no H-matrix layer yet
    replace_linears(model, 1e-2)
    total = sum(layer.rank_penalty().item() for _, layer in hlinear_layers(model))
    assert rank_penalty(model, "nuclear").item() == pytest.approx(total)
    rank_penalty(model).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "leaves" in n)


def test_replace_linears_swaps_selected_layers_in_place() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 40), nn.Tanh(), nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 3)))
    x = torch.randn(6, 40)
    with torch.no_grad():
        before = model(x)
        w1, w2, w3 = (model[0].weight.double(), model[2][0].weight.double(), model[2][1].weight.double())
        hidden = torch.tanh(x.double() @ w1.T + model[0].bias.double())
    done = replace_linears(model, 1e-2, include=["*"], exclude=["2.1"])
    assert [d.name for d in done] == ["0", "2.0"]
    assert isinstance(model[0], TrainableHLinear) and isinstance(model[2][0], TrainableHLinear) and type(model[2][1]) is nn.Linear
    assert all(d.error <= d.budget and d.rel_error <= 1e-2 for d in done)
    # The output moves by at most what the weights' errors allow (tanh is 1-Lipschitz), measured
    # independently: ||Δy|| <= ||W3|| (||H2|| ||W1 - H1|| ||x|| + ||W2 - H2|| ||h||)
    h1, h2 = (model[0].to_hmatrix().to_dense(torch.float64), model[2][0].to_hmatrix().to_dense(torch.float64))
    assert measure.sq_fro(w1.numpy(), h1.numpy()) <= measure.sq(1e-2) * measure.sq_fro(w1.numpy())
    e1 = measure.spectrum(w1.numpy(), h1.numpy()).top_range[1]
    e2 = measure.spectrum(w2.numpy(), h2.numpy()).top_range[1]
    norm_h2, norm_w3 = measure.spectrum(h2.numpy()).top_range[1], measure.spectrum(w3.numpy()).top_range[1]
    bound = norm_w3 * (norm_h2 * e1 * torch.linalg.vector_norm(x.double(), dim=1)
                       + e2 * torch.linalg.vector_norm(hidden, dim=1))
    with torch.no_grad():
        moved = torch.linalg.vector_norm((model(x) - before).double(), dim=1)
    assert torch.all(moved <= bound + 1e-5), (moved, bound)  # 1e-5: float32 arithmetic of both models
    with pytest.raises(ValueError, match="cannot replace the model itself"):
        replace_linears(nn.Linear(4, 4))


def test_rebuild_optimizer_keeps_state_and_hyperparameters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.LayerNorm(16))
    replace_linears(model, 1e-2, include=["0"])
    norm = model[3].weight
    optimizer = torch.optim.Adam([{"params": list(model[0].parameters()) + list(model[2].parameters()), "lr": 1e-2},
                                  {"params": list(model[3].parameters()), "lr": 5e-3}])
    x = torch.randn(8, 16)
    model(x).square().sum().backward()
    optimizer.step()
    optimizer.param_groups[0]["lr"] = 7e-3  # as a scheduler would
    recompress(model)
    rebuilt = rebuild_optimizer(optimizer, model)
    assert type(rebuilt) is torch.optim.Adam
    assert rebuilt.param_groups[0]["lr"] == 7e-3 and rebuilt.param_groups[1]["lr"] == 5e-3
    assert rebuilt.state[norm] is optimizer.state[norm]
    assert rebuilt.state[model[0].bias] is optimizer.state[model[0].bias]
    owned = {id(p) for g in rebuilt.param_groups for p in g["params"]}
    assert owned == {id(p) for p in model.parameters()}
    assert all(id(p) in {id(q) for q in rebuilt.param_groups[0]["params"]} for p in model[0].leaves.parameters())
    rebuilt.zero_grad()
    model(x).square().sum().backward()
    rebuilt.step()
    lbfgs = rebuild_optimizer(torch.optim.LBFGS(model.parameters()), model)
    lbfgs.step(lambda: model(x).square().sum())


def test_footprint_counts_numbers_and_packed_bytes() -> None:
    model = nn.Sequential(nn.Linear(32, 32))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(32, 1) @ torch.randn(1, 32))
    replace_linears(model, 1e-3)
    size = footprint(model)
    assert (size.stored_numbers, size.dense_numbers, size.dense_bytes) == (64, 1024, 4096)
    assert size.stored_bytes == model[0].to_hmatrix().nbytes
    assert size.stored_fraction == 64 / 1024 and size.bytes_ratio == 4096 / size.stored_bytes
    assert math.isfinite(size.bytes_ratio)
