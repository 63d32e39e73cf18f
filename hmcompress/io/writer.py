"""Writing files atomically: compressed checkpoints (docs/FORMAT.md), dense ones, the runtime shim.

Every file is written to a temporary file in the target directory, flushed to disk and renamed
over the target, so a reader never sees a partial file and a failure leaves nothing behind.
A temporary file is named ``.<target name>.<host>.<pid>.<random>.tmp``; one left behind by a
killed writer (same host, process gone) is removed by the next write of the same target.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import socket
import tempfile
from collections.abc import Callable, Iterable

import torch

from hmcompress import __version__
from hmcompress.errors import OutputExists, UserError
from hmcompress.runtime import FORMAT_NAME, FORMAT_VERSION, MATRIX_DTYPE_NAMES, SAFETENSORS_CODE, HMatrix, dense_nbytes
from hmcompress.runtime.bundle import shim_source

SHIM_NAME = "hmruntime.py"


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: pathlib.Path) -> None:
    with contextlib.suppress(OSError):  # not every platform / filesystem allows it
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_prefix(target: pathlib.Path) -> str:
    """Start of every temporary name of ``target`` written by this process."""
    return f".{target.name}.{_host()}.{os.getpid()}."


def _host() -> str:
    """This machine's name with nothing but letters, digits and '-' (the name's field separator is '.')."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _dead_writer_temporary(name: str, head: str) -> bool:
    """True if ``name`` is a temporary file named ``head + PID.RANDOM.tmp`` (``head``: the target's
    name and this host) of a process that no longer runs (a concurrent writer's file, or another
    machine's, is never touched)."""
    if not (name.startswith(head) and name.endswith(".tmp")):
        return False
    parts = name[len(head):-len(".tmp")].split(".")
    if len(parts) != 2 or not parts[0].isdigit():
        return False
    pid = int(parts[0])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it runs, under another user
        return False
    return False


def remove_stale_temporaries(target: pathlib.Path) -> list[pathlib.Path]:
    """Delete the temporary files a killed writer of ``target`` left behind; return them.

    A reused pid makes a stale file look alive: it then stays until a later write.
    """
    head = f".{target.name}.{_host()}."
    removed = []
    with contextlib.suppress(OSError):
        for candidate in sorted(target.parent.iterdir()):
            if _dead_writer_temporary(candidate.name, head):
                with contextlib.suppress(FileNotFoundError):
                    candidate.unlink()
                    removed.append(candidate)
    return removed


def atomic_write(path: str | os.PathLike, produce: Callable[[pathlib.Path], None], *,
                 overwrite: bool = False) -> pathlib.Path:
    """Create ``path`` by ``produce(temporary_path)``, then fsync and rename it into place.

    The file gets mode ``0o666 & ~umask``. Without ``overwrite`` an existing target is refused
    (also if it appears while writing). On any failure the temporary file is removed.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; name the file to write")
    if path.exists() and not overwrite:
        raise OutputExists(path)
    directory = path.parent
    if not directory.is_dir():
        raise UserError(f"{directory}: output directory does not exist")
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(dir=directory, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    tmp = pathlib.Path(name)
    try:
        produce(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the target appeared meanwhile
            except FileExistsError:
                raise OutputExists(path) from None
            except OSError:  # filesystems without hard links
                if path.exists():
                    raise OutputExists(path) from None
                os.replace(tmp, path)
            else:
                tmp.unlink()
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)
    return path


@dataclasses.dataclass(frozen=True)
class StreamedTensor:
    """A tensor to write: its description, and how to get it when its turn comes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    owner: str = ""  # what it belongs to, for messages ("passthrough tensor 'x'", ...)

    @property
    def nbytes(self) -> int:
        return dense_nbytes(self.shape, self.dtype)

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor, owner: str = "") -> "StreamedTensor":
        """A tensor already in memory."""
        return cls(name, tensor.dtype, tuple(tensor.shape), lambda: tensor, owner or f"tensor {name!r}")


def write_streamed(path: str | os.PathLike, tensors: Iterable[StreamedTensor], metadata: dict[str, str] | None,
                   *, overwrite: bool = False) -> pathlib.Path:
    """Atomically write ``tensors`` as one safetensors file, loading one tensor at a time.

    Every size is known before any tensor is read, so the header is written first and the data
    streamed after it: memory holds one tensor, not the checkpoint. The layout is deterministic:
    tensors sorted by element size (largest first, so each starts at a multiple of its element
    size) then name, the header padded with spaces to a multiple of 8 bytes, as safetensors does.
    """
    return atomic_write(path, streamed_producer(path, tensors, metadata), overwrite=overwrite)


