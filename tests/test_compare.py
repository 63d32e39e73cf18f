"""`compare` and the report artifacts: the verdict says plainly where hmcompress is not smallest,
the JSON follows its documented schema, pictures are real and deterministic PNGs, HTML pages are
self-contained and render in headless Chromium (skipped without it, except under CI=true: there it fails)."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pathlib
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from browser import CHROMIUM, chromium_images, chromium_or_skip
from safetensors.torch import save_file

from hmcompress.api import compress_checkpoint
from hmcompress.compare import baselines
from hmcompress.compare import comparison as compare
from hmcompress.compare.baselines import Outcome
from hmcompress.core.build import CompressionOptions
from hmcompress.errors import OptionError
from hmcompress.report import pages, plots

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "compare.schema.json").read_text())


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, for what needs one (each call says why); otherwise the ``cli`` fixture."""
    return subprocess.run([sys.executable, "-m", "hmcompress", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def kernel(m: int, n: int, seed: int) -> torch.Tensor:
    """A smooth kernel plus noise: low-rank far from the diagonal, so H-matrices have structure."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.sort(torch.rand(m, generator=gen, dtype=torch.float64))[0]
    y = torch.sort(torch.rand(n, generator=gen, dtype=torch.float64))[0]
    w = 1 / (1 + 50 * (x[:, None] - y[None, :]).abs()) + 1e-3 * torch.randn(m, n, generator=gen, dtype=torch.float64)
    return w.float()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_file({"a.weight": kernel(96, 64, 0), "b.weight": kernel(64, 64, 1), "a.bias": torch.ones(96)}, path)
    return path


@pytest.fixture(scope="module")
def compared(cli, model, tmp_path_factory) -> dict:
    """One CLI run with JSON, pictures and a page; a second identical run with --force."""
    out = tmp_path_factory.mktemp("compare")
    args = ["compare", str(model), "--tol", "1e-2", "--sweep", "1e-1", "--leaf", "16", "--json",
            "--plot", str(out / "plots"), "--html", str(out / "page.html"), "-q"]
    first = cli(*args)
    assert first.code == 0, first.stderr
    files = {p.name: p.read_bytes() for p in sorted((out / "plots").iterdir())}
    page = (out / "page.html").read_bytes()
    # A real process for the second run: the same bytes must not depend on this process (its hash
    # seed, matplotlib's state after the first run).
    second = run(*args, "--force")
    assert second.returncode == 0, second.stderr
    return {"dir": out, "args": args, "json": first.stdout, "files": files, "page": page, "second": second,
            "payload": json.loads(first.stdout)}


# ------------------------------------------------------------------------------------------------
# The comparison itself


@dataclasses.dataclass(frozen=True)
class _Tiny:
    """A fake method that always stores one byte exactly: it must beat hmcompress, visibly."""

    name: str = "tiny"
    label: str = "one byte, no error"
    bounded = True

    def __call__(self, matrix):
        outcome = Outcome(1, 0.0, float(matrix.double().norm()), "fake")
        return type("Fit", (), {"at_tol": lambda _self, _tol: outcome, "at_bytes": lambda _self, _budget: outcome})()


def test_a_smaller_method_is_named_in_the_table_and_the_json():
    methods = {**baselines.select("svd", leaf=16), "tiny": _Tiny()}
    layer = compare.compare_matrix("w", kernel(48, 40, 2), [1e-2], methods)
    result = compare.Comparison("model", [1e-2], methods, [layer], 16)
    assert layer.smallest(1e-2) == "tiny"
    assert [(r["layer"], r["smallest"]) for r in result.not_smallest()] == [("w", "tiny"), (None, "tiny")]
    table = compare.tol_table(result, 1e-2)
    ref_bytes = layer.at_tol[1e-2]["hm-auto"].nbytes
    assert table.rows[0][-1] == f"NO: tiny 1 B < {ref_bytes} B"
    assert "hm-auto is NOT the smallest on 2 of 2 rows at tol 0.01: w (tiny); total (tiny)." in table.notes[0]
    payload = result.to_json()
    assert payload["layers"][0]["tolerances"][0]["reference_smallest"] is False
    assert payload["totals"][0]["smallest"] == "tiny"


def test_hmcompress_is_smallest_where_no_method_within_tolerance_is_smaller():
    methods = baselines.select(None, leaf=16)
    layer = compare.compare_matrix("w", kernel(48, 40, 3), [1e-2], methods)
    outs = layer.at_tol[1e-2]
    smaller = [n for n, o in outs.items() if o.within(1e-2) and o.nbytes < outs["hm-auto"].nbytes]
    assert (layer.smallest(1e-2) == "hm-auto") == (not smaller)
    for name, out in layer.matched[1e-2].items():
        assert out is None or out.nbytes <= outs["hm-auto"].nbytes, name
    assert layer.matched[1e-2]["hm-auto"] == outs["hm-auto"]
    assert outs["hm-auto"].hmatrix is not None and outs["svd"].stored is None  # kept: pictures only


def test_tolerances_parse_the_sweep_once_each_primary_first():
    assert compare.tolerances(1e-2, "1e-1, 1e-2,1e-3") == [1e-2, 1e-1, 1e-3]
    with pytest.raises(OptionError, match="comma-separated numbers"):
        compare.tolerances(1e-2, "1e-1;1e-3")
    with pytest.raises(OptionError, match="strictly between 0 and 1"):
        compare.tolerances(0.0, None)


# ------------------------------------------------------------------------------------------------
# The command line


@pytest.mark.slow
def test_json_follows_the_documented_schema(compared):
    import jsonschema

    payload = compared["payload"]
    jsonschema.validate(payload, SCHEMA)
    assert payload["tolerances"] == [0.01, 0.1] and payload["reference"] == "hm-auto"
    assert [layer["name"] for layer in payload["layers"]] == ["a.weight", "b.weight"]
    listed = {(r["layer"], r["tol"]) for r in payload["not_smallest"]}
    for layer in payload["layers"]:
        for entry in layer["tolerances"]:
            assert set(entry["methods"]) == set(baselines.registry())
            assert entry["reference_smallest"] == ((layer["name"], entry["tol"]) not in listed)
            for name, out in entry["methods"].items():
                bounded = next(m["bounded"] for m in payload["methods"] if m["name"] == name)
                assert out["within"] or not bounded, (layer["name"], name)
                assert out["within"] == (out["rel_error"] <= entry["tol"] * (1 + 1e-12))
    bad = json.loads(compared["json"])
    bad["layers"][0]["tolerances"][0]["methods"]["svd"]["bytes"] = -1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)


@pytest.mark.slow
def test_same_input_same_json_and_pictures(compared):
    assert compared["second"].stdout == compared["json"]
    again = {p.name: p.read_bytes() for p in sorted((compared["dir"] / "plots").iterdir())}
    assert again == compared["files"]
    assert (compared["dir"] / "page.html").read_bytes() == compared["page"]


@pytest.mark.slow
def test_existing_outputs_are_refused_without_force(cli, compared):
    done = cli(*[a for a in compared["args"] if a != "--json"])
    assert done.code == 2 and done.stderr.count("\n") == 1
    assert "exists (use --force to overwrite)" in done.stderr and "Traceback" not in done.stderr


def test_bad_options_are_one_line_and_exit_2(cli, model):
    for args, message in ((["--sweep", "1e-1,x"], "comma-separated numbers"),
                          (["--methods", "svd,nope"], "unknown nope"),
                          (["--tol", "2"], "strictly between 0 and 1"),
                          (["--min-size", "100"], "no matrix to compare")):
        done = cli("compare", str(model), *args)
        assert done.code == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.slow
def test_without_matplotlib_the_cli_says_how_to_get_it(cli, model, tmp_path, monkeypatch):
    with monkeypatch.context() as blocked:
        blocked.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
        done = cli("compare", str(model), "--plot", str(tmp_path / "plots"))
    assert done.code == 2 and "pip install matplotlib" in done.stderr
    assert done.stderr.count("\n") == 1 and not (tmp_path / "plots").exists()
    blocker = tmp_path / "blocker" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = {"PYTHONPATH": f"{blocker.parent}{os.pathsep}{ROOT}"}
    # A real process: a fresh interpreter where matplotlib cannot be imported, so that no import on
    # the way to a plain comparison may need it (in this process it is imported already).
    plain = run("compare", str(model), "--methods", "svd", "--leaf", "16", env=env)
    assert plain.returncode == 0 and "hm-auto smallest?" in plain.stdout


MODEL_PACKAGE = """
import torch
from torch import nn

METRIC = "agreement"


def build():
    return nn.Sequential(nn.Linear(64, 96), nn.Tanh(), nn.Linear(64, 64, bias=False))


def sample_inputs(n):
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(0))


def evaluate(model):
    x = sample_inputs(256)
    with torch.no_grad():
        hidden = model[1](model[0](x))[:, :64]
        out = model[2](hidden)
    return {"agreement": float((out.argmax(1) == REFERENCE).float().mean()), "norm": float(out.norm())}


REFERENCE = torch.load(__file__.replace(".py", ".ref"), weights_only=True)
"""


def test_task_metric_of_each_method_from_a_model_package(cli, tmp_path, monkeypatch):
    """A model package (hmcompress.evaluate.analysis protocol) scores every method's matrices in the model."""
    pytest.importorskip("hmcompress.evaluate.analysis")  # the protocol's module (issue 4)
    path = tmp_path / "tiny.safetensors"
    state = {"0.weight": kernel(96, 64, 0), "0.bias": torch.zeros(96), "2.weight": kernel(64, 64, 1)}
    save_file(state, path)
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
    reference = (torch.tanh(x @ state["0.weight"].T)[:, :64] @ state["2.weight"].T).argmax(1)
    torch.save(reference, tmp_path / "tinypkg.ref")
    (tmp_path / "tinypkg.py").write_text(MODEL_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    done = cli("compare", str(path), "--methods", "svd,int4-g32", "--leaf", "16", "--json",
               "--model-factory", "tinypkg:build", "-q")
    assert done.code == 0, done.stderr
    payload = json.loads(done.stdout)
    import jsonschema

    jsonschema.validate(payload, SCHEMA)
    task = payload["task"]
    assert task["metric"] == "agreement" and task["original"]["agreement"] == 1.0
    assert set(task["methods"]) == {"hm-auto", "svd", "int4-g32"}
    for scores in task["methods"].values():
        assert 0.5 < scores["agreement"] <= 1.0 and scores["norm"] > 0
    assert task["methods"]["int4-g32"]["norm"] != task["original"]["norm"]  # its matrices were used
    wrong = cli("compare", str(path), "--methods", "svd", "--model-factory", "tinypkg:nothing", "-q")
    assert wrong.code == 2 and "tinypkg:nothing" in wrong.stderr


def test_terminal_table_states_the_verdict(cli, model):
    done = cli("compare", str(model), "--methods", "svd,int8-row", "--leaf", "16", "-q")
    assert done.code == 0, done.stderr
    assert "hm-auto smallest?" in done.stdout and "matched size" in done.stdout
    assert re.search(r"hm-auto (has the fewest bytes|is NOT the smallest)", done.stdout)


# ------------------------------------------------------------------------------------------------
# Pictures and pages


def png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        chunks.append(data[at + 4:at + 8])
        at += 12 + length
    return chunks


def assert_real_picture(data: bytes) -> None:
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64)
    assert image.shape[0] >= 300 and image.shape[1] >= 400  # a summary chart of few layers is narrow
    assert image.std() > 10, "a blank picture"
    assert b"tIME" not in png_chunks(data) and b"Software" not in data


@pytest.mark.slow
def test_pictures_decode_are_not_blank_and_carry_no_stamp(compared):
    names = list(compared["files"])
    assert names == sorted(["ratio_vs_tol.png", "layers.png", "layer_000_a.weight.png", "layer_001_b.weight.png"])
    for data in compared["files"].values():
        assert_real_picture(data)


def test_block_picture_draws_every_leaf():
    hm = compress_matrix_tiny()
    leaves = plots.leaves(hm)
    assert len(leaves) == hm.blocks.shape[0] > 4
    assert sum(leaf.rows * leaf.cols for leaf in leaves) == hm.shape[0] * hm.shape[1]
    assert {leaf.kind for leaf in leaves} <= {"lowrank", "rows", "dense", "zero"}
    assert_real_picture(plots.blocks_png(hm, "tiny", size=(10.0, 4.0)))


def compress_matrix_tiny():
    from hmcompress.core.build import compress_matrix

    return compress_matrix(kernel(128, 128, 4), CompressionOptions(tol=1e-3, leaf=16), planned_only=True).hmatrix


@pytest.mark.slow
def test_page_embeds_every_picture_and_table(compared):
    page = compared["page"].decode()
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")
    assert page.count("data:image/png;base64,") == len(compared["files"])
    assert page.count("<table>") == 4  # two tolerances: tolerance table + matched-size table each


def test_missing_browser_skips_only_outside_ci(monkeypatch, tmp_path):
    missing = tmp_path / "no-chromium"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="fails instead of skipping"):
        chromium_or_skip(missing)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install --no-install-recommends chromium"):
        chromium_or_skip(missing)


