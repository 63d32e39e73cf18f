"""What a new user meets first: help, version, choices, narrow terminals, JSON shapes, progress."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from hmcompress import __version__

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = ("compress", "report", "verify", "compare", "decompress", "inspect", "evaluate", "recalibrate")
NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    """Three 96x128 float32 matrices with long names, and a bias."""
    gen = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("basics") / "model.safetensors"
    tensors = {f"transformer.layers.{i}.attention.output_projection.weight": torch.randn(96, 128, generator=gen)
               for i in range(3)}
    save_file({**tensors, "head.bias": torch.zeros(96)}, str(path))
    return path


@pytest.fixture(scope="module")
def compressed(checkpoint, tmp_path_factory) -> pathlib.Path:
    from conftest import run_cli

    out = tmp_path_factory.mktemp("compressed") / "model.hm.safetensors"
    assert run_cli("compress", checkpoint, "-o", out, "--quiet", "--json").code == 0
    return out


def test_version_and_short_help(cli):
    for flag in ("--version", "-V"):
        run = cli(flag)
        assert run.code == 0 and run.stdout.strip() == f"hmcompress {__version__}"
    assert cli("-h").code == 0 and "compress" in cli("-h").stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_helps_with_an_example_and_no_value_placeholders_on_flags(cli, command):
    run = cli(command, "--help")
    assert run.code == 0, run.stderr
    text = " ".join(run.stdout.split())
    assert "Example" in text and f"hmcompress {command}" in text
    assert "<bool>" not in text
    assert cli(command, "-h").stdout == run.stdout


def test_choices_are_listed_and_checked(cli, checkpoint, tmp_path):
    text = " ".join(cli("compress", "--help").stdout.split())
    assert "optimal|paper" in text and "auto|keep" in text
    run = cli("compress", checkpoint, "-o", tmp_path / "x.hm.safetensors", "--strategy", "fastest")
    assert run.code == 2 and "fastest" in run.stderr and not (tmp_path / "x.hm.safetensors").exists()


@pytest.mark.slow
def test_help_does_not_import_torch():
    # A real process: what a fresh interpreter imports for --help.
    code = ("import sys; sys.argv = ['hmcompress', '--help']\nfrom hmcompress.cli import main\ntry:\n    main()\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stderr.strip().splitlines()[-1] == "False", done.stderr


def test_debug_is_accepted_after_the_command(cli, tmp_path):
    missing = tmp_path / "missing.pt"
    plain = cli("inspect", missing)
    assert plain.code == 2 and "Traceback" not in plain.stderr
    with pytest.raises(Exception, match="missing.pt"):  # --debug lets the error through, with its traceback
        cli("inspect", missing, "--debug")


def _table_cells(text: str) -> list[list[str]]:
    """The cells of every body row of a rich table (box-drawing borders)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("│"):
            rows.append([cell.strip() for cell in line.strip("│").split("│")])
    return rows


