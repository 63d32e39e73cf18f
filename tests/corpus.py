"""Generated test corpora: hostile inputs that must be refused, awkward ones that must just work.

Nothing here is committed as a binary: every case is a function that writes its file(s) into a
directory. Hostile payloads create the file ``SENTINEL`` in that directory if they ever run, so a
test proves no code ran by its absence. ``python tests/corpus.py DIR`` writes every case into
``DIR/<corpus>/<case>/`` for a look by hand.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pathlib
import pickle
import shlex
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable

import numpy as np
import torch
from safetensors.torch import save_file

SENTINEL = "PWNED"

Maker = Callable[[pathlib.Path], pathlib.Path]


@dataclasses.dataclass(frozen=True)
class Case:
    """One corpus entry: ``make(directory)`` writes it and returns the path given to the CLI."""

    name: str
    make: Maker
    problem: str = ""  # hostile: a regex the one-line error must match


# ------------------------------------------------------------------------------------- payloads

def sentinel(directory: pathlib.Path) -> pathlib.Path:
    return directory / SENTINEL


class _Call:
    """Pickles as ``func(*args)``: what a malicious checkpoint makes the unpickler run."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _system(directory: pathlib.Path) -> _Call:
    return _Call(os.system, f"touch {shlex.quote(str(sentinel(directory)))}")


def _eval(directory: pathlib.Path) -> _Call:
    return _Call(eval, f"open({str(sentinel(directory))!r}, 'w').close()")


def _raw_system_pickle(directory: pathlib.Path) -> bytes:
    """A hand-assembled protocol-0 pickle calling ``os.system`` (no class of ours involved)."""
    return b"cos\nsystem\n(V" + f"touch {shlex.quote(str(sentinel(directory)))}".encode() + b"\ntR."


def _raw_eval_pickle(directory: pathlib.Path) -> bytes:
    return (b"cbuiltins\neval\n(V" + f"open({str(sentinel(directory))!r}, 'w').close()".encode()
            + b"\ntR.")