@pytest.mark.slow
def test_comparison_page_renders_in_chromium(compared, tmp_path):
    chromium = chromium_or_skip(CHROMIUM)
    total, loaded = chromium_images(chromium, compared["dir"] / "page.html", tmp_path)
    assert total == len(compared["files"]) > 0 and loaded == total


@pytest.fixture(scope="module")
def compressed_file(model, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("report") / "tiny.hm.safetensors"
    compress_checkpoint(model, out, CompressionOptions(tol=1e-2, leaf=16))
    return out


def test_report_page_from_the_file_alone(cli, compressed_file, tmp_path):
    page = tmp_path / "report.html"
    done = cli("report", str(compressed_file), "--html", str(page))
    assert done.code == 0, done.stderr
    assert "a.weight" in done.stdout  # the table still goes to stdout
    text = page.read_text()
    assert text.count("data:image/png;base64,") == 3 and "<table>" in text and "a.weight" in text


def test_report_page_renders_in_chromium(cli, compressed_file, tmp_path):
    chromium = chromium_or_skip(CHROMIUM)
    page = tmp_path / "report.html"
    done = cli("report", str(compressed_file), "--html", str(page))
    assert done.code == 0, done.stderr
    assert chromium_images(chromium, page, tmp_path) == (3, 3)


def test_file_pictures_are_real(compressed_file):
    from hmcompress.runtime import read_file

    compressed = read_file(compressed_file)
    stats = {n: info["stats"] for n, info in compressed.metadata["matrices"].items()}
    pictures = plots.file_pictures(compressed.matrices, stats, relative=True)
    assert list(pictures) == ["layers.png", "layer_000_a.weight.png", "layer_001_b.weight.png"]
    for data in pictures.values():
        assert_real_picture(data)
    assert pages.file_page("x", {"tol": 0.01}, [], {}).startswith("<!DOCTYPE html>")


def test_markdown_report_is_a_well_formed_table(cli, compressed_file):
    """For $GITHUB_STEP_SUMMARY: every row has as many cells as the header ("|" escaped)."""
    done = cli("report", str(compressed_file), "--markdown")
    assert done.code == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("|")]
    cells = [len(re.split(r"(?<!\\)\|", row)) for row in rows]
    assert len(rows) == 4 and len(set(cells)) == 1, rows
    assert done.stdout.startswith("### ") and done.stdout.endswith("\n")