@pytest.mark.parametrize("columns", ["80", "60"])
def test_report_fits_a_narrow_terminal_and_never_splits_a_number(cli, compressed, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", columns)
    run = cli("report", compressed)
    assert run.code == 0, run.stderr
    table = run.stdout.split("\n(")[0]
    assert all(len(line) <= int(columns) for line in table.splitlines() if line[:1] in "┏┃┡│└")
    rows = _table_cells(table)
    assert rows
    for row in rows:
        # a continuation line of a folded name leaves every other cell empty; numbers are whole
        for cell in row[1:]:
            assert cell == "" or NUMBER.match(cell) or re.match(r"^[\d.]+ (B|KiB|MiB|GiB)$", cell) \
                or re.match(r"^\d+x\d+$", cell) or cell in ("unbounded", "inf") or cell.endswith("(F)"), cell
    assert "--wide" in run.stdout


def test_wide_shows_every_column(cli, compressed, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    run = cli("report", compressed, "--wide")
    assert run.code == 0
    for column in ("kappa(W)", "rank max/mean", "codecs", "bytes before"):
        assert column in run.stdout
    assert "left out" not in run.stdout


def test_json_is_one_object_with_ok_for_every_command(cli, checkpoint, compressed, tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(other))
    documents = {
        "compress one": cli("compress", checkpoint, "-o", tmp_path / "a.hm.safetensors", "--json", "-q"),
        "compress two": cli("compress", checkpoint, other, "--out-dir", tmp_path / "two", "--json", "-q"),
        "report": cli("report", compressed, "--json"),
        "verify": cli("verify", compressed, "--original", checkpoint, "--json"),
        "inspect": cli("inspect", checkpoint, "--json"),
        "decompress": cli("decompress", compressed, "-o", tmp_path / "d.safetensors", "--json"),
        "compare": cli("compare", checkpoint, "--methods", "svd", "--json", "-q"),
        "error": cli("report", tmp_path / "nothing.hm.safetensors", "--json"),
    }
    for what, run in documents.items():
        document = json.loads(run.stdout)
        assert isinstance(document, dict) and isinstance(document["ok"], bool), what
        assert document["ok"] is (what != "error"), (what, run.stderr)
    assert len(json.loads(documents["compress two"].stdout)["results"]) == 2
    assert (tmp_path / "two").is_dir()  # --out-dir is created


def test_inspect_ends_with_a_totals_line(cli, checkpoint):
    run = cli("inspect", checkpoint)
    assert run.code == 0
    assert re.search(r"4 tensors, [\d.]+ KiB; compress would take 3 matrices, [\d.]+ KiB", run.stdout)


def test_verify_speaks_in_the_tolerance_it_was_given_and_sums_up(cli, checkpoint, compressed):
    run = cli("verify", compressed, "--original", checkpoint)
    assert run.code == 0, run.stderr
    assert "relative error" in run.stdout and "<= tol 0.01" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == "3 of 3 matrices hold every recorded figure"


def test_markdown_puts_totals_first_and_has_a_legend(cli, compressed):
    text = cli("report", compressed, "--markdown").stdout
    assert text.index("tensors compressed") < text.index("| layer |")
    assert "rel err = " in text


@pytest.mark.slow
def test_plain_progress_has_total_percentage_and_throughput_from_the_start(checkpoint, tmp_path):
    # A real process with stderr on a pipe: the plain progress lines a CI log gets.
    env = {**os.environ, "HMCOMPRESS_WORKERS": "1"}
    done = subprocess.run([sys.executable, "-m", "hmcompress", "compress", str(checkpoint), "-o",
                           str(tmp_path / "p.hm.safetensors")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert lines[0].startswith("[0/3 0%]") and lines[0].endswith("starting")
    assert lines[-1].startswith("[3/3 100%]") and "MB/s" in lines[-1] and "done" in lines[-1]


def test_compress_checks_the_model_when_given_its_factory(cli, tmp_path):
    source = ROOT / "sample_models" / "classifier" / "classifier.safetensors"
    run = cli("compress", source, "-o", tmp_path / "c.hm.safetensors", "--model-factory",
              "sample_models.classifier:build", "--json", "-q")
    assert run.code == 0, run.stderr
    check = json.loads(run.stdout)["results"][0]["model_check"]
    assert check["metric"] == "accuracy" and check["samples"] == 64
    assert 0 < check["output_error"] < 0.05 and abs(check["compressed"] - check["original"]) < 0.02
    text = cli("compress", source, "-o", tmp_path / "c.hm.safetensors", "--force", "--model-factory",
               "sample_models.classifier:build", "-q").stdout
    assert "model check (sample_models.classifier:build): output error" in text and "accuracy" in text


def test_a_tolerance_that_zeroes_matrices_is_said(cli, checkpoint, tmp_path):
    run = cli("compress", checkpoint, "--tol", "2", "-o", tmp_path / "z.hm.safetensors", "-q")
    assert run.code == 0
    assert "hmcompress: warning: 3 matrices" in run.stderr and "stored as zero: tol 2" in run.stderr
    quiet = cli("compress", checkpoint, "--tol", "1e-2", "-o", tmp_path / "n.hm.safetensors", "-q")
    assert "warning" not in quiet.stderr
    huge = cli("compress", checkpoint, "--tol", "1e308", "-o", tmp_path / "h.hm.safetensors", "-q")  # its square overflows
    assert huge.code == 0 and huge.stderr.splitlines() == [line.replace("tol 2", "tol 1e+308")
                                                             for line in run.stderr.splitlines()]
