"""Sharded output (issue 15): ``--max-shard-size`` writes ``NAME-0000i-of-0000N.hm.safetensors``
and an index in Hugging Face's layout, and the runtime, ``report`` and ``verify`` read the
directory or the index as they read one file."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch
from helpers import files_under

from hmcompress.io.writer import parse_size
from hmcompress.runtime import FormatError, load_state_dict, patch, read_file
from sample_models import char_transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE = ROOT / "sample_models" / "char_transformer" / "char_transformer.safetensors"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, cli) -> tuple[pathlib.Path, pathlib.Path]:
    """The char transformer compressed into one file, and into shards of at most 300 kB."""
    directory = tmp_path_factory.mktemp("shards")
    single, sharded = directory / "single" / "ct.hm.safetensors", directory / "sharded" / "ct.hm.safetensors"
    for target, extra in ((single, ()), (sharded, ("--max-shard-size", "300KB"))):
        target.parent.mkdir()
        run = cli("compress", SOURCE, "-o", target, "-q", "--json", *extra)
        assert run.code == 0, run.stderr
    return single, sharded


def test_shards_and_index_in_the_hugging_face_layout(outputs):
    _single, sharded = outputs
    shards = sorted(sharded.parent.glob("ct-*-of-*.hm.safetensors"))
    assert len(shards) >= 3
    assert [p.name for p in shards] == [f"ct-{i:05d}-of-{len(shards):05d}.hm.safetensors"
                                        for i in range(1, len(shards) + 1)]
    assert not sharded.exists()
    index = json.loads((sharded.parent / "ct.hm.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(
        sum(t.numel() * t.element_size() for t in _tensors(p).values()) for p in shards)
    for shard in shards:  # each shard at most 300 kB of tensors, unless one matrix alone is larger
        sizes = sum(t.numel() * t.element_size() for t in _tensors(shard).values())
        assert sizes <= 300_000 or len(read_file(shard).matrices) + len(read_file(shard).passthrough) == 1


def _tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("spelling", ["directory", "index"])
def test_sharded_output_loads_as_the_single_file_does(outputs, spelling):
    single, sharded = outputs
    path = sharded.parent if spelling == "directory" else sharded.parent / "ct.hm.safetensors.index.json"
    expected, got = load_state_dict(single), load_state_dict(path)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    a, b = read_file(single), read_file(path)
    assert a.metadata == b.metadata
    model = char_transformer.build()
    patched = patch(model, path)
    reference = char_transformer.build()
    patch(reference, single)
    assert len(patched) > 0
    x = char_transformer.sample_inputs(4)
    assert torch.equal(model(x), reference(x))


def test_report_and_verify_accept_the_directory_and_the_index(outputs, cli):
    single, sharded = outputs
    one = json.loads(cli("report", single, "--json").stdout)
    for path in (sharded.parent, sharded.parent / "ct.hm.safetensors.index.json"):
        report = cli("report", path, "--json")
        assert report.code == 0, report.stderr
        assert json.loads(report.stdout)["layers"] == one["layers"]
    verify = cli("verify", sharded.parent, "--original", SOURCE)
    assert verify.code == 0, verify.stderr


def test_the_same_input_gives_the_same_shards(outputs, tmp_path, cli):
    _single, sharded = outputs
    again = tmp_path / "ct.hm.safetensors"
    assert cli("compress", SOURCE, "-o", again, "-q", "--max-shard-size", "300KB").code == 0
    for shard in sorted(sharded.parent.glob("ct*")):
        assert (tmp_path / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_a_checkpoint_within_the_size_is_one_file(tmp_path, cli):
    target = tmp_path / "ct.hm.safetensors"
    assert cli("compress", SOURCE, "-o", target, "-q", "--max-shard-size", "5GB").code == 0
    assert target.is_file() and not list(tmp_path.glob("*index.json"))


@pytest.mark.parametrize("size", ["", "5XB", "-1", "0", "GB"])
def test_a_bad_shard_size_is_refused_before_anything_is_written(tmp_path, size, cli):
    before = files_under(tmp_path)
    run = cli("compress", SOURCE, "-o", tmp_path / "x.hm.safetensors", "--max-shard-size", size)
    assert run.code == 2 and "--max-shard-size" in run.error_line()
    assert files_under(tmp_path) == before


def test_sizes_read_as_hugging_face_reads_them():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("300kb") == 300_000
    assert parse_size("1000") == 1000 and parse_size("1.5MB") == 1_500_000


def test_a_broken_index_is_refused(outputs, tmp_path, cli):
    _single, sharded = outputs
    for shard in sharded.parent.glob("ct-*"):
        (tmp_path / shard.name).write_bytes(shard.read_bytes())
    index = json.loads((sharded.parent / "ct.hm.safetensors.index.json").read_text())
    cases = {
        "no weight_map": {"metadata": {}},
        "outside": {"weight_map": {**index["weight_map"], "x": "../x.hm.safetensors"}},
        "missing tensor": {"weight_map": dict(list(index["weight_map"].items())[1:])},
        "not indexed": {"weight_map": {**index["weight_map"], "ghost": next(iter(index["weight_map"].values()))}},
    }
    for case, table in cases.items():
        path = tmp_path / "ct.hm.safetensors.index.json"
        path.write_text(json.dumps(table))
        with pytest.raises(FormatError):
            read_file(path)
        assert cli("report", path).code == 2, case
    (tmp_path / "other.hm.safetensors.index.json").write_text("{}")
    with pytest.raises(FormatError, match="holds 2"):
        read_file(tmp_path)
