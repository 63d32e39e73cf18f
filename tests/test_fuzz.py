"""Fuzzing the two loaders with random byte mutations of valid files, and their JSON headers with
structural ones (nesting thousands deep, numbers of thousands of digits or beyond float64, values
of the wrong type, keys deleted or given twice, strings that are not Unicode).

The compressed-file loader (`hmcompress.runtime.read_file`) and the checkpoint loader
(`open_checkpoint` + loading every entry) may only fail with the tool's own clear errors
(`USER_ERRORS`), never allocate beyond the file's size (a data-segment limit turns such an
allocation into an error the test catches), and whatever they return must agree with what they
announced. `make test` runs a few dozen mutations per loader and format, deterministically;
`make fuzz` sets HMCOMPRESS_FUZZ_EXAMPLES=10000 and runs that many per loader and format.
The compressed files' structural mutations also go through `report`'s reader of the stats.
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import struct

import numpy as np
import pytest
import torch
from corpus import coded_in_place, rewrite_compressed
from helpers import HEADER, mixed_matrix
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from limits import memory_limit
from safetensors.torch import save_file

from hmcompress.api import stats_from_file
from hmcompress.core.stats import LayerStats
from hmcompress.errors import USER_ERRORS
from hmcompress.io.checkpoint import open_checkpoint
from hmcompress.io.writer import write_compressed
from hmcompress.runtime import CompactMatrix, FormatError, HLinear, compact_layouts, read_file

EXAMPLES = int(os.environ.get("HMCOMPRESS_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="HMCOMPRESS_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
HEADROOM = 256 * 2**20  # allocation allowed beyond what the process holds already, per example
ALLOCATION_FAILURE = re.compile(r"alloc|MemoryError|out of memory", re.IGNORECASE)


# ------------------------------------------------------------------------------------ seeds

def _small(seed: int, shape=(8, 6)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _seed_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """One small valid file per format (small, so that most mutations hit structure)."""
    files = {}
    files["safetensors"] = directory / "seed.safetensors"
    save_file({"a.weight": _small(0), "a.bias": _small(1, (6,)), "steps": torch.arange(3)},
              str(files["safetensors"]), metadata={"epoch": "3"})
    state = {"model": {"a.weight": _small(2), "b": [_small(3, (4,)), 7]}, "epoch": 3}
    files["torch_zip"] = directory / "seed.pt"
    torch.save(state, files["torch_zip"])
    files["torch_legacy"] = directory / "seed_legacy.pt"
    torch.save(state, files["torch_legacy"], _use_new_zipfile_serialization=False)
    files["torchscript"] = directory / "seed.jit"
    torch.jit.save(torch.jit.script(torch.nn.Linear(6, 4)), files["torchscript"])
    files["npz"] = directory / "seed.npz"
    np.savez(files["npz"], w=_small(4).numpy(), b=np.arange(5, dtype=np.int16))
    files["compressed"] = directory / "seed.hm.safetensors"
    matrix = mixed_matrix()
    stats = LayerStats("w", [24, 20], "float32", 24 * 20 * 4, matrix.nbytes, True, tol=0.01, budget=0.1).to_json()
    write_compressed(files["compressed"], {"w": (matrix, {"orig_shape": [24, 20], "stats": stats})},
                     {"b": (torch.ones(3), "1-D")}, HEADER)
    files["coded"] = rewrite_compressed(files["compressed"], directory / "seed-coded.hm.safetensors", _all_coded)
    return files


def _all_coded(tensors: dict[str, torch.Tensor], _meta: dict) -> None:
    """Every integer pool entropy-coded (FORMAT.md version 2), so that mutations hit coded streams."""
    for name in [n for n in tensors if ".pool.i" in n]:
        prefix, codec = name.split("pool.")
        coded_in_place(tensors, prefix, codec)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, pathlib.Path]:
    return _seed_files(tmp_path_factory.mktemp("fuzz-seeds"))


# ------------------------------------------------------------------------------------ mutations

INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0xFF, ord("-"), ord("9"), ord("{"), ord('"'), ord(".")]


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` with a few random edits: bytes, bits, a number in text, a cut, a copied chunk."""
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["byte", "bit", "number", "cut", "chunk"]))
        if not raw:
            break
        where = draw(st.integers(0, len(raw) - 1))
        if kind == "byte":
            raw[where] = draw(st.sampled_from(INTERESTING) | st.integers(0, 255))
        elif kind == "bit":
            raw[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "number":
            runs = [m.span() for m in re.finditer(rb"\d+", bytes(raw))]
            if runs:
                start, end = runs[draw(st.integers(0, len(runs) - 1))]
                number = draw(st.sampled_from([0, 1, -1, 2**31, 2**32 + 1, 2**63, 10**30]) | st.integers(-10**6, 10**6))
                raw[start:end] = str(number).encode()
        elif kind == "cut":
            del raw[where:]
        else:
            length = draw(st.integers(1, 64))
            chunk = raw[where:where + length]
            at = draw(st.integers(0, len(raw)))
            raw[at:at] = chunk if draw(st.booleans()) else b""
            if not draw(st.booleans()):
                del raw[where:where + length]
    return bytes(raw)


# ------------------------------------------------------------------------------------ guards

def clear_error(exc: BaseException, path: pathlib.Path) -> None:
    """A tool error must name the file and must not be an allocation failure in disguise."""
    message = str(exc)
    assert str(path) in message, message
    assert "\n" not in message, message
    assert not ALLOCATION_FAILURE.search(message), message


def write_mutation(directory: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    path = directory / f"mutant-{name}"
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------ the loaders

def load_checkpoint(path: pathlib.Path) -> None:
    """Open and load every entry; what loads must be what the entry announced, within the file."""
    size = path.stat().st_size
    for entry in open_checkpoint(path).entries:
        tensor = entry.load()
        assert tuple(tensor.shape) == entry.shape and tensor.dtype == entry.dtype, entry.name
        assert tensor.numel() * tensor.element_size() == entry.nbytes <= size, entry.name


def load_compressed(path: pathlib.Path) -> None:
    """Read and validate; every matrix then decodes (validation guarantees the pool ranges), and
    runs as an `HLinear` and as a compact layer in every layout it offers, unless a tile plan is
    refused (`FormatError`, before any allocation)."""
    compressed = read_file(path)
    size = path.stat().st_size
    for name, hm in compressed.matrices.items():
        m, n = hm.shape
        if m * n <= 64 * size:  # a valid file may describe a huge all-zero matrix in a few bytes
            assert tuple(hm.to_dense().shape) == (m, n), name
        try:
            layer = HLinear(hm)
        except FormatError as exc:
            assert "as an HLinear would take" in str(exc), exc
        else:
            if n <= 4096:
                assert tuple(layer(torch.ones(2, n)).shape) == (2, m), name
        for layout in compact_layouts(hm):
            try:
                compact = CompactMatrix(hm, layout=layout)
            except FormatError as exc:
                assert "as an HLinear would take" in str(exc), exc
            else:
                assert compact.held_bytes <= 80 * size + 64 * (m + n), (name, layout)  # the plan limit
                if n <= 4096:
                    assert tuple(compact.matmul_t(torch.ones(2, n)).shape) == (2, m), (name, layout)
    for name, tensor in compressed.passthrough.items():
        assert tensor.numel() * tensor.element_size() <= size, name


def fuzz_once(loader, directory: pathlib.Path, name: str, data: bytes) -> None:
    path = write_mutation(directory, name, data)
    try:
        with memory_limit(HEADROOM):
            loader(path)
    except USER_ERRORS as exc:
        clear_error(exc, path)


CHECKPOINT_FORMATS = ["safetensors", "torch_zip", "torch_legacy", "torchscript", "npz"]
SUFFIX = {"safetensors": "seed.safetensors", "torch_zip": "seed.pt", "torch_legacy": "seed.pt",
          "torchscript": "seed.jit", "npz": "seed.npz", "compressed": "seed.hm.safetensors",
          "coded": "seed-coded.hm.safetensors"}


@pytest.mark.parametrize("fmt", CHECKPOINT_FORMATS)
def test_checkpoint_loader_survives_mutations(seeds, fmt):
    original = seeds[fmt].read_bytes()
    load_checkpoint(seeds[fmt])  # the seed itself loads

    @FUZZ
    @given(data=mutated(original))
    def run(data: bytes) -> None:
        fuzz_once(load_checkpoint, seeds[fmt].parent, SUFFIX[fmt], data)

    run()


@pytest.mark.parametrize("fmt", ["compressed", "coded"])
def test_compressed_loader_survives_mutations(seeds, fmt):
    original = seeds[fmt].read_bytes()
    load_compressed(seeds[fmt])
    assert fmt != "coded" or ".coded.i" in original[:4096].decode("utf-8", "replace")

    @FUZZ
    @given(data=mutated(original))
    def run(data: bytes) -> None:
        fuzz_once(load_compressed, seeds[fmt].parent, SUFFIX[fmt], data)

    run()


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_the_allocation_guard_catches_big_allocations():
    """The guard itself works: without it the fuzz tests could not see an oversized allocation."""
    with pytest.raises((MemoryError, RuntimeError)) as info:
        with memory_limit(HEADROOM):
            torch.empty(HEADROOM // 2)  # 2 x HEADROOM bytes: beyond any free memory already held
    assert ALLOCATION_FAILURE.search(f"{info.type.__name__} {info.value}")



# ------------------------------------------------------------------------------------ structural

MARKER = "__FUZZ_LITERAL__"
LITERALS = st.sampled_from(["1e400", "-1e400", "9" * 30, "9" * 400, "9" * 4000, "9" * 5000, "-0", "0.5e-400",
                            '"\\udc80"', '"\\ud800x"', "null", "true", "[]", "{}", '""', "[[[[]]]]", "1.5",
                            "-1", "2147483648", "9223372036854775808"])
PLAIN = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=6), st.just([]), st.just({}),
                  st.just([1, 2]), st.just({"a": 1}), st.floats(allow_nan=False, allow_infinity=False))


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, prefix + (index,))
    return found


