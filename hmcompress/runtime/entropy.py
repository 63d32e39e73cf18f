"""Entropy-coded integer pools (docs/FORMAT.md version 2): checked, then decoded on load.

A coded pool is interleaved rANS over the pool's codes: many independent lanes, each a 31-bit
state (held in an int32) renormalised by 16-bit words, one static frequency table per pool. Its
words are either each lane's apart (layout 0, with every lane's word count) or one stream that
all lanes read in turn (layout 1: contiguous reads, no counts). The decoder runs every lane of
every pool handed to it in lockstep (one torch operation per step acts on all lanes; constants
are 0-dim tensors, which torch applies faster than Python numbers), so its speed comes from the
number of lanes, not from Python. A pool of layout 2 (format version 4) is sectioned: its rows in
classes, each class's rows a layout-1 stream with a table of its own; its sections decode in the
same pass as every other pool, and its rows are put back in order after. Decoding gives exactly the
fixed-width pool version 1 stores:
everything downstream is unchanged. Every field is checked, and every size bounded by the coded
bytes, before anything large is allocated.
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
CODED_LAYOUTS = (0, 1)  # 0: each lane's words apart, with word counts; 1: one stream the lanes share
SECTIONED = 2  # the layout of a pool coded a class of rows at a time, each class a layout-1 stream
SECTIONED_SINCE = 4  # the format version that brought it
MAX_SECTIONS = 64
LAYOUT_UNIT = 256  # the header's precision field holds precision + LAYOUT_UNIT * layout
LANE_BYTES = {0: 6, 1: 4}  # a lane's fixed bytes: its state (and, in layout 0, its word count)
HEADER_FIELDS = 5  # u32: lanes, precision (and layout), first symbol, table length, runs
HEADER_BYTES = 4 * HEADER_FIELDS
VARINT_BYTES = 3  # a frequency (at most 2**15) as a varint
# A pool decodes to at most this many codes per coded byte: a stream of a single symbol costs no
# bits, so without it a few kilobytes could ask for gigabytes (and a file's pools together stay
# within 1024 codes per byte of the file). hmcompress writes at most 1365 codes per 4-byte lane.
MAX_CODES_PER_BYTE = 1024
PACK_CODES = 1 << 18  # codes packed into (or unpacked from) bit streams at once
STREAM_CHECK = 8  # layout 1: steps between checks that no pool read past its stream's start
# Beyond this many table slots in all (8 pools of 2**14), each slot's frequency and bias are looked
# up by symbol instead (a symbol table of 256 entries a pool stays in cache; slot tables of many
# pools do not): two operations more a step, 2.6x faster lookups at 64 pools of 2**14 slots.
BY_SYMBOL_SLOTS = 1 << 17


@dataclasses.dataclass(frozen=True)
class CodedPool:
    """One coded pool, parsed and checked: what `decode_pools` needs."""

    codec: str
    precision: int
    freqs: torch.Tensor  # int64 (2**bits,): the quantised frequency of every symbol
    runs: torch.Tensor  # int64 (R, 2): (rows, length) of the pool's stored rows, in order
    states: torch.Tensor  # int32 (K,): each lane's initial state
    counts: torch.Tensor  # int64 (K,): words of each lane (layout 0; empty in layout 1)
    words: torch.Tensor  # int32 (W,), 0 .. 65535: layout 0 every lane's words, lane 0's first;
    # layout 1 the shared stream as stored (its last word is read first)
    symbols: int  # N: codes in the pool
    layout: int = 0

    @property
    def lanes(self) -> int:
        return self.states.numel()


@dataclasses.dataclass(frozen=True)
class SectionedPool:
    """A coded pool of layout 2, parsed and checked: its rows' classes and one layout-1 section
    for each class, holding that class's rows in order."""

    codec: str
    runs: torch.Tensor  # int64 (R, 2): as `CodedPool.runs`, of the whole pool
    length: int  # symbols of a row
    classes: torch.Tensor  # int64 (rows,): each row's class
    sections: list[CodedPool]
    symbols: int


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


