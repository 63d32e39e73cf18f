"""Functional evaluation: NTK against hand-computed Jacobians, hooks, SVD baseline, the CLI."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest
import torch
from torch import nn

from hmcompress import runtime
from hmcompress.compare.baselines import TruncatedSVD
from hmcompress.errors import UserError
from hmcompress.evaluate.analysis import (
    OUTPUT,
    SVDBaseline,
    compare_ntk,
    empirical_ntk,
    layer_outputs,
    load_task,
    relative_error,
)


def test_ntk_of_a_tanh_network_matches_the_hand_computed_jacobian() -> None:
    """f(x) = w2 · tanh(W1 x + b1) + b2: ∂f/∂W1 = (w2 ⊙ s) xᵀ, ∂f/∂b1 = w2 ⊙ s (s = 1 − h²),
    ∂f/∂w2 = h, ∂f/∂b2 = 1; Θ = J Jᵀ."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    w1, b1, w2 = model[0].weight, model[0].bias, model[2].weight[0]
    with torch.no_grad():
        h = torch.tanh(x @ w1.T + b1)
        delta = w2 * (1 - h * h)  # (5, 3)
        jacobian = torch.cat([(delta[:, :, None] * x[:, None, :]).reshape(5, 6), delta, h,
                              torch.ones(5, 1, dtype=torch.float64)], dim=1)  # parameter order
    expected = jacobian @ jacobian.T
    theta = empirical_ntk(model, x, chunk=2)
    assert theta.dtype == torch.float64 and theta.shape == (5, 5)
    torch.testing.assert_close(theta, expected, rtol=1e-12, atol=1e-12)


def test_ntk_rows_are_ordered_by_input_then_output() -> None:
    """For f(x) = W x + b with two outputs, Θ[(a, k), (b, l)] = δ_kl (x_a · x_b + 1)."""
    model = nn.Linear(3, 2).double()
    x = torch.arange(12, dtype=torch.float64).reshape(4, 3) / 7
    gram = x @ x.T + 1
    expected = torch.einsum("ab,kl->akbl", gram, torch.eye(2, dtype=torch.float64)).reshape(8, 8)
    torch.testing.assert_close(empirical_ntk(model, x, chunk=3), expected, rtol=1e-12, atol=1e-12)
    # A custom output function: the NTK of the second output alone.
    theta = empirical_ntk(model, x, output_fn=lambda out, _x: out[:, 1:])
    torch.testing.assert_close(theta, gram)


def test_compare_ntk_reports_distance_and_extreme_eigenvalues() -> None:
    theta = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    result = compare_ntk(theta, theta * 1.5, inputs=3)
    assert result.rel_fro == pytest.approx(0.5)
    assert (result.eig_min, result.eig_max) == pytest.approx((1.0, 4.0))
    assert (result.eig_min_compressed, result.eig_max_compressed) == pytest.approx((1.5, 6.0))


def test_layer_hooks_localise_a_perturbation_to_the_layer_and_after() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    perturbed = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    perturbed.load_state_dict(model.state_dict())
    with torch.no_grad():
        perturbed[2].weight[0, 0] += 0.1
    x = torch.randn(7, 4)
    names = ["4", "0", "2"]  # any order: results come in execution order
    ref, out = layer_outputs(model, x, names), layer_outputs(perturbed, x, names)
    assert list(ref) == ["0", "2", "4", OUTPUT]
    assert relative_error(out["0"], ref["0"]) == 0.0
    hand = perturbed[2](torch.tanh(model[0](x))).detach()
    assert relative_error(out["2"], ref["2"]) == pytest.approx(relative_error(hand, ref["2"]))
    assert relative_error(out["2"], ref["2"]) > 0 and relative_error(out["4"], ref["4"]) > 0
    torch.testing.assert_close(out[OUTPUT], out["4"])
    assert not model[0]._forward_hooks  # hooks are removed afterwards


def test_svd_baseline_takes_the_smallest_rank_within_tolerance() -> None:
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 4, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(6, 4, generator=gen, dtype=torch.float64))
    w = (u * torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)) @ v.T  # ||W||_F = sqrt(30)
    svd = SVDBaseline({"w": w, "b": torch.ones(3)}, ["w"])
    # tails: r=2 -> sqrt(5) = 0.408 ||W||, r=3 -> 1 = 0.183 ||W||
    assert svd.rank("w", 0.2) == 3 and svd.rank("w", 0.41) == 2
    assert svd.rank("w", 0.0) == 6  # exactness keeps even the rounding-level singular values
    assert svd.rank("w", 1.0 + 1e-9, absolute=True) == 3  # the tail at rank 3 is 1 up to rounding
    state, ranks = svd.truncated(0.2)
    assert ranks == {"w": 3} and torch.equal(state["b"], torch.ones(3))
    assert relative_error(state["w"], w) == pytest.approx(1 / 30**0.5)
    assert svd.nbytes(ranks) == 3 * (8 + 6) * 8 and svd.dense_nbytes() == 8 * 6 * 8
    assert svd.nbytes(ranks) == TruncatedSVD()(w).at_tol(0.2).nbytes  # evaluate counts as compare does


