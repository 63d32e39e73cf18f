"""Writing files atomically: compressed checkpoints (docs/FORMAT.md), dense ones, the runtime shim.

Every file is written to a temporary file in the target directory, flushed to disk and renamed
over the target, so a reader never sees a partial file and a failure leaves nothing behind.
A temporary file is named ``.<target name>.<host>.<pid>.<random>.tmp``; one left behind by a
killed writer (same host, process gone) is removed by the next write of the same target.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import socket
import tempfile
from collections.abc import Callable

import torch

from . import runtime
from .errors import UserError
from .runtime import FORMAT_NAME, FORMAT_VERSION, HMatrix

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


def _dead_writer_temporary(candidate: pathlib.Path, target: pathlib.Path) -> bool:
    """True if ``candidate`` is a temporary file of ``target`` written on this host by a process
    that no longer runs (a concurrent writer's file, or another machine's, is never touched)."""
    name = candidate.name
    head = f".{target.name}.{_host()}."
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
    removed = []
    with contextlib.suppress(OSError):
        for candidate in sorted(target.parent.iterdir()):
            if _dead_writer_temporary(candidate, target):
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
    if path.exists() and not overwrite:
        raise UserError(f"{path}: exists (use --force to overwrite)")
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
                raise UserError(f"{path}: exists (use --force to overwrite)") from None
            except OSError:  # filesystems without hard links
                if path.exists():
                    raise UserError(f"{path}: exists (use --force to overwrite)") from None
                os.replace(tmp, path)
            else:
                tmp.unlink()
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(directory)
    return path


def _save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None,
                  overwrite: bool) -> None:
    """Atomically write a safetensors file (contiguous CPU tensors, no shared storage)."""
    from safetensors.torch import save_file

    prepared, seen = {}, set()
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.device.type) if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        elif key is not None:
            seen.add(key)
        prepared[name] = t
    atomic_write(path, lambda tmp: save_file(prepared, str(tmp), metadata=metadata), overwrite=overwrite)


def packed_tensors(name: str, hm: HMatrix, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors that store one matrix in a file (docs/FORMAT.md), by tensor name."""
    tensors = {prefix + "blocks": hm.blocks, prefix + "segments": hm.segments}
    for codec, pool in sorted(hm.pools.items()):
        tensors[prefix + "pool." + codec] = pool
    for codec, scale in sorted(hm.scales.items()):
        tensors[prefix + "scale." + codec] = scale
    if hm.row_masks.numel():
        tensors[prefix + "rows"] = hm.row_masks
    return tensors


def write_compressed(path: str | os.PathLike, matrices: dict[str, tuple[HMatrix, dict]],
                     passthrough: dict[str, tuple[torch.Tensor, str]], header: dict, *,
                     overwrite: bool = False) -> None:
    """Write a compressed checkpoint.

    ``matrices``: name -> (packed matrix, info with "orig_shape" and "stats"); ``passthrough``:
    name -> (tensor, reason); ``header``: "options", "source", "extra". The bytes depend only on
    the arguments.
    """
    tensors: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}

    def add(tensor_name: str, tensor: torch.Tensor, what: str) -> None:
        if tensor_name in owner:
            raise UserError(f"{path}: tensor name {tensor_name!r} of {what} collides with {owner[tensor_name]}")
        owner[tensor_name] = what
        tensors[tensor_name] = tensor

    table = {}
    for name, (tensor, reason) in passthrough.items():
        add(name, tensor, f"passthrough tensor {name!r}")
    for name, (hm, info) in matrices.items():
        hm.validate(name)
        prefix = name + ".hm."
        for tensor_name, tensor in packed_tensors(name, hm, prefix).items():
            add(tensor_name, tensor, f"compressed matrix {name!r}")
        table[name] = {**info, "shape": list(hm.shape), "orig_shape": list(info["orig_shape"]),
                       "dtype": runtime.DTYPE_NAMES[hm.dtype], "prefix": prefix}
    for name in table:
        if name in passthrough:
            raise UserError(f"{path}: {name!r} is both compressed and passed through")
    meta = {**header, "format": FORMAT_NAME, "version": FORMAT_VERSION, "matrices": table,
            "passthrough": {name: reason for name, (_t, reason) in passthrough.items()}}
    try:
        text = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: metadata is not JSON-serialisable: {err}") from err
    _save_tensors(path, tensors, {"hmcompress": text}, overwrite)


def write_dense(path: str | os.PathLike, state: dict[str, torch.Tensor], *, overwrite: bool = False) -> None:
    """Write a plain state dict as safetensors, atomically."""
    _save_tensors(path, state, None, overwrite)


def write_runtime_shim(directory: str | os.PathLike) -> pathlib.Path:
    """Copy the standalone runtime beside a compressed file as ``hmruntime.py`` (byte-identical)."""
    source = pathlib.Path(runtime.__file__).read_bytes()
    target = pathlib.Path(directory) / SHIM_NAME
    with contextlib.suppress(OSError):
        if target.read_bytes() == source:
            return target

    def produce(tmp: pathlib.Path) -> None:
        tmp.write_bytes(source)

    return atomic_write(target, produce, overwrite=True)