def test_html_escapes_names():
    table = compare.TextTable("<t>", ["a&b"], [["<img src=x>"], ["NO: x"]], ["n<1"])
    text = pages.table_html(table)
    assert "<img src=x>" not in text and "&lt;img src=x&gt;" in text and 'class="flag"' in text



# ------------------------------------------------------------------------------------------------
# compare --activations: errors in each layer's output norm on its calibration inputs


def input_gram(n: int, seed: int) -> torch.Tensor:
    """G = X Xᵀ / N of inputs with scales falling over two decades, correlated."""
    gen = torch.Generator().manual_seed(seed)
    mix, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    x = mix @ (torch.logspace(0, -2, n, dtype=torch.float64)[:, None]
               * torch.randn(n, 1000, generator=gen, dtype=torch.float64))
    g = x @ x.T / 1000
    return (g + g.T) / 2  # exactly symmetric, as calibrate writes it


def write_stats_file(path: pathlib.Path, grams: dict[str, torch.Tensor]) -> pathlib.Path:
    from hmcompress.calibrate import LayerInputs, write_stats

    write_stats(path, {name: LayerInputs(g, 1000, 1) for name, g in grams.items()}, {"model": "test"}, overwrite=True)
    return path


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory) -> pathlib.Path:
    """G for a.weight only: b.weight keeps the plain norm."""
    return write_stats_file(tmp_path_factory.mktemp("stats") / "stats.safetensors", {"a.weight": input_gram(64, 5)})


