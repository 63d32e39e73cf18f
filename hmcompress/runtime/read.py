"""Reading files: the safetensors header (one parser for checkpoints and compressed files), the
`hmcompress` metadata, and the packed matrices, every size checked before anything is allocated.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import stat
import struct

import torch

from hmcompress.runtime.entropy import decode_coded
from hmcompress.runtime.errors import FormatError
from hmcompress.runtime.format import (
    BLOCK_COLUMNS,
    CODEC,
    CODECS,
    FORMAT_NAME,
    INTEGER_CODECS,
    MATRIX_DTYPES,
    READABLE_VERSIONS,
    SAFETENSORS_CODE,
    SAFETENSORS_DTYPES,
    SCALE_DTYPE,
    SEGMENT_COLUMNS,
    DType,
    codecs_of_version,
)
from hmcompress.runtime.matrix import HMatrix

MAX_HEADER_BYTES = 100 * 1024 * 1024  # as safetensors itself
MAX_METADATA_DEPTH = 64  # JSON containers inside containers in the hmcompress metadata
# A matrix is expanded to dense form only up to the larger of these (its stored bytes times
# MAX_EXPANSION, or MIN_DENSE_LIMIT): a tiny file cannot ask for gigabytes of zeros.
MAX_EXPANSION = 4096
MIN_DENSE_LIMIT = 256 << 20
# Expanding a low-rank segment of rank k on an r x c block adds k terms of r·c products (the order
# FORMAT.md prescribes); a file may ask for at most the larger of these many such products: a coded
# pool of one symbol costs no stream bytes, so without it 2 KiB could ask for a full-rank 5792²
# block (1.9e11 products: about 2 minutes at the 1.5e9 a second one thread did, 2026-12-03). The
# writer's factors take far more than a byte per 2¹⁶ products (a 4096 x 4096 block of rank k:
# k·8192 codes for k·2²⁴ products, 2048 a code).
MIN_TERM_WORK = 1 << 32
TERM_WORK_PER_BYTE = 1 << 16


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header: dtype, shape and its byte range in the data section."""

    dtype: DType
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    """A checked safetensors header: its tensors in file order and its string metadata."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_size: int
    data_start: int = 0  # where the data section starts in the file (8 + the header's length)


def brief(value: object, limit: int = 80) -> str:
    """``repr(value)`` for a message, at most about ``limit`` characters, whatever the value
    (a deeply nested list, an integer of thousands of digits, a name of megabytes)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError, MemoryError):  # ValueError: int too long to convert
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def open_regular(path: str | os.PathLike):
    """``open(path, "rb")``, refusing anything but a regular file (a FIFO, a device, a socket)
    without blocking on it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise FormatError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(f"{path}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """The header of a safetensors file, checked: a `FormatError` naming the file otherwise.

    Checked: the length field against the file, UTF-8 JSON (no key twice, no lone surrogates, no
    absurd nesting or numbers), string metadata, known dtypes, shapes and offsets that are
    integers, ranges inside the data section that match their shape and do not overlap.
    """
    path = pathlib.Path(path)

    def fail(problem: str):
        raise FormatError(f"{path}: {problem}")

    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                fail("truncated safetensors file (no header length)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise NotSafetensors(f"{path}: safetensors header claims {length} bytes, file has {size - 8}")
            raw = f.read(length)
    except OSError as err:
        raise FormatError(f"{path}: cannot read: {err.strerror or err}") from None
    header = strict_json(raw, "safetensors header", fail)
    if not isinstance(header, dict):
        fail("safetensors header is not a JSON object")
    data_size = size - 8 - length
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) and is_unicode(k + v)
                                                 for k, v in metadata.items()):
        fail("safetensors __metadata__ must map strings to strings")
    tensors = {}
    for name, info in header.items():
        if not is_unicode(name):
            fail(f"tensor name {brief(name)} is not valid UTF-8 (a lone surrogate)")
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) \
                or info["dtype"] not in SAFETENSORS_DTYPES:
            fail(f"tensor {brief(name)}: unknown or missing dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if (not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)):
            fail(f"tensor {brief(name)}: malformed shape or data_offsets")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = offsets
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * dtype.itemsize:
            fail(f"tensor {brief(name)}: data offsets out of range or inconsistent with its shape")
        tensors[name] = TensorInfo(dtype, tuple(shape), begin, end)
    spans = sorted((t.begin, t.end, name) for name, t in tensors.items())
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            fail(f"tensors {brief(first)} and {brief(second)} overlap")
    return SafetensorsHeader(tensors, metadata, data_size, 8 + length)


def read_tensor(f, header: SafetensorsHeader, name: str) -> torch.Tensor:
    """Tensor ``name`` of a checked header, read from the open file ``f`` into memory of exactly
    its size (not through safetensors, which would parse the header again)."""
    info = header.tensors[name]
    if info.dtype.torch_dtype is None:
        raise FormatError(f"{brief(name)}: dtype {info.dtype.code} is not supported by this torch")
    raw = torch.empty(info.end - info.begin, dtype=torch.uint8)
    f.seek(header.data_start + info.begin)
    if raw.numel() and f.readinto(memoryview(raw.numpy())) != raw.numel():
        raise FormatError(f"{brief(name)}: the file ends inside its data")
    return raw.view(info.dtype.torch_dtype).reshape(info.shape)


class NotSafetensors(FormatError):
    """The file's first 8 bytes cannot be a safetensors header length: some other kind of file."""


