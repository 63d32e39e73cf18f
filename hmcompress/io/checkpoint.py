"""Reading checkpoints of every common kind, safely, and choosing which tensors to compress.

Nothing here runs code from a file: PyTorch pickles are scanned first (`picklescan`: every record
checked against the file before torch reads it) and then read with ``weights_only=True``,
TorchScript archives with a restricted unpickler that only rebuilds tensors and plain objects,
safetensors headers are validated before any tensor is read, `.npz` headers before any data.
Only regular files are opened (never a FIFO or a device). Tensors are read one at a time.
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
import stat
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator

import numpy as np
import torch

from hmcompress.errors import CheckpointError
from hmcompress.io.picklescan import Global, PickleProblem, Scan, scan
from hmcompress.runtime import (
    MATRIX_DTYPE_NAMES,
    MAX_HEADER_BYTES,
    FormatError,
    SafetensorsHeader,
    brief,
    is_unicode,
    open_regular,
    read_header,
    read_tensor,
    unique_keys,
)

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
MAX_NESTING = 100  # containers inside containers in a pickled checkpoint
MAX_NODES = 1_000_000  # objects a pickle may build, and paths visited while flattening it
DEFLATE_MAX_RATIO = 1032  # the most deflate can expand: bounds what a compressed .npz member may claim
SHARED_BYTES_FACTOR = 64  # a pickled checkpoint's tensors may total this many times the file (views of shared storage)
READ_CHUNK = 16 << 20  # bytes read from a zip member at once
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
            ckpt = _open_directory(path)
        else:
            info = path.stat()
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointError(path, "not a regular file (a FIFO, a device or a socket is never read)")
            if info.st_size == 0:
                raise CheckpointError(path, "empty file")
            kind = _sniff(path)
            opener = {"safetensors": _open_safetensors, "torch": _open_torch, "npz": _open_npz}[kind]
            ckpt = opener(path)
            if ckpt.kind in ("torch", "torchscript"):
                _check_shared_bytes(path, ckpt.entries, info.st_size)
    except OSError as exc:  # unreadable, vanished ...
        raise CheckpointError(path, f"cannot read ({exc.strerror or exc.__class__.__name__})") from None
    except FormatError as exc:  # from the runtime's readers (a header, a regular file)
        raise CheckpointError(path, str(exc).removeprefix(f"{path}: ")) from None
    if not ckpt.entries:
        raise CheckpointError(path, "holds no tensors")
    ckpt.entries.sort(key=lambda e: e.name)
    return ckpt


def _check_shared_bytes(path: pathlib.Path, entries: list[TensorEntry], size: int) -> None:
    """Views may share a storage (tied weights), but not make a small file a huge checkpoint."""
    total = sum(e.nbytes for e in entries)
    if total > SHARED_BYTES_FACTOR * size + (1 << 20):
        raise CheckpointError(path, f"its tensors total {total} bytes, more than {SHARED_BYTES_FACTOR} times the "
                                    f"{size}-byte file (many views of shared storage); refusing to expand them")


def _sniff(path: pathlib.Path) -> str:
    with open_regular(path) as fh:
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
            raise CheckpointError(path, f"tensor {brief(name)}: dtype {info.dtype.code} is not supported by this torch")
        entries.append(TensorEntry(name, info.shape, info.dtype.torch_dtype, info.end - info.begin,
                                   _safetensors_loader(path, header, name)))
    return Checkpoint(path, "safetensors", entries, metadata=dict(header.metadata))


def _safetensors_loader(path: pathlib.Path, header: SafetensorsHeader, name: str) -> Callable[[], torch.Tensor]:
    """Reads the tensor where the checked header says it is (the header is not parsed again:
    for thousands of tensors that would cost the square of their number)."""
    def load() -> torch.Tensor:
        try:
            with open_regular(path) as fh:
                return read_tensor(fh, header, name)
        except (FormatError, OSError) as exc:
            raise CheckpointError(path, f"tensor {brief(name)} cannot be read ({exc})") from None
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


class _TorchWarningsHidden(warnings.catch_warnings):
    """torch's own warnings while it reads a file (TypedStorage deprecation, sparse invariants,
    old pickle protocols) are about its internals, not the file: they would only be extra lines
    beside the one line a refusal prints."""

    def __enter__(self):
        result = super().__enter__()
        warnings.simplefilter("ignore")
        return result


def _torch_load(path: pathlib.Path) -> object:
    try:
        if zipfile.is_zipfile(path):
            _prescan_zip(path)
            with _TorchWarningsHidden():
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        data = path.read_bytes()  # the legacy format: read from memory, so no read asks for more
        _prescan_legacy(path, data)
        with _TorchWarningsHidden():
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        detail = next((line for line in reason if "Unsupported global" in line or "GLOBAL" in line), "")
        if not detail:
            raise CheckpointError(path, f"cannot read as a PyTorch checkpoint (corrupt pickle: "
                                        f"{reason[0][:200] if reason else 'unreadable'})") from None
        raise CheckpointError(path, "refusing to unpickle: the file contains Python objects other than "
                                    f"tensors and containers ({detail.strip()[:200]}); "
                                    "only weights_only-safe checkpoints are read") from None
    except CheckpointError:
        raise
    except Exception as exc:  # corrupt or truncated archives raise many different errors
        first = str(exc).splitlines()[0][:200] if str(exc) else "corrupt"
        raise CheckpointError(path, f"cannot read as a PyTorch checkpoint ({exc.__class__.__name__}: {first})") from None


def _scan(path: pathlib.Path, stream: io.BufferedIOBase, max_objects: int = MAX_NODES) -> Scan:
    try:
        return scan(stream, max_objects)
    except PickleProblem as problem:
        raise CheckpointError(path, f"cannot read as a PyTorch checkpoint: {problem}") from None


def _prescan_zip(path: pathlib.Path) -> None:
    """Check a zip checkpoint's records before torch maps them: one data.pkl; every storage it
    names is an uncompressed record at least as large as it claims, the records together no
    larger than the file; every tensor lies inside its storage; no more than `MAX_NODES` objects."""
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        if len(infos) != len(archive.infolist()):  # torch would read a record this scan did not see
            raise CheckpointError(path, "cannot read as a PyTorch checkpoint (two records of one name, or names "
                                        "that differ only after a NUL)")
        pickles = [name for name in infos if name == "data.pkl" or name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(path, f"cannot read as a PyTorch checkpoint (the archive holds {len(pickles)} "
                                        "data.pkl records, not one)")
        info = infos[pickles[0]]
        if info.file_size > size:
            raise CheckpointError(path, f"cannot read as a PyTorch checkpoint (data.pkl claims {info.file_size} "
                                        f"bytes, more than the {size}-byte file)")
        root = pickles[0][: -len("data.pkl")]
        summary = _scan(path, io.BytesIO(archive.read(info)))
    claims: dict[object, tuple[int, int]] = {}  # storage key -> (elements, bytes per element)
    total = 0
    for pid in summary.storages:
        key, numel, itemsize = _storage_record(path, pid, 5)
        record = infos.get(f"{root}data/{key}")
        if record is None:
            raise CheckpointError(path, f"cannot read as a PyTorch checkpoint (storage {brief(key)} has no record)")
        if record.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(path, f"storage {brief(key)} is a compressed record (torch writes them "
                                        "uncompressed, and maps them as they are)")
        if numel * itemsize > record.file_size:
            raise CheckpointError(path, f"a storage claims {numel * itemsize} bytes, its record holds "
                                        f"{record.file_size}")
        if key not in claims:
            total += record.file_size
        if claims.setdefault(key, (numel, itemsize)) != (numel, itemsize):
            raise CheckpointError(path, f"storage {brief(key)} is named with two types or sizes")
    if total > size:
        raise CheckpointError(path, f"its storage records add up to {total} bytes, more than the {size}-byte "
                                    "file holds (records overlap)")
    _check_views(path, summary, claims)


def _prescan_legacy(path: pathlib.Path, data: bytes) -> None:
    """Check a legacy (non-zip) file's pickles before torch allocates what they claim: every
    storage fits in the file, all of them together too, every tensor lies inside its storage."""
    stream = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info
        if _scan(path, stream, 10_000).storages:
            raise CheckpointError(path, "persistent record in a legacy PyTorch file's preamble")
    summary = _scan(path, stream)
    claims: dict[object, tuple[int, int]] = {}
    for pid in summary.storages:
        key, numel, itemsize = _storage_record(path, pid, 6)
        if claims.setdefault(key, (numel, itemsize)) != (numel, itemsize):
            raise CheckpointError(path, f"storage {brief(key)} is named with two types or sizes")
    total = sum(numel * itemsize for numel, itemsize in claims.values())
    if total > len(data):
        raise CheckpointError(path, f"a storage claims {total} bytes, more than the {len(data)}-byte file holds")
    _check_views(path, summary, claims)


def _storage_record(path: pathlib.Path, pid: object, length: int) -> tuple[object, int, int]:
    """(key, elements, bytes per element) of a storage record ('storage', type, key, location,
    elements[, view]); anything else is refused (torch refuses it too, later)."""
    if not (isinstance(pid, tuple) and len(pid) == length and pid[0] in ("storage", b"storage")):
        raise CheckpointError(path, "cannot read as a PyTorch checkpoint (unrecognised persistent record)")
    itemsize = _STORAGE_ITEMSIZE.get(getattr(pid[1], "global_name", None))
    key, numel = pid[2], pid[4]
    if itemsize is None or type(numel) is not int or numel < 0 or not isinstance(key, (str, int)):
        raise CheckpointError(path, "unrecognised storage record in a PyTorch file")
    return key, numel, itemsize


def _check_views(path: pathlib.Path, summary: Scan, claims: dict[object, tuple[int, int]]) -> None:
    """Every tensor record lies inside its storage and needs no more bytes than it holds (a view
    with stride 0 could otherwise be materialised far beyond the file)."""
    for view in summary.views:
        storage = view.storage
        key = storage[2] if isinstance(storage, tuple) and len(storage) > 2 else None
        if key not in claims or type(view.offset) is not int or view.offset < 0 or not _int_tuple(view.size) \
                or not _int_tuple(view.stride) or len(view.size) != len(view.stride):
            raise CheckpointError(path, "cannot read as a PyTorch checkpoint (malformed tensor record)")
        numel, itemsize = claims[key]
        if view.dtype is not None:  # an untyped storage viewed as this dtype
            element = _DTYPE_ITEMSIZE.get(view.dtype)
            if element is None:
                raise CheckpointError(path, "cannot read as a PyTorch checkpoint (a tensor record names an unknown "
                                            f"dtype {brief(str(view.dtype))})")
            numel, itemsize = numel * itemsize // element, element
        count = math.prod(view.size)
        if count and view.offset + sum((s - 1) * st for s, st in zip(view.size, view.stride)) >= numel:
            raise CheckpointError(path, f"a tensor of shape {brief(tuple(view.size))} lies outside its storage")
        if count > numel:
            raise CheckpointError(path, f"a tensor of shape {brief(tuple(view.size))} needs {count * itemsize} "
                                        f"bytes but its storage holds {numel * itemsize} (overlapping strides); "
                                        "refusing to expand it")


def _flatten(path: pathlib.Path, obj: object) -> tuple[list[TensorEntry], dict[str, object], list[str]]:
    """Nested dicts/lists of tensors -> entries with dotted names (+ JSON-able extras)."""
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, object] = {}
    dropped: list[str] = []
    for name, value in _walk(path, obj):
        if name in tensors or name in extra or name in dropped:
            raise CheckpointError(path, f"two entries are both named {brief(name)} once flattened")
        if isinstance(value, torch.Tensor):
            _require_plain_tensor(path, name, value)
            tensors[name] = value
        elif _plain_json(value):
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
    _count_paths(path, root)
    stack: list[tuple[str, object, tuple[int, ...]]] = [("", root, ())]
    visited = 0
    while stack:
        name, obj, ancestors = stack.pop()
        visited += 1
        if visited > MAX_NODES:
            raise CheckpointError(path, f"holds more than {MAX_NODES} nested objects (a sharing bomb?)")
        children = _children(path, obj)
        if children is None:
            yield name, obj
            continue
        if id(obj) in ancestors:
            raise CheckpointError(path, f"container {brief(name or '<root>')} contains itself")
        if len(ancestors) >= MAX_NESTING:
            raise CheckpointError(path, f"containers are nested deeper than {MAX_NESTING} levels")
        inner = (*ancestors, id(obj))
        for key, value in reversed(children):
            stack.append((f"{name}.{key}" if name else str(key), value, inner))


def _count_paths(path: pathlib.Path, root: object) -> None:
    """Refuse a sharing bomb at once: the names flattening would make (one per path to each
    object, shared containers counted per path) are counted over the distinct containers, so a
    list holding the level below twice, 60 levels deep (2**60 names), costs 60 steps, not 10**6."""
    counts: dict[int, int] = {}
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        obj, expanded = stack.pop()
        if id(obj) in counts and not expanded:
            continue
        children = _children(path, obj)
        if children is None:
            counts[id(obj)] = 1
        elif expanded:
            counts[id(obj)] = 1 + sum(counts.get(id(child), 0) for _key, child in children)
            if counts[id(obj)] > MAX_NODES:
                raise CheckpointError(path, f"holds more than {MAX_NODES} nested objects (a sharing bomb?)")
        else:
            counts[id(obj)] = 0  # in progress: a cycle through it counts nothing here (`_walk` refuses it)
            stack.append((obj, True))
            stack.extend((child, False) for _key, child in children if id(child) not in counts)


def _children(path: pathlib.Path, obj: object) -> list[tuple[object, object]] | None:
    """A container's (key, value) pairs if flattening descends into it, else None (a leaf).

    A dict is descended into when every key can be part of a name (a string, or an integer of at
    most 64 bits); a string key that is not Unicode (a lone surrogate) is refused, since no name
    could hold it. Other dicts (float, None or tuple keys) are leaves, kept only if plain JSON.
    """
    if isinstance(obj, dict) and obj:
        keys = list(obj)
        bad = next((k for k in keys if isinstance(k, str) and not is_unicode(k)), None)
        if bad is not None:
            raise CheckpointError(path, f"holds a name that is not valid Unicode ({brief(bad)})")
        if all(isinstance(k, str) or (type(k) is int and -2**63 <= k < 2**63) for k in keys):
            return list(obj.items())
        return None
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in obj):
        return list(enumerate(obj))
    return None


def _require_plain_tensor(path: pathlib.Path, name: str, tensor: torch.Tensor) -> None:
    """A dense tensor in CPU memory whose view does not reach beyond its storage (stride 0,
    overlapping: materialising one could take far more memory than the file holds)."""
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested:
        raise CheckpointError(path, f"tensor {brief(name)} is {str(tensor.layout).removeprefix('torch.')}"
                                    f"{' quantized' if tensor.is_quantized else ''}; only dense tensors are read")
    if tensor.device.type != "cpu":
        raise CheckpointError(path, f"tensor {brief(name)} is on the {tensor.device.type} device, not in memory")
    needed = tensor.numel() * tensor.element_size()
    held = tensor.untyped_storage().nbytes()
    if needed > held:
        raise CheckpointError(path, f"tensor {brief(name)} {brief(tuple(tensor.shape))} needs {needed} bytes but "
                                    f"its storage holds {held} (overlapping strides); refusing to expand it")


def _plain_json(value: object) -> bool:
    """Whether ``value`` is plain JSON the file's header can keep as it is: None, bools, integers of
    at most 64 bits, finite floats, Unicode strings, lists and tuples, dicts with string keys;
    nested at most `MAX_NESTING` deep (checked without recursion)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, str):
            if not is_unicode(item):
                return False
        elif isinstance(item, int):
            if not -2**63 <= item < 2**64:
                return False
        elif isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, (list, tuple, dict)):
            if depth >= MAX_NESTING:
                return False
            if isinstance(item, dict):
                if not all(isinstance(k, str) and is_unicode(k) for k in item):
                    return False
                item = item.values()
            stack.extend((child, depth + 1) for child in item)
        else:
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


