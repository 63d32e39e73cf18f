"""Refusing a file costs little: every hostile file of the corpus under 1 MB is refused in under
2 s and under 300 MB of new memory, by every command that reads it; reading a valid file takes a
small multiple of what its headers truthfully describe.

Memory is capped, not sampled: `limits.memory_limit` sets RLIMIT_DATA to what the test process
holds plus the budget, so any larger allocation fails (and fails the test) instead of passing
unseen. Commands run in this process (the `cli` fixture), after a warm-up that imports everything
a command imports, so that the time measured is the command's own.
"""
from __future__ import annotations

import pathlib

import corpus
import pytest
from limits import memory_limit, stopwatch

REFUSAL_SECONDS = 2.0
REFUSAL_BYTES = 300 << 20
SMALL_FILE = 1 << 20  # the promise covers files (or checkpoint directories) under 1 MB


def size(path: pathlib.Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.is_file() else 0


@pytest.fixture(scope="module", autouse=True)
def warm(cli, tmp_path_factory) -> None:
    """Run every command once on good files, so that lazy imports are not measured."""
    directory = tmp_path_factory.mktemp("warm")
    good = corpus.good_compressed(directory)
    original = directory / "original.safetensors"
    for args in (("inspect", original, "--json"), ("compress", original, "-o", directory / "again.hm.safetensors",
                                                   "--min-size", "8", "--leaf", "8", "--quiet", "--json"),
                 ("report", good, "--json"), ("report", good, "--markdown"), ("verify", good, "--original", original),
                 ("decompress", good, "-o", directory / "dense.safetensors")):
        assert cli(*args).code == 0


def refused_within_budget(cli, *args: object) -> float:
    """Run a command that must refuse its input (exit 2, one line) within the budget; its time."""
    with memory_limit(REFUSAL_BYTES), stopwatch() as took:
        run = cli(*args)
    assert run.code == 2, (args, run.stderr)
    run.error_line()
    assert took[0] < REFUSAL_SECONDS, (args, took[0])
    return took[0]


def small(case: corpus.Case, path: pathlib.Path) -> None:
    if size(path) >= SMALL_FILE:
        pytest.skip(f"{case.name} is {size(path)} bytes: over the 1 MB the promise covers")


@pytest.mark.parametrize("case", corpus.HOSTILE_CHECKPOINTS, ids=lambda c: c.name)
def test_checkpoint_refusal_is_fast_and_small(cli, tmp_path, case):
    path = case.make(tmp_path)
    small(case, path)
    refused_within_budget(cli, "compress", path, "-o", tmp_path / "out.hm.safetensors", "--quiet", "--json")
    if case.name not in corpus.DATA_PROBLEMS:
        refused_within_budget(cli, "inspect", path, "--json")


@pytest.mark.parametrize("case", corpus.HOSTILE_COMPRESSED + corpus.HOSTILE_STATS, ids=lambda c: c.name)
def test_compressed_file_refusal_is_fast_and_small(cli, tmp_path, case):
    path = case.make(tmp_path)
    small(case, path)
    refused_within_budget(cli, "report", path, "--json")
    refused_within_budget(cli, "verify", path, "--original", tmp_path / "original.safetensors")
    if case in corpus.HOSTILE_COMPRESSED:
        refused_within_budget(cli, "decompress", path, "-o", tmp_path / "dense.safetensors")


@pytest.mark.parametrize("case", [c for c in corpus.HOSTILE_RUNTIME if not c.loads], ids=lambda c: c.name)
def test_runtime_refusal_is_fast_and_small(cli, tmp_path, case):
    path = case.make(tmp_path)
    small(case, path)
    refused_within_budget(cli, "decompress", path, "-o", tmp_path / "dense.safetensors")


def test_a_million_entries_are_refused_by_counting(cli, tmp_path):
    """9.7 MB (beyond the promise's 1 MB), a million entries: refused before torch builds them."""
    path = corpus.zip_million_entries(tmp_path)
    with memory_limit(600 << 20), stopwatch() as took:
        run = cli("inspect", path, "--json")
    assert run.code == 2 and "more than 1000000 objects" in run.error_line()
    assert took[0] < 10, took[0]


def test_a_maximally_compressed_npz_is_inspected_without_inflating_it_into_memory(cli, tmp_path):
    """An .npz of 256 MiB of zeros in about 250 KiB: its headers say 256 MiB (truthfully), and
    inspecting it reads the member through a fixed buffer to check it, holding none of it."""
    path = corpus.npz_zeros(64 << 20)(tmp_path)
    assert size(path) < SMALL_FILE
    with memory_limit(64 << 20), stopwatch() as took:
        run = cli("inspect", path, "--json")
    assert run.code == 0, run.stderr
    assert took[0] < 5, took[0]


def test_loading_a_valid_file_takes_a_small_multiple_of_what_it_describes(tmp_path):
    """1 MiB of row bitmaps over a 2**19 x 8 matrix: validated and expanded within 8 times its
    dense float64 form (checking the bitmaps once took gigabytes)."""
    from hmcompress.runtime import load_state_dict

    path = corpus.HOSTILE_RUNTIME[[c.name for c in corpus.HOSTILE_RUNTIME].index("rows_bitmaps")].make(tmp_path)
    dense = (2**19) * 8 * 8
    with memory_limit(8 * dense), stopwatch() as took:
        state = load_state_dict(path)
    assert state[corpus.COMPRESSED_NAME].shape == (2**19, 8)
    assert took[0] < 5, took[0]
