"""The Burgers PINN: the exact reference it is judged by, and the committed checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hmcompress import runtime
from hmcompress.api import compress_checkpoint
from hmcompress.calibrate import calibrate_checkpoint
from hmcompress.core.build import CompressionOptions
from hmcompress.evaluate import analysis, budget
from hmcompress.train.recalibrate import recalibrate
from sample_models.burgers_pinn import CHECKPOINT, build, calibration_batches, calibration_loss, evaluate

FACTORY = "sample_models.burgers_pinn:build"
from sample_models.burgers_pinn.reference import NU, exact_solution


def test_reference_meets_the_initial_and_boundary_conditions() -> None:
    x = np.linspace(-1, 1, 101)
    np.testing.assert_allclose(exact_solution(x, np.zeros_like(x)), -np.sin(np.pi * x), atol=1e-14)
    t = np.linspace(0, 1, 51)
    assert np.abs(exact_solution(np.full_like(t, -1.0), t)).max() < 1e-12
    assert np.abs(exact_solution(np.full_like(t, 1.0), t)).max() < 1e-12


def test_reference_satisfies_the_pde_by_finite_differences() -> None:
    """u_t + u u_x − ν u_xx ≈ 0 by central differences (error O(h²)), on a coarse grid that
    stays a few shock widths away from x = 0 once the shock has formed (t > 1/π)."""
    x, t = np.meshgrid(np.linspace(-0.9, 0.9, 19), np.linspace(0.05, 0.95, 10))
    x, t = x.ravel(), t.ravel()
    keep = (np.abs(x) > 0.05) | (t < 0.25)
    x, t = x[keep], t[keep]
    h = 1e-4
    u = exact_solution(x, t)
    u_t = (exact_solution(x, t + h) - exact_solution(x, t - h)) / (2 * h)
    u_x = (exact_solution(x + h, t) - exact_solution(x - h, t)) / (2 * h)
    u_xx = (exact_solution(x + h, t) - 2 * u + exact_solution(x - h, t)) / h**2
    residual = u_t + u * u_x - NU * u_xx
    scale = np.abs(u_t) + np.abs(u * u_x) + 1e-3
    assert np.abs(residual / scale).max() < 1e-4
    assert np.abs(u_t).max() > 0.1  # the test is not vacuous: the solution does change


def test_reference_quadrature_has_converged_at_the_shock() -> None:
    x = np.linspace(-0.02, 0.02, 41)
    t = np.ones_like(x)
    coarse, fine = exact_solution(x, t, nodes=100), exact_solution(x, t)
    np.testing.assert_allclose(coarse, fine, atol=1e-12)
    assert fine[0] > 0.5 and fine[-1] < -0.5  # a steep shock: u drops by > 1 within |x| < 0.02


def test_jets_match_autograd() -> None:
    torch.manual_seed(0)
    model = build().double()
    xt = torch.rand(20, 2, dtype=torch.float64, requires_grad=True)
    u = model(xt)[:, 0]
    (grad,) = torch.autograd.grad(u.sum(), xt, create_graph=True)
    (grad_x,) = torch.autograd.grad(grad[:, 0].sum(), xt)
    jets = model.jets(xt)
    for got, expected in zip(jets, (u, grad[:, 0], grad[:, 1], grad_x[:, 0])):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _recorded() -> dict[str, str]:
    with safe_open(str(CHECKPOINT), framework="pt") as f:
        return f.metadata()


def test_checkpoint_reaches_its_recorded_error() -> None:
    model = build()
    model.load_state_dict(load_file(str(CHECKPOINT)))  # strict: keys and shapes match build()
    result = evaluate(model)
    recorded = _recorded()
    assert result["rel_l2"] < 1e-2  # the bar (published PINNs reach ~1e-3)
    assert result["rel_l2"] == pytest.approx(float(recorded["rel_l2"]), rel=1e-3)
    assert result["mean_abs_residual"] == pytest.approx(float(recorded["mean_abs_residual"]), rel=1e-2)
    assert CHECKPOINT.stat().st_size < 5 * 2**20


@pytest.fixture(scope="module")
def compressed_rel_l2(tmp_path_factory) -> dict[float, float]:
    """rel. L2 of the committed checkpoint (key 0) and of its compression at tol 1e-3 and 1e-2
    (default options), each loaded through the runtime shim."""
    original = build()
    original.load_state_dict(load_file(str(CHECKPOINT)))
    result = {0.0: evaluate(original)["rel_l2"]}
    for tol in (1e-3, 1e-2):
        out = tmp_path_factory.mktemp("burgers") / "burgers.hm.safetensors"
        compress_checkpoint(CHECKPOINT, out, CompressionOptions(tol=tol))
        compressed = build()
        assert runtime.patch(compressed, out) == [f"layers.{i}" for i in range(1, len(compressed.layers) - 1)]
        result[tol] = evaluate(compressed)["rel_l2"]
    return result


@pytest.mark.slow  # with its fixture: two compressions of the PINN
def test_compressed_through_the_shim_stays_accurate(compressed_rel_l2) -> None:
    """At tol 1e-3 the error stays within 1.2x the original's; at 1e-2 the compressed PINN still
    meets the issue's accuracy bar (rel. L2 < 1e-2), though its error about triples."""
    assert compressed_rel_l2[1e-3] <= 1.2 * compressed_rel_l2[0.0], compressed_rel_l2
    assert compressed_rel_l2[1e-2] < 1e-2, compressed_rel_l2


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured 7.7e-3 vs 2.38e-3 (3.2x): a 1e-2 relative weight error "
                   "spread over all directions (Gaussian noise of that size: 6e-3..1.1e-2) moves this "
                   "PINN's output by ~7e-3; see sample_models/burgers_pinn/README.md")
