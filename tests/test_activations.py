"""compress/verify/report --activations: the data-aware budget as a user meets it on the command line."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import files_under
from safetensors.torch import load_file, save_file

from hmcompress import api, runtime
from hmcompress.calibrate import LayerInputs, write_stats
from hmcompress.core.build import CompressionOptions

SIDE = 96


def second_moment(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(400, n, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    gram = x.T @ x / 400
    return (gram + gram.T) / 2


@pytest.fixture()
def model(tmp_path):
    """A checkpoint of two trained-like layers and a small one, and a stats file for it."""
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.randn(SIDE, SIDE, generator=gen) * 0.05,
               "b.weight": torch.randn(SIDE, SIDE, generator=gen) * 0.05,
               "head.weight": torch.randn(4, SIDE, generator=gen), "b.bias": torch.zeros(SIDE)}, str(path))
    stats = tmp_path / "stats.safetensors"
    write_stats(stats, {name: LayerInputs(second_moment(SIDE, i), 400, 2)
                        for i, name in enumerate(("a.weight", "b.weight", "head.weight"))}, {}, overwrite=False)
    return path, stats


def test_compress_report_and_verify_with_activations(cli, model, tmp_path):
    path, stats = model
    out = tmp_path / "model.hm.safetensors"
    run = cli("compress", path, "--activations", stats, "-o", out, "--json", "-q")
    assert run.code == 0, run.stderr
    layers = {layer["name"]: layer for layer in json.loads(run.stdout)["results"][0]["layers"]}
    for name in ("a.weight", "b.weight"):
        assert layers[name]["norm"] == "activations"
        assert layers[name]["act_rel_error"] <= 1e-2
        assert layers[name]["budget"] == "inf"  # no budget on the weights (JSON has no infinity)
    plain = api.compress_checkpoint(path, None, CompressionOptions(), write=False)
    assert sum(s.bytes_after for s in plain.layers) > sum(layer["bytes_after"] for layer in layers.values())
    assert "out err" in cli("report", out).stdout
    ok = cli("verify", out, "--original", path, "--activations", stats)
    assert ok.code == 0, ok.stdout + ok.stderr
    assert "relative output error" in ok.stdout
    without = cli("verify", out, "--original", path)
    assert without.code == 0 and "needs --activations" in without.stdout
    stored = runtime.read_file(out)
    assert stored.metadata["options"]["activations"] == {"file": "stats.safetensors", "matrices": 2}
    for name, hm in stored.matrices.items():  # the bytes reported are the bytes stored
        assert layers[name]["bytes_after"] == hm.nbytes


def test_verify_with_activations_fails_a_tampered_file(cli, model, tmp_path):
    path, stats = model
    out = tmp_path / "model.hm.safetensors"
    assert cli("compress", path, "--activations", stats, "-o", out, "-q").code == 0
    # The same file, but built for other inputs: its data-aware figures no longer hold.
    write_stats(stats, {name: LayerInputs(second_moment(SIDE, 50 + i), 400, 2)
                        for i, name in enumerate(("a.weight", "b.weight"))}, {}, overwrite=True)
    run = cli("verify", out, "--original", path, "--activations", stats)
    assert run.code == 1
    assert "FAILED" in run.stdout and "(W − H)X" in run.stdout


@pytest.mark.parametrize("problem", ["other model", "wrong size", "nonfinite", "not psd", "zero"])
def test_bad_stats_files_exit_2_with_one_line_and_nothing_written(cli, model, tmp_path, problem):
    path, stats = model
    gram = second_moment(SIDE, 0)
    name, n = "a.weight", SIDE
    if problem == "other model":
        name = "encoder.layers.0.weight"
    elif problem == "wrong size":
        gram, n = second_moment(SIDE + 1, 0), SIDE + 1
    elif problem == "nonfinite":
        gram[3, 3] = float("nan")
    elif problem == "not psd":
        gram = -gram
    elif problem == "zero":
        gram = torch.zeros(SIDE, SIDE, dtype=torch.float64)
    bad = tmp_path / "bad.safetensors"
    save_file({name: gram}, str(bad), metadata={"hmcompress_stats": json.dumps(
        {"format": 1, "layers": {name: {"samples": 10, "batches": 1}}, "source": {}})})
    before = files_under(tmp_path)
    run = cli("compress", path, "--activations", bad, "-o", tmp_path / "out.hm.safetensors")
    assert run.code == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and str(bad) in run.stderr
    assert "Traceback" not in run.stderr
    assert files_under(tmp_path) == before
    assert n  # the size the bad G claims


def test_a_run_with_activations_is_byte_identical(cli, model, tmp_path):
    path, stats = model
    outs = [tmp_path / f"{i}.hm.safetensors" for i in range(2)]
    for out in outs:
        assert cli("compress", path, "--activations", stats, "-o", out, "-q").code == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_loaded_weights_meet_the_output_bound(model, tmp_path):
    """What a user loads (the shim's dense weights) meets ||(W-H)X|| <= tol ||WX|| on the inputs."""
    path, stats = model
    out = tmp_path / "model.hm.safetensors"
    api.compress_checkpoint(path, out, CompressionOptions(tol=3e-2), activations=stats)
    loaded, original = runtime.load_state_dict(out), load_file(str(path))
    for i, name in enumerate(("a.weight", "b.weight")):
        gram = second_moment(SIDE, i)
        error = original[name].double() - loaded[name].double()
        w = original[name].double()
        assert float(((error @ gram) * error).sum()) <= 3e-2 ** 2 * float(((w @ gram) * w).sum())