# Element sizes of the storage types a pickle's storage records may name (typed storages of every
# dtype torch has one for, untyped ones counted in bytes).
_STORAGE_ITEMSIZE = {Global(f"torch {name}"): dtype.itemsize
                     for dtype, name in torch.storage._dtype_to_storage_type_map().items()} \
    | {Global("torch UntypedStorage"): 1, Global("torch.storage UntypedStorage"): 1}
# Element sizes of the dtypes a `_rebuild_tensor_v3` record may name (views of untyped storages).
_DTYPE_ITEMSIZE = {Global(f"torch {name}"): getattr(torch, name).itemsize
                   for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}

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
        self.storage_bytes = 0  # of every storage read: together no more than the file holds

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
            raise CheckpointError(self.path, f"malformed storage record {brief(key)} in a TorchScript archive")
        known = self.storages.get(key)
        if known is not None:
            if known.dtype != dtype or known.numel() != numel:
                raise CheckpointError(self.path, f"TorchScript storage {brief(key)} is named with two types or sizes")
            return known
        try:
            info = self.archive.getinfo(f"{self.root}/data/{key}")
        except KeyError:
            raise CheckpointError(self.path, f"TorchScript archive has no storage {brief(key)}") from None
        nbytes = numel * dtype.itemsize
        if info.file_size < nbytes or info.file_size > self.file_size:
            raise CheckpointError(self.path, f"TorchScript storage {brief(key)} holds {info.file_size} bytes, "
                                             f"not the {nbytes} it claims")
        self.storage_bytes += nbytes
        if self.storage_bytes > self.file_size:
            raise CheckpointError(self.path, f"TorchScript storages add up to more than the {self.file_size}-byte "
                                             "file holds (records overlap)")
        raw = torch.empty(nbytes, dtype=torch.uint8)
        with self.archive.open(info) as member:
            _read_exactly(self.path, member, raw, f"TorchScript storage {brief(key)}")
        storage = raw.view(dtype)
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
            raise CheckpointError(self.path, f"TorchScript tensor of shape {brief(tuple(size))} needs more elements "
                                             f"than its storage holds ({storage.numel()}); refusing to expand it")
        return torch.as_strided(storage, size, stride, offset)  # a view: its entry copies it when loaded