@st.composite
def json_mutated(draw, text: str) -> str:
    """``text`` (a JSON document) with one to three structural edits, as JSON text again."""
    value = json.loads(text)
    literals: list[str] = []
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(value) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        kind = draw(st.sampled_from(["plain", "literal", "nest", "delete", "duplicate"]))
        if kind == "plain":
            parent[path[-1]] = copy.deepcopy(draw(PLAIN))  # st.just gives one shared object
        elif kind == "literal":
            literals.append(draw(LITERALS))
            parent[path[-1]] = f"{MARKER}{len(literals) - 1}"
        elif kind == "nest":
            depth = draw(st.sampled_from([2, 65, 900, 3000, 20000]))
            literals.append("[" * depth + json.dumps(parent[path[-1]]) + "]" * depth)
            parent[path[-1]] = f"{MARKER}{len(literals) - 1}"
        elif kind == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif kind == "duplicate" and isinstance(parent, dict) and isinstance(path[-1], str):
            literals.append(json.dumps(parent[path[-1]]) + ", " + json.dumps(path[-1]) + ": "
                            + json.dumps(parent[path[-1]]))
            parent[path[-1]] = f"{MARKER}{len(literals) - 1}"
    out = json.dumps(value)
    for index, literal in enumerate(literals):
        out = out.replace(json.dumps(f"{MARKER}{index}"), literal)
    return out