def test_activations_measure_every_method_in_the_output_norm(cli, model, stats_file):
    import jsonschema

    done = cli("compare", str(model), "--activations", str(stats_file), "--leaf", "16", "--json", "-q")
    assert done.code == 0, done.stderr
    payload = json.loads(done.stdout)
    jsonschema.validate(payload, SCHEMA)
    assert payload["activations"]["file"] == str(stats_file) and payload["activations"]["layers"] == ["a.weight"]
    names = [m["name"] for m in payload["methods"]]
    assert names == list(baselines.ACTIVATIONS_DEFAULT)
    layers = {layer["name"]: layer for layer in payload["layers"]}
    assert layers["a.weight"]["error_norm"] == "activations" and layers["b.weight"]["error_norm"] == "frobenius"
    w = kernel(96, 64, 0).double()
    gram = input_gram(64, 5)
    assert layers["a.weight"]["norm"] == pytest.approx(math.sqrt(float(torch.trace(w @ gram @ w.T))), rel=1e-9)
    assert layers["b.weight"]["norm"] == pytest.approx(float(kernel(64, 64, 1).double().norm()), rel=1e-12)
    for layer in payload["layers"]:
        entry = layer["tolerances"][0]
        assert entry["methods"]["hm-aware"]["within"] and entry["methods"]["svd-llm"]["within"]
    a = layers["a.weight"]["tolerances"][0]["methods"]
    assert a["gptq-int4"]["bytes"] == a["int4-g128"]["bytes"] and a["gptq-int4"]["rel_error"] < a["int4-g128"]["rel_error"]
    assert a["svd-llm"]["bytes"] <= a["svd"]["bytes"]
    # plain layers: the data-aware methods fall back to G = I
    b = layers["b.weight"]["tolerances"][0]["methods"]
    assert b["gptq-int4"] == b["int4-g128"] | {"detail": b["gptq-int4"]["detail"]}
    table = cli("compare", str(model), "--activations", str(stats_file), "--methods", "svd-llm", "--leaf", "16", "-q")
    assert table.code == 0, table.stderr
    assert "errors are OUTPUT errors on the calibration inputs" in table.stdout
    assert "relative Frobenius on the 1 without G (b.weight)" in table.stdout


