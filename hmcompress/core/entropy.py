"""Entropy coding of integer pools (docs/FORMAT.md version 2): the rANS encoder.

The mirror of `hmcompress.runtime.entropy` (the decoder): the pool's codes become symbols, a
frequency table is quantised to 2**14 (integer arithmetic only, so every machine writes the same
bytes), and every lane is encoded backwards in lockstep with NumPy; the lanes' words go into one
stream they share (layout 1; layout 0, each lane's words apart, is still written on request). A
pool is stored coded only where that takes fewer bytes than its fixed-width form, so coding never
costs bytes. Output depends on the codes alone.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from hmcompress.runtime import CODEC, DENSE, LOWRANK, HMatrix
from hmcompress.runtime.entropy import (
    HEADER_FIELDS,
    LANE_BYTES,
    LAYOUT_UNIT,
    MAX_LANE_SYMBOLS,
    PRECISIONS,
    STATE_LOW,
    WORD_BITS,
)

LAYOUT = 1  # one stream the lanes share (FORMAT.md layout 1): its reads are contiguous, no word counts
# Symbols a lane decodes: its 4 bytes of state cost 0.023 bit a symbol, as layout 0's 6 bytes a lane
# did at 2048. More lanes decode faster (fewer lockstep steps), fewer take fewer bytes.
LANE_SYMBOLS = 1365
LAYOUT0_LANE_SYMBOLS = 2048  # what layout 0 was written with: its lanes take 6 bytes
# Measured on Gaussian, narrow and very skewed codes: within 0.002 bit a symbol of the best of
# 12..15 (finer tables fit the counts better; coarser ones leave the state more headroom).
PRECISION = 14
COUNT_SLICE = 1 << 20  # symbols counted at once

assert LANE_SYMBOLS <= MAX_LANE_SYMBOLS and PRECISION in PRECISIONS
LANE_BITS = 8 * LANE_BYTES[LAYOUT] / LANE_SYMBOLS  # a lane's fixed bytes, per symbol


def quantise_frequencies(counts: np.ndarray, precision: int) -> np.ndarray:
    """Frequencies summing to 2**precision, every symbol that occurs at least 1, near proportional
    to ``counts`` (largest remainders first, ties to the smaller symbol; integers only, so the
    same counts give the same table everywhere)."""
    total, scale = int(counts.sum()), 1 << precision
    freqs = counts * scale // total
    remainder = counts * scale % total
    freqs = np.where((counts > 0) & (freqs == 0), 1, freqs)
    short = scale - int(freqs.sum())
    if short > 0:
        freqs[np.lexsort((np.arange(len(counts)), -remainder))[:short]] += 1
    for _ in range(-short):  # at most one step per symbol raised to 1
        freqs[int(np.argmax(freqs))] -= 1
    return freqs


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A coded symbol stream: its table, and its lanes' initial states, word counts and words."""

    precision: int
    first: int
    freqs: np.ndarray  # of symbols first, first + 1, ...
    states: np.ndarray
    counts: np.ndarray
    words: np.ndarray  # lane 0's first, each lane's in the order the decoder reads them
    stream: np.ndarray  # layout 1: all the words as emitted (the decoder reads the last first)


