"""An independent decoder of hmcompress files, written from docs/FORMAT.md alone.

NumPy and the standard library only: no hmcompress, no torch, no safetensors. It reads the
container itself, decodes every matrix into H64 (float64, in the order FORMAT.md prescribes) and
rounds it once to the source dtype with its own integer arithmetic on the float64 bit patterns,
so that the tests can hold the tool's reconstructions (`HMatrix.to_dense`, ``decompress``,
``hmruntime``) to it bit for bit, and measure every recorded figure against what it returns.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import struct

import numpy as np

# safetensors dtype string -> (NumPy dtype of its bytes, element size). BF16 is read as its bits.
CONTAINER_DTYPES = {
    "F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "I64": ("<i8", 8),
    "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1), "U8": ("u1", 1), "U16": ("<u2", 2),
    "U32": ("<u4", 4), "U64": ("<u8", 8), "BOOL": ("?", 1), "F8_E4M3": ("u1", 1), "F8_E5M2": ("u1", 1),
    "C64": ("<c8", 8),
}
# FORMAT.md "Codecs": id -> (name, pool dtype string, bits of a packed code or None, integer?)
CODECS = {0: ("f64", "F64", None, False), 1: ("f32", "F32", None, False), 2: ("f16", "F16", None, False),
          3: ("bf16", "BF16", None, False), 4: ("i8", "I8", None, True), 5: ("i4", "U8", 4, True),
          6: ("i7", "U8", 7, True), 7: ("i6", "U8", 6, True), 8: ("i5", "U8", 5, True),
          9: ("u8", "I8", None, True), 10: ("u8lo", "I8", None, True)}
SEGMENT_SCALE = {"u8", "u8lo"}  # integer codecs with one scale per segment (version 3)
# Source dtypes: (exponent bits, fraction bits) of the IEEE-style format H is rounded to.
FORMATS = {"float64": (11, 52), "float32": (8, 23), "float16": (5, 10), "bfloat16": (8, 7)}
DENSE, LOWRANK, ROWS = 0, 1, 2


class Invalid(ValueError):
    """The file breaks FORMAT.md."""


@dataclasses.dataclass
class Matrix:
    """One decoded matrix."""

    name: str
    dtype: str  # the source dtype
    shape: tuple[int, int]
    orig_shape: tuple[int, ...]
    h64: np.ndarray  # H64, float64, (m, n)
    bits: np.ndarray  # H: its bit patterns in the source dtype (uint16/32/64), orig_shape

    @property
    def loaded(self) -> np.ndarray:
        """H as float64 values (exact), in orig_shape."""
        return bits_to_float64(self.bits, self.dtype)

    @property
    def loaded_matrix(self) -> np.ndarray:
        return self.loaded.reshape(self.shape)


@dataclasses.dataclass
class File:
    metadata: dict
    matrices: dict[str, Matrix]
    passthrough: dict[str, tuple[str, np.ndarray]]  # name -> (safetensors dtype, raw array)


# ------------------------------------------------------------------------------------ container

def read_container(path: str | pathlib.Path) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, str]]:
    """Every tensor of a safetensors file as (dtype string, array of its bytes' values), and the
    string metadata."""
    raw = pathlib.Path(path).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length].decode("utf-8"))
    data = raw[8 + length:]
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        numpy_dtype, size = CONTAINER_DTYPES[code]
        if end - begin != math.prod(shape) * size or not 0 <= begin <= end <= len(data):
            raise Invalid(f"tensor {name!r}: bad data offsets")
        tensors[name] = (code, np.frombuffer(data[begin:end], dtype=numpy_dtype).reshape(shape))
    return tensors, metadata


# ------------------------------------------------------------------------------------ decoding

def decode_file(path: str | pathlib.Path) -> File:
    tensors, strings = read_container(path)
    meta = json.loads(strings["hmcompress"])
    if meta.get("format") != "hmcompress" or meta.get("version") not in (1, 2, 3, 4):
        raise Invalid("not an hmcompress version 1, 2, 3 or 4 file")
    matrices = {}
    claimed = set()
    for name, entry in meta["matrices"].items():
        prefix = entry["prefix"]
        parts = {t[len(prefix):]: tensors[t] for t in tensors if t.startswith(prefix)}
        claimed.update(prefix + part for part in parts)
        if meta["version"] == 1 and any(part.startswith("coded.") for part in parts):
            raise Invalid(f"{name}: a version 1 file has no coded pools")
        if meta["version"] < 3 and any(part.split(".", 1)[-1] in SEGMENT_SCALE for part in parts):
            raise Invalid(f"{name}: codecs {sorted(SEGMENT_SCALE)} are new in version 3")
        matrices[name] = decode_matrix(name, entry, parts, meta["version"])
    passthrough = {name: tensors[name] for name in meta["passthrough"]}
    unexplained = set(tensors) - claimed - set(passthrough)
    if unexplained:
        raise Invalid(f"tensors {sorted(unexplained)} are not explained by the metadata")
    return File(meta, matrices, passthrough)


def decode_matrix(name: str, entry: dict, parts: dict[str, tuple[str, np.ndarray]], version: int = 4) -> Matrix:
    m, n = entry["shape"]
    orig_shape = tuple(entry["orig_shape"])
    dtype = entry["dtype"]
    if math.prod(orig_shape) != m * n or dtype not in FORMATS:
        raise Invalid(f"{name}: shape, orig_shape or dtype")
    blocks = _table(parts, "blocks", 5)
    segments = _table(parts, "segments", 6)
    _check_tiling(name, blocks, m, n)
    pools = {p[len("pool."):]: array for p, (_code, array) in parts.items() if p.startswith("pool.")}
    for part, (code, array) in parts.items():
        if part.startswith("coded."):
            codec = part[len("coded."):]
            if code != "U8" or codec in pools:
                raise Invalid(f"{name}: {part} is {code}, or its codec also has a pool")
            pools[codec] = decode_coded_pool(codec, array, version)
    for codec, (code, _array) in ((p[len("pool."):], v) for p, v in parts.items() if p.startswith("pool.")):
        expected = next(c[1] for c in CODECS.values() if c[0] == codec)
        if code != expected:
            raise Invalid(f"{name}: pool.{codec} is {code}, not {expected}")
    scales = {p[len("scale."):]: array.astype(np.float64) for p, (code, array) in parts.items()
              if p.startswith("scale.") and code == "F32"}
    bitmaps = parts["rows"][1] if "rows" in parts else np.zeros(0, dtype=np.uint8)

    h64 = np.zeros((m, n), dtype=np.float64)  # every entry starts at +0
    bitmap_cursor = 0
    for block, kind, codec_id, rank, offset, scale_offset in segments.tolist():
        row0, col0, rows, cols, _level = blocks[block].tolist()
        codec, _pool_code, bits, integer = CODECS[codec_id]
        reader = _Rows(pools[codec], scales.get(codec), bits, integer, offset, scale_offset, codec in SEGMENT_SCALE)
        view = h64[row0:row0 + rows, col0:col0 + cols]
        if kind == DENSE:
            view += reader.take(rows, cols)
        elif kind == ROWS:
            size = (rows + 7) // 8
            mask = np.unpackbits(bitmaps[bitmap_cursor:bitmap_cursor + size], bitorder="little")
            bitmap_cursor += size
            index = np.flatnonzero(mask)
            if len(index) != rank or (len(index) and index[-1] >= rows):
                raise Invalid(f"{name}: rows bitmap of segment does not name {rank} rows of {rows}")
            view[index] += reader.take(rank, cols)
        elif kind == LOWRANK:
            a = reader.take(rank, rows)
            b = reader.take(rank, cols)
            for j in range(rank):  # term by term, each product rounded, then added
                view += np.multiply(a[j][:, None], b[j][None, :])
        else:
            raise Invalid(f"{name}: segment kind {kind}")
    if bitmap_cursor != len(bitmaps):
        raise Invalid(f"{name}: row bitmaps hold {len(bitmaps)} bytes, segments use {bitmap_cursor}")
    bits = round_to_bits(h64, dtype).reshape(orig_shape)
    return Matrix(name, dtype, (m, n), orig_shape, h64, bits)


# ------------------------------------------------------------------------------------ coded pools

def decode_coded_pool(codec: str, blob: np.ndarray, version: int = 4) -> np.ndarray:
    """FORMAT.md "Entropy-coded pools": the fixed-width pool a coded pool stands for."""
    bits = next(b or 8 for name, _code, b, integer in CODECS.values() if name == codec and integer)
    runs, symbols = coded_symbols(blob.tobytes(), bits, version >= 4)
    if bits == 8:
        return (symbols - 128).astype(np.int8)
    rows = []
    for count, length in runs.tolist():
        for _ in range(count):
            row, symbols = symbols[:length], symbols[length:]
            stream_bits = ((row[:, None] >> np.arange(bits)) & 1).reshape(-1).astype(np.uint8)
            rows.append(np.packbits(stream_bits, bitorder="little"))
    return np.concatenate(rows) if rows else np.zeros(0, dtype=np.uint8)


def coded_symbols(data: bytes, bits: int, sections: bool) -> tuple[np.ndarray, np.ndarray]:
    """The runs and the symbols of a coded pool's bytes (layout 2 where ``sections``: a version-4
    file's pool, not a section of one)."""
    lanes, precision, first, size, nruns = struct.unpack_from("<5I", data, 0)
    layout, precision = divmod(precision, 256)
    at = 20
    if layout == 2 and precision == 0 and sections:  # rows in classes, a layout-1 section a class
        count, length, rows = lanes, first, size
        runs = np.frombuffer(data, "<u4", 2 * nruns, at).astype(np.int64).reshape(-1, 2)
        at += 8 * nruns
        classes = np.frombuffer(data, np.uint8, rows, at).astype(np.int64)
        sizes = np.frombuffer(data, "<u4", count, at + rows).astype(np.int64)
        at += rows + 4 * count
        if (not 2 <= count <= 64 or (runs < 1).any() or int((runs[:, 0] * runs[:, 1]).sum()) != rows * length
                or (classes >= count).any() or at + int(sizes.sum()) != len(data)):
            raise Invalid("coded pool: sections")
        out = np.zeros((rows, length), dtype=np.int64)
        for c, section_size in enumerate(sizes.tolist()):
            _runs, symbols = coded_symbols(data[at:at + section_size], bits, False)
            at += section_size
            if len(symbols) != int((classes == c).sum()) * length:
                raise Invalid(f"coded pool: section {c} holds {len(symbols)} codes")
            out[classes == c] = symbols.reshape(-1, length)
        return runs, out.reshape(-1)
    runs = np.frombuffer(data, "<u4", 2 * nruns, at).astype(np.int64).reshape(-1, 2)
    at += 8 * nruns
    freq = np.zeros(1 << bits, dtype=np.int64)
    if first + size > 1 << bits or not 12 <= precision <= 15 or layout not in (0, 1) or (runs < 1).any():
        raise Invalid("coded pool: table or runs")
    for symbol in range(first, first + size):  # varints: 7 bits a byte, low first, high bit = more
        shift = 0
        while True:
            byte = data[at]
            at += 1
            freq[symbol] |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
    state = np.frombuffer(data, "<u4", lanes, at).astype(np.int64)
    at += 4 * lanes
    if layout == 0:
        counts = np.frombuffer(data, "<u2", lanes, at).astype(np.int64)
        at += 2 * lanes
        stream = np.frombuffer(data, "<u2", int(counts.sum()), at).astype(np.int64)
    else:  # one stream, read from its last word back to its first
        stream = np.frombuffer(data, "<u2", (len(data) - at) // 2, at).astype(np.int64)[::-1]
    if at + 2 * len(stream) != len(data):
        raise Invalid("coded pool: size")
    n = int((runs[:, 0] * runs[:, 1]).sum())
    if n > 1024 * len(data):
        raise Invalid("coded pool: more codes than 1024 a byte")
    symbols = np.zeros(n, dtype=np.int64)
    if n:
        if freq.sum() != 1 << precision or not 1 <= lanes <= n or -(-n // lanes) > 65535:
            raise Invalid("coded pool: frequencies or lanes")
        if ((state < 1 << 15) | (state >= 1 << 31)).any():
            raise Invalid("coded pool: state")
        cum = np.cumsum(freq) - freq
        symbol_of_slot = np.repeat(np.arange(1 << bits), freq)
        if layout == 0:
            pointer = np.cumsum(counts) - counts
            end = pointer + counts
        stream = np.concatenate([stream, np.zeros(n + 1, dtype=np.int64)])  # overruns read zeros
        read = 0
        for step in range(-(-n // lanes)):  # every lane's step-th symbol (symbol step*K + lane)
            active = min(lanes, n - step * lanes)
            x = state[:active]
            slot = x % (1 << precision)
            s = symbol_of_slot[slot]
            symbols[step * lanes:step * lanes + active] = s
            x = freq[s] * (x >> precision) + slot - cum[s]
            need = x < 1 << 15
            if layout == 0:
                word = stream[pointer[:active]]
                pointer[:active] += need
            else:  # the lanes that read take the stream's next words, in lane order
                word = stream[read + np.cumsum(need) - 1]
                read += int(need.sum())
            x = np.where(need, (x << 16) + word, x)
            state[:active] = x
        all_read = (pointer == end).all() if layout == 0 else read == len(stream) - n - 1
        if (state != 1 << 15).any() or not all_read:
            raise Invalid("coded pool: a lane does not end in state 2**15 with its words read")
    return runs, symbols


def _table(parts: dict, part: str, columns: int) -> np.ndarray:
    code, array = parts[part]
    if code != "I32" or array.ndim != 2 or array.shape[1] != columns:
        raise Invalid(f"{part}: {code} {array.shape}")
    return array.astype(np.int64)


def _check_tiling(name: str, blocks: np.ndarray, m: int, n: int) -> None:
    cover = np.zeros((m, n), dtype=np.int64)
    for row0, col0, rows, cols, level in blocks.tolist():
        if row0 < 0 or col0 < 0 or rows < 1 or cols < 1 or row0 + rows > m or col0 + cols > n or level < 0:
            raise Invalid(f"{name}: block {(row0, col0, rows, cols, level)}")
        cover[row0:row0 + rows, col0:col0 + cols] += 1
    if not np.all(cover == 1):
        raise Invalid(f"{name}: blocks do not tile the matrix")


class _Rows:
    """Consecutive stored rows of a segment from its pool (and scales), decoded to float64."""

    def __init__(self, pool: np.ndarray, scales: np.ndarray | None, bits: int | None, integer: bool,
                 offset: int, scale_offset: int, one_scale: bool = False) -> None:
        self.pool, self.scales, self.bits, self.integer = pool, scales, bits, integer
        self.offset, self.scale_offset, self.one_scale = offset, scale_offset, one_scale

    def take(self, count: int, length: int) -> np.ndarray:
        row = (length * self.bits + 7) // 8 if self.bits else length
        end = self.offset + count * row
        if self.offset < 0 or end > len(self.pool):
            raise Invalid("segment outside its pool")
        data = self.pool[self.offset:end].reshape(count, row)
        self.offset = end
        if self.bits:
            stream = np.unpackbits(data.astype(np.uint8), axis=1, bitorder="little")[:, :length * self.bits]
            weights = 1 << np.arange(self.bits, dtype=np.int64)
            codes = (stream.reshape(count, length, self.bits).astype(np.int64) * weights).sum(-1)
            values = (codes - (1 << (self.bits - 1))).astype(np.float64)
        elif self.pool.dtype == np.uint16:  # bfloat16: the upper half of a float32
            values = (data.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        else:
            values = data.astype(np.float64)
        if self.integer and self.one_scale:  # every stored row of the segment: its one scale
            if self.scale_offset < 0 or self.scale_offset >= len(self.scales):
                raise Invalid("segment outside its scales")
            values = values * self.scales[self.scale_offset]
        elif self.integer:
            if self.scale_offset < 0 or self.scale_offset + count > len(self.scales):
                raise Invalid("segment outside its scales")
            values = values * self.scales[self.scale_offset:self.scale_offset + count, None]
            self.scale_offset += count
        return values


# ------------------------------------------------------------------------------------ rounding

def round_to_bits(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 ``values`` rounded once to ``dtype`` (to nearest, ties to even, subnormals, ±inf on
    overflow, sign kept): the bit patterns, as unsigned integers of the dtype's width.

    Integer arithmetic on the float64 bit patterns: value = sig * 2**unit exactly; the target's
    last place is 2**q with q = max(leading exponent - fraction bits, least normal exponent -
    fraction bits); sig is shifted right by q - unit and rounded on the bits shifted out.
    """
    exponent_bits, fraction_bits = FORMATS[dtype]
    width = {"float64": np.uint64, "float32": np.uint32, "float16": np.uint16, "bfloat16": np.uint16}[dtype]
    values = np.ascontiguousarray(values, dtype=np.float64)
    raw = values.view(np.uint64)
    if dtype == "float64":
        return raw.copy()
    one = np.uint64(1)
    sign = raw >> np.uint64(63)
    biased = ((raw >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64)
    fraction = raw & np.uint64((1 << 52) - 1)
    sig = np.where(biased > 0, fraction | np.uint64(1 << 52), fraction)
    unit = np.where(biased > 0, biased - 1075, -1074)
    bias = (1 << (exponent_bits - 1)) - 1
    least_normal = 1 - bias
    length = np.frexp(sig.astype(np.float64))[1].astype(np.int64)  # bit length of sig (exact: < 2**53)
    q = np.maximum(unit + length - 1 - fraction_bits, least_normal - fraction_bits)
    shift = np.minimum(q - unit, 63).astype(np.uint64)  # >= 1 for every narrower format
    kept = sig >> shift
    rest = sig & ((one << shift) - one)
    half = one << (shift - one)
    kept = kept + ((rest > half) | ((rest == half) & ((kept & one) == one))).astype(np.uint64)
    # kept * 2**q is the rounded magnitude; a carry to 2**(fraction_bits + 1) moves up one binade
    carry = kept >> np.uint64(fraction_bits + 1)
    kept = kept >> carry
    q = q + carry.astype(np.int64)
    normal = kept >= np.uint64(1 << fraction_bits)
    field = np.where(normal, q + fraction_bits + bias, 0)
    top = (1 << exponent_bits) - 1
    overflow = normal & (field >= top)
    magnitude = np.where(normal, (field.astype(np.uint64) << np.uint64(fraction_bits))
                         | (kept - np.uint64(1 << fraction_bits)), kept)
    magnitude = np.where(overflow, np.uint64(top << fraction_bits), magnitude)
    special = biased == 0x7FF  # inf stays inf; NaN becomes a quiet NaN
    nan_bits = np.uint64((top << fraction_bits) | (1 << (fraction_bits - 1)))
    magnitude = np.where(special, np.where(fraction == 0, np.uint64(top << fraction_bits), nan_bits), magnitude)
    total = 1 + exponent_bits + fraction_bits
    return ((sign << np.uint64(total - 1)) | magnitude).astype(width)


def bits_to_float64(bits: np.ndarray, dtype: str) -> np.ndarray:
    """The values of ``dtype`` bit patterns, as float64 (exact)."""
    if dtype == "float64":
        return bits.astype(np.uint64).view(np.float64)
    if dtype == "float32":
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    if dtype == "float16":
        return bits.astype(np.uint16).view(np.float16).astype(np.float64)
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
