"""Coded pools in both layouts (FORMAT.md "Entropy-coded pools"): layout 1, one stream the lanes
share, is what hmcompress writes; layout 0, each lane's words apart, is what it wrote before and
still loads. Random streams round-trip through the runtime and the reference decoder, pools of
both layouts and of unequal lane lengths decode together, and corrupt streams raise FormatError."""
from __future__ import annotations

import numpy as np
import pytest
import reference_decoder
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hmcompress.core.entropy import LANE_SYMBOLS, LAYOUT, coded_blob
from hmcompress.runtime import CODEC, FormatError, decode_pools, parse_coded, pool_from_symbols
from hmcompress.runtime.entropy import LANE_BYTES, STREAM_CHECK

CODECS = ["i4", "i5", "i6", "i7", "i8"]


def symbol_stream(codec: str, count: int, spread: float, seed: int) -> np.ndarray:
    bits = CODEC[codec].bits
    rng = np.random.default_rng(seed)
    centre = 1 << (bits - 1)
    return np.clip(np.round(rng.normal(centre, spread * centre, count)), 0, (1 << bits) - 1).astype(np.int64)


def expected_pool(codec: str, symbols: np.ndarray) -> torch.Tensor:
    return pool_from_symbols(codec, torch.from_numpy(symbols).to(torch.uint8), torch.tensor([[1, len(symbols)]]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec=st.sampled_from(CODECS), count=st.integers(1, 6000), spread=st.floats(0.0, 1.5),
       lane_symbols=st.integers(1, 3000), precision=st.integers(12, 15), layout=st.sampled_from([0, 1]),
       seed=st.integers(0, 10**6))
def test_random_streams_round_trip_in_both_layouts(codec, count, spread, lane_symbols, precision, layout, seed):
    """Any stream, lane length (a last step of a few lanes or all), precision and layout: the pool
    comes back bit for bit from the runtime and from the decoder written from FORMAT.md alone."""
    symbols = symbol_stream(codec, count, spread, seed)
    blob = coded_blob(codec, symbols, np.array([[1, count]]), precision, layout=layout, lane_symbols=lane_symbols)
    pool = parse_coded(codec, blob, "test")
    assert (pool.layout, pool.precision) == (layout, precision)
    expected = expected_pool(codec, symbols)
    assert torch.equal(decode_pools([pool])[0], expected)
    assert np.array_equal(reference_decoder.decode_coded_pool(codec, blob.numpy()), expected.numpy())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pools=st.lists(st.tuples(st.sampled_from(CODECS), st.integers(0, 4000), st.integers(1, 900),
                                st.integers(12, 15), st.sampled_from([0, 1])), min_size=1, max_size=7),
       seed=st.integers(0, 10**6))
def test_pools_of_both_layouts_and_unequal_lanes_decode_together(pools, seed):
    """Pools whose lanes end at different steps (some lanes of a pool one step before the others),
    of different precisions and layouts, in one call: each gets its own pool, in order."""
    parsed, expected = [], []
    for i, (codec, count, lane_symbols, precision, layout) in enumerate(pools):
        symbols = symbol_stream(codec, count, 0.3, seed + i)
        blob = coded_blob(codec, symbols, np.array([[1, count]]).reshape(-1, 2)[:int(count > 0)], precision,
                          layout=layout, lane_symbols=lane_symbols)
        parsed.append(parse_coded(codec, blob, "test"))
        expected.append(expected_pool(codec, symbols))
    for got, want in zip(decode_pools(parsed), expected):
        assert torch.equal(got, want)


def test_layout_1_is_written_and_costs_what_layout_0_did_a_symbol():
    """hmcompress writes layout 1, whose 4-byte lanes of 1365 symbols cost per symbol what layout
    0's 6-byte lanes of 2048 did; a large pool takes no more bytes than in layout 0."""
    assert LAYOUT == 1 and LANE_BYTES == {0: 6, 1: 4}
    assert abs(LANE_BYTES[1] / LANE_SYMBOLS - LANE_BYTES[0] / 2048) < 1e-5
    symbols = symbol_stream("i8", 300_000, 0.25, 3)
    runs = np.array([[1, len(symbols)]])
    assert coded_blob("i8", symbols, runs).numel() <= coded_blob("i8", symbols, runs, layout=0).numel()


@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("seed", range(12))
def test_a_flipped_stream_bit_raises_format_error(layout, seed):
    """A stream bit flipped anywhere: FormatError, never an exception of torch or a silent pool."""
    symbols = symbol_stream("i6", 20_000, 0.3, seed)
    blob = coded_blob("i6", symbols, np.array([[1, len(symbols)]]), layout=layout).clone()
    words = parse_coded("i6", blob, "test").words.numel()
    at = blob.numel() - 1 - int(np.random.default_rng(seed).integers(0, 2 * words))
    blob[at] ^= 1 << (seed % 8)
    with pytest.raises(FormatError, match="coded stream is corrupt"):
        decode_pools([parse_coded("i6", blob, "test")])


def test_lanes_reading_past_their_stream_raise_format_error():
    """A layout-1 stream far too short for its lanes (its last word only): the lanes read past the
    stream's start, which the decoder checks every `STREAM_CHECK` steps: FormatError."""
    symbols = symbol_stream("i8", 200_000, 0.5, 7)
    blob = coded_blob("i8", symbols, np.array([[1, len(symbols)]]))
    words = parse_coded("i8", blob, "test").words.numel()
    short = torch.cat([blob[:blob.numel() - 2 * words], blob[-2:]])
    assert STREAM_CHECK >= 1
    with pytest.raises(FormatError, match="coded stream is corrupt"):
        decode_pools([parse_coded("i8", short, "test")])