def test_compressed_at_1e_2_keeps_the_error_within_1_2x(compressed_rel_l2) -> None:
    """The issue's bar, not met by plain compression (recalibration meets it: the test below):
    recorded here so that a change that meets it (or the test's removal) is a decision, not an
    accident."""
    assert compressed_rel_l2[1e-2] <= 1.2 * compressed_rel_l2[0.0], compressed_rel_l2


@pytest.mark.slow
def test_model_tol_keeps_the_error_within_1_2x_in_fewer_bytes_than_int8_rows(tmp_path) -> None:
    """The issue's bar met without retraining (issue 13): `--model-tol` at a fifth of the
    original's relative L2 error keeps the compressed PINN's within 1.2x of it (the triangle
    inequality, with room for the two measures' difference), in fewer bytes than int8 codes with
    a float32 scale a row for the same matrices."""
    original = evaluate(build_loaded())["rel_l2"]
    stats = tmp_path / "stats.safetensors"
    calibrate_checkpoint(FACTORY, CHECKPOINT, stats)
    task = analysis.factory_task(FACTORY)
    out = tmp_path / "pinn.hm.safetensors"
    result, chosen = budget.compress_to_model_tol(CHECKPOINT, out, original / 5, task, calibration_batches(),
                                                  f"{FACTORY.split(':')[0]}:calibration_batches",
                                                  activations=stats)
    assert chosen.measured <= original / 5
    model = build()
    runtime.patch(model, out)  # through the shim, as a user runs it
    assert evaluate(model)["rel_l2"] <= 1.2 * original
    int8_rows = sum(layer.entries + 4 * layer.shape[0] for layer in result.layers if layer.compressed)
    assert sum(layer.bytes_after for layer in result.layers if layer.compressed) < int8_rows


def build_loaded() -> torch.nn.Module:
    model = build()
    model.load_state_dict(load_file(str(CHECKPOINT)))
    return model


@pytest.mark.slow
def test_recalibrated_at_1e_2_keeps_the_error_within_1_2x(compressed_rel_l2, tmp_path) -> None:
    """The issue's bar against the committed original, met once the 1,153 numbers the file stores
    exactly (biases, the 2 -> 128 and 128 -> 1 layers) are retrained on the PINN's own physics loss
    (no data): the compressed matrices, and their error bounds, are those of plain compression at
    1e-2. (Against the original given the same retraining it is ~1.3x: see the PINN's README.)"""
    compressed = tmp_path / "burgers.hm.safetensors"
    compress_checkpoint(CHECKPOINT, compressed, CompressionOptions(tol=1e-2))
    out = tmp_path / "recalibrated.hm.safetensors"
    result = recalibrate(build(), compressed, calibration_loss, out)
    assert result.numbers == 1153 and result.loss_after < result.loss_before
    model = build()
    runtime.patch(model, out)  # through the shim, as a user runs it
    assert evaluate(model)["rel_l2"] <= 1.2 * compressed_rel_l2[0.0], (evaluate(model), compressed_rel_l2)