class _DuplicateKey(ValueError):
    pass


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object hook refusing a key given twice (json would silently keep the last)."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def strict_json(raw: bytes, what: str, fail) -> object:
    """``raw`` parsed as UTF-8 JSON whose objects name no key twice; else ``fail`` (which raises)
    with one line naming ``what``."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
    except _DuplicateKey as err:
        fail(f"{what} names {brief(err.args[0])} twice")
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: also huge integers
        fail(f"{what} is not valid UTF-8 JSON ({err.__class__.__name__})")


def is_unicode(text: str) -> bool:
    """False for strings JSON escapes can make but UTF-8 cannot hold (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclasses.dataclass
class CompressedFile:
    """A compressed checkpoint: its metadata, packed matrices and passthrough tensors."""

    path: pathlib.Path
    metadata: dict  # the parsed `hmcompress` metadata (docs/FORMAT.md)
    matrices: dict[str, HMatrix]
    passthrough: dict[str, torch.Tensor]

    def under(self, prefix: str) -> CompressedFile:
        """The tensors whose names start with ``prefix``, named without it (all of them for "")."""
        if not prefix:
            return self

        def strip(table: dict) -> dict:
            return {name[len(prefix):]: value for name, value in table.items() if name.startswith(prefix)}
        metadata = {**self.metadata, "matrices": strip(self.metadata["matrices"]),
                    "passthrough": strip(self.metadata["passthrough"])}
        return CompressedFile(self.path, metadata, strip(self.matrices), strip(self.passthrough))

    def dense(self, name: str, max_bytes: int | None = None) -> torch.Tensor:
        """Tensor ``name`` as the original checkpoint held it (a matrix expanded, in its shape).

        A matrix is expanded only if its float64 work array (8 bytes per entry) fits in
        ``max_bytes``, by default the larger of `MIN_DENSE_LIMIT` and `MAX_EXPANSION` times the
        bytes the file stores for it; otherwise `FormatError` (a few bytes of blocks cannot ask
        for gigabytes of zeros).
        """
        if name not in self.matrices:
            return self.passthrough[name]
        self.check_expansion(name, max_bytes)
        return self.matrices[name].to_dense().reshape(self.metadata["matrices"][name]["orig_shape"])

    def check_expansion(self, name: str, max_bytes: int | None = None) -> None:
        """`FormatError` unless matrix ``name`` may be expanded: its float64 work array within
        ``max_bytes`` (see `dense`) and its low-rank terms' products within `MIN_TERM_WORK` or
        `TERM_WORK_PER_BYTE` a byte stored."""
        hm = self.matrices[name]
        m, n = hm.shape
        limit = max(MIN_DENSE_LIMIT, MAX_EXPANSION * hm.nbytes) if max_bytes is None else max_bytes
        if 8 * m * n > limit:
            raise FormatError(f"{self.path}: {name}: expanding its {m}x{n} matrix, stored in {hm.nbytes} bytes, "
                              f"would take {8 * m * n} bytes, more than the {limit} allowed")
        work, allowed = hm.term_products, max(MIN_TERM_WORK, TERM_WORK_PER_BYTE * hm.nbytes)
        if work > allowed:
            raise FormatError(f"{self.path}: {name}: expanding its low-rank blocks would take {work:.3g} products "
                              f"from {hm.nbytes} bytes, more than the {allowed:.3g} allowed")



def parse_metadata(path: str | os.PathLike) -> tuple[dict, dict[str, TensorInfo]]:
    """The `hmcompress` metadata of a file and its tensors (dtype, shape), checked, from the
    header alone: nothing is allocated for the tensors."""
    meta, header = _checked_metadata(pathlib.Path(path))
    return meta, header.tensors


def _checked_metadata(path: pathlib.Path) -> tuple[dict, SafetensorsHeader]:

    def fail(problem: str):
        raise FormatError(f"{path}: {problem}")

    try:
        header = read_header(path)
    except NotSafetensors as err:
        raise FormatError(f"{err}: not an hmcompress file (those are safetensors files)") from None
    if "hmcompress" not in header.metadata:
        fail("no hmcompress metadata (not a file written by hmcompress?)")
    try:
        meta = json.loads(header.metadata["hmcompress"], object_pairs_hook=unique_keys)
    except _DuplicateKey as err:
        fail(f"hmcompress metadata names {brief(err.args[0])} twice in one object")
    except (ValueError, RecursionError) as err:  # ValueError: also integers of thousands of digits
        fail(f"hmcompress metadata is not valid JSON ({err.__class__.__name__})")
    if not isinstance(meta, dict):
        fail("hmcompress metadata is not a JSON object")
    problem = _plain_json_problem(meta, MAX_METADATA_DEPTH)
    if problem:
        fail(f"hmcompress metadata {problem}")
    if meta.get("format") != FORMAT_NAME:
        fail(f"metadata names format {brief(meta.get('format'))}, not {FORMAT_NAME!r}")
    version = meta.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        fail(f"format version {brief(version)} is not supported (this reader knows versions "
             f"{', '.join(map(str, READABLE_VERSIONS))})")
    entries = header.tensors
    matrices, passthrough = meta.get("matrices"), meta.get("passthrough")
    if not isinstance(matrices, dict) or not isinstance(passthrough, dict):
        fail("metadata lacks the 'matrices' and 'passthrough' tables")
    if not isinstance(meta.get("options", {}), dict):
        fail("metadata 'options' is not a JSON object")

    claimed: dict[str, tuple[str, str]] = {}  # packed tensor name -> (matrix, part)
    for name, info in matrices.items():
        where = f"matrix {brief(name)}"
        if not isinstance(info, dict):
            fail(f"{where}: entry is not an object")
        shape, orig, dtype, prefix = (info.get(k) for k in ("shape", "orig_shape", "dtype", "prefix"))
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d >= 0 for d in shape)):
            fail(f"{where}: shape must be two non-negative integers, got {brief(shape)}")
        if not (isinstance(orig, list) and all(type(d) is int and d >= 0 for d in orig)
                and math.prod(orig) == shape[0] * shape[1]):
            fail(f"{where}: orig_shape {brief(orig)} does not hold a {shape[0]}x{shape[1]} matrix")
        if not isinstance(dtype, str) or dtype not in MATRIX_DTYPES:
            fail(f"{where}: unsupported dtype {brief(dtype)}")
        if not isinstance(prefix, str) or not prefix:
            fail(f"{where}: prefix must be a non-empty string")
        codecs = codecs_of_version(version)
        integer = sorted(INTEGER_CODECS.intersection(codecs))
        parts = ["blocks", "segments", "rows", *(f"pool.{c}" for c in codecs), *(f"scale.{c}" for c in integer),
                 *(f"coded.{c}" for c in integer if version >= 2)]
        for part in parts:
            other = claimed.setdefault(prefix + part, (name, part))
            if other != (name, part):
                fail(f"tensor {brief(prefix + part)} is claimed by matrices {brief(other[0])} and {brief(name)}")
    for name, reason in passthrough.items():
        if not isinstance(reason, str):
            fail(f"passthrough {brief(name)}: reason must be a string")
        if name in claimed:
            fail(f"tensor {brief(name)} is both passthrough and part of matrix {brief(claimed[name][0])}")
        if name not in entries:
            fail(f"passthrough tensor {brief(name)} is missing")

    found: dict[str, dict[str, str]] = {name: {} for name in matrices}
    for tensor, info in entries.items():
        if tensor in passthrough:
            continue
        if tensor not in claimed:
            fail(f"tensor {brief(tensor)} is not explained by the metadata")
        matrix, part = claimed[tensor]
        found[matrix][part] = tensor
        shape = list(info.shape)
        if part in ("blocks", "segments"):
            columns = BLOCK_COLUMNS if part == "blocks" else SEGMENT_COLUMNS
            want, ok_shape = torch.int32, len(shape) == 2 and shape[1] == columns
        else:
            kind, _, codec = part.partition(".")
            want = {"rows": torch.uint8, "coded": torch.uint8, "scale": SCALE_DTYPE}.get(kind) or CODEC[codec].pool_dtype
            ok_shape = len(shape) == 1
        if info.dtype.torch_dtype != want or not ok_shape:
            fail(f"tensor {brief(tensor)}: {info.dtype.code} {brief(shape)} where {SAFETENSORS_CODE[want]} of "
                 f"{'shape (N, %d)' % columns if part in ('blocks', 'segments') else 'one dimension'} is expected")
    for name, parts in found.items():
        for part in ("blocks", "segments"):
            if part not in parts:
                fail(f"tensor {brief(matrices[name]['prefix'] + part)} of matrix {brief(name)} is missing")
        for codec in INTEGER_CODECS:
            if f"pool.{codec}" in parts and f"coded.{codec}" in parts:
                fail(f"matrix {brief(name)} stores pool {codec} both fixed-width and coded")
    return meta, header