def test_weights_whose_output_energy_overflows_are_one_line(cli, stats_file, tmp_path):
    """float64 weights of 1e200: tr(W G Wᵀ) leaves float64's range (compress keeps such a matrix
    as it is); compare says which tensor, in one line."""
    huge = tmp_path / "huge.safetensors"
    save_file({"a.weight": kernel(96, 64, 0).double() * 1e200, "b.weight": kernel(64, 64, 1)}, huge)
    run = cli("compare", huge, "--activations", stats_file, "--methods", "svd", "-q")
    assert run.code == 2 and "tensor 'a.weight': the weighted error leaves float64's range" in run.error_line()


@pytest.mark.slow
def test_plain_json_has_no_activation_fields(compared):
    payload = compared["payload"]
    assert "activations" not in payload and all("error_norm" not in layer for layer in payload["layers"])


def test_activation_refusals_are_one_line_and_exit_2(cli, model, tmp_path):
    bad_g = input_gram(64, 6)
    bad_g[0, 0] = -1.0
    other = {"other.weight": input_gram(64, 7)}
    wrong_size = {"a.weight": input_gram(32, 8)}
    cases = [
        ([], ["--methods", "svd-llm"], "--methods svd-llm needs --activations"),
        ([], ["--methods", "gptq-int8,hm-aware"], "gptq-int8, hm-aware need --activations"),
        (["--activations", str(write_stats_file(tmp_path / "other.safetensors", other))], [], "for another model"),
        (["--activations", str(write_stats_file(tmp_path / "size.safetensors", wrong_size))], [],
         "has inputs of size 32"),
        (["--activations", str(write_stats_file(tmp_path / "bad.safetensors", {"a.weight": bad_g}))], [],
         "negative diagonal"),
        (["--activations", str(tmp_path / "missing.safetensors")], [], "no such file"),
        (["--activations", str(model)], [], "not a calibration stats file"),
    ]
    for stats, args, message in cases:
        done = cli("compare", str(model), *stats, *args, "-q")
        assert done.code == 2 and message in done.stderr and done.stderr.count("\n") == 1, (message, done.stderr)


@pytest.mark.slow
def test_compare_activations_on_the_classifier(cli, tmp_path):
    """End to end: hmcompress calibrate's stats of a sample model, then compare with them."""
    from hmcompress.calibrate import calibrate_checkpoint

    checkpoint = ROOT / "sample_models" / "classifier" / "classifier.safetensors"
    stats = tmp_path / "stats.safetensors"
    calibrate_checkpoint("sample_models.classifier:build", checkpoint, stats)
    done = cli("compare", str(checkpoint), "--activations", str(stats), "--methods", "svd-llm,gptq-int4,int4-g128",
               "--include", "net.0.weight", "--include", "net.4.weight", "--json", "-q")
    assert done.code == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["activations"]["layers"] == ["net.0.weight", "net.4.weight"]
    total = next(t for t in payload["totals"] if t["tol"] == 0.01)["methods"]
    assert total["hm-aware"]["layers_within"] == total["svd-llm"]["layers_within"] == 2
    assert total["hm-aware"]["bytes"] < total["hm-auto"]["bytes"]  # built for the inputs: fewer bytes at the same output tol
    assert total["gptq-int4"]["rel_error"] < total["int4-g128"]["rel_error"]
    assert total["hm-aware"]["bytes"] < total["svd-llm"]["bytes"]
