"""Reading checkpoints of every common kind, safely, and choosing which tensors to compress.

Nothing here runs code from a file: PyTorch pickles are read with ``weights_only=True``,
TorchScript archives with a restricted unpickler that only rebuilds tensors and plain objects,
safetensors headers are validated before any tensor is read. Tensors are read one at a time.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import io
import json
import math
import os
import pathlib
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator

import numpy as np
import torch
from safetensors import safe_open

from hmcompress.errors import CheckpointError
from hmcompress.io.picklescan import Global, persistent_ids
from hmcompress.runtime import MAX_HEADER_BYTES, FormatError, SafetensorsHeader, read_header, unique_keys

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
MAX_NESTING = 100  # containers inside containers in a pickled checkpoint
MAX_NODES = 1_000_000  # objects visited while flattening one (shared containers count per path)
DEFLATE_MAX_RATIO = 1032  # the most deflate can expand: bounds what a compressed .npz member may claim
OPTIMIZER_PARTS = frozenset({"optimizer", "optimizer_state", "optimizer_state_dict", "optim",
                             "opt_state", "scheduler", "lr_scheduler"})
OPTIMIZER_LEAVES = (".exp_avg", ".exp_avg_sq", ".momentum_buffer", ".max_exp_avg_sq", ".square_avg",
                    ".acc_delta")


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint, described without reading it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    load: Callable[[], torch.Tensor]


@dataclasses.dataclass
class Checkpoint:
    path: pathlib.Path
    kind: str  # "safetensors" | "torch" | "torchscript" | "npz" | "sharded"
    entries: list[TensorEntry]
    extra: dict[str, object] = dataclasses.field(default_factory=dict)
    dropped: list[str] = dataclasses.field(default_factory=list)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which tensors are compressed: floating matrices (conv kernels as out x in*k*k, unless not
    ``conv``) of at least ``min_size`` squared entries, selected by the name patterns."""

    min_size: int = 64
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    conv: bool = True
    passthrough_nonfinite: bool = False  # copy matrices holding NaN/Inf unchanged instead of refusing
    drop_optimizer: bool = False  # leave optimizer state out of the output (`io.training`)
    model_only: bool = False  # keep the model's state dict alone, under the bare model's names


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint file or directory; every problem is a one-line `CheckpointError`."""
    path = pathlib.Path(path)
    try:
        if not path.exists():
            raise CheckpointError(path, "no such file or directory")
        if path.is_dir():
            return _open_directory(path)
        if path.stat().st_size == 0:
            raise CheckpointError(path, "empty file")
        kind = _sniff(path)
        opener = {"safetensors": _open_safetensors, "torch": _open_torch, "npz": _open_npz}[kind]
        ckpt = opener(path)
    except OSError as exc:  # unreadable, vanished, a special file ...
        raise CheckpointError(path, f"cannot read ({exc.strerror or exc.__class__.__name__})") from None
    ckpt.entries.sort(key=lambda e: e.name)
    return ckpt


def _sniff(path: pathlib.Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(8)
    name = path.name.lower()
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(TORCH_SUFFIXES) or name.endswith(".jit") or head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 8 and 2 <= struct.unpack("<Q", head)[0] < MAX_HEADER_BYTES:
        return "safetensors"
    raise CheckpointError(path, "unknown checkpoint format (expected .safetensors, .pt/.pth/.bin, .npz or a directory)")


# ---------------------------------------------------------------- safetensors

def safetensors_header(path: pathlib.Path) -> SafetensorsHeader:
    """The checked header of a safetensors checkpoint (the runtime's parser, our error type)."""
    try:
        return read_header(path)
    except FormatError as err:
        raise CheckpointError(path, str(err).removeprefix(f"{path}: ")) from None


def _open_safetensors(path: pathlib.Path) -> Checkpoint:
    header = safetensors_header(path)
    entries = []
    for name, info in header.tensors.items():
        if info.dtype.torch_dtype is None:
            raise CheckpointError(path, f"tensor {name!r}: dtype {info.dtype.code} is not supported by this torch")
        entries.append(TensorEntry(name, info.shape, info.dtype.torch_dtype, info.end - info.begin,
                                   _safetensors_loader(path, name)))
    return Checkpoint(path, "safetensors", entries, metadata=dict(header.metadata))


def _safetensors_loader(path: pathlib.Path, name: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        try:
            with safe_open(str(path), framework="pt") as fh:
                return fh.get_tensor(name).contiguous()
        except Exception as exc:  # safetensors raises its own error types on corrupt data
            raise CheckpointError(path, f"tensor {name!r} cannot be read ({exc})") from None
    return load


# ---------------------------------------------------------------- PyTorch pickles

def _warn_old_torch() -> None:
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    if (major, minor) < (2, 10):
        warnings.warn(f"torch {torch.__version__} has known weights_only bypasses; upgrade to "
                      "torch >= 2.10 before reading untrusted .pt files", stacklevel=3)


def _open_torch(path: pathlib.Path) -> Checkpoint:
    if _is_torchscript(path):
        return _open_torchscript(path)
    _warn_old_torch()
    obj = _torch_load(path)
    entries, extra, dropped = _flatten(path, obj)
    return Checkpoint(path, "torch", entries, extra, dropped)


def _torch_load(path: pathlib.Path) -> object:
    try:
        if zipfile.is_zipfile(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        data = path.read_bytes()  # the legacy format: read from memory, so no read asks for more
        _check_legacy_claims(path, data)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        detail = next((line for line in reason if "Unsupported global" in line or "GLOBAL" in line), "")
        if not detail:
            raise CheckpointError(path, f"cannot read as a PyTorch checkpoint (corrupt pickle: "
                                        f"{reason[0] if reason else 'unreadable'})") from None
        raise CheckpointError(path, "refusing to unpickle: the file contains Python objects other than "
                                    f"tensors and containers ({detail.strip()}); "
                                    "only weights_only-safe checkpoints are read") from None
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt or truncated archives raise many different errors
        raise CheckpointError(path, f"cannot read as a PyTorch checkpoint ({exc.__class__.__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'})") from None


def _check_legacy_claims(path: pathlib.Path, data: bytes) -> None:
    """Refuse a legacy (non-zip) file whose pickle claims a storage larger than the file: torch
    would allocate it before finding the data missing. An unparsable pickle is refused too."""
    stream = io.BytesIO(data)
    try:
        for _ in range(3):  # magic number, protocol version, system info
            for _ in persistent_ids(stream):
                raise CheckpointError(path, "persistent record in a legacy PyTorch file's preamble")
        for pid in persistent_ids(stream):
            if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
                continue  # torch refuses any other record itself
            itemsize = _LEGACY_ITEMSIZE.get(pid[1] if len(pid) > 1 else None)
            if len(pid) < 5 or itemsize is None or type(pid[4]) is not int or pid[4] < 0:
                raise CheckpointError(path, "unrecognised storage record in a legacy PyTorch file")
            if pid[4] * itemsize > len(data):
                raise CheckpointError(path, f"a storage claims {pid[4] * itemsize} bytes, more than the "
                                            f"{len(data)}-byte file holds")
    except CheckpointError:
        raise
    except Exception as exc:  # pickletools' errors on malformed opcodes
        raise CheckpointError(path, f"cannot read as a PyTorch checkpoint (malformed pickle: "
                                    f"{exc.__class__.__name__})") from None


def _flatten(path: pathlib.Path, obj: object) -> tuple[list[TensorEntry], dict[str, object], list[str]]:
    """Nested dicts/lists of tensors -> entries with dotted names (+ JSON-able extras)."""
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, object] = {}
    dropped: list[str] = []
    for name, value in _walk(path, obj):
        if name in tensors or name in extra or name in dropped:
            raise CheckpointError(path, f"two entries are both named {name!r} once flattened")
        if isinstance(value, torch.Tensor):
            _require_within_storage(path, name, value)
            tensors[name] = value
        elif _json_safe(value):
            extra[name] = value
        else:
            dropped.append(name)
    if tensors and all(n.startswith("module.") for n in tensors):
        tensors = {n[len("module."):]: t for n, t in tensors.items()}
    entries = [TensorEntry(name, tuple(t.shape), t.dtype, t.numel() * t.element_size(), _tensor_loader(t))
               for name, t in tensors.items()]
    return entries, extra, sorted(dropped)


def _walk(path: pathlib.Path, root: object) -> Iterator[tuple[str, object]]:
    """(dotted name, leaf) pairs, depth first; hostile nesting, cycles and sharing bombs are refused."""
    stack: list[tuple[str, object, tuple[int, ...]]] = [("", root, ())]
    visited = 0
    while stack:
        name, obj, ancestors = stack.pop()
        visited += 1
        if visited > MAX_NODES:
            raise CheckpointError(path, f"holds more than {MAX_NODES} nested objects (a sharing bomb?)")
        children = _children(obj)
        if children is None:
            yield name, obj
            continue
        if id(obj) in ancestors:
            raise CheckpointError(path, f"container {name or '<root>'!r} contains itself")
        if len(ancestors) >= MAX_NESTING:
            raise CheckpointError(path, f"containers are nested deeper than {MAX_NESTING} levels")
        inner = (*ancestors, id(obj))
        for key, value in reversed(children):
            stack.append((f"{name}.{key}" if name else str(key), value, inner))


def _children(obj: object) -> list[tuple[object, object]] | None:
    """A container's (key, value) pairs if flattening descends into it, else None (a leaf)."""
    if isinstance(obj, dict) and obj and all(isinstance(k, (str, int)) for k in obj):
        return list(obj.items())
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in obj):
        return list(enumerate(obj))
    return None


def _require_within_storage(path: pathlib.Path, name: str, tensor: torch.Tensor) -> None:
    """Refuse views larger than their storage (stride 0, overlapping): materialising one could
    take far more memory than the file holds."""
    needed = tensor.numel() * tensor.element_size()
    held = tensor.untyped_storage().nbytes()
    if needed > held:
        raise CheckpointError(path, f"tensor {name!r} {tuple(tensor.shape)} needs {needed} bytes but its "
                                    f"storage holds {held} (overlapping strides); refusing to expand it")


def _json_safe(value: object) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _tensor_loader(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor.detach().to("cpu").contiguous().clone()


# ---------------------------------------------------------------- TorchScript archives

def _is_torchscript(path: pathlib.Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, EOFError):
        return False  # not a zip Python can read (NotImplementedError: "zip file version 12.7"): torch.load says why


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


_LEGACY_ITEMSIZE = {Global(f"torch {name}"): torch.empty((), dtype=dtype).element_size()
                    for name, dtype in _STORAGE_DTYPES.items()} | {Global("torch UntypedStorage"): 1}

_SCRIPT_LIST_BUILDERS = frozenset({"build_intlist", "build_doublelist", "build_boollist",
                                   "build_tensorlist", "build_complexlist"})


class _ScriptObject:
    """Stand-in for a TorchScript class instance: keeps its attributes, runs nothing."""

    def __setstate__(self, state: object) -> None:
        self.__dict__["_state"] = state


class _ScriptUnpickler(pickle.Unpickler):
    """Rebuilds tensors from the archive's storages; refuses every global it does not know."""

    def __init__(self, fh, archive: zipfile.ZipFile, root: str, path: pathlib.Path) -> None:
        super().__init__(fh)
        self.archive, self.root, self.path = archive, root, path
        self.file_size = path.stat().st_size
        self.storages: dict[object, torch.Tensor] = {}  # by key: a storage named N times is read once

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return type(name, (_ScriptObject,), {})
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return self._rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, _requires_grad, _hooks: data
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch.jit._pickle" and name in _SCRIPT_LIST_BUILDERS:
            return list
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return lambda value, _type: value
        raise CheckpointError(self.path, f"refusing to unpickle {module}.{name} from a TorchScript archive")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(self.path, "unexpected persistent record in a TorchScript archive")
        _, dtype, key, _location, numel = pid
        if (dtype not in _STORAGE_DTYPES.values() or type(numel) is not int or numel < 0
                or not isinstance(key, str)):
            raise CheckpointError(self.path, f"malformed storage record {key!r} in a TorchScript archive")
        known = self.storages.get(key)
        if known is not None:
            if known.dtype != dtype or known.numel() != numel:
                raise CheckpointError(self.path, f"TorchScript storage {key!r} is named with two types or sizes")
            return known
        try:
            info = self.archive.getinfo(f"{self.root}/data/{key}")
        except KeyError:
            raise CheckpointError(self.path, f"TorchScript archive has no storage {key!r}") from None
        nbytes = numel * dtype.itemsize
        if info.file_size < nbytes or info.file_size > self.file_size:
            raise CheckpointError(self.path, f"TorchScript storage {key!r} holds {info.file_size} bytes, "
                                             f"not the {nbytes} it claims")
        raw = self.archive.read(info)
        storage = torch.frombuffer(bytearray(raw[:nbytes]), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        self.storages[key] = storage
        return storage

    def _rebuild_tensor(self, storage, offset, size, stride, *_rest):
        if not (isinstance(storage, torch.Tensor) and _int_tuple(size) and _int_tuple(stride)
                and len(size) == len(stride) and type(offset) is int):
            raise CheckpointError(self.path, "malformed tensor record in a TorchScript archive")
        numel = math.prod(size)
        span = offset + sum((s - 1) * st for s, st in zip(size, stride)) if numel else 0
        if offset < 0 or min(stride, default=0) < 0 or numel and span >= storage.numel():
            raise CheckpointError(self.path, "TorchScript tensor points outside its storage")
        if numel > storage.numel():  # overlapping strides: could expand far beyond the file
            raise CheckpointError(self.path, f"TorchScript tensor of shape {tuple(size)} needs more elements "
                                             f"than its storage holds ({storage.numel()}); refusing to expand it")
        return torch.as_strided(storage, size, stride, offset).clone()


def _int_tuple(values: object) -> bool:
    return isinstance(values, (tuple, list)) and all(type(v) is int and v >= 0 for v in values)


def _open_torchscript(path: pathlib.Path) -> Checkpoint:
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if not pickles:
                raise CheckpointError(path, "TorchScript archive has no data.pkl")
            root = pickles[0][: -len("/data.pkl")]
            with archive.open(pickles[0]) as fh:
                module = _ScriptUnpickler(fh, archive, root, path).load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(path, f"cannot read TorchScript archive ({exc.__class__.__name__})") from None
    tensors: dict[str, torch.Tensor] = {}
    _collect_script_tensors(path, module, "", tensors, set(), 0)
    entries = [TensorEntry(name, tuple(t.shape), t.dtype, t.numel() * t.element_size(), _tensor_loader(t))
               for name, t in tensors.items()]
    return Checkpoint(path, "torchscript", entries)


def _collect_script_tensors(path: pathlib.Path, obj: object, prefix: str, out: dict[str, torch.Tensor],
                            seen: set[int], depth: int) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if depth > MAX_NESTING:
        raise CheckpointError(path, f"TorchScript objects are nested deeper than {MAX_NESTING} levels")
    if isinstance(obj, torch.Tensor):
        out.setdefault(prefix.rstrip("."), obj)
    elif isinstance(obj, _ScriptObject):
        _collect_script_tensors(path, obj.__dict__.get("_state"), prefix, out, seen, depth + 1)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, str) and not key.startswith("training"):
                _collect_script_tensors(path, value, f"{prefix}{key}.", out, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            _collect_script_tensors(path, value, f"{prefix}{index}.", out, seen, depth + 1)


# ---------------------------------------------------------------- numpy and directories

def _open_npz(path: pathlib.Path) -> Checkpoint:
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = {}
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if name in arrays:
                    raise CheckpointError(path, f"array {name!r} appears twice")
                arrays[name] = _read_npy(path, archive, info)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(path, f"cannot read as .npz ({exc.__class__.__name__}: {exc})") from None
    entries, dropped = [], []
    for name, array in arrays.items():
        try:
            tensor = torch.from_numpy(np.ascontiguousarray(array))
        except TypeError:  # strings, dates, ...: no tensor type holds them
            dropped.append(name)
            continue
        entries.append(TensorEntry(name, tuple(tensor.shape), tensor.dtype, tensor.numel() * tensor.element_size(),
                                   _tensor_loader(tensor)))
    return Checkpoint(path, "npz", entries, dropped=sorted(dropped))


def _read_npy(path: pathlib.Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One array of an .npz, its header checked against the member's size before reading data."""
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 1024:
        raise CheckpointError(path, f"member {info.filename!r} claims {info.file_size} bytes from "
                                    f"{info.compress_size} compressed (a zip bomb?)")
    with archive.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        if dtype.hasobject:
            raise CheckpointError(path, f"refusing .npz array {info.filename!r}: object arrays need unpickling")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != info.file_size - fh.tell():
            raise CheckpointError(path, f"array {info.filename!r} of shape {shape} needs {nbytes} bytes, "
                                        f"the member holds {info.file_size - fh.tell()}")
        data = fh.read(nbytes)
    array = np.frombuffer(bytearray(data), dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _open_directory(path: pathlib.Path) -> Checkpoint:
    indexes = sorted(path.glob("*.index.json"))
    if indexes:
        return _open_sharded(path, indexes[0])
    files = sorted(p for p in path.iterdir() if p.is_file() and
                   (p.suffix in (".safetensors", ".npz", ".jit") or p.name.endswith(TORCH_SUFFIXES)))
    if len(files) == 1:
        return open_checkpoint(files[0])
    if not files:
        raise CheckpointError(path, "directory holds no checkpoint file")
    raise CheckpointError(path, f"directory holds {len(files)} checkpoint files and no *.index.json; name one")


def _open_sharded(directory: pathlib.Path, index_path: pathlib.Path) -> Checkpoint:
    try:
        weight_map = json.loads(index_path.read_text(), object_pairs_hook=unique_keys)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise CheckpointError(index_path, "not a valid shard index (expected a JSON object with a weight_map)") from None
    entries, shards = [], {}
    for name, shard in sorted(weight_map.items()):
        shard_path = directory / shard
        if shard_path.parent != directory:
            raise CheckpointError(index_path, f"shard {shard!r} of tensor {name!r} is outside the directory")
        if not shard_path.is_file():
            raise CheckpointError(index_path, f"shard {shard!r} of tensor {name!r} does not exist")
        if shard not in shards:
            shards[shard] = {e.name: e for e in open_checkpoint(shard_path).entries}
        if name not in shards[shard]:
            raise CheckpointError(shard_path, f"has no tensor {name!r} (the index says it does)")
        entries.append(shards[shard][name])
    return Checkpoint(directory, "sharded", entries)


# ---------------------------------------------------------------- selection

def is_optimizer_state(name: str) -> bool:
    return bool(OPTIMIZER_PARTS.intersection(name.split("."))) or name.endswith(OPTIMIZER_LEAVES)


def classify(entry: TensorEntry, selection: Selection) -> str | None:
    """None if the tensor is compressed, else why it passes through."""
    if is_optimizer_state(entry.name):
        return "optimizer state"
    if not entry.dtype.is_floating_point:
        return "not floating point"
    if entry.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        return f"unsupported dtype {str(entry.dtype).removeprefix('torch.')}"
    if len(entry.shape) != 2:
        if len(entry.shape) >= 3:
            if not selection.conv:
                return "conv kernel (--no-conv)"
        else:
            return "not a matrix"
    if math.prod(entry.shape) == 0:
        return "empty"
    rows, cols = entry.shape[0], math.prod(entry.shape[1:])
    if rows * cols < selection.min_size ** 2:
        return f"too small (< {selection.min_size}x{selection.min_size} entries)"
    if selection.include and not any(fnmatch.fnmatchcase(entry.name, p) for p in selection.include):
        return "not included by pattern"
    if any(fnmatch.fnmatchcase(entry.name, p) for p in selection.exclude):
        return "excluded by pattern"
    return None