def _int_tuple(values: object) -> bool:
    return isinstance(values, (tuple, list)) and all(type(v) is int and v >= 0 for v in values)


def _read_exactly(path: pathlib.Path, member, out: torch.Tensor, what: str) -> None:
    """Fill the uint8 tensor ``out`` from a zip member, in bounded chunks, then reach the member's
    end (where zipfile checks its CRC)."""
    view = memoryview(out.numpy()) if out.numel() else memoryview(b"")
    done = 0
    while done < len(view):
        chunk = member.read(min(READ_CHUNK, len(view) - done))
        if not chunk:
            raise CheckpointError(path, f"{what} ends before its data")
        view[done:done + len(chunk)] = chunk
        done += len(chunk)
    while member.read(READ_CHUNK):
        pass


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
                if not is_unicode(key):
                    raise CheckpointError(path, f"holds a name that is not valid Unicode ({brief(key)})")
                _collect_script_tensors(path, value, f"{prefix}{key}.", out, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            _collect_script_tensors(path, value, f"{prefix}{index}.", out, seen, depth + 1)


# ---------------------------------------------------------------- numpy and directories

@dataclasses.dataclass(frozen=True)
class _NpyMember:
    """One array of an .npz, described from its header: read only when its entry is loaded."""

    member: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    data_offset: int  # where the array's bytes start in the (uncompressed) member

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _open_npz(path: pathlib.Path) -> Checkpoint:
    """Headers only: every member's npy header is checked against its size, and a compressed
    member is inflated once, in bounded chunks, to check its CRC; arrays are read when loaded."""
    entries, dropped, names = [], [], set()
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if name in names:
                    raise CheckpointError(path, f"array {brief(name)} appears twice")
                if not is_unicode(name):
                    raise CheckpointError(path, f"array name {brief(name)} is not valid Unicode")
                names.add(name)
                member = _npy_member(path, archive, info)
                dtype = _torch_dtype(member.dtype)
                if dtype is None:  # strings, dates, structures ...: no tensor type holds them
                    dropped.append(name)
                    continue
                entries.append(TensorEntry(name, member.shape, dtype, member.nbytes, _npy_loader(path, member)))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(path, f"cannot read as .npz ({exc.__class__.__name__}: "
                                    f"{str(exc).splitlines()[0][:200] if str(exc) else 'corrupt'})") from None
    return Checkpoint(path, "npz", entries, dropped=sorted(dropped))


def _npy_member(path: pathlib.Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> _NpyMember:
    """One member's npy header, checked against the member's size before any data is read."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CheckpointError(path, f"member {brief(info.filename)} is compressed with method {info.compress_type} "
                                    "(numpy writes stored or deflated members only)")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 1024:
        raise CheckpointError(path, f"member {brief(info.filename)} claims {info.file_size} bytes from "
                                    f"{info.compress_size} compressed (a zip bomb?)")
    with archive.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        if dtype.hasobject:
            raise CheckpointError(path, f"refusing .npz array {brief(info.filename)}: object arrays need unpickling")
        if not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(path, f"array {brief(info.filename)} has a malformed shape")
        offset = fh.tell()
        member = _NpyMember(info.filename, tuple(shape), dtype, bool(fortran), offset)
        if member.nbytes != info.file_size - offset:
            raise CheckpointError(path, f"array {brief(info.filename)} of shape {brief(member.shape)} needs "
                                        f"{member.nbytes} bytes, the member holds {info.file_size - offset}")
        if info.compress_type != zipfile.ZIP_STORED:
            while fh.read(READ_CHUNK):  # inflate once (CRC checked at the end), keeping nothing
                pass
    return member


def _torch_dtype(dtype: np.dtype) -> torch.dtype | None:
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype.newbyteorder("="))).dtype
    except (TypeError, ValueError):
        return None


def _npy_loader(path: pathlib.Path, member: _NpyMember) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        raw = torch.empty(member.nbytes, dtype=torch.uint8)
        try:
            with zipfile.ZipFile(path) as archive, archive.open(member.member) as fh:
                fh.read(member.data_offset)
                _read_exactly(path, fh, raw, f"array {brief(member.member)}")
        except CheckpointError:
            raise
        except Exception as exc:  # the file changed or is corrupt (a CRC error, ...)
            raise CheckpointError(path, f"array {brief(member.member)} cannot be read "
                                        f"({exc.__class__.__name__})") from None
        array = raw.numpy().view(member.dtype).reshape(member.shape, order="F" if member.fortran else "C")
        if not member.dtype.isnative:
            array = array.byteswap().view(member.dtype.newbyteorder("="))
        return torch.from_numpy(np.ascontiguousarray(array))
    return load


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


def _file_name(text: str) -> bool:
    """Whether ``text`` can name a file: no NUL, no lone surrogate (the system would refuse both)."""
    try:
        os.fsencode(text)
    except UnicodeError:
        return False
    return "\0" not in text


def _open_sharded(directory: pathlib.Path, index_path: pathlib.Path) -> Checkpoint:
    """Every shard is opened once, however the index spells its name (by device and inode)."""
    try:
        with open_regular(index_path) as fh:
            text = fh.read(MAX_HEADER_BYTES + 1)
        if len(text) > MAX_HEADER_BYTES:
            raise ValueError
        weight_map = json.loads(text.decode("utf-8"), object_pairs_hook=unique_keys)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, RecursionError, FormatError):
        raise CheckpointError(index_path, "not a valid shard index (expected a JSON object with a weight_map)") from None
    entries: list[TensorEntry] = []
    shards: dict[tuple[int, int], dict[str, TensorEntry]] = {}
    inside = directory.resolve()
    for name, shard in sorted(weight_map.items()):
        if not _file_name(shard):
            raise CheckpointError(index_path, f"shard {brief(shard)} of tensor {brief(name)} is not a file name")
        shard_path = directory / shard
        if shard_path.parent != directory or shard_path.resolve().parent != inside:
            raise CheckpointError(index_path, f"shard {brief(shard)} of tensor {brief(name)} is outside the directory")
        try:
            info = shard_path.stat()
        except OSError:
            raise CheckpointError(index_path, f"shard {brief(shard)} of tensor {brief(name)} does not exist") from None
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(index_path, f"shard {brief(shard)} of tensor {brief(name)} is not a regular file")
        key = (info.st_dev, info.st_ino)
        if key not in shards:
            shards[key] = {e.name: e for e in open_checkpoint(shard_path).entries}
        if name not in shards[key]:
            raise CheckpointError(shard_path, f"has no tensor {brief(name)} (the index says it does)")
        entries.append(shards[key][name])
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
    if entry.dtype not in MATRIX_DTYPE_NAMES:  # the source dtypes a compressed matrix may have
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
