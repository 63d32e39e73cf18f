"""Entropy-coded integer pools (docs/FORMAT.md version 2): checked, then decoded on load.

A coded pool is interleaved rANS over the pool's codes: many independent lanes, each a 31-bit
state (held in an int32) renormalised by 16-bit words, one static frequency table per pool. The
decoder runs every lane of every pool handed to it in lockstep (one torch operation per step
acts on all lanes), so its speed comes from the number of lanes, not from Python. Decoding gives
exactly the fixed-width pool version 1 stores: everything downstream is unchanged. Every field
is checked, and every size bounded by the coded bytes, before anything large is allocated.
"""
from __future__ import annotations

import dataclasses

import torch

from hmcompress.runtime.errors import FormatError
from hmcompress.runtime.format import CODEC, INTEGER_CODECS

STATE_LOW = 1 << 15  # a lane's state lies in [STATE_LOW, 2**31) between symbols
WORD_BITS = 16
PRECISIONS = range(12, 16)  # frequency tables sum to 2**n for one of these n
MAX_LANE_SYMBOLS = (1 << 16) - 1  # symbols (hence words) of one lane: its word count fits a u16
HEADER_FIELDS = 5  # u32: lanes, precision, first symbol, table length, runs
HEADER_BYTES = 4 * HEADER_FIELDS
VARINT_BYTES = 3  # a frequency (at most 2**15) as a varint
# A pool decodes to at most this many codes per coded byte: a stream of a single symbol costs no
# bits, so without it a few kilobytes could ask for gigabytes (and a file's pools together stay
# within 1024 codes per byte of the file). hmcompress writes at most 2048 codes per 6-byte lane.
MAX_CODES_PER_BYTE = 1024
PACK_CODES = 1 << 18  # codes packed into (or unpacked from) bit streams at once


@dataclasses.dataclass(frozen=True)
class CodedPool:
    """One coded pool, parsed and checked: what `decode_pools` needs."""

    codec: str
    precision: int
    freqs: torch.Tensor  # int64 (2**bits,): the quantised frequency of every symbol
    runs: torch.Tensor  # int64 (R, 2): (rows, length) of the pool's stored rows, in order
    states: torch.Tensor  # int32 (K,): each lane's initial state
    counts: torch.Tensor  # int64 (K,): words of each lane
    words: torch.Tensor  # int32 (W,): every lane's words, lane 0's first, 0 .. 65535
    symbols: int  # N: codes in the pool

    @property
    def lanes(self) -> int:
        return self.states.numel()


def symbol_bits(codec: str) -> int:
    """Bits of one symbol (offset code) of an integer codec: its width."""
    return CODEC[codec].bits