def streamed_producer(path: str | os.PathLike, tensors: Iterable[StreamedTensor],
                      metadata: dict[str, str] | None) -> Callable[[pathlib.Path], None]:
    """What `write_streamed` writes, as a function of the temporary file to write it to (the
    header checked now, the tensors loaded when it runs)."""
    items = sorted(tensors, key=lambda t: (-torch.empty((), dtype=t.dtype).element_size(), t.name))
    owners: dict[str, str] = {}
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in items:
        if t.name in owners or t.name == "__metadata__":
            raise UserError(f"{path}: tensor name {t.name!r} of {t.owner} collides with "
                            f"{owners.get(t.name, 'the metadata')}")
        owners[t.name] = t.owner
        if t.dtype not in SAFETENSORS_CODE:
            raise UserError(f"{path}: tensor {t.name!r} has dtype {t.dtype}, which safetensors cannot store")
        header[t.name] = {"dtype": SAFETENSORS_CODE[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)

    def produce(tmp: pathlib.Path) -> None:
        with open(tmp, "wb") as out:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            for t in items:
                out.write(_tensor_bytes(path, t))

    return produce


def _tensor_bytes(path: str | os.PathLike, item: StreamedTensor) -> memoryview:
    """The tensor's bytes in C order, checked against what the header promised."""
    tensor = item.load().detach().to("cpu")
    if tensor.dtype != item.dtype or tuple(tensor.shape) != item.shape:
        raise UserError(f"{path}: tensor {item.name!r} changed while writing "
                        f"({tensor.dtype} {tuple(tensor.shape)}, expected {item.dtype} {item.shape})")
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def packed_tensors(hm: HMatrix, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors that store one matrix in a file (docs/FORMAT.md), by tensor name."""
    tensors = {prefix + "blocks": hm.blocks, prefix + "segments": hm.segments}
    for codec, pool in sorted(hm.pools.items()):
        if codec in hm.coded:
            tensors[prefix + "coded." + codec] = hm.coded[codec]
        else:
            tensors[prefix + "pool." + codec] = pool
    for codec, scale in sorted(hm.scales.items()):
        tensors[prefix + "scale." + codec] = scale
    if hm.row_masks.numel():
        tensors[prefix + "rows"] = hm.row_masks
    return tensors


def matrix_entry(hm: HMatrix, info: dict, prefix: str) -> dict:
    """A compressed matrix's entry in the file's metadata table (docs/FORMAT.md)."""
    return {**info, "shape": list(hm.shape), "orig_shape": list(info["orig_shape"]),
            "dtype": MATRIX_DTYPE_NAMES[hm.dtype], "prefix": prefix}


def write_compressed(path: str | os.PathLike, matrices: dict[str, tuple[HMatrix, dict]],
                     passthrough: dict[str, tuple[torch.Tensor, str]], header: dict, *,
                     overwrite: bool = False) -> None:
    """Write a compressed checkpoint held in memory.

    ``matrices``: name -> (packed matrix, info with "orig_shape" and "stats"); ``passthrough``:
    name -> (tensor, reason); ``header``: "options", "source", "extra". The bytes depend only on
    the arguments.
    """
    tensors = [StreamedTensor.of(name, tensor, f"passthrough tensor {name!r}")
               for name, (tensor, _reason) in passthrough.items()]
    table = {}
    for name, (hm, info) in matrices.items():
        hm.validate(name)
        prefix = name + ".hm."
        tensors += [StreamedTensor.of(part, tensor, f"compressed matrix {name!r}")
                    for part, tensor in packed_tensors(hm, prefix).items()]
        table[name] = matrix_entry(hm, info, prefix)
    write_assembled(path, table, {name: reason for name, (_t, reason) in passthrough.items()}, tensors,
                    header, overwrite=overwrite)


def write_assembled(path: str | os.PathLike, table: dict[str, dict], reasons: dict[str, str],
                    tensors: list[StreamedTensor], header: dict, *, overwrite: bool = False,
                    max_shard_bytes: int | None = None) -> pathlib.Path:
    """Write a compressed checkpoint from its metadata table and its tensors, streamed.

    With ``max_shard_bytes``, a checkpoint whose tensors hold more is written as shards and an
    index (`write_sharded`), and the index's path is returned; otherwise ``path``.
    """
    for name in table:
        if name in reasons:
            raise UserError(f"{path}: {name!r} is both compressed and passed through")
    if max_shard_bytes is not None and sum(t.nbytes for t in tensors) > max_shard_bytes:
        return write_sharded(path, table, reasons, tensors, header, max_shard_bytes, overwrite=overwrite)
    write_streamed(path, tensors, _metadata(path, table, reasons, header), overwrite=overwrite)
    return pathlib.Path(path)


def _metadata(path: str | os.PathLike, table: dict[str, dict], reasons: dict[str, str], header: dict) -> dict[str, str]:
    """The safetensors metadata of a compressed file: one key of sorted JSON (docs/FORMAT.md)."""
    meta = {**header, "format": FORMAT_NAME, "version": FORMAT_VERSION, "matrices": table,
            "passthrough": reasons}
    try:
        return {"hmcompress": json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)}
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: metadata is not JSON-serialisable: {err}") from err


INDEX_SUFFIX = ".index.json"
SHARD_SUFFIX = ".hm.safetensors"


def shard_paths(path: str | os.PathLike, count: int) -> tuple[list[pathlib.Path], pathlib.Path]:
    """The shards and index of output ``path`` (``model.hm.safetensors``): ``model-00001-of-0000N
    .hm.safetensors`` ... beside it and ``model.hm.safetensors.index.json``, Hugging Face's layout."""
    path = pathlib.Path(path)
    stem = path.name[:-len(SHARD_SUFFIX)] if path.name.endswith(SHARD_SUFFIX) else path.stem
    shards = [path.parent / f"{stem}-{i:05d}-of-{count:05d}{SHARD_SUFFIX}" for i in range(1, count + 1)]
    return shards, path.parent / (path.name + INDEX_SUFFIX)


def plan_shards(tensors: list[StreamedTensor], max_bytes: int) -> list[list[StreamedTensor]]:
    """Tensors in shards of at most ``max_bytes`` each, a compressed matrix's tensors never apart
    (a matrix or tensor larger than that has a shard of its own); owners in name order, each
    shard filled before the next is started, so the split depends on the tensors alone."""
    groups: dict[str, list[StreamedTensor]] = {}
    for t in tensors:
        groups.setdefault(t.owner or t.name, []).append(t)
    shards: list[list[StreamedTensor]] = [[]]
    size = 0
    for _owner, group in sorted(groups.items(), key=lambda item: min(t.name for t in item[1])):
        nbytes = sum(t.nbytes for t in group)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += nbytes
    return shards


def write_sharded(path: str | os.PathLike, table: dict[str, dict], reasons: dict[str, str],
                  tensors: list[StreamedTensor], header: dict, max_bytes: int, *, overwrite: bool = False) -> pathlib.Path:
    """Write shards of at most ``max_bytes`` of tensors and their index (`shard_paths`).

    Each shard is a complete compressed file for the matrices and tensors it holds (the same
    header); the index maps every tensor name to its shard (``weight_map``) and holds the
    ``total_size`` of the tensors. Every shard is written to a temporary file first; only when
    all are complete are they renamed into place, then the index, written last. On failure no
    temporary file is left.
    """
    shards = plan_shards(tensors, max_bytes)
    paths, index = shard_paths(path, len(shards))
    if not overwrite:
        for target in [*paths, index]:
            if target.exists():
                raise OutputExists(target)
    owners = {t.name: t.owner for t in tensors}
    temporaries: list[tuple[pathlib.Path, pathlib.Path]] = []
    try:
        for target, shard in zip(paths, shards):
            names = {t.name for t in shard}
            mine = {name: entry for name, entry in table.items()
                    if owners.get(entry["prefix"] + "blocks") in {owners[n] for n in names}}
            kept = {name: reason for name, reason in reasons.items() if name in names}
            produce = streamed_producer(target, shard, _metadata(target, mine, kept, header))
            temporaries.append((_written_temporary(target, produce), target))
        for tmp, target in temporaries:
            if target.exists() and not overwrite:
                raise OutputExists(target)
            os.replace(tmp, target)
        temporaries = []
        weight_map = {t.name: paths[i].name for i, shard in enumerate(shards) for t in shard}
        text = json.dumps({"metadata": {"total_size": sum(t.nbytes for t in tensors), "format": FORMAT_NAME},
                           "weight_map": dict(sorted(weight_map.items()))}, indent=2, sort_keys=True) + "\n"
        atomic_write(index, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)
    finally:
        for tmp, _target in temporaries:
            with contextlib.suppress(OSError):
                tmp.unlink()
    _fsync_dir(pathlib.Path(path).parent)
    return index


def _written_temporary(target: pathlib.Path, produce: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """A complete, fsynced temporary file for ``target`` (named as `atomic_write` names them)."""
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: output directory does not exist")
    remove_stale_temporaries(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=_temp_prefix(target), suffix=".tmp")
    os.close(fd)
    tmp = pathlib.Path(name)
    try:
        produce(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def parse_size(text: str) -> int:
    """Bytes from ``5GB``, ``500MB``, ``1.5GiB`` or ``1000000`` (decimal units as Hugging Face reads
    them, binary ones with an i); a `UserError` otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b|b)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise UserError(f"--max-shard-size: {text!r} is not a size (e.g. 5GB, 500MB, 2GiB or a number of bytes)")
    unit = (match.group(2) or "b").lower()
    scale = 1 if unit == "b" else (1024 if "i" in unit else 1000) ** ("kmgt".index(unit[0]) + 1)
    size = int(float(match.group(1)) * scale)
    if size < 1:
        raise UserError(f"--max-shard-size: {text!r} must be at least one byte")
    return size


def write_dense(path: str | os.PathLike, state: dict[str, torch.Tensor], *, overwrite: bool = False) -> None:
    """Write a plain state dict as safetensors, atomically."""
    write_streamed(path, [StreamedTensor.of(name, tensor) for name, tensor in state.items()], None,
                   overwrite=overwrite)


def write_runtime_shim(directory: str | os.PathLike) -> pathlib.Path:
    """Write the standalone runtime beside a compressed file as ``hmruntime.py`` (`runtime.bundle`)."""
    source = shim_source(__version__).encode("utf-8")
    target = pathlib.Path(directory) / SHIM_NAME
    with contextlib.suppress(OSError):
        if target.read_bytes() == source:
            return target

    def produce(tmp: pathlib.Path) -> None:
        tmp.write_bytes(source)

    return atomic_write(target, produce, overwrite=True)
