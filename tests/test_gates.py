"""CI verdicts: quality gates on `compress`, and `verify` re-checking every recorded figure."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import corpus
import pytest
import torch
from helpers import compress_result, files_under
from safetensors.torch import save_file

from hmcompress.api import LayerStats, compress_checkpoint
from hmcompress.core.build import CompressionOptions
from hmcompress.core.verdicts import Gates, recorded_fields
from hmcompress.errors import OptionError
from hmcompress.runtime import FormatError, read_file

NAME = "enc.weight"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> pathlib.Path:
    """A well-conditioned matrix (singular values 2 .. 1): every recorded bound is finite."""
    gen = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(96, 64, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    w = (u * torch.linspace(2, 1, 64, dtype=torch.float64)) @ v.T
    path = tmp_path_factory.mktemp("gates") / "model.safetensors"
    save_file({NAME: w.float(), "enc.bias": torch.ones(96), "steps": torch.arange(4)}, str(path))
    return path


@pytest.fixture(scope="module")
def ratio(model) -> float:
    return compress_checkpoint(model, None, CompressionOptions(tol=1e-2), write=False).totals()["ratio"]


def compress(cli, model: pathlib.Path, out: pathlib.Path, *options: object):
    return cli("compress", model, "-o", out, "--tol", "1e-2", "--quiet", *options)


def test_a_missed_gate_exits_1_and_writes_nothing(cli, model, ratio, tmp_path):
    out = tmp_path / "m.hm.safetensors"
    run = compress(cli, model, out, "--max-error", "1e-4", "--min-ratio", ratio * 1.01, "--json")
    assert run.code == 1
    payload = compress_result(run.stdout)
    assert payload["ok"] is False and payload["output"] is None
    assert [f.split(" ")[0] for f in payload["gate_failures"]] == ["relative", "bytes"]
    assert "exceeds --max-error 0.0001" in payload["gate_failures"][0]
    assert f"is below --min-ratio {ratio * 1.01:g}" in payload["gate_failures"][1]
    assert run.stderr.count("quality gate failed") == 2 and "nothing written" in run.stderr
    assert files_under(tmp_path) == set()


def test_gates_that_hold_pass(cli, model, ratio, tmp_path):
    out = tmp_path / "m.hm.safetensors"
    run = compress(cli, model, out, "--max-error", "1e-2", "--min-ratio", ratio * 0.99, "--json")
    assert run.code == 0, run.stderr
    payload = compress_result(run.stdout)
    assert payload["ok"] is True and payload["gate_failures"] == [] and payload["output"] == str(out)
    assert payload["totals"]["ratio"] == pytest.approx(ratio)
    assert NAME in read_file(out).matrices


def test_keep_failed_writes_the_output_and_still_exits_1(cli, model, ratio, tmp_path):
    out = tmp_path / "m.hm.safetensors"
    run = compress(cli, model, out, "--min-ratio", ratio * 1.01, "--keep-failed")
    assert run.code == 1
    assert "quality gate failed" in run.stderr and "nothing written" not in run.stderr
    assert NAME in read_file(out).matrices and f"-> {out}" in run.stdout


def test_gate_values_are_checked(cli, model, tmp_path):
    run = compress(cli, model, tmp_path / "m.hm.safetensors", "--max-error", "-1")
    assert run.code == 2 and "--max-error must be a finite number >= 0" in run.error_line()


@dataclasses.dataclass
class _Layer:
    name: str
    compressed: bool
    rel_error: float


def test_gate_definitions():
    layers = [_Layer("a", True, 0.004), _Layer("b", True, 0.009), _Layer("c", False, 0.0)]
    assert Gates(max_error=0.009, min_ratio=2.0).failures(layers, {"ratio": 2.0}) == []
    assert Gates(max_error=0.005).failures(layers, {"ratio": 2.0}) == [
        "relative error 0.009 of 'b' exceeds --max-error 0.005"]
    assert Gates(min_ratio=3).failures(layers, {"ratio": 2.5}) == ["bytes ratio 2.5 is below --min-ratio 3"]
    assert Gates(max_error=0.0, min_ratio=1.0).failures([], {"ratio": None}) == []  # an empty checkpoint
    assert Gates(max_error=0.1).failures([_Layer("n", True, float("nan"))], {"ratio": 1.0})
    with pytest.raises(OptionError):
        Gates(min_ratio=float("inf"))


# ------------------------------------------------------------------------------------ verify

@pytest.fixture(scope="module")
def compressed(cli, model, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("verify") / "m.hm.safetensors"
    assert compress(cli, model, out).code == 0
    return out


def test_verify_accepts_the_untouched_file(cli, model, compressed):
    run = cli("verify", compressed, "--original", model, "--json")
    assert run.code == 0, run.stdout
    (check,) = json.loads(run.stdout)["matrices"]
    assert check["ok"] is True and check["problems"] == []
    stats = json.loads(cli("report", compressed, "--json").stdout)["layers"]
    assert {s["name"]: s["kappa_h_bound"] is not None for s in stats}[NAME]  # the kappa check is exercised


def _scale(key: str, factor: float):
    return lambda stats: stats.update({key: stats[key] * factor})


TAMPERED = [
    ("fro_error", _scale("fro_error", 0.5), "above the recorded error"),
    ("budget", _scale("budget", 0.5), "above the recorded budget"),
    ("tol", _scale("tol", 0.01), "above the tolerance"),
    ("rel_error", _scale("rel_error", 0.5), "relative error above the recorded one"),
    ("spectral_error", _scale("spectral_error", 0.5), "‖W − H‖₂ above its recorded bound"),
    ("sigma_max_upper", _scale("sigma_max_upper", 0.9), "σ_max\\(W\\) above its recorded bound"),
    ("sigma_min_lower", _scale("sigma_min_lower", 1.1), "recorded lower bound on σ_min\\(W\\) above σ_min\\(W\\)"),
    ("kappa_h_bound", _scale("kappa_h_bound", 0.9), "κ\\(H\\) above its recorded bound"),
    ("bytes_after", lambda stats: stats.update(bytes_after=stats["bytes_after"] + 1), "bytes_after: recorded"),
]


@pytest.mark.parametrize("change,problem", [t[1:] for t in TAMPERED], ids=[t[0] for t in TAMPERED])
def test_verify_exits_1_on_every_recorded_figure_that_does_not_hold(cli, model, compressed, tmp_path, change, problem):
    bad = corpus.rewrite_compressed(compressed, tmp_path / "bad.hm.safetensors",
                                    lambda _tensors, meta: change(meta["matrices"][NAME]["stats"]))
    run = cli("verify", bad, "--original", model, "--json")
    assert run.code == 1, run.stdout
    (check,) = json.loads(run.stdout)["matrices"]
    assert check["ok"] is False
    assert any(re.search(problem, p) for p in check["problems"]), check["problems"]
    assert "break a recorded bound" in run.stderr and len(run.stderr.splitlines()) == 1


def test_verify_exits_1_when_the_stored_matrix_was_altered(cli, model, compressed, tmp_path):
    def alter(tensors, _meta):  # fixed-width pools zeroed, scales doubled (coded pools' values too)
        for name in tensors:
            if ".hm.pool." in name:
                tensors[name] = torch.zeros_like(tensors[name])
            elif ".hm.scale." in name:
                tensors[name] = tensors[name] * 2

    bad = corpus.rewrite_compressed(compressed, tmp_path / "bad.hm.safetensors", alter)
    run = cli("verify", bad, "--original", model)
    assert run.code == 1
    assert "above the tolerance" in run.stdout and "FAILED" in run.stdout


def test_recorded_fields_type_checks_and_ignores_unknown_keys():
    good = {"name": "w", "shape": [2, 3], "dtype": "float32", "bytes_before": 24, "bytes_after": 10,
            "compressed": True, "kappa_w": None, "rel_error": 1, "added_by_a_newer_writer": [1]}
    values = recorded_fields(LayerStats, good, "f: w")
    assert values["rel_error"] == 1 and "added_by_a_newer_writer" not in values and values["kappa_w"] is None
    for broken, problem in [({**good, "shape": "2x3"}, "'shape' has str"), ({**good, "bytes_after": 1.5}, "float"),
                            ({**good, "compressed": 1}, "'compressed' has int"),
                            ({**good, "kappa_w": "big"}, "'kappa_w'"), ({k: v for k, v in good.items() if k != "dtype"},
                                                                        "lack 'dtype'")]:
        with pytest.raises(FormatError, match=problem):
            recorded_fields(LayerStats, broken, "f: w")