def run_sizes(codec: str, runs: torch.Tensor) -> tuple[int, int]:
    """(symbols, pool elements) the runs of stored rows describe."""
    bits = symbol_bits(codec)
    rows, length = runs[:, 0], runs[:, 1]
    return int((rows * length).sum()), int((rows * ((length * bits + 7) // 8)).sum())


def _field(blob: torch.Tensor, start: int, count: int, size: int) -> torch.Tensor:
    """``count`` little-endian unsigned integers of ``size`` bytes from ``start``, as int64."""
    raw = blob[start:start + count * size].clone()
    if size == 2:
        return raw.view(torch.int16).to(torch.int64) & 0xFFFF
    return raw.view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def parse_coded(codec: str, blob: torch.Tensor, where: str) -> CodedPool:
    """Check a coded pool's bytes (FORMAT.md "Entropy-coded pools") and parse them; a
    `FormatError` naming ``where`` otherwise. Nothing larger than the blob is allocated."""
    def fail(problem: str):
        raise FormatError(f"{where}: coded pool {codec}: {problem}")

    size = blob.numel()
    if size < HEADER_BYTES:
        fail(f"{size} bytes, shorter than its {HEADER_BYTES}-byte header")
    lanes, precision, first, table, nruns = _field(blob, 0, HEADER_FIELDS, 4).tolist()
    alphabet = 1 << symbol_bits(codec)
    if precision not in PRECISIONS:
        fail(f"precision {precision} is not one of {PRECISIONS.start}..{PRECISIONS.stop - 1}")
    if first + table > alphabet:
        fail(f"frequency table of symbols {first}..{first + table - 1} exceeds the alphabet of {alphabet}")
    start = HEADER_BYTES + 8 * nruns
    if start + table + 6 * lanes > size:
        fail(f"header declares at least {start + table + 6 * lanes} bytes of tables, the pool holds {size}")
    table_values, start = _varints(blob, start, table, fail)
    fixed = start + 6 * lanes
    if fixed > size:
        fail(f"header declares {fixed} bytes of tables, the pool holds {size}")
    runs = _field(blob, HEADER_BYTES, 2 * nruns, 4).reshape(-1, 2)
    if bool((runs < 1).any()):
        fail("a run of stored rows has no rows or rows of length 0")
    if float((runs[:, 0].double() * runs[:, 1].double()).sum()) > lanes * MAX_LANE_SYMBOLS:
        fail(f"its runs hold more symbols than {lanes} lanes of at most {MAX_LANE_SYMBOLS} decode")
    symbols, _pool = run_sizes(codec, runs)
    if symbols > MAX_CODES_PER_BYTE * size:
        fail(f"{symbols} codes from {size} bytes: more codes than {MAX_CODES_PER_BYTE} a byte")
    freqs = torch.zeros(alphabet, dtype=torch.int64)
    freqs[first:first + table] = torch.tensor(table_values, dtype=torch.int64)
    if symbols == 0:
        if lanes or table:
            fail("an empty pool has lanes or a frequency table")
    else:
        if int(freqs.sum()) != 1 << precision:
            fail(f"frequencies sum to {int(freqs.sum())}, not 2**{precision}")
        if not 1 <= lanes <= symbols or -(-symbols // lanes) > MAX_LANE_SYMBOLS:
            fail(f"{lanes} lanes for {symbols} symbols (each lane decodes 1 to {MAX_LANE_SYMBOLS})")
    states = _field(blob, start, lanes, 4)
    counts = _field(blob, start + 4 * lanes, lanes, 2)
    if bool(((states < STATE_LOW) | (states >= 1 << 31)).any()):
        fail("a lane's state lies outside [2**15, 2**31)")
    lane_symbols = (symbols - torch.arange(lanes) + lanes - 1) // max(lanes, 1)
    if bool((counts > lane_symbols).any()):
        fail("a lane has more words than symbols")
    total = fixed + 2 * int(counts.sum())
    if total != size:
        fail(f"its lanes' words end at byte {total}, the pool holds {size} bytes")
    words = _field(blob, fixed, int(counts.sum()), 2).to(torch.int32)
    return CodedPool(codec, precision, freqs, runs, states.to(torch.int32), counts, words, symbols)


def _varints(blob: torch.Tensor, start: int, count: int, fail) -> tuple[list[int], int]:
    """``count`` frequencies as varints from ``start`` (7 bits a byte, least significant first, the
    high bit set on every byte but a number's last; at most `VARINT_BYTES` bytes), and the end."""
    raw = blob[start:start + VARINT_BYTES * count].tolist()
    values, at = [], 0
    for _ in range(count):
        value = shift = 0
        while True:
            if at >= len(raw) or shift >= 7 * VARINT_BYTES:
                fail("a frequency runs past the pool or past its 3 bytes")
            byte = raw[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        values.append(value)
    return values, start + at


def decode_coded(tensors: dict[str, torch.Tensor], prefixes: list[str], where: str) -> dict[str, torch.Tensor]:
    """The pools of the coded parts (``prefix + "coded." + codec``) of these matrices, by their pool
    tensor's name (``prefix + "pool." + codec``), every one checked, then decoded in one pass."""
    names, parsed = [], []
    for prefix in prefixes:
        for codec in sorted(INTEGER_CODECS):
            if prefix + "coded." + codec in tensors:
                names.append(prefix + "pool." + codec)
                parsed.append(parse_coded(codec, tensors[prefix + "coded." + codec], f"{where}: {prefix}coded.{codec}"))
    return dict(zip(names, decode_pools(parsed, where)))


def decode_pools(pools: list[CodedPool], where: str = "") -> list[torch.Tensor]:
    """The fixed-width pools (FORMAT.md version 1) of checked coded pools, decoded together:
    the lanes of every pool advance in lockstep."""
    busy = [i for i, p in enumerate(pools) if p.symbols]
    symbols = dict(zip(busy, _decode_lanes([pools[i] for i in busy], where))) if busy else {}
    return [pool_from_symbols(p.codec, symbols.get(i, torch.zeros(0, dtype=torch.uint8)), p.runs)
            for i, p in enumerate(pools)]


def _decode_lanes(pools: list[CodedPool], where: str) -> list[torch.Tensor]:
    """The symbols of non-empty pools (uint8 each), every lane decoded in lockstep; each lane
    finds its pool's table at its own offset and uses its pool's precision."""
    sym_table, freq_table, bias_table = [], [], []
    for p in pools:
        symbol = torch.repeat_interleave(torch.arange(p.freqs.numel()), p.freqs)  # slot -> symbol
        cum = torch.cumsum(p.freqs, 0) - p.freqs
        sym_table.append(symbol)
        freq_table.append(p.freqs[symbol])
        bias_table.append(torch.arange(1 << p.precision) - cum[symbol])
    symbol_of = torch.cat(sym_table).to(torch.uint8)
    freq_of, bias_of = torch.cat(freq_table).to(torch.int32), torch.cat(bias_table).to(torch.int32)
    # Lanes of all pools, longest first: the lanes still decoding at any step are a prefix.
    lane_symbols = torch.cat([(p.symbols - torch.arange(p.lanes) + p.lanes - 1) // p.lanes for p in pools])
    order = torch.sort(lane_symbols, descending=True, stable=True).indices
    sorted_symbols = lane_symbols[order]
    table_start = torch.tensor([0] + [1 << p.precision for p in pools]).cumsum(0)

    def per_lane(values: list[int]) -> torch.Tensor:
        return torch.repeat_interleave(torch.tensor(values, dtype=torch.int32), torch.tensor([p.lanes for p in pools]))
    base = per_lane(table_start[:-1].tolist())
    shift = per_lane([p.precision for p in pools])[order]
    mask = per_lane([(1 << p.precision) - 1 for p in pools])[order]
    word_offsets = torch.tensor([0] + [p.words.numel() for p in pools]).cumsum(0)
    starts = torch.cat([torch.cumsum(p.counts, 0) - p.counts + word_offsets[i] for i, p in enumerate(pools)])
    ends = torch.cat([torch.cumsum(p.counts, 0) + word_offsets[i] for i, p in enumerate(pools)])
    steps = int(sorted_symbols[0])
    # Lanes overrunning their words read the next lane's (or zeros): caught by the end check.
    words = torch.cat([*(p.words for p in pools), torch.zeros(steps + 1, dtype=torch.int32)])
    state = torch.cat([p.states for p in pools])[order]
    pointer, base, ends = starts[order].to(torch.int32), base[order], ends[order]
    total = state.numel()
    active = total - torch.cumsum(torch.bincount(sorted_symbols, minlength=steps + 1), 0)
    slots = torch.zeros(steps, total, dtype=torch.int32)  # zeros: its pages are touched at once, not per step
    rows = slots.unbind(0)
    buffers = [torch.empty(total, dtype=torch.int32) for _ in range(4)]
    need = torch.empty(total, dtype=torch.bool)
    shared = len(pools) == 1  # one table: no per-lane table offset to add
    precision = pools[0].precision if len({p.precision for p in pools}) == 1 else None  # else per lane
    lanes = -1
    for t, now in enumerate(active[:steps].tolist()):
        if now != lanes:  # views of the lanes still decoding (a prefix), made when that changes
            lanes = now
            x, ptr, n, lane_base = state[:lanes], pointer[:lanes], need[:lanes], base[:lanes]
            lane_mask, lane_shift = (mask[:lanes], shift[:lanes]) if precision is None else ((1 << precision) - 1,
                                                                                            precision)
            f, b, w, s = (buffer[:lanes] for buffer in buffers)
        slot = rows[t] if lanes == total else rows[t][:lanes]
        torch.bitwise_and(x, lane_mask, out=slot)
        if not shared:
            slot += lane_base
        torch.index_select(freq_of, 0, slot, out=f)
        torch.index_select(bias_of, 0, slot, out=b)
        x >>= lane_shift
        torch.addcmul(b, f, x, out=x)  # x = freq·(x div M) + slot - cum
        torch.lt(x, STATE_LOW, out=n)
        torch.index_select(words, 0, ptr, out=w)
        torch.bitwise_left_shift(x, WORD_BITS, out=s)  # wraps where no word is read: zeroed next
        s |= w
        s *= n
        torch.maximum(x, s, out=x)  # a lane that reads gets s >= 2**16 > x, the others keep x
        ptr += n
    bad = (state != STATE_LOW) | (pointer != ends)
    if bool(bad.any()):
        lane = int(order[torch.nonzero(bad)[0, 0]])
        pool_of = torch.repeat_interleave(torch.arange(len(pools)), torch.tensor([p.lanes for p in pools]))
        raise FormatError(f"{where}{': ' if where else ''}coded pool {pools[int(pool_of[lane])].codec}: the coded "
                          "stream is corrupt (a lane does not end in its initial state with its words read)")
    position = torch.empty(total, dtype=torch.int64)
    position[order] = torch.arange(total)
    out, first_lane = [], 0
    for p in pools:  # symbol i of a pool: its lane i mod K's (i div K)-th, at row i div K of its columns
        columns = position[first_lane:first_lane + p.lanes]
        first_lane += p.lanes
        start = int(columns[0])
        if bool((columns == torch.arange(start, start + p.lanes)).all()):
            mine = slots[:, start:start + p.lanes]
        else:
            mine = torch.index_select(slots, 1, columns)
        out.append(torch.index_select(symbol_of, 0, mine.reshape(-1)[:p.symbols]))
    return out


def _row_blocks(bits: int, runs: torch.Tensor):
    """The pool's stored rows in blocks of back-to-back rows of one length, at most about
    `PACK_CODES` codes each: (length, rows, first symbol, first byte). A run whose rows fill whole
    bytes is one long row (cut at multiples of 8 codes). Work memory stays bounded whatever the
    runs declare, and there is no per-row index."""
    symbol = byte = 0
    for rows, length in runs.tolist():
        if (length * bits) % 8 == 0:  # no padding between its rows: one bit stream
            total, step = rows * length, PACK_CODES
            for first in range(0, total, step):
                count = min(step, total - first)
                yield count, 1, symbol + first, byte + first * bits // 8
        else:
            width, step = (length * bits + 7) // 8, max(1, PACK_CODES // length)
            for first in range(0, rows, step):
                yield length, min(step, rows - first), symbol + first * length, byte + first * width
        symbol += rows * length
        byte += rows * ((length * bits + 7) // 8)


def pool_from_symbols(codec: str, symbols: torch.Tensor, runs: torch.Tensor) -> torch.Tensor:
    """The fixed-width pool holding these symbols (offset codes, uint8) in rows as ``runs`` describe.

    Packed rows go 8 codes (b bytes) at a time: the codes' bits gathered into an int64, whose low
    b bytes (little-endian) are the bit stream's next b bytes."""
    bits = symbol_bits(codec)
    symbols = symbols.to(torch.uint8)
    if not CODEC[codec].packed:  # i8: symbol - 128 in two's complement
        return torch.bitwise_xor(symbols, 0x80).view(torch.int8)
    pool = torch.zeros(run_sizes(codec, runs)[1], dtype=torch.uint8)
    for length, rows, first_symbol, first_byte in _row_blocks(bits, runs):
        groups, width = -(-length // 8), (length * bits + 7) // 8
        codes = torch.zeros(rows, groups, 8, dtype=torch.uint8)
        codes.view(rows, groups * 8)[:, :length] = symbols[first_symbol:first_symbol + rows * length].view(rows, length)
        packed = torch.zeros(rows, groups, dtype=torch.int64)
        for j in range(8):
            packed |= codes[..., j].to(torch.int64) << (bits * j)
        row_bytes = packed.view(torch.uint8).view(rows, groups, 8)[..., :bits].reshape(rows, groups * bits)
        pool[first_byte:first_byte + rows * width].view(rows, width).copy_(row_bytes[:, :width])
    return pool


def pool_symbols(codec: str, pool: torch.Tensor, runs: torch.Tensor) -> torch.Tensor:
    """The symbols (offset codes, int16: two bytes a code of a large pool, not eight) of a
    fixed-width pool whose rows ``runs`` describe: the inverse of `pool_from_symbols`."""
    bits = symbol_bits(codec)
    if not CODEC[codec].packed:
        return pool.to(torch.int16) + (1 << (bits - 1))
    out = torch.zeros(run_sizes(codec, runs)[0], dtype=torch.int16)
    for length, rows, first_symbol, first_byte in _row_blocks(bits, runs):
        groups, width = -(-length // 8), (length * bits + 7) // 8
        grouped = torch.zeros(rows, groups * bits, dtype=torch.uint8)
        grouped[:, :width] = pool[first_byte:first_byte + rows * width].view(rows, width)
        padded = torch.zeros(rows, groups, 8, dtype=torch.uint8)
        padded[..., :bits] = grouped.view(rows, groups, bits)
        values = padded.view(-1, 8).view(torch.int64).view(rows, groups, 1)
        codes = ((values >> (bits * torch.arange(8))) & ((1 << bits) - 1)).view(rows, groups * 8)
        out[first_symbol:first_symbol + rows * length].view(rows, length).copy_(codes[:, :length])
    return out
