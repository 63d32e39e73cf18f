"""Generated test corpora: hostile inputs that must be refused, awkward ones that must just work.

Nothing here is committed as a binary: every case is a function that writes its file(s) into a
directory. Hostile payloads create the file ``SENTINEL`` in that directory if they ever run, so a
test proves no code ran by its absence. ``python tests/corpus.py DIR`` writes every case into
``DIR/<corpus>/<case>/`` for a look by hand.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import pickle
import shlex
import struct
import sys
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
    Case("zip_truncated_storage", zip_truncated_storage, "cannot read"),
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
]


# ------------------------------------------------------------------------------- compressed files

COMPRESSED_NAME = "enc.weight"


def original_matrix() -> torch.Tensor:
    """A smooth kernel plus noise: compresses into several blocks of every kind at leaf 8."""
    gen = torch.Generator().manual_seed(7)
    x = torch.sort(torch.rand(64, generator=gen, dtype=torch.float64))[0]
    y = torch.sort(torch.rand(48, generator=gen, dtype=torch.float64))[0]
    w = 1 / (1 + 50 * (x[:, None] - y[None, :]).abs()) + 1e-3 * torch.randn(64, 48, generator=gen, dtype=torch.float64)
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


def _stats(change: Callable[[dict], None]) -> Callable[[pathlib.Path], pathlib.Path]:
    return _meta(lambda meta: change(meta["matrices"][COMPRESSED_NAME]))


HOSTILE_COMPRESSED = [
    Case("blocks_overlap", _table("blocks", _overlap), "overlap"),
    Case("blocks_leave_a_hole", _table("blocks", _hole), "hole"),
    Case("blocks_equal_area_no_tiling", _table("blocks", _equal_area_misplaced), "do not tile"),
    Case("segment_outside_pool", _table("segments", _outside_pool), "outside pool"),
    Case("segment_negative_offset", _table("segments", _negative_offset), "outside pool"),
    Case("segment_absurd_rank", _table("segments", _absurd_rank), "outside pool"),
    Case("segment_unknown_kind", _table("segments", _bad_kind), "unknown kind"),
    Case("matrix_absurd_size", _meta(_absurd_matrix), "does not fit"),
    Case("wrong_version", _meta(lambda m: m.update(version=2)), "version 2 is not supported"),
    Case("version_as_string", _meta(lambda m: m.update(version="1")), "version '1' is not supported"),
    Case("wrong_format_name", _meta(lambda m: m.update(format="ggml")), "format 'ggml'"),
    Case("options_not_an_object", _meta(lambda m: m.update(options=["tol", 0.01])), "'options' is not a JSON object"),
    Case("compressed_truncated", _compressed_truncated, "data offsets out of range"),
    Case("compressed_header_bit_flipped", _compressed_header_flipped, "not valid UTF-8 JSON"),
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

CORPORA = {"hostile_checkpoints": HOSTILE_CHECKPOINTS, "hostile_compressed": HOSTILE_COMPRESSED,
           "hostile_stats": HOSTILE_STATS, "awkward": AWKWARD}


def write_all(root: pathlib.Path) -> None:
    for corpus, cases in CORPORA.items():
        for case in cases:
            directory = root / corpus / case.name
            directory.mkdir(parents=True, exist_ok=True)
            print(case.make(directory))


if __name__ == "__main__":
    write_all(pathlib.Path(sys.argv[1]))