def _weights(seed: int = 0, shape: tuple[int, int] = (96, 80)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _zip_members(path: pathlib.Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def _write_zip(path: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _replace_member(path: pathlib.Path, suffix: str, change: Callable[[bytes], bytes]) -> pathlib.Path:
    members = _zip_members(path)
    (name,) = [n for n in members if n.endswith(suffix)]
    members[name] = change(members[name])
    return _write_zip(path, members)


def _flip_bit(data: bytes, index: int, bit: int = 0) -> bytes:
    raw = bytearray(data)
    raw[index] ^= 1 << bit
    return bytes(raw)


# ------------------------------------------------------------------------------- PyTorch pickles

def _torch_with(payload: Callable[[pathlib.Path], _Call], legacy: bool) -> Maker:
    """A PyTorch checkpoint holding ``payload`` beside a weight matrix (zip or legacy format)."""
    def make(d: pathlib.Path) -> pathlib.Path:
        torch.save({"w": _weights(), "hook": payload(d)}, d / "model.pt", _use_new_zipfile_serialization=not legacy)
        return d / "model.pt"
    return make


def plain_pickle_os_system(d: pathlib.Path) -> pathlib.Path:
    (d / "model.bin").write_bytes(pickle.dumps(_system(d), protocol=2))
    return d / "model.bin"


def zip_data_pkl_replaced(d: pathlib.Path) -> pathlib.Path:
    """A valid zip checkpoint whose data.pkl was swapped for one that calls os.system."""
    torch.save({"w": _weights()}, d / "model.pt")
    return _replace_member(d / "model.pt", "/data.pkl", lambda _old: _raw_system_pickle(d))


def zip_data_pkl_bit_flipped(d: pathlib.Path) -> pathlib.Path:
    """One bit of data.pkl flipped after the zip was written (its CRC no longer matches)."""
    torch.save({"w": _weights()}, d / "model.pt")
    members = _zip_members(d / "model.pt")
    (name,) = [n for n in members if n.endswith("/data.pkl")]
    with open(d / "model.pt", "r+b") as fh:
        data = fh.read()
        start = data.index(members[name])
        fh.seek(start + 2)
        fh.write(bytes([data[start + 2] ^ 0x10]))
    return d / "model.pt"


def zip_deep_nesting(d: pathlib.Path) -> pathlib.Path:
    """data.pkl holding 50,000 nested lists: a recursion bomb for naive flattening."""
    depth = 50_000
    nested = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    torch.save({"w": _weights()}, d / "model.pt")
    return _replace_member(d / "model.pt", "/data.pkl", lambda _old: nested)


def zip_shared_bomb(d: pathlib.Path) -> pathlib.Path:
    """60 levels of a list holding the level below twice: 2**60 paths, a few hundred bytes."""
    level: list = [torch.zeros(1)]
    for _ in range(60):
        level = [level, level]
    torch.save({"w": level}, d / "model.pt")
    return d / "model.pt"


def zip_cycle(d: pathlib.Path) -> pathlib.Path:
    """A list that contains itself (memo reference), beside a tensor."""
    cyclic: list = [torch.zeros(1)]
    cyclic.append(cyclic)
    torch.save({"w": cyclic}, d / "model.pt")
    return d / "model.pt"


def torch_flattened_names_collide(d: pathlib.Path) -> pathlib.Path:
    """'a.b' and {'a': {'b': ...}} flatten to the same name: one would silently replace the other."""
    torch.save({"a.b": _weights(1), "a": {"b": _weights(2)}}, d / "model.pt")
    return d / "model.pt"


def zip_expand_bomb(d: pathlib.Path) -> pathlib.Path:
    """One float of storage viewed as a 100,000 x 100,000 matrix (40 GB if materialised)."""
    torch.save({"w": torch.zeros(1).expand(100_000, 100_000)}, d / "model.pt")
    return d / "model.pt"


def legacy_expand_bomb(d: pathlib.Path) -> pathlib.Path:
    torch.save({"w": torch.zeros(1).expand(100_000, 100_000)}, d / "model.pt",
               _use_new_zipfile_serialization=False)
    return d / "model.pt"


def zip_truncated_storage(d: pathlib.Path) -> pathlib.Path:
    torch.save({"w": _weights()}, d / "model.pt")
    return _replace_member(d / "model.pt", "/data/0", lambda old: old[: len(old) // 2])


def torch_truncated(d: pathlib.Path) -> pathlib.Path:
    torch.save({"w": _weights()}, d / "model.pt")
    data = (d / "model.pt").read_bytes()
    (d / "model.pt").write_bytes(data[: len(data) // 3])
    return d / "model.pt"


# ------------------------------------------------------------------------------- TorchScript

def _scripted(d: pathlib.Path) -> pathlib.Path:
    torch.jit.save(torch.jit.script(torch.nn.Linear(80, 96)), d / "model.jit")
    return d / "model.jit"


def torchscript_data_pkl_eval(d: pathlib.Path) -> pathlib.Path:
    return _replace_member(_scripted(d), "/data.pkl", lambda _old: _raw_eval_pickle(d))


def torchscript_data_pkl_os_system(d: pathlib.Path) -> pathlib.Path:
    return _replace_member(_scripted(d), "/data.pkl", lambda _old: _raw_system_pickle(d))


class _StorageRef:
    """Marks where a crafted TorchScript pickle refers to storage ``data/0`` (one float)."""


class _ScriptPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", torch.FloatStorage, "0", "cpu", 1)
        return None


def torchscript_expand_bomb(d: pathlib.Path) -> pathlib.Path:
    """A hand-made TorchScript data.pkl: one float of storage as a 100,000 x 100,000 tensor."""
    import io

    from torch._utils import _rebuild_tensor_v2

    bomb = _Call(_rebuild_tensor_v2, _StorageRef(), 0, (100_000, 100_000), (0, 0), False,
                 collections.OrderedDict())
    buffer = io.BytesIO()
    _ScriptPickler(buffer, protocol=2).dump({"weight": bomb})
    path = _scripted(d)
    members = _zip_members(path)
    root = next(n for n in members if n.endswith("/data.pkl"))[: -len("/data.pkl")]
    members[f"{root}/data.pkl"] = buffer.getvalue()
    members[f"{root}/data/0"] = struct.pack("<f", 1.0)
    return _write_zip(path, members)


# ------------------------------------------------------------------------------- safetensors

def _safetensors(d: pathlib.Path, tensors: dict[str, torch.Tensor] | None = None) -> pathlib.Path:
    save_file(tensors or {"w": _weights(), "b": torch.zeros(96)}, str(d / "model.safetensors"))
    return d / "model.safetensors"


def _raw_safetensors(d: pathlib.Path, header: str | bytes, data: bytes = b"", name: str = "model.safetensors",
                     claimed: int | None = None) -> pathlib.Path:
    raw = header.encode() if isinstance(header, str) else header
    length = len(raw) if claimed is None else claimed
    (d / name).write_bytes(struct.pack("<Q", length) + raw + data)
    return d / name


def safetensors_truncated(d: pathlib.Path) -> pathlib.Path:
    path = _safetensors(d)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    return path


def safetensors_header_bit_flipped(d: pathlib.Path) -> pathlib.Path:
    """Bit 0 of the header's opening brace: '{' becomes 'z'."""
    path = _safetensors(d)
    path.write_bytes(_flip_bit(path.read_bytes(), 8))
    return path


def safetensors_length_bit_flipped(d: pathlib.Path) -> pathlib.Path:
    """Bit 6 of the header length's top byte: the header claims 2**62 more bytes."""
    path = _safetensors(d)
    path.write_bytes(_flip_bit(path.read_bytes(), 7, 6))
    return path


def safetensors_huge_shape(d: pathlib.Path) -> pathlib.Path:
    header = {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 2**82]}}
    return _raw_safetensors(d, json.dumps(header), b"\0" * 64)


def safetensors_shape_offsets_disagree(d: pathlib.Path) -> pathlib.Path:
    header = {"w": {"dtype": "F32", "shape": [4096, 4096], "data_offsets": [0, 64]}}
    return _raw_safetensors(d, json.dumps(header), b"\0" * 64)


def safetensors_overlapping_offsets(d: pathlib.Path) -> pathlib.Path:
    header = {"a": {"dtype": "F32", "shape": [8, 8], "data_offsets": [0, 256]},
              "b": {"dtype": "F32", "shape": [8, 8], "data_offsets": [128, 384]}}
    return _raw_safetensors(d, json.dumps(header), b"\0" * 384)


def safetensors_header_150mb(d: pathlib.Path) -> pathlib.Path:
    """The length field claims a 150 MB header (the file is tiny: nothing may be allocated)."""
    return _raw_safetensors(d, b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
                            b"\0" * 4, claimed=150 * 2**20)


def safetensors_non_utf8_name(d: pathlib.Path) -> pathlib.Path:
    header = b'{"w\xff\xfe": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    return _raw_safetensors(d, header, b"\0" * 4)


def safetensors_lone_surrogate_name(d: pathlib.Path) -> pathlib.Path:
    """Valid JSON, but the escaped name is no Unicode string (a lone surrogate)."""
    header = '{"w\\udc80": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    return _raw_safetensors(d, header, b"\0" * 4)


def safetensors_duplicate_names(d: pathlib.Path) -> pathlib.Path:
    header = ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
              '"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
    return _raw_safetensors(d, header, b"\0" * 8)


def safetensors_metadata_not_strings(d: pathlib.Path) -> pathlib.Path:
    header = {"__metadata__": {"epoch": 3}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    return _raw_safetensors(d, json.dumps(header), b"\0" * 4)


def safetensors_metadata_not_object(d: pathlib.Path) -> pathlib.Path:
    header = {"__metadata__": "x", "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    return _raw_safetensors(d, json.dumps(header), b"\0" * 4)


def safetensors_nan(d: pathlib.Path) -> pathlib.Path:
    w = _weights()
    w[5, 7] = float("nan")
    return _safetensors(d, {"layer.weight": w})


def safetensors_inf(d: pathlib.Path) -> pathlib.Path:
    w = _weights().double()
    w[0, 0] = -float("inf")
    return _safetensors(d, {"layer.weight": w})


# ------------------------------------------------------------------------------- other files

def npz_object_array(d: pathlib.Path) -> pathlib.Path:
    np.savez(d / "model.npz", w=np.array([_system(d)], dtype=object))
    return d / "model.npz"


def npz_truncated(d: pathlib.Path) -> pathlib.Path:
    np.savez(d / "model.npz", w=_weights().numpy())
    data = (d / "model.npz").read_bytes()
    (d / "model.npz").write_bytes(data[: len(data) // 2])
    return d / "model.npz"


def empty_file(d: pathlib.Path) -> pathlib.Path:
    (d / "model.safetensors").write_bytes(b"")
    return d / "model.safetensors"


def unknown_format(d: pathlib.Path) -> pathlib.Path:
    (d / "model.dat").write_bytes(b"GGUF" + b"\x07" * 60)
    return d / "model.dat"


def nonexistent_path(d: pathlib.Path) -> pathlib.Path:
    return d / "missing.pt"


def directory_without_checkpoint(d: pathlib.Path) -> pathlib.Path:
    (d / "ckpt").mkdir()
    (d / "ckpt" / "README.md").write_text("weights go here\n")
    return d / "ckpt"


def _sharded(d: pathlib.Path, weight_map: object | None = None, index_text: str | None = None) -> pathlib.Path:
    shards = d / "sharded"
    shards.mkdir()
    save_file({"a.weight": _weights(1)}, str(shards / "model-1.safetensors"))
    save_file({"b.weight": _weights(2)}, str(shards / "model-2.safetensors"))
    if index_text is None:
        index_text = json.dumps({"weight_map": weight_map})
    (shards / "model.safetensors.index.json").write_text(index_text)
    return shards


def shards_index_not_json(d: pathlib.Path) -> pathlib.Path:
    return _sharded(d, index_text='{"weight_map": {"a.weight": ')


def shards_index_without_map(d: pathlib.Path) -> pathlib.Path:
    return _sharded(d, index_text='{"metadata": {}}')


def shards_missing_shard(d: pathlib.Path) -> pathlib.Path:
    return _sharded(d, {"a.weight": "model-1.safetensors", "b.weight": "model-3.safetensors"})


def shards_path_escapes(d: pathlib.Path) -> pathlib.Path:
    save_file({"c.weight": _weights(3)}, str(d / "outside.safetensors"))
    return _sharded(d, {"a.weight": "model-1.safetensors", "c.weight": "../outside.safetensors"})


def shards_index_names_absent_tensor(d: pathlib.Path) -> pathlib.Path:
    return _sharded(d, {"a.weight": "model-1.safetensors", "z.weight": "model-2.safetensors"})


def shards_nul_in_a_shard_name(d: pathlib.Path) -> pathlib.Path:
    return _sharded(d, {"a.weight": "model-1.safetensors\u0000x"})


def shards_lone_surrogate_in_a_shard_name(d: pathlib.Path) -> pathlib.Path:
    return _sharded(d, {"a.weight": "model-1\ud800.safetensors"})


def torch_zip_record_twice(d: pathlib.Path) -> pathlib.Path:
    """A second data.pkl record of the same name: the scan and torch could read different ones
    (zip readers keep the last of a name, or the first; a name cut at a NUL makes another)."""
    path = d / "model.pt"
    torch.save({"w": _weights(0)}, path)
    members = _zip_members(path)
    name = next(n for n in members if n.endswith("/data.pkl"))
    with warnings.catch_warnings(), zipfile.ZipFile(path, "a") as archive:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it writes
        archive.writestr(name, members[name])
    return path


def shards_broken_shard(d: pathlib.Path) -> pathlib.Path:
    shards = _sharded(d, {"a.weight": "model-1.safetensors", "b.weight": "model-2.safetensors"})
    (shards / "model-2.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    return shards


HOSTILE_CHECKPOINTS = [
    Case("torch_zip_os_system", _torch_with(_system, legacy=False), "refusing to unpickle"),
    Case("torch_legacy_os_system", _torch_with(_system, legacy=True), "refusing to unpickle"),
    Case("torch_zip_eval", _torch_with(_eval, legacy=False), "refusing to unpickle"),
    Case("torch_legacy_eval", _torch_with(_eval, legacy=True), "refusing to unpickle"),
    Case("plain_pickle_os_system", plain_pickle_os_system, "refusing to unpickle|cannot read"),
    Case("zip_data_pkl_replaced", zip_data_pkl_replaced, "refusing to unpickle"),
    Case("zip_data_pkl_bit_flipped", zip_data_pkl_bit_flipped, "cannot read as a PyTorch checkpoint"),
    Case("zip_deep_nesting", zip_deep_nesting, "nested deeper"),
    Case("zip_shared_bomb", zip_shared_bomb, "more than"),
    Case("zip_cycle", zip_cycle, "contains itself"),
    Case("torch_flattened_names_collide", torch_flattened_names_collide, "both named 'a.b'"),
    Case("zip_expand_bomb", zip_expand_bomb, "storage"),
    Case("legacy_expand_bomb", legacy_expand_bomb, "storage"),
    Case("zip_truncated_storage", zip_truncated_storage, "storage claims 30720 bytes, its record holds 15360"),
    Case("torch_truncated", torch_truncated, "cannot read"),
    Case("torchscript_data_pkl_eval", torchscript_data_pkl_eval, "refusing to unpickle builtins.eval"),
    Case("torchscript_data_pkl_os_system", torchscript_data_pkl_os_system, "refusing to unpickle os.system"),
    Case("torchscript_expand_bomb", torchscript_expand_bomb, "storage"),
    Case("safetensors_truncated", safetensors_truncated, "out of range"),
    Case("safetensors_header_bit_flipped", safetensors_header_bit_flipped, "not valid UTF-8 JSON"),
    Case("safetensors_length_bit_flipped", safetensors_length_bit_flipped, "header claims"),
    Case("safetensors_huge_shape", safetensors_huge_shape, "out of range"),
    Case("safetensors_shape_offsets_disagree", safetensors_shape_offsets_disagree, "inconsistent"),
    Case("safetensors_overlapping_offsets", safetensors_overlapping_offsets, "overlap"),
    Case("safetensors_header_150mb", safetensors_header_150mb, "header claims 157286400 bytes"),
    Case("safetensors_non_utf8_name", safetensors_non_utf8_name, "not valid UTF-8 JSON"),
    Case("safetensors_lone_surrogate_name", safetensors_lone_surrogate_name, "not valid UTF-8"),
    Case("safetensors_duplicate_names", safetensors_duplicate_names, "twice"),
    Case("safetensors_metadata_not_strings", safetensors_metadata_not_strings, "__metadata__"),
    Case("safetensors_metadata_not_object", safetensors_metadata_not_object, "__metadata__"),
    Case("safetensors_nan", safetensors_nan, "'layer.weight' contains NaN or Inf"),
    Case("safetensors_inf", safetensors_inf, "'layer.weight' contains NaN or Inf"),
    Case("npz_object_array", npz_object_array, "unpickling"),
    Case("npz_truncated", npz_truncated, "cannot read"),
    Case("empty_file", empty_file, "empty file"),
    Case("unknown_format", unknown_format, "unknown checkpoint format"),
    Case("nonexistent_path", nonexistent_path, "no such file"),
    Case("directory_without_checkpoint", directory_without_checkpoint, "no checkpoint file"),
    Case("shards_index_not_json", shards_index_not_json, "not a valid shard index"),
    Case("shards_index_without_map", shards_index_without_map, "not a valid shard index"),
    Case("shards_missing_shard", shards_missing_shard, "does not exist"),
    Case("shards_path_escapes", shards_path_escapes, "is outside the directory"),
    Case("shards_index_names_absent_tensor", shards_index_names_absent_tensor, "has no tensor 'z.weight'"),
    Case("shards_broken_shard", shards_broken_shard, "model-2.safetensors"),
    Case("shards_nul_in_a_shard_name", shards_nul_in_a_shard_name, "is not a file name"),
    Case("shards_lone_surrogate_in_a_shard_name", shards_lone_surrogate_in_a_shard_name, "is not a file name"),
    Case("torch_zip_record_twice", torch_zip_record_twice, "two records of one name"),
]


# ------------------------------------------------------------------------------- compressed files

COMPRESSED_NAME = "enc.weight"


def original_matrix() -> torch.Tensor:
    """A smooth kernel plus noise: compresses into several low-rank blocks at leaf 8 (a planned
    build: smaller than the uniform one)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.sort(torch.rand(64, generator=gen, dtype=torch.float64))[0]
    y = torch.sort(torch.rand(48, generator=gen, dtype=torch.float64))[0]
    w = 1 / (1 + 10 * (x[:, None] - y[None, :]).abs()) + 1e-3 * torch.randn(64, 48, generator=gen, dtype=torch.float64)
    return w.float()


def good_compressed(d: pathlib.Path) -> pathlib.Path:
    """``d/original.safetensors`` and its compression ``d/good.hm.safetensors`` (written by the library)."""
    from hmcompress.api import compress_checkpoint
    from hmcompress.core.build import CompressionOptions
    from hmcompress.io.checkpoint import Selection

    original = d / "original.safetensors"
    save_file({COMPRESSED_NAME: original_matrix(), "enc.bias": torch.arange(64.0)}, str(original))
    good = d / "good.hm.safetensors"
    compress_checkpoint(original, good, CompressionOptions(tol=1e-2, leaf=8), Selection(min_size=8))
    return good


def rewrite_compressed(source: pathlib.Path, target: pathlib.Path,
                       change: Callable[[dict[str, torch.Tensor], dict], None]) -> pathlib.Path:
    """Copy a compressed file with ``change(tensors, metadata)`` applied to its content."""
    from safetensors import safe_open

    with safe_open(str(source), "pt") as fh:
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        meta = json.loads(fh.metadata()["hmcompress"])
    change(tensors, meta)
    save_file(tensors, str(target), metadata={"hmcompress": json.dumps(meta)})
    return target


def _rewrite(d: pathlib.Path, change: Callable[[dict[str, torch.Tensor], dict], None]) -> pathlib.Path:
    """The good compressed file with its tensors and metadata changed, saved as ``bad.hm.safetensors``."""
    good = good_compressed(d)
    bad = rewrite_compressed(good, d / "bad.hm.safetensors", change)
    good.unlink()
    return bad


def _table(name: str, edit: Callable[[torch.Tensor], None]) -> Callable[[pathlib.Path], pathlib.Path]:
    def make(d: pathlib.Path) -> pathlib.Path:
        def change(tensors: dict[str, torch.Tensor], _meta: dict) -> None:
            table = tensors[f"{COMPRESSED_NAME}.hm.{name}"].clone()
            assert table.shape[0] >= 2, "the corpus matrix should have several blocks and segments"
            edit(table)
            tensors[f"{COMPRESSED_NAME}.hm.{name}"] = table
        return _rewrite(d, change)
    return make


def _overlap(blocks: torch.Tensor) -> None:
    blocks[1, :4] = blocks[0, :4]


def _hole(blocks: torch.Tensor) -> None:
    row = int(torch.nonzero(blocks[:, 2] > 1)[0, 0])
    blocks[row, 2] -= 1


def _equal_area_misplaced(blocks: torch.Tensor) -> None:
    """Two blocks of equal shape swap nothing but one moves onto the other: same area, no tiling."""
    shapes = [tuple(b) for b in blocks[:, 2:4].tolist()]
    first = next(i for i, s in enumerate(shapes) if shapes.count(s) > 1)
    second = next(i for i, s in enumerate(shapes) if s == shapes[first] and i != first)
    blocks[second, :2] = blocks[first, :2]


def _outside_pool(segments: torch.Tensor) -> None:
    segments[0, 4] = 2**30


def _negative_offset(segments: torch.Tensor) -> None:
    segments[0, 4] = -1


def _absurd_rank(segments: torch.Tensor) -> None:
    lowrank = int(torch.nonzero(segments[:, 1] == 1)[0, 0])
    segments[lowrank, 3] = 2**31 - 1


def _bad_kind(segments: torch.Tensor) -> None:
    segments[0, 1] = 7


def _meta(change: Callable[[dict], None]) -> Callable[[pathlib.Path], pathlib.Path]:
    return lambda d: _rewrite(d, lambda _tensors, meta: change(meta))


def _absurd_matrix(meta: dict) -> None:
    info = meta["matrices"][COMPRESSED_NAME]
    info["shape"] = info["orig_shape"] = [2**40, 2**40]


def _compressed_truncated(d: pathlib.Path) -> pathlib.Path:
    good = good_compressed(d)
    bad = d / "bad.hm.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    good.unlink()
    return bad


def _compressed_header_flipped(d: pathlib.Path) -> pathlib.Path:
    good = good_compressed(d)
    bad = d / "bad.hm.safetensors"
    bad.write_bytes(_flip_bit(good.read_bytes(), 8))
    good.unlink()
    return bad


def coded_in_place(tensors: dict[str, torch.Tensor], prefix: str, codec: str, layout: int = 1) -> torch.Tensor:
    """Replace a matrix's fixed-width pool ``codec`` by its entropy-coded form (FORMAT.md version 2,
    written by the library's encoder in ``layout`` whether or not that is smaller); returns the
    coded bytes."""
    from hmcompress.core.entropy import coded_blob, pool_runs
    from hmcompress.runtime import pool_symbols
    from hmcompress.runtime.read import hmatrix_from_tensors

    hm = hmatrix_from_tensors(tensors, prefix, (0, 0), torch.float32)
    runs = pool_runs(hm, codec)
    symbols = pool_symbols(codec, tensors.pop(prefix + "pool." + codec), torch.from_numpy(runs))
    tensors[prefix + "coded." + codec] = coded_blob(codec, symbols.numpy(), runs, layout=layout)
    return tensors[prefix + "coded." + codec]


def sectioned_in_place(tensors: dict[str, torch.Tensor], prefix: str, codec: str) -> torch.Tensor:
    """Replace a matrix's fixed-width pool ``codec`` by a coded pool of layout 2 (format version 4):
    its symbols cut into the fewest rows (2 or more) that divide them, odd and even rows in two
    sections; returns the coded bytes."""
    from hmcompress.core.coded_pools import sectioned_blob
    from hmcompress.core.entropy import pool_runs
    from hmcompress.runtime import pool_symbols
    from hmcompress.runtime.read import hmatrix_from_tensors

    hm = hmatrix_from_tensors(tensors, prefix, (0, 0), torch.float32)
    runs = pool_runs(hm, codec)
    symbols = pool_symbols(codec, tensors.pop(prefix + "pool." + codec), torch.from_numpy(runs)).numpy()
    rows = next(q for q in range(2, len(symbols) + 1) if len(symbols) % q == 0)
    tensors[prefix + "coded." + codec] = sectioned_blob(codec, symbols, runs, np.arange(rows, dtype=np.uint8) % 2)
    return tensors[prefix + "coded." + codec]


def sectioned_fields(blob: torch.Tensor) -> dict[str, int]:
    """Byte offsets of a layout-2 coded pool's fields (FORMAT.md "Entropy-coded pools")."""
    count, _layout, _length, rows, runs = blob[:20].clone().view(torch.int32).tolist()
    classes = 20 + 8 * runs
    sections = classes + rows + 4 * count
    first = int(blob[classes + rows:classes + rows + 4].clone().view(torch.int32))
    return {"count": 0, "rows": 12, "classes": classes, "sizes": classes + rows, "section0": sections,
            "section1": sections + first}


def _sectioned(edit: Callable[[torch.Tensor, dict[str, int]], torch.Tensor], codec: str = "i8",
               version: int | None = None) -> Callable[[pathlib.Path], pathlib.Path]:
    """The good file with one pool coded in layout 2 (two sections) and its bytes edited."""
    prefix = COMPRESSED_NAME + ".hm."

    def change(tensors: dict[str, torch.Tensor], meta: dict) -> None:
        blob = sectioned_in_place(tensors, prefix, codec)
        tensors[prefix + "coded." + codec] = edit(blob.clone(), sectioned_fields(blob))
        if version is not None:
            meta["version"] = version
    return lambda d: _rewrite(d, change)


def _wrapping_runs(_blob: torch.Tensor, _fields: dict[str, int]) -> torch.Tensor:
    """A layout-2 pool of one row of one code whose runs, (2**32 - 1) rows of 2**32 - 1 codes and
    4 rows of 2**31, sum in int64 to 2**64 + 1: wrapped, 1, the pool's rows times their length."""
    section = struct.pack("<5I", 1, 12 + 256, 3, 1, 1) + struct.pack("<2I", 1, 1) + bytes([0x80, 0x20])
    section += struct.pack("<I", 1 << 15)
    empty = struct.pack("<5I", 0, 12 + 256, 0, 0, 0)
    runs = struct.pack("<4I", 2**32 - 1, 2**32 - 1, 4, 2**31)
    blob = struct.pack("<5I", 2, 2 * 256, 1, 1, 2) + runs + bytes([0]) + struct.pack("<2I", len(section), len(empty))
    return torch.frombuffer(bytearray(blob + section + empty), dtype=torch.uint8)


def _nested_sections(blob: torch.Tensor, fields: dict[str, int]) -> torch.Tensor:
    """Section 0's layout field set to 2: a section may not itself be sectioned."""
    return _put_u32(blob, fields["section0"] + 4, 2 * 256)


def coded_fields(blob: torch.Tensor) -> dict[str, int]:
    """Byte offsets of a coded pool's fields (FORMAT.md "Entropy-coded pools")."""
    lanes, precision, _first, table, runs = blob[:20].clone().view(torch.int32).tolist()
    freq = 20 + 8 * runs
    state = freq
    for _ in range(table):  # varints: the last byte of each is below 0x80
        while int(blob[state]) >= 0x80:
            state += 1
        state += 1
    counts = precision < 256  # layout 0: each lane's word count after the states
    return {"lanes": 0, "precision": 4, "runs": 20, "freq": freq, "state": state, "words": state + 4 * lanes,
            "stream": state + (6 if counts else 4) * lanes}


def _coded(edit: Callable[[torch.Tensor, dict[str, int]], torch.Tensor], codec: str = "i8",
           keep_pool: bool = False, version: int | None = None, layout: int = 1) -> Callable[[pathlib.Path], pathlib.Path]:
    """The good file with one pool entropy-coded in ``layout`` and the coded bytes edited
    (``edit(blob, fields)`` returns the new bytes), the fixed-width pool kept too or the version
    changed if asked."""
    prefix = COMPRESSED_NAME + ".hm."

    def change(tensors: dict[str, torch.Tensor], meta: dict) -> None:
        pool = tensors[prefix + "pool." + codec]
        blob = coded_in_place(tensors, prefix, codec, layout)
        tensors[prefix + "coded." + codec] = edit(blob.clone(), coded_fields(blob))
        if keep_pool:
            tensors[prefix + "pool." + codec] = pool
        if version is not None:
            meta["version"] = version
    return lambda d: _rewrite(d, change)


def _put_u8(blob: torch.Tensor, at: int, value: int) -> torch.Tensor:
    blob[at] = value
    return blob


def _flip_u8(blob: torch.Tensor, at: int) -> torch.Tensor:
    blob[at] ^= 0x10
    return blob


def _put_u32(blob: torch.Tensor, at: int, value: int) -> torch.Tensor:
    blob[at:at + 4] = torch.tensor(list(value.to_bytes(4, "little")), dtype=torch.uint8)
    return blob


def _expansion_bomb(_blob: torch.Tensor, _fields: dict[str, int]) -> torch.Tensor:
    """A valid-looking stream of one symbol (frequency 2**14: no bits a symbol, no words read) in
    1000 lanes of 65535 symbols: 65.5 million codes from 6 kB."""
    lanes, symbols = 1000, 1000 * 65535
    header = struct.pack("<5I", lanes, 14, 0, 1, 1) + struct.pack("<2I", 1, symbols) + bytes([0x80, 0x80, 0x01])
    body = struct.pack(f"<{lanes}I", *[1 << 15] * lanes) + bytes(2 * lanes)
    return torch.frombuffer(bytearray(header + body), dtype=torch.uint8)


def _bump_frequency(blob: torch.Tensor, fields: dict[str, int]) -> torch.Tensor:
    blob[fields["freq"]] ^= 0x01  # the low bit of the first frequency: its varint keeps its length
    return blob


def _flip_stream(blob: torch.Tensor, fields: dict[str, int]) -> torch.Tensor:
    blob[fields["stream"] + 3] ^= 0x10
    return blob


def _more_rows(blob: torch.Tensor, fields: dict[str, int]) -> torch.Tensor:
    rows = int(blob[20:24].clone().view(torch.int32))
    return _put_u32(blob, fields["runs"], rows + 1)


def _stream_from_its_last_words(blob: torch.Tensor, fields: dict[str, int]) -> torch.Tensor:
    """Layout 1 with its stream cut to its last 4 words: the lanes read past the stream's start."""
    return torch.cat([blob[:fields["stream"]], blob[-8:]])


def _stream_too_long(blob: torch.Tensor, _fields: dict[str, int]) -> torch.Tensor:
    """Layout 1 with more words in its stream than it has symbols."""
    return torch.cat([blob, torch.zeros(2 * 10**5, dtype=torch.uint8)])


def _stats(change: Callable[[dict], None]) -> Callable[[pathlib.Path], pathlib.Path]:
    return _meta(lambda meta: change(meta["matrices"][COMPRESSED_NAME]))


HOSTILE_COMPRESSED = [
    Case("blocks_overlap", _table("blocks", _overlap), "overlap"),
    Case("blocks_leave_a_hole", _table("blocks", _hole), "hole"),
    Case("blocks_equal_area_no_tiling", _table("blocks", _equal_area_misplaced), "do not tile"),
    Case("segment_outside_pool", _table("segments", _outside_pool), "outside pool"),
    Case("segment_negative_offset", _table("segments", _negative_offset), "outside pool"),
    Case("segment_absurd_rank", _table("segments", _absurd_rank), "ranks sum to 214748"),
    Case("segment_unknown_kind", _table("segments", _bad_kind), "unknown kind"),
    Case("matrix_absurd_size", _meta(_absurd_matrix), "does not fit"),
    Case("wrong_version", _meta(lambda m: m.update(version=5)), "version 5 is not supported"),
    Case("version_as_string", _meta(lambda m: m.update(version="1")), "version '1' is not supported"),
    Case("wrong_format_name", _meta(lambda m: m.update(format="ggml")), "format 'ggml'"),
    Case("options_not_an_object", _meta(lambda m: m.update(options=["tol", 0.01])), "'options' is not a JSON object"),
    Case("compressed_truncated", _compressed_truncated, "data offsets out of range"),
    Case("compressed_header_bit_flipped", _compressed_header_flipped, "not valid UTF-8 JSON"),
    # entropy-coded pools (version 2): every field checked before decoding allocates
    Case("coded_bad_frequency_table", _coded(_bump_frequency), "frequencies sum to"),
    Case("coded_expansion_bomb", _coded(_expansion_bomb), "more codes than"),
    Case("coded_frequency_of_4_bytes", _coded(lambda b, f: _put_u32(b, f["freq"], 0xFFFFFFFF)),
         "past its 3 bytes"),
    Case("coded_precision_out_of_range", _coded(lambda b, f: _put_u32(b, f["precision"], 40)), "precision 40"),
    Case("coded_truncated_words", _coded(lambda b, _f: b[:-2], layout=0), "words end at byte"),
    Case("coded_lane_pointer_out_of_range", _coded(lambda b, f: _put_u32(b, f["words"], 0xFFFF), layout=0),
         "more words than"),
    Case("coded_layout_0_stream_bit_flipped", _coded(_flip_stream, codec="i6", layout=0), "coded stream is corrupt"),
    Case("coded_unknown_layout", _coded(lambda b, f: _put_u32(b, f["precision"], 14 + 3 * 256)), "layout 3"),
    Case("coded_stream_of_odd_bytes", _coded(lambda b, _f: b[:-1]), "an odd number"),
    Case("coded_stream_longer_than_symbols", _coded(_stream_too_long), "more words than"),
    Case("coded_stream_truncated", _coded(lambda b, _f: b[:-2]), "coded stream is corrupt"),
    Case("coded_stream_read_past_its_start", _coded(_stream_from_its_last_words), "coded stream is corrupt"),
    Case("coded_state_out_of_range", _coded(lambda b, f: _put_u32(b, f["state"], 7)), "state lies outside"),
    Case("coded_symbol_count_mismatch", _coded(_more_rows), "corrupt|more words than"),
    Case("coded_huge_declared_size", _coded(lambda b, f: _put_u32(_put_u32(b, f["runs"], 2**32 - 1), f["runs"] + 4,
                                                                 2**32 - 1)), "more symbols than"),
    Case("coded_stream_bit_flipped", _coded(_flip_stream, codec="i6"), "coded stream is corrupt"),
    Case("coded_and_fixed_width", _coded(lambda b, _f: b, keep_pool=True), "both fixed-width and coded"),
    Case("coded_in_version_1", _coded(lambda b, _f: b, version=1), "not explained"),
    # coded pools by row classes (layout 2, version 4)
    Case("sectioned_in_version_3", _sectioned(lambda b, _f: b, version=3), "layout 2 is not one of 0, 1"),
    Case("sectioned_class_out_of_range", _sectioned(lambda b, f: _put_u32(b, f["classes"], 7)), "class is not below"),
    Case("sectioned_sizes_do_not_add_up", _sectioned(lambda b, f: _put_u32(b, f["sizes"], 3)), "sections end at byte"),
    Case("sectioned_rows_do_not_hold_the_runs", _sectioned(lambda b, f: _put_u32(b, f["rows"], 1)),
         "its runs hold .* codes, not its 1 rows"),
    Case("sectioned_too_many_sections", _sectioned(lambda b, f: _put_u32(b, f["count"], 65)), "65 sections"),
    Case("sectioned_within_a_section", _sectioned(_nested_sections), "section 0: .*layout 2 is not one of 0, 1"),
    Case("sectioned_stream_bit_flipped", _sectioned(lambda b, f: _flip_u8(b, f["section1"] + 40)),
         "coded stream is corrupt|state lies outside|frequencies sum to|more words than|past its"),
    Case("sectioned_class_moves_a_row", _sectioned(lambda b, f: _put_u8(b, f["classes"], 1)),
         "section 0 holds .* codes, its rows"),
    Case("sectioned_runs_wrap_int64", _sectioned(_wrapping_runs, codec="i4"), "more codes than 1024 a byte"),
]

# Broken statistics: the weights still decompress, but `report` and `verify` must refuse.
HOSTILE_STATS = [
    Case("stats_not_an_object", _stats(lambda info: info.update(stats="fine")), "stats must be a JSON object"),
    Case("stats_wrong_types", _stats(lambda info: info["stats"].update(rel_error="small")),
         "stats field 'rel_error' has str"),
    Case("stats_missing", _stats(lambda info: info.pop("stats")), "stats must be a JSON object"),
    Case("stats_lack_a_field", _stats(lambda info: info["stats"].pop("bytes_after")), "stats lack 'bytes_after'"),
    Case("stats_bool_for_number", _stats(lambda info: info["stats"].update(budget=True)), "'budget' has bool"),
]


# ------------------------------------------------------------------------------- awkward but valid

def _save_torch(d: pathlib.Path, state: dict) -> pathlib.Path:
    torch.save(state, d / "model.pt")
    return d / "model.pt"


def _low_rank(m: int, n: int, rank: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, rank, generator=gen, dtype=torch.float64)
    b = torch.randn(rank, n, generator=gen, dtype=torch.float64)
    return (a @ b).to(dtype)


def awkward_shapes(d: pathlib.Path) -> pathlib.Path:
    return _save_torch(d, {"empty_rows": torch.zeros(0, 64), "empty_cols": torch.zeros(64, 0),
                           "one_row": _weights(1, (1, 200)), "one_col": _weights(2, (200, 1)),
                           "scalar_matrix": torch.full((1, 1), 3.5), "normal": _weights(3, (40, 72))})


def awkward_float64(d: pathlib.Path) -> pathlib.Path:
    return _save_torch(d, {"w": _weights(4, (64, 48)).double() + _low_rank(64, 48, 2, dtype=torch.float64)})


def awkward_bfloat16(d: pathlib.Path) -> pathlib.Path:
    return _save_torch(d, {"w": (_low_rank(64, 56, 3) + 0.1 * _weights(5, (64, 56))).bfloat16()})


def awkward_float16(d: pathlib.Path) -> pathlib.Path:
    save_file({"w": (_low_rank(48, 64, 3) + 0.1 * _weights(6, (48, 64))).half()}, str(d / "model.safetensors"))
    return d / "model.safetensors"


def awkward_integer_and_bool(d: pathlib.Path) -> pathlib.Path:
    gen = torch.Generator().manual_seed(8)
    return _save_torch(d, {"ids": torch.randint(-2**40, 2**40, (64, 64), generator=gen),
                           "mask": torch.rand(64, 64, generator=gen) > 0.5,
                           "codes": torch.randint(0, 255, (64, 64), generator=gen, dtype=torch.uint8),
                           "w": _weights(9, (64, 64))})


def awkward_tied(d: pathlib.Path) -> pathlib.Path:
    shared = _low_rank(96, 64, 4) + 0.01 * _weights(10, (96, 64))
    return _save_torch(d, {"embed.weight": shared, "head.weight": shared, "view": shared[:48]})


def awkward_magnitudes(d: pathlib.Path) -> pathlib.Path:
    base = _low_rank(48, 40, 3) + 0.05 * _weights(11, (48, 40))
    return _save_torch(d, {"huge32": base * 1e30, "tiny32": base * 1e-30,
                           "huge64": base.double() * 1e150, "tiny64": base.double() * 1e-150,
                           "near_max16": (base / base.abs().max() * 6e4).half(),
                           "subnormal32": base * 1e-40})


def awkward_exact_structure(d: pathlib.Path) -> pathlib.Path:
    return _save_torch(d, {"rank1": _low_rank(80, 64, 1), "rank5": _low_rank(80, 64, 5, seed=1),
                           "zero": torch.zeros(64, 80), "identity": torch.eye(64)})


AWKWARD = [
    Case("shapes", awkward_shapes),
    Case("float64", awkward_float64),
    Case("bfloat16", awkward_bfloat16),
    Case("float16", awkward_float16),
    Case("integer_and_bool", awkward_integer_and_bool),
    Case("tied", awkward_tied),
    Case("magnitudes", awkward_magnitudes),
    Case("exact_structure", awkward_exact_structure),
]

# =============================================================================== second round
# Built for issue 17 (a corpus of 171 cases we have not seen found each class below; these are our
# own examples of every class). Each comment says which class.


# ------------------------------------------------------------------ checkpoints, refused

def _deep_json(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def safetensors_shape_5000_digits(d: pathlib.Path) -> pathlib.Path:
    """A shape holding a 5,000-digit integer (Python's JSON refuses past 4,300 digits)."""
    return _raw_safetensors(d, '{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}',
                            b"\0" * 4)


def safetensors_shape_4000_digits(d: pathlib.Path) -> pathlib.Path:
    """A 4,000-digit integer parses: every message must still print it briefly."""
    return _raw_safetensors(d, '{"w": {"dtype": "F32", "shape": [' + "9" * 4000 + ', 1], "data_offsets": [0, 4]}}',
                            b"\0" * 4)


def safetensors_nested_5000(d: pathlib.Path) -> pathlib.Path:
    return _raw_safetensors(d, '{"w": {"dtype": "F32", "shape": ' + _deep_json(5000) + ', "data_offsets": [0, 4]}}',
                            b"\0" * 4)


def safetensors_nested_900(d: pathlib.Path) -> pathlib.Path:
    """Shallow enough for Python's parser, deep enough to break any code that recurses on it."""
    return _raw_safetensors(d, '{"w": {"dtype": "F32", "shape": ' + _deep_json(900) + ', "data_offsets": [0, 4]}}',
                            b"\0" * 4)


def safetensors_metadata_nested(d: pathlib.Path) -> pathlib.Path:
    header = '{"__metadata__": {"a": ' + _deep_json(900, '"x"') + '}, "w": {"dtype": "F32", "shape": [1], ' \
             '"data_offsets": [0, 4]}}'
    return _raw_safetensors(d, header, b"\0" * 4)


def shards_index_nested(d: pathlib.Path) -> pathlib.Path:
    return _sharded(d, index_text='{"weight_map": ' + _deep_json(5000) + "}")


def shards_index_huge_number(d: pathlib.Path) -> pathlib.Path:
    return _sharded(d, index_text='{"weight_map": {"a.weight": ' + "9" * 5000 + "}}")


def fifo_checkpoint(d: pathlib.Path) -> pathlib.Path:
    """A FIFO named like a checkpoint: opening it for reading would wait for a writer forever."""
    os.mkfifo(d / "model.safetensors")
    return d / "model.safetensors"


def shards_fifo_shard(d: pathlib.Path) -> pathlib.Path:
    shards = _sharded(d, {"a.weight": "model-1.safetensors", "b.weight": "model-2.safetensors"})
    (shards / "model-2.safetensors").unlink()
    os.mkfifo(shards / "model-2.safetensors")
    return shards


def _replace_data_pkl(path: pathlib.Path, obj: object, storages: dict[str, bytes] | None = None) -> pathlib.Path:
    """``path`` (a zip checkpoint) with its data.pkl replaced by ``obj`` pickled with storage
    references (`_Storage`) as persistent ids, and the given storage records."""
    buffer = io.BytesIO()
    _StoragePickler(buffer, protocol=2).dump(obj)
    members = _zip_members(path)
    root = next(n for n in members if n.endswith("/data.pkl"))[: -len("/data.pkl")]
    members = {n: v for n, v in members.items() if not n.startswith(f"{root}/data/")}
    members[f"{root}/data.pkl"] = buffer.getvalue()
    for key, data in (storages or {}).items():
        members[f"{root}/data/{key}"] = data
    return _write_zip(path, members)


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    numel: int
    kind: str = "FloatStorage"


class _StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel)
        return None


def _tensor_record(storage: _Storage, size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> _Call:
    from torch._utils import _rebuild_tensor_v2

    return _Call(_rebuild_tensor_v2, storage, offset, size, stride, False, collections.OrderedDict())


def zip_storage_claims_2_40(d: pathlib.Path) -> pathlib.Path:
    """A storage record claiming 2**40 floats over a 30,720-byte record; the tensor itself is small.
    torch would map 4 TiB over the archive (reading past it is SIGBUS); refused before it does."""
    torch.save({"w": _weights()}, d / "model.pt")
    claim = _Storage("0", 2**40)
    return _replace_data_pkl(d / "model.pt", {"w": _tensor_record(claim, (96, 80), (80, 1))},
                             {"0": _weights().numpy().tobytes()})


def zip_many_views_of_one_storage(d: pathlib.Path) -> pathlib.Path:
    """3,000 names for one 64 KiB storage: 190 MiB of tensors from a 300 KiB file."""
    shared = torch.randn(16384, generator=torch.Generator().manual_seed(1))
    torch.save({f"t{i}": shared for i in range(3000)}, d / "model.pt")
    return d / "model.pt"


def torchscript_many_views(d: pathlib.Path) -> pathlib.Path:
    """A TorchScript archive whose 3,000 tensors all view one 64 KiB storage (each one used to be
    copied while reading: gigabytes from a small file)."""
    storage = _Storage("0", 16384)
    buffer = io.BytesIO()
    _StoragePickler(buffer, protocol=2).dump({f"t{i}": _tensor_record(storage, (16384,), (1,)) for i in range(3000)})
    path = _scripted(d)
    members = _zip_members(path)
    root = next(n for n in members if n.endswith("/data.pkl"))[: -len("/data.pkl")]
    members = {n: v for n, v in members.items() if not n.startswith(f"{root}/data/")}
    members[f"{root}/data.pkl"] = buffer.getvalue()
    members[f"{root}/data/0"] = torch.randn(16384, generator=torch.Generator().manual_seed(2)).numpy().tobytes()
    return _write_zip(path, members)


def torchscript_sets(d: pathlib.Path) -> pathlib.Path:
    """A TorchScript data.pkl that builds sets and frozensets (and so no tensor anywhere)."""
    data = pickle.dumps({"weight": {1, 2}, "bias": frozenset({frozenset({3})}), "more": [set(), {4}]}, protocol=4)
    return _replace_member(_scripted(d), "/data.pkl", lambda _old: data)


def zip_sparse_tensor(d: pathlib.Path) -> pathlib.Path:
    indices = torch.tensor([[0, 1], [1, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on sparse invariant checks
        sparse = torch.sparse_coo_tensor(indices, torch.tensor([1.0, 2.0]), (2**20, 2**20))
    torch.save({"w": _weights(), "adjacency": sparse}, d / "model.pt")
    return d / "model.pt"


def zip_meta_tensor_huge(d: pathlib.Path) -> pathlib.Path:
    """A meta-device tensor of 2**60 entries: no data at all (materialising it: 4 EiB)."""
    torch.save({"w": _weights(), "ghost": torch.empty(2**30, 2**30, device="meta")}, d / "model.pt")
    return d / "model.pt"


def zip_lone_surrogate_name(d: pathlib.Path) -> pathlib.Path:
    torch.save({"w\udc80": _weights()}, d / "model.pt")
    return d / "model.pt"


def zip_huge_integer_key(d: pathlib.Path) -> pathlib.Path:
    torch.save({10**5000: _weights()}, d / "model.pt")
    return d / "model.pt"


def zip_million_entries(d: pathlib.Path) -> pathlib.Path:
    """A million entries (9.7 MB): refused by counting, before torch builds them one by one."""
    torch.save({"w": _weights(), "steps": {i: i for i in range(1_000_001)}}, d / "model.pt")
    return d / "model.pt"


def _odd_keys(depth: int) -> Maker:
    """Entries whose dicts have float or None keys, in lists ``depth`` deep, beside a weight and a
    plain number (the odd ones are not JSON: they stay out of the file's header, and are listed)."""
    def make(d: pathlib.Path) -> pathlib.Path:
        deep: object = {1.5: "a", None: "b", (1, 2): [None]}
        for _ in range(depth):
            deep = [deep, 0]
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 10 * depth + 1000))  # pickling nested lists recurses
        try:
            return _save_torch(d, {"w": _weights(16, (64, 48)), "odd": {2.5: torch.ones(2), None: 1}, "deep": deep,
                                   "epoch": 3})
        finally:
            sys.setrecursionlimit(limit)
    return make


def npz_bzip2_member(d: pathlib.Path) -> pathlib.Path:
    """bzip2 expands far more than deflate's 1,032x; numpy never writes it."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(1000, dtype=np.float32))
    with zipfile.ZipFile(d / "model.npz", "w", zipfile.ZIP_BZIP2) as archive:
        archive.writestr("w.npy", buffer.getvalue())
    return d / "model.npz"


def npz_claims_beyond_deflate(d: pathlib.Path) -> pathlib.Path:
    """A deflated member whose directory entry claims 100 times what deflate could give."""
    np.savez_compressed(d / "model.npz", w=np.zeros((512, 512), dtype=np.float32))
    data = bytearray((d / "model.npz").read_bytes())
    central = data.rindex(b"PK\x01\x02")
    size = struct.unpack_from("<I", data, central + 24)[0]
    struct.pack_into("<I", data, central + 24, min(size * 100, 2**32 - 1))
    (d / "model.npz").write_bytes(bytes(data))
    return d / "model.npz"


# Refused when their data is read (compress, verify), not by `inspect`, which reads headers only.
DATA_PROBLEMS = frozenset({"safetensors_nan", "safetensors_inf"})

HOSTILE_CHECKPOINTS += [
    Case("safetensors_shape_5000_digits", safetensors_shape_5000_digits, "not valid UTF-8 JSON"),
    Case("safetensors_shape_4000_digits", safetensors_shape_4000_digits, "inconsistent with its shape"),
    Case("safetensors_nested_5000", safetensors_nested_5000, "not valid UTF-8 JSON"),
    Case("safetensors_nested_900", safetensors_nested_900, "malformed shape"),
    Case("safetensors_metadata_nested", safetensors_metadata_nested, "__metadata__ must map strings to strings"),
    Case("shards_index_nested", shards_index_nested, "not a valid shard index"),
    Case("shards_index_huge_number", shards_index_huge_number, "not a valid shard index"),
    Case("fifo_checkpoint", fifo_checkpoint, "not a regular file"),
    Case("shards_fifo_shard", shards_fifo_shard, "is not a regular file"),
    Case("zip_storage_claims_2_40", zip_storage_claims_2_40, "storage claims 4398046511104 bytes"),
    Case("zip_many_views_of_one_storage", zip_many_views_of_one_storage, "more than 64 times"),
    Case("torchscript_many_views", torchscript_many_views, "more than 64 times"),
    Case("torchscript_sets", torchscript_sets, "holds no tensors"),
    Case("zip_sparse_tensor", zip_sparse_tensor, "sparse tensor"),
    Case("zip_meta_tensor_huge", zip_meta_tensor_huge, "meta-device tensor"),
    Case("zip_lone_surrogate_name", zip_lone_surrogate_name, "not valid Unicode"),
    Case("zip_huge_integer_key", zip_huge_integer_key, "cannot read as a PyTorch checkpoint"),
    Case("zip_million_entries", zip_million_entries, "more than 1000000 objects"),
    Case("zip_odd_keys_nested_2000", _odd_keys(2000), "nested deeper than 100 levels"),
    Case("npz_bzip2_member", npz_bzip2_member, "method 12"),
    Case("npz_claims_beyond_deflate", npz_claims_beyond_deflate, "a zip bomb"),
]


# ------------------------------------------------------------------ compressed files, refused

def _meta_text(change: Callable[[str], str]) -> Callable[[pathlib.Path], pathlib.Path]:
    """The good compressed file with its metadata JSON text edited (for what json.dumps cannot
    write: duplicate keys, 1e400, 5,000 digits)."""
    def make(d: pathlib.Path) -> pathlib.Path:
        from safetensors import safe_open

        good = good_compressed(d)
        with safe_open(str(good), "pt") as fh:
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
            text = fh.metadata()["hmcompress"]
        save_file(tensors, str(d / "bad.hm.safetensors"), metadata={"hmcompress": change(text)})
        good.unlink()
        return d / "bad.hm.safetensors"
    return make


def _nest(depth: int) -> Callable[[dict], None]:
    def change(meta: dict) -> None:
        value: object = "x"
        for _ in range(depth):
            value = [value]
        meta["extra"] = {"deep": value}
    return change


def _rename_matrix(meta: dict, new: str) -> None:
    meta["matrices"][new] = meta["matrices"].pop(COMPRESSED_NAME)


def _compressed_fifo(d: pathlib.Path) -> pathlib.Path:
    good_compressed(d).unlink()
    os.mkfifo(d / "bad.hm.safetensors")
    return d / "bad.hm.safetensors"


def _header_text(change: Callable[[str], str]) -> Callable[[pathlib.Path], pathlib.Path]:
    """The good compressed file with its safetensors header text edited (same data)."""
    def make(d: pathlib.Path) -> pathlib.Path:
        good = good_compressed(d)
        raw = good.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = change(raw[8:8 + length].decode()).encode()
        (d / "bad.hm.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + length:])
        good.unlink()
        return d / "bad.hm.safetensors"
    return make


def _rows_bitmaps(valid: bool) -> Callable[[pathlib.Path], pathlib.Path]:
    """A 2**19 x 8 matrix: eight 2**19 x 1 blocks each storing one row through a 64 KiB bitmap
    (512 KiB of bitmaps in all). Checking them used to take gigabytes; ``valid=False`` sets two
    bits in the last bitmap, which is refused."""
    def make(d: pathlib.Path) -> pathlib.Path:
        m, n = 2**19, 8
        blocks = torch.tensor([[0, j, m, 1, 1] for j in range(n)], dtype=torch.int32)
        segments = torch.tensor([[j, 2, 2, 1, j, -1] for j in range(n)], dtype=torch.int32)  # rows, f16
        masks = torch.zeros(n, m // 8, dtype=torch.uint8)
        masks[:, 5] = 1
        if not valid:
            masks[-1, 7] = 3
        return packed_file(d, (m, n), blocks, segments, {"f16": torch.ones(n, dtype=torch.float16)},
                            rows=masks.reshape(-1))
    return make


def _one_scale_segment(version: int = 3, kind: int = 0, scale_offset: int = 0,
                       scales: int = 1, rank: int = 2) -> Callable[[pathlib.Path], pathlib.Path]:
    """An 8 x 8 matrix as one ``u8`` segment (dense, or low rank ``rank``), ``scales`` elements of
    ``scale.u8``, in a file of ``version``."""
    def make(d: pathlib.Path) -> pathlib.Path:
        blocks = torch.tensor([[0, 0, 8, 8, 0]], dtype=torch.int32)
        segments = torch.tensor([[0, kind, 9, rank if kind else 0, 0, scale_offset]], dtype=torch.int32)
        pools = {"u8": torch.ones(64 if kind == 0 else 16 * rank, dtype=torch.int8)}
        return packed_file(d, (8, 8), blocks, segments, pools, {"u8": torch.ones(scales)}, version=version)
    return make


HOSTILE_COMPRESSED += [
    Case("metadata_nested_900", _meta(_nest(900)), "nests containers deeper than 64 levels"),
    Case("metadata_nested_5000", _meta_text(lambda t: t.replace('"extra":{', '"extra":{"deep":' + _deep_json(5000)
                                                                  + ",", 1)), "not valid JSON"),
    Case("metadata_5000_digit_shape", _meta_text(lambda t: t.replace('"shape":[64,48]', '"shape":[' + "9" * 5000
                                                                       + ',48]', 1)), "not valid JSON"),
    Case("metadata_400_digit_shape", _meta(lambda m: m["matrices"][COMPRESSED_NAME].update(
        shape=[10**400, 48], orig_shape=[10**400, 48])), "does not fit"),
    Case("dtype_as_list", _meta(lambda m: m["matrices"][COMPRESSED_NAME].update(dtype=["float32"])),
         "unsupported dtype"),
    Case("dtype_as_object", _meta(lambda m: m["matrices"][COMPRESSED_NAME].update(dtype={"name": "float32"})),
         "unsupported dtype"),
    Case("dtype_deeply_nested", _meta(lambda m: m["matrices"][COMPRESSED_NAME].update(dtype=json.loads(
        _deep_json(60, '"float32"')))), "unsupported dtype"),
    Case("metadata_duplicate_key", _meta_text(lambda t: t.replace('"version":', '"version":2,"version":', 1)),
         "twice"),
    Case("matrix_name_lone_surrogate", _meta(lambda m: _rename_matrix(m, "enc\udc80")), "not valid Unicode"),
    Case("compressed_fifo", _compressed_fifo, "not a regular file"),
    Case("header_offsets_5000_digits", _header_text(lambda t: t.replace('"data_offsets":[0,', '"data_offsets":['
                                                                          + "9" * 5000 + ",", 1)),
         "not valid UTF-8 JSON"),
    Case("rows_bitmaps_wrong_count", _rows_bitmaps(valid=False), "bits set, not the rank"),
    # codec u8 (version 3): one scale a segment
    Case("u8_in_version_2", _one_scale_segment(version=2), "scale.u8' is not explained"),
    Case("u8_scale_offset_past_its_scales", _one_scale_segment(scale_offset=1), r"scale range \[1, 2\) outside"),
    Case("u8_low_rank_without_its_scale", _one_scale_segment(kind=1, scales=0), r"scale range \[0, 1\) outside"),
    # ranks above the block's: a coded pool of one symbol (no stream bytes) could hold millions of terms
    Case("low_rank_above_its_block", _one_scale_segment(kind=1, rank=9), r"ranks sum to 9, above min\(rows, cols\) = 8"),
]


def _stats_text(field: str, literal: str) -> Callable[[pathlib.Path], pathlib.Path]:
    """A stats field given as a raw JSON literal (1e400, a 400-digit integer)."""
    def make(d: pathlib.Path) -> pathlib.Path:
        def change(text: str) -> str:
            meta = json.loads(text)
            meta["matrices"][COMPRESSED_NAME]["stats"][field] = "__HOSTILE__"
            return json.dumps(meta).replace('"__HOSTILE__"', literal)
        return _meta_text(change)(d)
    return make


HOSTILE_STATS += [
    Case("stats_number_1e400", _stats_text("fro_error", "1e400"), "'fro_error' has float inf"),
    Case("stats_400_digit_figure", _stats_text("rel_error", "9" * 400), "'rel_error' has int"),
    Case("stats_huge_byte_count", _stats(lambda info: info["stats"].update(bytes_after=10**30)), "'bytes_after' has int"),
    Case("stats_negative_count", _stats(lambda info: info["stats"].update(max_rank=-3)), "'max_rank' has int"),
    Case("stats_as_list", _stats(lambda info: info.update(stats=[1, 2])), "stats must be a JSON object"),
    Case("stats_shape_nested", _stats(lambda info: info["stats"].update(shape=[[64], [48]])), "'shape' has list"),
    Case("stats_codecs_as_list", _stats(lambda info: info["stats"].update(codecs=["f16"])), "'codecs' has list"),
    Case("stats_codec_bytes_text", _stats(lambda info: info["stats"].update(codecs={"f16": "many"})),
         "'codecs' has dict"),
    Case("stats_inf_for_a_count", _stats(lambda info: info["stats"].update(bytes_after="inf")), "'bytes_after' has str"),
]


# ------------------------------------------------------------------ packed tables the runtime must refuse

def packed_file(d: pathlib.Path, shape: tuple[int, int], blocks: torch.Tensor, segments: torch.Tensor,
                pools: dict[str, torch.Tensor], scales: dict[str, torch.Tensor] | None = None,
                rows: torch.Tensor | None = None, name: str = COMPRESSED_NAME,
                dtype: str = "float32", version: int = 1) -> pathlib.Path:
    """A compressed file holding one matrix with exactly these tables (written without validating
    them), with plausible stats, as ``packed.hm.safetensors``."""
    from hmcompress.core.stats import LayerStats

    prefix = name + ".hm."
    tensors = {prefix + "blocks": blocks, prefix + "segments": segments,
               **{prefix + "pool." + c: t for c, t in pools.items()},
               **{prefix + "scale." + c: t for c, t in (scales or {}).items()}}
    if rows is not None:
        tensors[prefix + "rows"] = rows
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    stats = LayerStats(name, list(shape), dtype, min(shape[0] * shape[1] * 4, 2**62), stored, True, tol=0.01).to_json()
    meta = {"format": "hmcompress", "version": version, "options": {"tol": 0.01}, "source": {"file": "model.pt"},
            "extra": {}, "passthrough": {},
            "matrices": {name: {"shape": list(shape), "orig_shape": list(shape), "dtype": dtype, "prefix": prefix,
                                "stats": stats}}}
    path = d / "packed.hm.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"hmcompress": json.dumps(meta)})
    return path


def zero_block(shape: tuple[int, int]) -> Maker:
    """One block, no segment: a zero matrix of any size in 20 bytes of table (valid)."""
    def make(d: pathlib.Path) -> pathlib.Path:
        blocks = torch.tensor([[0, 0, shape[0], shape[1], 0]], dtype=torch.int32)
        return packed_file(d, shape, blocks, torch.zeros(0, 6, dtype=torch.int32), {})
    return make


def tall_dense_block(d: pathlib.Path) -> pathlib.Path:
    """One dense 65,536 x 1 block (128 KiB of float16): as an HLinear term its identity factor
    would be 65,536 x 65,536 (32 GiB); it loads densely as it is."""
    m = 65536
    blocks = torch.tensor([[0, 0, m, 1, 0]], dtype=torch.int32)
    segments = torch.tensor([[0, 0, 2, 0, 0, -1]], dtype=torch.int32)
    return packed_file(d, (m, 1), blocks, segments, {"f16": torch.ones(m, dtype=torch.float16)})


def plan_grid(d: pathlib.Path) -> pathlib.Path:
    """A 4,096 x 4,096 matrix of 1 x 1 dense blocks along its first row and column and one zero
    block: 160 KiB of tables whose tile plan pads to 4,096 x 4,096 per stage (and used to lay
    them out in Python for minutes)."""
    n = 4096
    blocks = [[i, 0, 1, 1, 1] for i in range(n)] + [[0, j, 1, 1, 1] for j in range(1, n)] + [[1, 1, n - 1, n - 1, 1]]
    segments = [[b, 0, 1, 0, b, -1] for b in range(2 * n - 1)]
    return packed_file(d, (n, n), torch.tensor(blocks, dtype=torch.int32), torch.tensor(segments, dtype=torch.int32),
                       {"f32": torch.ones(2 * n - 1)})


def constant_coded_low_rank(d: pathlib.Path) -> pathlib.Path:
    """One 2048 x 2048 block of rank 2048 (the most a block may have) whose `u8` factors are a
    coded pool of one symbol: 8 KiB for 8.4 M codes and 8.6e9 products to expand (about 4 s on
    one thread here, twice what the reader allows)."""
    n, per_lane = 2048, 4096
    blocks = torch.tensor([[0, 0, n, n, 0]], dtype=torch.int32)
    segments = torch.tensor([[0, 1, 9, n, 0, 0]], dtype=torch.int32)
    packed = packed_file(d, (n, n), blocks, segments, {}, {"u8": torch.ones(1)}, version=3)
    lanes = 2 * n * n // per_lane
    blob = struct.pack("<5I", lanes, 12 + 256, 129, 1, 1) + struct.pack("<2I", 2 * n, n) + bytes([0x80, 0x20])
    blob += struct.pack(f"<{lanes}I", *[1 << 15] * lanes)  # every state at its lowest: no stream words
    coded = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    path = rewrite_compressed(packed, d / "bad.hm.safetensors",
                              lambda tensors, _meta: tensors.update({f"{COMPRESSED_NAME}.hm.coded.u8": coded}))
    packed.unlink()
    return path


@dataclasses.dataclass(frozen=True)
class RuntimeCase(Case):
    """A compressed file the runtime reads (``loads``: `load_state_dict` gives its dense tensors)
    or refuses; either way `patch` and `HLinear` refuse it (a product plan it cannot afford)."""

    loads: bool = False
    linear: tuple[int, int] = (0, 0)  # (in, out) of a model layer ``enc`` that matches it, for `patch`


HOSTILE_RUNTIME = [
    RuntimeCase("zero_block_65536_squared", zero_block((65536, 65536)), "expanding its 65536x65536 matrix"),
    RuntimeCase("zero_block_2_31_elements", zero_block((1, 2**31 - 1)), "expanding its 1x2147483647 matrix"),
    RuntimeCase("zero_block_int64_overflow", zero_block((2**31 - 1, 2**31 - 1)),
                "expanding its 2147483647x2147483647 matrix"),
    RuntimeCase("tall_dense_block", tall_dense_block, "as an HLinear would take", loads=True, linear=(1, 65536)),
    RuntimeCase("plan_grid", plan_grid, "as an HLinear would take", loads=True, linear=(4096, 4096)),
    RuntimeCase("rows_bitmaps", _rows_bitmaps(valid=True), "", loads=True),
    RuntimeCase("constant_coded_low_rank", constant_coded_low_rank, "expanding its low-rank blocks would take"),
]


# ------------------------------------------------------------------ awkward but valid, second round

def awkward_markup_and_unicode(d: pathlib.Path) -> pathlib.Path:
    """Names and a path that look like rich markup or TeX, escape codes, right-to-left marks, CJK."""
    tensors = {"[bold]enc[/]": _weights(12, (64, 64)), "ünï©ødé.[/red]\u202eweight": _weights(13, (64, 72)),
               "a$x^$_{.weight": _weights(20, (64, 64)),
               "b\x1b[31m": torch.ones(3, 4), "日本.bias": torch.arange(4)}
    save_file(tensors, str(d / "plain.safetensors"))
    path = d / "[red]model[link=x] é 日本.safetensors"
    os.rename(d / "plain.safetensors", path)
    return path


def awkward_magnitudes_extreme(d: pathlib.Path) -> pathlib.Path:
    """float64 entries from 1e-300 to 1e300 in one matrix (squares overflow and underflow)."""
    gen = torch.Generator().manual_seed(14)
    exponents = torch.randint(-300, 301, (96, 80), generator=gen).double()
    w = torch.randn(96, 80, generator=gen, dtype=torch.float64) * 10.0**exponents
    return _safetensors(d, {"w": w, "tiny": w * 1e-8})


def awkward_shard_spellings(d: pathlib.Path) -> pathlib.Path:
    """An index naming one shard under many spellings ("x", "./x", ".//./x") for 3,000 tensors."""
    shards = d / "sharded"
    shards.mkdir()
    save_file({f"t{i:04d}": torch.full((2,), i, dtype=torch.int32) for i in range(3000)} | {"w": _weights(15)},
              str(shards / "model-1.safetensors"))
    spellings = ["model-1.safetensors", "./model-1.safetensors", ".//model-1.safetensors", "././model-1.safetensors"]
    weight_map = {f"t{i:04d}": spellings[i % 4] for i in range(3000)} | {"w": "model-1.safetensors"}
    (shards / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return shards


def npz_zeros(numbers: int, shape: tuple[int, ...] | None = None) -> Maker:
    """A maximally compressed .npz (deflate's 1,032x): ``numbers`` float32 zeros beside a weight,
    read member by member, in chunks."""
    def make(d: pathlib.Path) -> pathlib.Path:
        np.savez_compressed(d / "model.npz", w=_weights(17, (64, 64)).numpy(),
                            zeros=np.zeros(shape or (numbers,), np.float32))
        return d / "model.npz"
    return make


AWKWARD += [
    Case("markup_and_unicode", awkward_markup_and_unicode),
    Case("magnitudes_extreme", awkward_magnitudes_extreme),
    Case("shard_spellings", awkward_shard_spellings),
    Case("odd_keys", _odd_keys(50)),
    Case("compressed_npz", npz_zeros(512 * 256, (512, 256))),
]


def empty_tensors_50000(d: pathlib.Path) -> pathlib.Path:
    """50,000 empty tensors beside a weight (valid; each used to re-read the whole header)."""
    header = {f"e{i:05d}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(50000)}
    header["w"] = {"dtype": "F32", "shape": [64, 48], "data_offsets": [0, 64 * 48 * 4]}
    return _raw_safetensors(d, json.dumps(header), _weights(18, (64, 48)).numpy().tobytes())


def norm_overflow(d: pathlib.Path) -> pathlib.Path:
    """A float64 matrix whose Frobenius norm is beyond float64 (entries near 1e307): no bound can be
    stated, so it passes through, and says why."""
    return _safetensors(d, {"w": _weights(19, (80, 64)).double() * 1.5e307})


CORPORA = {"hostile_checkpoints": HOSTILE_CHECKPOINTS, "hostile_compressed": HOSTILE_COMPRESSED,
           "hostile_stats": HOSTILE_STATS, "hostile_runtime": HOSTILE_RUNTIME, "awkward": AWKWARD}


def write_all(root: pathlib.Path) -> None:
    for corpus, cases in CORPORA.items():
        for case in cases:
            directory = root / corpus / case.name
            directory.mkdir(parents=True, exist_ok=True)
            print(case.make(directory))


if __name__ == "__main__":
    write_all(pathlib.Path(sys.argv[1]))
