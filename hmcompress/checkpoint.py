"""Reading checkpoints of every common kind, safely, and choosing which tensors to compress.

Nothing here runs code from a file: PyTorch pickles are read with ``weights_only=True``,
TorchScript archives with a restricted unpickler that only rebuilds tensors and plain objects,
safetensors headers are validated before any tensor is read. Tensors are read one at a time.
"""
from __future__ import annotations

import dataclasses
import fnmatch
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

from .errors import CheckpointError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
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
    """Which tensors are compressed."""

    min_size: int = 64
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    conv: bool = False


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint file or directory; every problem is a one-line `CheckpointError`."""
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or directory")
    if path.is_dir():
        return _open_directory(path)
    if path.stat().st_size == 0:
        raise CheckpointError(path, "empty file")
    kind = _sniff(path)
    opener = {"safetensors": _open_safetensors, "torch": _open_torch, "npz": _open_npz}[kind]
    ckpt = opener(path)
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

def safetensors_header(path: pathlib.Path) -> dict:
    """The validated JSON header of a safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(path, "truncated safetensors file (no header length)")
        length = struct.unpack("<Q", head)[0]
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise CheckpointError(path, f"safetensors header claims {length} bytes, file has {size - 8}")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"safetensors header is not valid UTF-8 JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "safetensors header is not a JSON object")
    data_size = size - 8 - length
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(path, f"tensor {name!r}: unknown or missing dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(path, f"tensor {name!r}: malformed shape or data_offsets")
        begin, end = offsets
        itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[info["dtype"]]).element_size()
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * itemsize:
            raise CheckpointError(path, f"tensor {name!r}: data offsets out of range or inconsistent with its shape")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(path, f"tensors {first!r} and {second!r} overlap")
    return header


def _open_safetensors(path: pathlib.Path) -> Checkpoint:
    header = safetensors_header(path)
    metadata = header.get("__metadata__") or {}
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        entries.append(TensorEntry(name, tuple(info["shape"]), dtype, end - begin,
                                   _safetensors_loader(path, name)))
    return Checkpoint(path, "safetensors", entries, metadata=dict(metadata))


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
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        return _open_torchscript(path)
    _warn_old_torch()
    obj = _torch_load(path)
    entries, extra, dropped = _flatten(obj)
    return Checkpoint(path, "torch", entries, extra, dropped)


def _torch_load(path: pathlib.Path) -> object:
    zipped = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        detail = next((line for line in reason if "Unsupported global" in line or "GLOBAL" in line), "")
        raise CheckpointError(path, "refusing to unpickle: the file contains Python objects other than "
                                    f"tensors and containers ({detail.strip() or 'not weights_only-safe'}); "
                                    "only weights_only-safe checkpoints are read") from None
    except Exception as exc:  # corrupt or truncated archives raise many different errors
        raise CheckpointError(path, f"cannot read as a PyTorch checkpoint ({exc.__class__.__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'})") from None


def _flatten(obj: object) -> tuple[list[TensorEntry], dict[str, object], list[str]]:
    """Nested dicts/lists of tensors -> entries with dotted names (+ JSON-able extras)."""
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, object] = {}
    dropped: list[str] = []
    for name, value in _walk(obj, ""):
        if isinstance(value, torch.Tensor):
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


def _walk(obj: object, prefix: str) -> Iterator[tuple[str, object]]:
    if isinstance(obj, dict) and obj and all(isinstance(k, (str, int)) for k in obj):
        for key, value in obj.items():
            yield from _walk(value, f"{prefix}{key}." if not isinstance(value, torch.Tensor) else f"{prefix}{key}")
        return
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in obj):
        for index, value in enumerate(obj):
            yield from _walk(value, f"{prefix}{index}." if not isinstance(value, torch.Tensor) else f"{prefix}{index}")
        return
    yield prefix.rstrip("."), obj


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
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


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

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return type(name, (_ScriptObject,), {})
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return self._rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad, hooks: data
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
        try:
            raw = self.archive.read(f"{self.root}/data/{key}")
        except KeyError:
            raise CheckpointError(self.path, f"TorchScript archive has no storage {key!r}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) < numel * itemsize:
            raise CheckpointError(self.path, f"TorchScript storage {key!r} is truncated")
        return torch.frombuffer(bytearray(raw[: numel * itemsize]), dtype=dtype) if numel else torch.empty(0, dtype=dtype)

    def _rebuild_tensor(self, storage, offset, size, stride, *_rest):
        span = offset + sum((s - 1) * st for s, st in zip(size, stride)) if all(size) else 0
        if offset < 0 or span >= max(storage.numel(), 1) and math.prod(size) > 0:
            raise CheckpointError(self.path, "TorchScript tensor points outside its storage")
        return torch.as_strided(storage, size, stride, offset).clone()


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
    _collect_script_tensors(module, "", tensors, set())
    entries = [TensorEntry(name, tuple(t.shape), t.dtype, t.numel() * t.element_size(), _tensor_loader(t))
               for name, t in tensors.items()]
    return Checkpoint(path, "torchscript", entries)


def _collect_script_tensors(obj: object, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.setdefault(prefix.rstrip("."), obj)
    elif isinstance(obj, _ScriptObject):
        _collect_script_tensors(obj.__dict__.get("_state"), prefix, out, seen)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, str) and not key.startswith("training"):
                _collect_script_tensors(value, f"{prefix}{key}.", out, seen)
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            _collect_script_tensors(value, f"{prefix}{index}.", out, seen)


# ---------------------------------------------------------------- numpy and directories

def _open_npz(path: pathlib.Path) -> Checkpoint:
    try:
        archive = np.load(path, allow_pickle=False)
        names = list(archive.files)
        arrays = {name: archive[name] for name in names}
    except ValueError as exc:
        raise CheckpointError(path, f"refusing .npz content that needs unpickling ({exc})") from None
    except Exception as exc:
        raise CheckpointError(path, f"cannot read as .npz ({exc.__class__.__name__})") from None
    entries = []
    for name, array in arrays.items():
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        entries.append(TensorEntry(name, tuple(tensor.shape), tensor.dtype, tensor.numel() * tensor.element_size(),
                                   _tensor_loader(tensor)))
    return Checkpoint(path, "npz", entries)


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
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(index_path, "not a valid shard index (expected a JSON object with a weight_map)") from None
    entries, shards = [], {}
    for name, shard in sorted(weight_map.items()):
        shard_path = directory / str(shard)
        if shard_path.parent != directory or not shard_path.is_file():
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
                return "conv kernel (use --conv)"
        else:
            return "not a matrix"
    if math.prod(entry.shape) == 0:
        return "empty"
    rows, cols = entry.shape[0], math.prod(entry.shape[1:])
    if min(rows, cols) < selection.min_size:
        return f"too small (< {selection.min_size})"
    if selection.include and not any(fnmatch.fnmatchcase(entry.name, p) for p in selection.include):
        return "not included by pattern"
    if any(fnmatch.fnmatchcase(entry.name, p) for p in selection.exclude):
        return "excluded by pattern"
    return None


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """The 2-D matrix compressed for a tensor: conv kernels become (out, in * k * ...)."""
    return tensor if tensor.ndim == 2 else tensor.reshape(tensor.shape[0], -1)