def encode_symbols(symbols: np.ndarray, alphabet: int, lane_symbols: int = LANE_SYMBOLS,
                   precision: int = PRECISION) -> Encoded:
    """Interleaved rANS: symbol i goes to lane i mod K (K = ceil(N / lane_symbols)) as its
    (i div K)-th; every lane starts (as the decoder ends) in state 2**15.

    Step t holds symbols t·K to t·K + K - 1, so only the last step is short (its lanes a prefix)
    and each step is a view of ``symbols``. The words go into one uint16 buffer and their lanes
    into one int32 buffer, each sized for a word a symbol (the most a symbol emits): large
    allocations that glibc maps and unmaps, where step-by-step pieces would stay in its heap."""
    symbols = np.asarray(symbols)
    n = len(symbols)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Encoded(precision, 0, empty, empty, empty, empty, empty)
    counts = symbol_counts(symbols, alphabet)
    freqs = quantise_frequencies(counts, precision)
    cum = np.cumsum(freqs) - freqs
    lanes = -(-n // lane_symbols)
    steps = -(-n // lanes)
    state = np.full(lanes, STATE_LOW, dtype=np.int64)
    limit = (STATE_LOW >> precision) << WORD_BITS
    words = np.empty(n, dtype=np.uint16)  # in the encoder's order (last step first), reversed below
    lane_of = np.empty(n, dtype=np.int32)
    emitted = 0
    for t in range(steps - 1, -1, -1):
        sym = symbols[t * lanes:(t + 1) * lanes]  # the last step's lanes are a prefix
        active = len(sym)
        x = state[:active]
        f = freqs[sym]
        need = x >= limit * f
        reading = np.flatnonzero(need)
        # Reversed within the step too: reversing the whole buffer then gives step order, lanes ascending.
        lane_of[emitted:emitted + len(reading)] = reading[::-1]
        words[emitted:emitted + len(reading)] = x[reading[::-1]] & 0xFFFF
        emitted += len(reading)
        x = np.where(need, x >> WORD_BITS, x)
        state[:active] = ((x // f) << precision) + x % f + cum[sym]
    stream = words[:emitted]
    lane_of, words = lane_of[:emitted][::-1], stream[::-1]  # step order, as the decoder reads
    words = words[np.argsort(lane_of, kind="stable")]
    used = np.flatnonzero(counts)
    first, last = int(used[0]), int(used[-1])
    return Encoded(precision, first, freqs[first:last + 1], state, np.bincount(lane_of, minlength=lanes), words,
                   stream)


def symbol_counts(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    """How often each symbol occurs, counted a slice at a time (`np.bincount` makes an int64 copy
    of what it counts)."""
    counts = np.zeros(alphabet, dtype=np.int64)
    for start in range(0, len(symbols), COUNT_SLICE):
        counts += np.bincount(symbols[start:start + COUNT_SLICE], minlength=alphabet)
    return counts


def coded_blob(codec: str, symbols: np.ndarray, runs: np.ndarray, precision: int = PRECISION,
               layout: int = LAYOUT, lane_symbols: int | None = None) -> torch.Tensor:
    """The bytes of a coded pool (FORMAT.md "Entropy-coded pools") as a uint8 tensor; lanes of
    ``lane_symbols`` (the layout's own length by default: the same bytes a lane per symbol)."""
    lane_symbols = lane_symbols or (LANE_SYMBOLS if layout == 1 else LAYOUT0_LANE_SYMBOLS)
    coded = encode_symbols(symbols, 1 << CODEC[codec].bits, lane_symbols, precision)
    header = [len(coded.states), coded.precision + LAYOUT_UNIT * layout, coded.first, len(coded.freqs), len(runs)]
    assert len(header) == HEADER_FIELDS
    lane_tables = [coded.states.astype("<u4").tobytes()]
    if layout == 0:
        lane_tables += [coded.counts.astype("<u2").tobytes(), coded.words.astype("<u2").tobytes()]
    else:
        lane_tables.append(coded.stream.astype("<u2").tobytes())
    parts = [np.asarray(header, dtype="<u4").tobytes(), np.asarray(runs, dtype="<u4").tobytes(),
             varints(coded.freqs), *lane_tables]
    return torch.frombuffer(bytearray(b"".join(parts)), dtype=torch.uint8)


def varints(values: np.ndarray) -> bytes:
    """Non-negative integers as varints: 7 bits a byte, least significant first, the high bit set
    on every byte but a number's last (most frequencies of a table take one byte)."""
    out = bytearray()
    for value in values.tolist():
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def stored_rows(hm: HMatrix, codec: str) -> list[tuple[int, list[tuple[int, int]]]]:
    """The codec's segments in pool order: each one's offset and its stored rows as (count,
    length) parts (a dense block's rows; a low-rank block's factors; a rows segment's rows)."""
    blocks = hm.blocks.tolist()
    out = []
    for block, kind, _codec, rank, offset, _scale in sorted(
            (s for s in hm.segments.tolist() if s[2] == CODEC[codec].id), key=lambda s: s[4]):
        _r0, _c0, rows, cols, _level = blocks[block]
        out.append((offset, [(rows, cols)] if kind == DENSE else [(rank, rows), (rank, cols)] if kind == LOWRANK
                    else [(rank, cols)]))
    return out


def pool_runs(hm: HMatrix, codec: str) -> np.ndarray | None:
    """The (rows, length) runs of a pool's stored rows in pool order, rows that start on a byte
    boundary merged; None unless the codec's segments fill the pool exactly, in offset order."""
    spec = CODEC[codec]
    runs: list[list[int]] = []
    cursor = 0
    for offset, parts in stored_rows(hm, codec):
        if offset != cursor:
            return None
        for count, length in parts:
            cursor += count * spec.row_length(length)
            if (length * spec.bits) % 8 == 0:  # no padding: one row of all their codes
                count, length = 1, count * length
                if runs and runs[-1][0] == 1 and (runs[-1][1] * spec.bits) % 8 == 0:
                    runs[-1][1] += length
                    continue
            if runs and runs[-1][1] == length and (length * spec.bits) % 8:
                runs[-1][0] += count
            else:
                runs.append([count, length])
    if cursor != hm.pools[codec].numel() or any(value >= 1 << 32 for run in runs for value in run):
        return None
    return np.asarray(runs, dtype=np.int64).reshape(-1, 2)