def test_load_task_refuses_specs_without_the_protocol() -> None:
    with pytest.raises(UserError, match="package.module:build"):
        load_task("sample_models.classifier")
    with pytest.raises(UserError, match="cannot import"):
        load_task("no_such_package_xyz:build")
    with pytest.raises(UserError, match="no callable evaluate, sample_inputs"):
        load_task("json:loads")  # json has no evaluate / sample_inputs hooks
    task = load_task("sample_models.classifier:build")
    assert task.metric == "accuracy" and task.higher_is_better


@pytest.fixture(scope="module")
def classifier_files(cli, tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    pytest.importorskip("sklearn")
    from sample_models.classifier import CHECKPOINT

    out = tmp_path_factory.mktemp("classifier") / "classifier.hm.safetensors"
    done = cli("compress", str(CHECKPOINT), "--tol", "1e-2", "-o", str(out), "--quiet")
    assert done.code == 0, done.stderr
    return CHECKPOINT, out


def test_evaluate_cli_on_the_classifier_through_the_shim(cli, classifier_files, monkeypatch) -> None:
    checkpoint, compressed = classifier_files
    done = cli("evaluate", "sample_models.classifier:build", str(checkpoint), "--compressed",
               str(compressed), "--samples", "32", "--ntk-samples", "3", "--json")
    assert done.code == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] and result["metric"] == "accuracy" and result["tol"] == 0.01
    original, compressed_acc = result["metrics"]["accuracy"], result["metrics_compressed"]["accuracy"]
    assert original >= 0.96
    assert abs(compressed_acc - original) <= 0.005  # the issue: within 0.5 percentage points
    assert 0 < result["output_error"] < 0.05
    assert [layer["name"] for layer in result["layers"]] == ["net.0", "net.2", "net.4", OUTPUT]
    for layer in result["layers"][:-1]:
        assert 0 < layer["weight_error"] <= 0.01 * (1 + 1e-9)
        assert layer["weight_error_svd"] <= 0.01 * (1 + 1e-6)
    ntk = result["ntk"]
    assert ntk["inputs"] == 3 and ntk["size"] == 30 and 0 < ntk["rel_fro"] < 0.05
    assert ntk["eig_max"] >= ntk["eig_min"] > 0
    assert result["matrix_bytes_compressed"] < result["matrix_bytes"] / 3

    # A user's own run: the hmruntime.py copied beside the file, imported from there.
    spec = importlib.util.spec_from_file_location("hmruntime_copy", compressed.parent / "hmruntime.py")
    shim = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, shim)  # as `import hmruntime` would register it
    spec.loader.exec_module(shim)
    from sample_models.classifier import build, evaluate

    model = build()
    replaced = shim.patch(model, compressed)
    assert replaced == ["net.0", "net.2", "net.4"]
    assert evaluate(model)["accuracy"] == compressed_acc


def test_evaluate_cli_refuses_a_mismatched_model_in_one_line(cli, classifier_files) -> None:
    checkpoint, compressed = classifier_files
    done = cli("evaluate", "sample_models.burgers_pinn:build", str(checkpoint), "--compressed",
               str(compressed), "--quiet")
    assert done.code == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "does not fit sample_models.burgers_pinn:build: missing layers.0.bias" in done.stderr
    done = cli("evaluate", "nowhere_xyz:build", str(checkpoint), "--compressed", str(compressed))
    assert done.code == 2 and "cannot import" in done.stderr and "Traceback" not in done.stderr


def test_patched_model_uses_compact_layers(classifier_files) -> None:
    from hmcompress.evaluate.analysis import compressed_model

    _, compressed = classifier_files
    model = compressed_model(load_task("sample_models.classifier:build"), compressed)
    assert sum(isinstance(m, runtime.CompactLinear) for m in model.modules()) == 3


def test_results_replace_only_the_marked_readme_section(tmp_path) -> None:
    from sample_models.results import BEGIN, END, write_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{BEGIN}\nold table\n{END}\n\nafter\n", encoding="utf-8")
    write_readme(readme, f"{BEGIN}\nnew table\n{END}")
    assert readme.read_text(encoding="utf-8") == f"# Title\n\nbefore\n\n{BEGIN}\nnew table\n{END}\n\nafter\n"
    assert readme.stat().st_mode & 0o777 == 0o644
    bare = tmp_path / "BARE.md"
    bare.write_text("# Bare\n", encoding="utf-8")
    write_readme(bare, f"{BEGIN}\nt\n{END}")
    assert bare.read_text(encoding="utf-8") == f"# Bare\n\n{BEGIN}\nt\n{END}\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_recorded_options_come_back_without_the_device():
    """A file compressed on a GPU machine can be re-swept or fine-tuned on one without a GPU."""
    from hmcompress.api import options_from_json, options_json
    from hmcompress.core.build import CompressionOptions
    from hmcompress.io.checkpoint import Selection

    options = CompressionOptions(tol=3e-2, strategy="paper", precision="keep", leaf=16)
    selection = Selection(min_size=32, include=("a.*",), exclude=("b",), conv=True, passthrough_nonfinite=True)
    recorded = {**options_json(options, selection), "device": "cuda"}  # as a GPU run writes it
    assert options_from_json(recorded) == (options, selection)