def parse_coded(codec: str, blob: torch.Tensor, where: str, sections: bool = True) -> CodedPool | SectionedPool:
    """Check a coded pool's bytes (FORMAT.md "Entropy-coded pools") and parse them; a
    `FormatError` naming ``where`` otherwise. Nothing larger than the blob is allocated. Layout 2
    only where ``sections`` (files of format version 4 or later, not within a section)."""
    def fail(problem: str):
        raise FormatError(f"{where}: coded pool {codec}: {problem}")

    size = blob.numel()
    if size < HEADER_BYTES:
        fail(f"{size} bytes, shorter than its {HEADER_BYTES}-byte header")
    lanes, precision, first, table, nruns = _field(blob, 0, HEADER_FIELDS, 4).tolist()
    layout, precision = divmod(precision, LAYOUT_UNIT)
    alphabet = 1 << symbol_bits(codec)
    if layout == SECTIONED and sections and precision == 0:
        return _parse_sectioned(codec, blob, where, fail)
    if layout not in CODED_LAYOUTS:
        fail(f"layout {layout} is not one of {', '.join(map(str, CODED_LAYOUTS))}"
             + (f" (layout {SECTIONED}: format version {SECTIONED_SINCE} and later, not within a section)"
                if layout == SECTIONED else ""))
    if precision not in PRECISIONS:
        fail(f"precision {precision} is not one of {PRECISIONS.start}..{PRECISIONS.stop - 1}")
    if first + table > alphabet:
        fail(f"frequency table of symbols {first}..{first + table - 1} exceeds the alphabet of {alphabet}")
    lane_bytes = LANE_BYTES[layout]
    start = HEADER_BYTES + 8 * nruns
    if start + table + lane_bytes * lanes > size:
        fail(f"header declares at least {start + table + lane_bytes * lanes} bytes of tables, the pool holds {size}")
    table_values, start = _varints(blob, start, table, fail)
    fixed = start + lane_bytes * lanes
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
    if bool(((states < STATE_LOW) | (states >= 1 << 31)).any()):
        fail("a lane's state lies outside [2**15, 2**31)")
    if layout == 0:
        counts = _field(blob, start + 4 * lanes, lanes, 2)
        lane_symbols = (symbols - torch.arange(lanes) + lanes - 1) // max(lanes, 1)
        if bool((counts > lane_symbols).any()):
            fail("a lane has more words than symbols")
        total = fixed + 2 * int(counts.sum())
        if total != size:
            fail(f"its lanes' words end at byte {total}, the pool holds {size} bytes")
    else:
        counts = torch.zeros(0, dtype=torch.int64)
        if (size - fixed) % 2:
            fail(f"its stream of 16-bit words takes {size - fixed} bytes, an odd number")
        if (size - fixed) // 2 > symbols:
            fail(f"its stream holds {(size - fixed) // 2} words, more words than its {symbols} symbols")
    words = _field(blob, fixed, (size - fixed) // 2, 2).to(torch.int32)
    return CodedPool(codec, precision, freqs, runs, states.to(torch.int32), counts, words, symbols, layout)


def _parse_sectioned(codec: str, blob: torch.Tensor, where: str, fail) -> SectionedPool:
    """A layout-2 pool: header (classes C, the layout field, row length L, rows Q, runs R), the
    pool's runs, a class byte for each row, C section sizes, then the C layout-1 sections."""
    size = blob.numel()
    count, _layout, length, rows, nruns = _field(blob, 0, HEADER_FIELDS, 4).tolist()
    if not 2 <= count <= MAX_SECTIONS or length < 1 or rows < 1:
        fail(f"{count} sections of rows of {length} codes, {rows} rows (2 to {MAX_SECTIONS} sections, "
             "rows of at least one code)")
    start = HEADER_BYTES + 8 * nruns
    tables = start + rows + 4 * count
    if tables > size:
        fail(f"header declares {tables} bytes of runs, classes and section sizes, the pool holds {size}")
    runs = _field(blob, HEADER_BYTES, 2 * nruns, 4).reshape(-1, 2)
    if bool((runs < 1).any()):
        fail("a run of stored rows has no rows or rows of length 0")
    # Counted in float64 first: runs of 2**32 - 1 rows of 2**32 - 1 codes wrap int64's products.
    if float((runs[:, 0].double() * runs[:, 1].double()).sum()) > MAX_CODES_PER_BYTE * size:
        fail(f"its runs hold more codes than {MAX_CODES_PER_BYTE} a byte of its {size}")
    symbols = int((runs[:, 0] * runs[:, 1]).sum())
    if symbols != rows * length:
        fail(f"its runs hold {symbols} codes, not its {rows} rows of {length}")
    classes = blob[start:start + rows].to(torch.int64)
    if bool((classes >= count).any()):
        fail(f"a row's class is not below its {count} sections")
    sizes = _field(blob, start + rows, count, 4)
    if tables + int(sizes.sum()) != size:
        fail(f"its sections end at byte {tables + int(sizes.sum())}, the pool holds {size}")
    held = torch.bincount(classes, minlength=count) * length
    ends = (tables + sizes.cumsum(0)).tolist()
    sections = []
    for c, (begin, end) in enumerate(zip([tables, *ends[:-1]], ends)):
        section = parse_coded(codec, blob[begin:end], f"{where}: section {c}", sections=False)
        if section.symbols != int(held[c]):
            fail(f"section {c} holds {section.symbols} codes, its rows {int(held[c])}")
        sections.append(section)
    return SectionedPool(codec, runs, length, classes, sections, symbols)


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


def decode_coded(tensors: dict[str, torch.Tensor], prefixes: list[str], where: str,
                 version: int = SECTIONED_SINCE) -> dict[str, torch.Tensor]:
    """The pools of the coded parts (``prefix + "coded." + codec``) of these matrices, by their pool
    tensor's name (``prefix + "pool." + codec``), every one checked, then decoded in one pass;
    ``version``: the file's format version."""
    names, parsed = [], []
    for prefix in prefixes:
        for codec in sorted(INTEGER_CODECS):
            if prefix + "coded." + codec in tensors:
                names.append(prefix + "pool." + codec)
                parsed.append(parse_coded(codec, tensors[prefix + "coded." + codec], f"{where}: {prefix}coded.{codec}",
                                          version >= SECTIONED_SINCE))
    return dict(zip(names, decode_pools(parsed, where)))


def decode_pools(pools: list[CodedPool | SectionedPool], where: str = "") -> list[torch.Tensor]:
    """The fixed-width pools (FORMAT.md version 1) of checked coded pools, decoded together:
    the lanes of every pool (and every section) of a layout advance in lockstep."""
    streams = [s for p in pools for s in (p.sections if isinstance(p, SectionedPool) else [p])]
    symbols = {}
    for layout in CODED_LAYOUTS:
        busy = [i for i, p in enumerate(streams) if p.symbols and p.layout == layout]
        if busy:
            symbols.update(zip(busy, _decode_lanes([streams[i] for i in busy], where)))
    decoded = [symbols.get(i, torch.zeros(0, dtype=torch.uint8)) for i in range(len(streams))]
    out, at = [], 0
    for p in pools:
        if isinstance(p, SectionedPool):
            out.append(pool_from_symbols(p.codec, _rows_in_order(p, decoded[at:at + len(p.sections)]), p.runs))
            at += len(p.sections)
        else:
            out.append(pool_from_symbols(p.codec, decoded[at], p.runs))
            at += 1
    return out


def _rows_in_order(pool: SectionedPool, sections: list[torch.Tensor]) -> torch.Tensor:
    """A sectioned pool's symbols, its rows back in order: row r is the next row of its class's
    section."""
    out = torch.empty(pool.symbols, dtype=torch.uint8)
    order = torch.argsort(pool.classes, stable=True)  # the rows as the sections hold them, one after the other
    out.view(-1, pool.length)[order] = torch.cat(sections).view(-1, pool.length)
    return out


def _steps(pool: CodedPool) -> int:
    """Steps of the pool's longest lanes: its first N mod K lanes (all if K divides N)."""
    return -(-pool.symbols // pool.lanes)


def _tables(pools: list[CodedPool], by_symbol: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    """slot -> symbol (uint8) of every pool's table, one after the other; freq and slot - cum
    (int32) by slot, or (``by_symbol``) freq and cum + the pool's first slot by symbol; where each
    pool's slots start, and where its symbols start (by symbol)."""
    sym_table, freq_table, bias_table = [], [], []
    starts = torch.tensor([0] + [1 << p.precision for p in pools]).cumsum(0).tolist()
    for p, start in zip(pools, starts):
        symbol = torch.repeat_interleave(torch.arange(p.freqs.numel()), p.freqs)  # slot -> symbol
        cum = torch.cumsum(p.freqs, 0) - p.freqs
        sym_table.append(symbol)
        freq_table.append(p.freqs if by_symbol else p.freqs[symbol])
        bias_table.append(cum + start if by_symbol else torch.arange(1 << p.precision) - cum[symbol])
    symbol_starts = torch.tensor([0] + [p.freqs.numel() for p in pools]).cumsum(0).tolist()
    return (torch.cat(sym_table).to(torch.uint8), torch.cat(freq_table).to(torch.int32),
            torch.cat(bias_table).to(torch.int32), starts[:-1], symbol_starts[:-1])


def _int32(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int32)


def _decode_lanes(pools: list[CodedPool], where: str) -> list[torch.Tensor]:
    """The symbols of non-empty pools of one layout (uint8 each), every lane decoded in lockstep.

    The lanes lie pool after pool, the pools with the most steps first, so the lanes still
    decoding are a prefix. At a pool's last step only its first N mod K lanes decode: the others,
    done, are checked first and then masked off (no word read). Each lane finds its pool's table
    at its own offset and uses its pool's precision. The symbols of a step fill the next bytes of
    one buffer, as many as lanes decode: Σ K·steps bytes in all, however the lengths differ."""
    order = sorted(range(len(pools)), key=lambda i: -_steps(pools[i]))
    pools = [pools[i] for i in order]
    interleaved = pools[0].layout == 1
    by_symbol = sum(1 << p.precision for p in pools) > BY_SYMBOL_SLOTS
    symbol_of, freq_of, bias_of, table_start, symbol_start = _tables(pools, by_symbol)
    lanes = [p.lanes for p in pools]
    steps = [_steps(p) for p in pools]
    last = [p.symbols - (s - 1) * k for p, s, k in zip(pools, steps, lanes)]  # lanes of the last step
    first_lane = [0, *torch.tensor(lanes).cumsum(0).tolist()]
    total, longest = first_lane[-1], steps[0]
    per_lane = torch.tensor(lanes)
    base = torch.repeat_interleave(torch.tensor(table_start, dtype=torch.int32), per_lane)
    symbol_base = torch.repeat_interleave(torch.tensor(symbol_start, dtype=torch.int32), per_lane)
    precisions = {p.precision for p in pools}
    if len(precisions) == 1:
        mask, shift = _int32((1 << pools[0].precision) - 1), _int32(pools[0].precision)
    else:
        shift = torch.repeat_interleave(torch.tensor([p.precision for p in pools], dtype=torch.int32), per_lane)
        mask = (1 << shift) - 1
    low, sign, word = _int32(STATE_LOW), _int32(31), _int32(1 << WORD_BITS)
    x = torch.cat([p.states for p in pools])
    final_x = torch.empty(total, dtype=torch.int32)
    if interleaved:  # the streams after a front pad: a pool reads at most K words a step past its own
        front = (STREAM_CHECK + 1) * total
        region = torch.tensor([0] + [p.words.numel() for p in pools]).cumsum(0) + front
        words = torch.cat([torch.zeros(front, dtype=torch.int32), *(p.words for p in pools),
                           torch.zeros(1, dtype=torch.int32)])
        top = region[1:].to(torch.int32)  # a pool's next word is the one below its top
        stream_start = region[:-1].to(torch.int32)
        final_top = torch.empty(len(pools), dtype=torch.int32)
        pool_of_lane = torch.repeat_interleave(torch.arange(len(pools), dtype=torch.int32), per_lane)
        firsts = torch.tensor(first_lane[:-1], dtype=torch.int32)
        ends = torch.tensor(first_lane[1:], dtype=torch.int32)
        counted = torch.zeros(total + 1, dtype=torch.int32)  # 0, then each lane's -1 if it reads
        running = torch.empty(total + 1, dtype=torch.int32)  # its cumulative sum
        before, after, offset = (torch.empty(len(pools), dtype=torch.int32) for _ in range(3))
        spread = torch.empty(total, dtype=torch.int32)
    else:  # each lane's words in turn; lanes overrunning theirs read the next lane's (or zeros)
        word_offsets = torch.tensor([0] + [p.words.numel() for p in pools]).cumsum(0)
        starts = torch.cat([torch.cumsum(p.counts, 0) - p.counts + word_offsets[i] for i, p in enumerate(pools)])
        lane_ends = (starts + torch.cat([p.counts for p in pools])).to(torch.int32)
        words = torch.cat([*(p.words for p in pools), torch.zeros(longest + 1, dtype=torch.int32)])
        pointer = starts.to(torch.int32)
        final_pointer = torch.empty(total, dtype=torch.int32)
    ending: dict[int, list[int]] = {}
    for j, s in enumerate(steps):
        ending.setdefault(s - 1, []).append(j)
    out = torch.empty(sum(k * s for k, s in zip(lanes, steps)), dtype=torch.uint8)
    row_start, row_lanes = [], []
    scratch = [torch.empty(total, dtype=torch.int32) for _ in range(7)]
    busy, now, at = len(pools), total, 0

    def views():  # of the lanes still decoding, made when they change
        v = [buffer[:now] for buffer in (x, *scratch[:6], base)]
        v += [mask[:now], shift[:now]] if len(precisions) > 1 else [mask, shift]
        if interleaved:
            v += [counted[1:now + 1], counted[:now + 1], running[:now + 1], running[1:now + 1], running[now:now + 1],
                  top[:busy], firsts[:busy], ends[:busy], before[:busy], after[:busy], offset[:busy],
                  pool_of_lane[:now], spread[:now], stream_start[:busy]]
        else:
            v += [pointer[:now]] + [None] * 13
        return v + [symbol_base[:now], scratch[6][:now]]
    (lane_x, slot, f, b, w, s, n, lane_base, lane_mask, lane_shift, reads, counts, sums, sums_after, sum_all,
     tops, first_of, end_of, sum_before, sum_end, pool_offset, pool_of, lane_offset, bottoms, lane_symbols,
     symbol_index) = views()
    for t in range(longest):
        done = [(first_lane[j] + last[j], first_lane[j + 1]) for j in ending.get(t, []) if last[j] < lanes[j]]
        if interleaved and t % STREAM_CHECK == 0 and bool((tops < bottoms).any()):
            _corrupt(pools, where)
        for a, z in done:  # lanes already done at their pool's last step
            final_x[a:z] = x[a:z]
            if not interleaved:
                final_pointer[a:z] = pointer[a:z]
        row = out[at:at + now]
        row_start.append(at)
        row_lanes.append(now)
        at += now
        torch.bitwise_and(lane_x, lane_mask, out=slot)
        if busy > 1:
            slot += lane_base
        torch.index_select(symbol_of, 0, slot, out=row)
        if by_symbol:  # freq and cum by the pool's symbol; bias = slot - cum, both offset by the pool's first slot
            torch.add(lane_symbols, row, out=symbol_index)
            torch.index_select(freq_of, 0, symbol_index, out=f)
            torch.index_select(bias_of, 0, symbol_index, out=b)
            torch.sub(slot, b, out=b)
        else:
            torch.index_select(freq_of, 0, slot, out=f)
            torch.index_select(bias_of, 0, slot, out=b)
        torch.bitwise_right_shift(lane_x, lane_shift, out=lane_x)
        torch.addcmul(b, f, lane_x, out=lane_x)  # x = freq·(x div M) + slot - cum
        n = reads if interleaved else n
        torch.sub(lane_x, low, out=n)
        n >>= sign  # -1 where the lane reads a word (x < 2**15), else 0
        for a, z in done:
            n[a:z] = 0
        if interleaved:  # the readers of a pool take its next words in lane order, from its top down
            torch.cumsum(counts, 0, out=sums)
            if busy == 1:
                torch.add(sums_after, tops, out=s)
                tops += sum_all
            else:
                torch.index_select(running, 0, first_of, out=sum_before)
                torch.sub(tops, sum_before, out=pool_offset)
                torch.index_select(pool_offset, 0, pool_of, out=lane_offset)
                torch.add(sums_after, lane_offset, out=s)
                torch.index_select(running, 0, end_of, out=sum_end)
                torch.add(pool_offset, sum_end, out=tops)
            torch.index_select(words, 0, s, out=w)
        else:
            torch.index_select(words, 0, reads, out=w)
            reads -= n
        torch.addcmul(w, lane_x, word, out=s)  # x·2**16 + word; wraps where no word is read: masked
        s &= n
        torch.maximum(lane_x, s, out=lane_x)  # a lane that reads gets s >= 2**16 > x, the others keep x
        if t in ending:  # these pools are done: their lanes leave the prefix
            for j in ending[t]:
                a, z = first_lane[j], first_lane[j] + last[j]
                final_x[a:z] = x[a:z]
                if interleaved:
                    final_top[j] = top[j]
                else:
                    final_pointer[a:z] = pointer[a:z]
            busy = min(ending[t])
            now = first_lane[busy]
            (lane_x, slot, f, b, w, s, n, lane_base, lane_mask, lane_shift, reads, counts, sums, sums_after, sum_all,
             tops, first_of, end_of, sum_before, sum_end, pool_offset, pool_of, lane_offset, bottoms, lane_symbols,
             symbol_index) = views()
    bad = final_x != STATE_LOW
    bad |= torch.repeat_interleave(final_top != stream_start, per_lane) if interleaved else final_pointer != lane_ends
    if bool(bad.any()):
        _corrupt(pools, where, int(torch.nonzero(bad)[0, 0]))
    symbols = [_lane_symbols(out, row_start, row_lanes, first_lane[j], p) for j, p in enumerate(pools)]
    return [symbols[order.index(i)] for i in range(len(pools))]


def _corrupt(pools: list[CodedPool], where: str, lane: int = 0):
    """Raise the error of a corrupt stream, naming the codec of the pool ``lane`` belongs to."""
    pool = pools[int(torch.searchsorted(torch.tensor([p.lanes for p in pools]).cumsum(0), lane, right=True))]
    raise FormatError(f"{where}{': ' if where else ''}coded pool {pool.codec}: the coded stream is corrupt (a "
                      "lane does not end in its initial state with its words read)")


def _lane_symbols(out: torch.Tensor, row_start: list[int], row_lanes: list[int], first: int,
                  pool: CodedPool) -> torch.Tensor:
    """A pool's symbols from the decoded rows (symbol i: its lane i mod K's (i div K)-th): one
    strided view where every row of its steps has the same lanes, else gathered a slice at a time."""
    steps, lanes = _steps(pool), pool.lanes
    if row_lanes[0] == row_lanes[steps - 1]:
        width = row_lanes[0]
        grid = out[row_start[0]:row_start[0] + steps * width].view(steps, width)
        return grid[:, first:first + lanes].reshape(-1)[:pool.symbols]
    starts = torch.tensor(row_start[:steps]) + first
    chunk = max(1, PACK_CODES // lanes)
    parts = [torch.index_select(out, 0, (starts[r:r + chunk, None] + torch.arange(lanes)).reshape(-1))
             for r in range(0, steps, chunk)]
    return torch.cat(parts)[:pool.symbols]


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
