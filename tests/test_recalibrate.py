"""`hmcompress recalibrate`: passthrough tensors retrained on a task loss, H-matrices untouched."""
from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hmcompress import runtime
from hmcompress.api import compress_checkpoint, verify
from hmcompress.core.build import CompressionOptions
from hmcompress.errors import UserError
from hmcompress.train.recalibrate import describe, recalibrate
from tests.calibration_model import build, calibration_loss, reference

FACTORY = "tests.calibration_model:build"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """The reference checkpoint and its compression at a coarse tolerance (a visible error)."""
    directory = tmp_path_factory.mktemp("recalibrate")
    checkpoint = directory / "model.safetensors"
    save_file(reference().state_dict(), str(checkpoint))
    compressed = directory / "model.hm.safetensors"
    compress_checkpoint(checkpoint, compressed, CompressionOptions(tol=0.2, leaf=16))
    return checkpoint, compressed


def _tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _metadata(path: pathlib.Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["hmcompress"])


def test_recalibration_lowers_the_loss_and_keeps_every_matrix(files, tmp_path) -> None:
    checkpoint, compressed = files
    out = tmp_path / "recalibrated.hm.safetensors"
    result = recalibrate(build(), compressed, calibration_loss, out, steps=30)
    assert result.tensors == ["0.bias", "0.weight", "2.bias", "4.bias", "4.weight"]  # 2.weight is compressed
    assert result.numbers == 96 + 8 * 96 + 96 + 3 + 96 * 3
    assert result.loss_after < 0.5 * result.loss_before

    before, after = _tensors(compressed), _tensors(out)
    assert before.keys() == after.keys()
    for name in before:
        if name.startswith("2.weight.hm."):
            assert torch.equal(before[name], after[name]), name  # the H-matrix, byte for byte
        elif name in result.tensors:
            assert not torch.equal(before[name], after[name]), name
    meta, source_meta = _metadata(out), _metadata(compressed)
    assert meta["matrices"] == source_meta["matrices"] and meta["options"] == source_meta["options"]
    assert meta["recalibrated"] == {"from": compressed.name, "steps": 30, "tensors": result.tensors,
                                    "loss_before": result.loss_before, "loss_after": result.loss_after}
    assert all(check.ok for check in verify(out, checkpoint))  # recorded errors and bounds still hold
    assert (tmp_path / "hmruntime.py").exists()

    model = build()
    runtime.patch(model, out)  # what a user runs: the recalibrated file through the shim
    assert float(calibration_loss(model).detach()) == pytest.approx(result.loss_after, rel=1e-6)


def test_recalibration_is_deterministic(files, tmp_path) -> None:
    _checkpoint, compressed = files
    first, second = tmp_path / "a.hm.safetensors", tmp_path / "b.hm.safetensors"
    recalibrate(build(), compressed, calibration_loss, first, steps=10)
    recalibrate(build(), compressed, calibration_loss, second, steps=10)
    assert first.read_bytes() == second.read_bytes()


def test_recalibration_refuses_what_it_cannot_do(files, tmp_path) -> None:
    _checkpoint, compressed = files
    with pytest.raises(UserError, match="steps must be >= 1"):
        recalibrate(build(), compressed, calibration_loss, tmp_path / "x.hm.safetensors", steps=0)
    with pytest.raises(UserError, match="did not lower the loss"):  # NaN: nothing to write
        recalibrate(build(), compressed, lambda model: model[0].bias.sum() * float("nan"),
                    tmp_path / "y.hm.safetensors", steps=5)
    assert not (tmp_path / "x.hm.safetensors").exists() and not (tmp_path / "y.hm.safetensors").exists()


def test_recalibrate_cli(cli, files, tmp_path) -> None:
    checkpoint, compressed = files
    out = tmp_path / "cli.hm.safetensors"
    done = cli("recalibrate", FACTORY, compressed, "-o", out, "--steps", "10", "--json")
    assert done.code == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] and result["output"] == str(out) and result["loss_after"] < result["loss_before"]
    again = cli("recalibrate", FACTORY, compressed, "-o", out, "--steps", "10")
    assert again.code == 2 and "exists (use --force to overwrite)" in again.error_line()
    done = cli("recalibrate", FACTORY, compressed, "-o", out, "--steps", "10", "--force")
    assert done.code == 0 and "retrained 5 tensors" in done.stdout
    assert cli("recalibrate", FACTORY, compressed, "-o", compressed).code == 2
    missing = cli("recalibrate", "json:loads", compressed, "-o", tmp_path / "z.hm.safetensors")
    assert missing.code == 2 and "no callable calibration_loss" in missing.error_line()
    other = cli("recalibrate", "sample_models.burgers_pinn:build", compressed, "-o", tmp_path / "z.hm.safetensors")
    assert other.code == 2 and "does not match the model" in other.error_line()
    assert not (tmp_path / "z.hm.safetensors").exists()
    assert cli("verify", out, "--original", checkpoint).code == 0
    shown = cli("report", out)
    assert shown.code == 0 and f"recalibrated from {compressed.name}: 5 passthrough tensors retrained" in shown.stdout
    assert json.loads(cli("report", out, "--json").stdout)["recalibrated"]["steps"] == 10
    assert "recalibrated" not in cli("report", compressed).stdout


def test_report_survives_a_malformed_recalibration_entry() -> None:
    assert describe(5) == "recalibrated: (malformed entry)"
    line = describe({"from": "x", "tensors": "not a list", "steps": None, "loss_before": "a"})
    assert line.startswith("recalibrated from x: ? passthrough tensors retrained (None L-BFGS steps")


def test_recalibration_needs_a_passthrough_parameter(tmp_path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False))
    checkpoint, compressed = tmp_path / "bare.safetensors", tmp_path / "bare.hm.safetensors"
    save_file(model.state_dict(), str(checkpoint))
    compress_checkpoint(checkpoint, compressed, CompressionOptions(tol=0.1))
    with pytest.raises(UserError, match="nothing to recalibrate"):
        recalibrate(model, compressed, lambda m: m(torch.ones(1, 64)).square().sum(), tmp_path / "out.hm.safetensors")


def test_recalibration_reports_progress(cli, files, tmp_path) -> None:
    _checkpoint, compressed = files
    lines: list[str] = []
    recalibrate(build(), compressed, calibration_loss, tmp_path / "p.hm.safetensors", steps=30, progress=lines.append)
    assert lines and all(re.fullmatch(r"\d+ loss evaluations, loss \S+", line) for line in lines), lines
    quiet = cli("recalibrate", FACTORY, compressed, "-o", tmp_path / "q.hm.safetensors", "--steps", "30", "-q")
    assert quiet.code == 0 and quiet.stderr == ""