def _split_safetensors(data: bytes) -> tuple[str, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return data[8:8 + length].decode("utf-8"), data[8 + length:]


def _join_safetensors(header: str, rest: bytes) -> bytes:
    raw = header.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + rest


@st.composite
def header_mutated(draw, data: bytes, nested_key: str | None = None) -> bytes:
    """A safetensors file with its header JSON mutated structurally; with ``nested_key``, the JSON
    held as a string under ``__metadata__[nested_key]`` may be mutated instead (hmcompress's own)."""
    header, rest = _split_safetensors(data)
    if nested_key is not None and draw(st.booleans()):
        outer = json.loads(header)
        outer["__metadata__"][nested_key] = draw(json_mutated(outer["__metadata__"][nested_key]))
        header = json.dumps(outer)
    else:
        header = draw(json_mutated(header))
    return _join_safetensors(header, rest)


def load_compressed_and_stats(path: pathlib.Path) -> None:
    """What `report` reads too: the stats, type-checked."""
    load_compressed(path)
    stats_from_file(path)


def test_safetensors_header_survives_structural_mutations(seeds):
    original = seeds["safetensors"].read_bytes()

    @FUZZ
    @given(data=header_mutated(original))
    def run(data: bytes) -> None:
        fuzz_once(load_checkpoint, seeds["safetensors"].parent, "structural.safetensors", data)

    run()


def test_compressed_header_and_metadata_survive_structural_mutations(seeds):
    original = seeds["compressed"].read_bytes()
    load_compressed_and_stats(seeds["compressed"])

    @FUZZ
    @given(data=header_mutated(original, nested_key="hmcompress"))
    def run(data: bytes) -> None:
        fuzz_once(load_compressed_and_stats, seeds["compressed"].parent, "structural.hm.safetensors", data)

    run()
