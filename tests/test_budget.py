"""--model-tol: per-layer tolerances whose model-level output error, measured on the file as
loaded, stays within the target, in fewer bytes than one tolerance for all."""
from __future__ import annotations

import json

import budget_model
import pytest
import torch
from helpers import files_under
from safetensors.torch import save_file

from hmcompress import runtime
from hmcompress.calibrate import calibrate_checkpoint
from hmcompress.evaluate.budget import CurvePoint, LayerCurve, allocate, output_error

FACTORY = "budget_model:build"


@pytest.fixture()
def model(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in budget_model.reference().state_dict().items()}, str(path))
    stats = tmp_path / "stats.safetensors"
    calibrate_checkpoint(FACTORY, path, stats)
    return path, stats


def measured_model_error(path) -> float:
    """The model's relative output error on its calibration batches, the file loaded by the shim."""
    original, loaded = budget_model.reference().eval(), budget_model.build()
    runtime.patch(loaded, path)
    with torch.no_grad():
        batches = budget_model.calibration_batches()
        return output_error([loaded(x).reshape(-1) for x in batches], [original(x).reshape(-1) for x in batches])


def test_model_tol_holds_on_the_file_as_loaded_and_beats_one_tolerance(cli, model, tmp_path):
    path, stats = model
    out = tmp_path / "model.hm.safetensors"
    target = 3e-3
    run = cli("compress", path, "--activations", stats, "--model-tol", target, "--model-factory", FACTORY,
              "-o", out, "--json", "-q")
    assert run.code == 0, run.stderr
    result = json.loads(run.stdout)["results"][0]
    chosen = result["model_tol"]
    assert chosen["measured"] <= target and chosen["target"] == target
    assert measured_model_error(out) == pytest.approx(chosen["measured"], rel=1e-6)
    assert measured_model_error(out) <= target
    layers = {layer["name"]: layer for layer in result["layers"] if layer["compressed"]}
    assert {name: layer["tol"] for name, layer in layers.items()} == chosen["tols"]
    assert len(set(chosen["tols"].values())) > 1  # the layers differ in what they may lose
    assert chosen["output_rounded"] and set(chosen["output_rounded"]) <= set(chosen["tols"])  # K pays here
    nbytes = sum(layer["bytes_after"] for layer in layers.values())
    # One tolerance for every layer, the largest of a few whose model error is within the target:
    uniform = None
    for tol in (3e-2, 2e-2, 1e-2, 5e-3, 3e-3, 2e-3, 1e-3):
        trial = tmp_path / f"uniform{tol}.hm.safetensors"
        assert cli("compress", path, "--activations", stats, "--tol", tol, "-o", trial, "-q").code == 0
        if measured_model_error(trial) <= target:
            uniform = runtime.read_file(trial)
            break
    assert uniform is not None
    assert nbytes < sum(hm.nbytes for hm in uniform.matrices.values())
    assert "model-level budget" in cli("compress", path, "--activations", stats, "--model-tol", target,
                                       "--model-factory", FACTORY, "-o", tmp_path / "again.hm.safetensors").stdout


@pytest.mark.parametrize("extra, message", [
    ((), "--model-tol needs --model-factory"),
    (("--model-factory", FACTORY, "--tol", "0.01"), "exclude each other"),
    (("--model-factory", FACTORY, "--data", "budget_model:bad_batches"), "no data today"),
    (("--model-factory", "budget_model:nothing"), "no callable"),
    (("--model-factory", FACTORY, "--model-tol", "0"), "--model-tol must be a finite number > 0"),  # the last one given
    (("--model-factory", FACTORY, "--model-tol", "-1"), "--model-tol must be a finite number > 0"),
])
def test_model_tol_refusals_are_one_line_and_write_nothing(cli, model, tmp_path, extra, message):
    path, stats = model
    before = files_under(tmp_path)
    run = cli("compress", path, "--activations", stats, "--model-tol", "0.01", *extra,
              "-o", tmp_path / "out.hm.safetensors")
    assert run.code == 2
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert files_under(tmp_path) == before


def test_allocation_spends_the_budget_where_bytes_are_cheapest():
    """Two layers, the second ten times as sensitive: the allocation lets the first lose more."""
    def curve(name: str, sensitivity: float) -> LayerCurve:
        points = [CurvePoint(t, int(1000 / t ** 0.5), t) for t in torch.logspace(-3, -1, 17).tolist()]
        return LayerCurve(name, points, sensitivity)

    chosen = allocate([curve("a", 1.0), curve("b", 10.0)], 1e-2)
    assert chosen["a"].error > chosen["b"].error
    assert 1.0 * chosen["a"].error ** 2 + 10.0 * chosen["b"].error ** 2 <= 1e-4
    assert allocate([curve("a", 1.0)], 1e-9)["a"].error == pytest.approx(1e-3)  # nothing fits: the most accurate point


def test_allocation_prices_each_family_with_its_own_sensitivity_and_fills_the_slack():
    """Points rounded for K are half the bytes at each error, but reach the output 16 times as
    strongly: at an error the one-sided family meets, they are the dearer choice."""
    tols = torch.logspace(-3, -1, 41).tolist()
    one = [CurvePoint(t, int(1000 / t ** 0.5), t) for t in tols]
    two = [CurvePoint(t, int(500 / t ** 0.5), t, two_sided=True) for t in tols]
    curve = LayerCurve("a", one + two, 1.0, two_sided_sensitivity=16.0)
    chosen = allocate([curve], 1e-2)["a"]
    assert curve.cost(chosen) <= 1e-4
    assert not chosen.two_sided  # 500/sqrt(e/4) = 1000/sqrt(e): a tie at best, and it costs more of the error
    assert chosen.error == pytest.approx(max(t for t in tols if t <= 1e-2))  # the slack filled to the target
    cheap = LayerCurve("a", one + two, 1.0, two_sided_sensitivity=1.0)
    assert allocate([cheap], 1e-2)["a"].two_sided


@pytest.mark.slow
def test_model_tol_without_statistics_rounds_rows_for_what_they_do_downstream(cli, model, tmp_path):
    """No --activations: every matrix keeps the plain bound, and its rows are rounded for M, the
    second moment of the gradients they receive; the model's error holds on the file as loaded."""
    path, _stats = model
    out = tmp_path / "plain-budget.hm.safetensors"
    run = cli("compress", path, "--model-tol", 3e-3, "--model-factory", FACTORY, "-o", out, "--json", "-q")
    assert run.code == 0, run.stderr
    result = json.loads(run.stdout)["results"][0]
    chosen = result["model_tol"]
    assert measured_model_error(out) <= 3e-3
    assert chosen["output_rounded"] and set(chosen["output_rounded"]) <= set(chosen["tols"])
    for layer in result["layers"]:
        if layer["compressed"]:
            assert layer["rel_error"] <= layer["tol"]  # the plain guarantee at each chosen tolerance