def _plain_json_problem(value: object, max_depth: int) -> str | None:
    """What makes parsed JSON unfit for the readers (None if nothing): containers nested deeper
    than ``max_depth`` (code that recurses would fail on them), strings that are not Unicode
    (lone surrogates, which JSON escapes can make and no output can print). Numbers are left to
    their readers (`stats` are checked where they are used)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= max_depth:
                return f"nests containers deeper than {max_depth} levels"
            if isinstance(item, dict):
                for key in item:
                    if not is_unicode(key):
                        return f"holds a key that is not valid Unicode ({brief(key)})"
                children = item.values()
            else:
                children = item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, str):
            if not is_unicode(item):
                return f"holds a string that is not valid Unicode ({brief(item)})"
    return None


def hmatrix_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, shape: tuple[int, int],
                         dtype: torch.dtype, where: str = "") -> HMatrix:
    """The packed matrix whose tensors are named ``prefix + part`` (docs/FORMAT.md); not validated,
    but its coded pools checked and decoded (unless ``tensors`` already holds them decoded under
    their pool names, as `decode_coded` gives them)."""
    coded = {c: tensors[prefix + f"coded.{c}"] for c in CODECS if prefix + f"coded.{c}" in tensors}
    if any(prefix + f"pool.{c}" not in tensors for c in coded):
        tensors = {**tensors, **decode_coded(tensors, [prefix], where)}
    pools = {c: tensors[prefix + f"pool.{c}"] for c in CODECS if prefix + f"pool.{c}" in tensors}
    scales = {c: tensors[prefix + f"scale.{c}"] for c in CODECS if prefix + f"scale.{c}" in tensors}
    masks = tensors.get(prefix + "rows", torch.zeros(0, dtype=torch.uint8))
    return HMatrix(shape, dtype, tensors[prefix + "blocks"], tensors[prefix + "segments"], pools, scales, masks,
                   coded)


def read_file(path: str | os.PathLike) -> CompressedFile:
    """Read and validate a compressed file, or a sharded one (its directory or its index); every
    problem is a `FormatError` naming it (an `OSError` only if a file cannot be read at all once
    its header was)."""
    path = pathlib.Path(path)
    index = sharded_index(path)
    if index is not None:
        return _read_sharded(index)
    return _read_single(path)[0]


INDEX_SUFFIX = ".hm.safetensors.index.json"


def sharded_index(path: pathlib.Path) -> pathlib.Path | None:
    """The index of the sharded checkpoint ``path`` names (a directory holding one index, or an
    index), or None where ``path`` is something else (a single file)."""
    if path.is_dir():
        try:
            found = sorted(p for p in path.iterdir() if p.name.endswith(INDEX_SUFFIX))
        except OSError as err:
            raise FormatError(f"{path}: cannot list: {err.strerror or err}") from None
        if len(found) != 1:
            raise FormatError(f"{path}: a sharded compressed checkpoint's directory holds one *{INDEX_SUFFIX} "
                              f"file; this one holds {len(found)}")
        return found[0]
    return path if path.name.endswith(".index.json") else None


def _read_sharded(index: pathlib.Path) -> CompressedFile:
    """Every shard an index names, each read and validated as a compressed file of its own, merged:
    the shards must hold exactly the tensors the index gives them, no name twice, one header."""

    def fail(problem: str):
        raise FormatError(f"{index}: {problem}")

    try:
        with open_regular(index) as f:
            if os.fstat(f.fileno()).st_size > MAX_HEADER_BYTES:
                fail(f"index larger than {MAX_HEADER_BYTES} bytes")
            raw = f.read()
    except OSError as err:
        raise FormatError(f"{index}: cannot read: {err.strerror or err}") from None
    table = strict_json(raw, "index", fail)
    weight_map = table.get("weight_map") if isinstance(table, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        fail("index has no weight_map (an object from tensor names to shard files)")
    directory = index.parent.resolve()
    wanted: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        if not (isinstance(shard, str) and is_unicode(name) and is_unicode(shard) and shard not in ("", ".", "..")
                and "/" not in shard and os.sep not in shard and "\0" not in shard):
            fail(f"weight_map gives tensor {brief(name)} the shard {brief(shard)}, not a file name in its directory")
        wanted.setdefault(shard, set()).add(name)
    merged: CompressedFile | None = None
    for shard in sorted(wanted):
        path = index.parent / shard
        if path.resolve().parent != directory:
            fail(f"shard {brief(shard)} lies outside the index's directory")
        part, names = _read_single(path)
        if names != wanted[shard]:
            extra, missing = sorted(names - wanted[shard]), sorted(wanted[shard] - names)
            fail(f"shard {brief(shard)} holds {len(names)} tensors where the index gives it {len(wanted[shard])}"
                 f" ({'not indexed: ' + brief(extra[0]) if extra else 'missing: ' + brief(missing[0])})")
        merged = part if merged is None else _merged(index, merged, part)
    return dataclasses.replace(merged, path=index)


def _merged(index: pathlib.Path, first: CompressedFile, other: CompressedFile) -> CompressedFile:
    """Two shards as one file: their tables joined (no name in both), their headers equal."""
    def header(meta: dict) -> dict:
        return {key: value for key, value in meta.items() if key not in ("matrices", "passthrough")}
    if header(first.metadata) != header(other.metadata):
        raise FormatError(f"{index}: shards {first.path.name} and {other.path.name} have different headers")
    for table in ("matrices", "passthrough"):
        for name in other.metadata[table]:
            if name in first.metadata["matrices"] or name in first.metadata["passthrough"]:
                raise FormatError(f"{index}: tensor {brief(name)} is in shards {first.path.name} and {other.path.name}")
    metadata = {**first.metadata, **{table: {**first.metadata[table], **other.metadata[table]}
                                     for table in ("matrices", "passthrough")}}
    return CompressedFile(first.path, metadata, {**first.matrices, **other.matrices},
                          {**first.passthrough, **other.passthrough})


def _read_single(path: pathlib.Path) -> tuple[CompressedFile, set[str]]:
    """One compressed file, validated, and the names of the tensors it holds."""
    meta, header = _checked_metadata(path)
    try:
        with open_regular(path) as f:
            tensors = {name: read_tensor(f, header, name) for name in header.tensors}
    except FormatError as err:
        raise FormatError(f"{path}: cannot load tensors: {err}") from None
    # every coded pool of the file in one lockstep pass (many lanes: fast), added under its pool name
    tensors.update(decode_coded(tensors, [info["prefix"] for info in meta["matrices"].values()], str(path),
                                meta["version"]))
    matrices = {}
    for name, info in meta["matrices"].items():
        hm = hmatrix_from_tensors(tensors, info["prefix"], tuple(info["shape"]), MATRIX_DTYPES[info["dtype"]])
        hm.validate(f"{path}: {name}")
        matrices[name] = hm
    passthrough = {name: tensors[name] for name in meta["passthrough"]}
    return CompressedFile(path, meta, matrices, passthrough), set(header.tensors)


def load_state_dict(path: str | os.PathLike, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a compressed file (or sharded checkpoint: its directory or index), dense,
    under its original name, shape and dtype.

    A drop-in for ``model.load_state_dict(...)``. With ``prefix`` (e.g. ``"model."`` for a file made
    from a training checkpoint), only the tensors whose names start with it, without it.
    """
    compressed = read_file(path).under(prefix)
    return {name: compressed.dense(name) for name in sorted({*compressed.matrices, *compressed.passthrough})}


