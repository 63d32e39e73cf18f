"""Entropy-coded pools (FORMAT.md version 2): exact round trips over adversarial code
distributions, coded size against the empirical entropy, the independent decoder, version-1
files still loading, and the planner pricing integer codes at their coded size."""
from __future__ import annotations

import math

import numpy as np
import pytest
import reference_decoder
import torch
from corpus import coded_in_place, rewrite_compressed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import hmcompress.core.build as build_module
import hmcompress.core.candidates as candidates_module
from hmcompress.api import compress_checkpoint
from hmcompress.core.build import CompressionOptions, allowed_error, assemble, compress_matrix
from hmcompress.core.candidates import analyse, build_tree
from hmcompress.core.codecs import auto_codecs
from hmcompress.core.entropy import LANE_SYMBOLS, coded_blob, encode_symbols, quantise_frequencies
from hmcompress.core.plans import optimal_plan
from hmcompress.core.pricing import FIXED_WIDTH, estimate_pricing
from hmcompress.io.checkpoint import Selection
from hmcompress.runtime import CODEC, decode_pools, load_state_dict, parse_coded, pool_from_symbols, read_file

DISTRIBUTIONS = ("single", "uniform", "gaussian", "skewed", "two")


def draw_symbols(kind: str, count: int, bits: int, seed: int) -> np.ndarray:
    """``count`` symbols in [0, 2**bits) from a named distribution, adversarial ones included."""
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    if kind == "single":
        return np.full(count, rng.integers(0, top + 1), dtype=np.int64)
    if kind == "uniform":
        return rng.integers(0, top + 1, count)
    if kind == "gaussian":
        return np.clip(np.round(rng.normal(top / 2, top / 8, count)), 0, top).astype(np.int64)
    if kind == "skewed":  # one symbol nearly always, a rare one at the far end of the alphabet
        return np.where(rng.random(count) < 1e-3, top, 0).astype(np.int64)
    return rng.choice(np.array([0, top]), count)


def runs_for(count: int, length: int) -> np.ndarray:
    """Rows of ``length`` codes holding ``count`` symbols (the last row shorter)."""
    if count == 0:
        return np.zeros((0, 2), dtype=np.int64)
    full, rest = divmod(count, length)
    runs = [[full, length]] if full else []
    return np.array(runs + ([[1, rest]] if rest else []), dtype=np.int64)


def round_trip(codec: str, symbols: np.ndarray, runs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoded pool, expected pool) of symbols coded and decoded by the library."""
    blob = coded_blob(codec, symbols, runs)
    decoded = decode_pools([parse_coded(codec, blob, "test")])[0]
    return decoded, pool_from_symbols(codec, torch.from_numpy(symbols).to(torch.uint8), torch.from_numpy(runs))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec=st.sampled_from(["i4", "i5", "i6", "i7", "i8", "u8"]), kind=st.sampled_from(DISTRIBUTIONS),
       count=st.integers(0, 5000), length=st.integers(1, 70), precision=st.sampled_from([12, 13, 14, 15]),
       seed=st.integers(0, 10**6))
def test_round_trip_is_exact(codec, kind, count, length, precision, seed):
    """Any distribution, any row structure, any pool size, any precision: the pool comes back bit
    for bit, from the library's decoder and from the independent one written from FORMAT.md."""
    symbols = draw_symbols(kind, count, CODEC[codec].bits, seed)
    runs = runs_for(count, length)
    blob = coded_blob(codec, symbols, runs, precision)
    decoded = decode_pools([parse_coded(codec, blob, "test")])[0]
    expected = pool_from_symbols(codec, torch.from_numpy(symbols).to(torch.uint8), torch.from_numpy(runs))
    assert torch.equal(decoded, expected)
    reference = reference_decoder.decode_coded_pool(codec, blob.numpy())
    assert np.array_equal(reference, expected.numpy())


@pytest.mark.parametrize("lane_symbols", [1, 7, LANE_SYMBOLS, 65535])
def test_one_lane_to_one_lane_per_symbol(lane_symbols):
    """The lane count only moves bytes: from a lane per symbol to one lane for all."""
    symbols = draw_symbols("gaussian", 3000, 8, 1)
    coded = encode_symbols(symbols, 256, lane_symbols)
    assert len(coded.states) == math.ceil(3000 / lane_symbols)
    decoded, expected = round_trip("i8", symbols, runs_for(3000, 3000))
    assert torch.equal(decoded, expected)


@pytest.mark.parametrize("by_symbol_slots", [0, 1 << 40])
def test_pools_of_every_precision_decode_together(monkeypatch, by_symbol_slots):
    """Several pools (codecs, sizes, precisions) in one lockstep pass give each its own pool,
    whether each lane looks its symbol's frequency up by slot or by symbol (many pools' tables)."""
    import hmcompress.runtime.entropy as entropy_module

    monkeypatch.setattr(entropy_module, "BY_SYMBOL_SLOTS", by_symbol_slots)
    pools, expected = [], []
    for seed, (codec, kind, count, precision) in enumerate([
            ("i8", "gaussian", 9000, 12), ("i4", "skewed", 300, 15), ("i6", "uniform", 4097, 14),
            ("i5", "single", 1, 13), ("i7", "two", 0, 14), ("i8", "gaussian", 5000, 15)]):
        symbols = draw_symbols(kind, count, CODEC[codec].bits, seed)
        runs = runs_for(count, 33)
        pools.append(parse_coded(codec, coded_blob(codec, symbols, runs, precision), "test"))
        expected.append(pool_from_symbols(codec, torch.from_numpy(symbols).to(torch.uint8), torch.from_numpy(runs)))
    assert {p.precision for p in pools} == {12, 13, 14, 15}
    for got, want in zip(decode_pools(pools), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind,bits", [("gaussian", 8), ("gaussian", 5), ("skewed", 4), ("uniform", 6)])
def test_large_pools_code_near_their_empirical_entropy(kind, bits):
    """Coded bytes within 1% of N times the empirical entropy of the codes, plus the table and the
    lanes' 6 bytes each (0.023 bit a symbol: what matters only where the codes take almost none)."""
    symbols = draw_symbols(kind, 400_000, bits, 3)
    p = np.bincount(symbols) / len(symbols)
    p = p[p > 0]
    entropy_bytes = len(symbols) * float(-(p * np.log2(p)).sum()) / 8
    blob = coded_blob(f"i{bits}", symbols, runs_for(len(symbols), len(symbols)))
    table = 20 + 8 + 2 * (1 << bits)
    lanes = 6 * math.ceil(len(symbols) / LANE_SYMBOLS)
    assert blob.numel() <= 1.01 * entropy_bytes + table + lanes + 64


def test_frequency_tables_are_exact_and_keep_every_symbol():
    counts = np.array([0, 1, 10**6, 3, 0, 1])
    for precision in (12, 13, 14, 15):
        freqs = quantise_frequencies(counts, precision)
        assert freqs.sum() == 1 << precision and np.array_equal(freqs > 0, counts > 0)


def test_coding_is_deterministic():
    symbols = draw_symbols("gaussian", 20_000, 7, 5)
    runs = runs_for(20_000, 100)
    assert torch.equal(coded_blob("i7", symbols, runs), coded_blob("i7", symbols, runs))


def test_builder_stores_coded_pools_at_their_coded_size():
    """A matrix whose codes compress stores coded pools; its bytes are what the file holds."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=gen) * torch.linspace(1, 0.01, 256)
    hm = compress_matrix(w, CompressionOptions(tol=1e-2)).hmatrix
    assert hm.coded
    for codec, blob in hm.coded.items():
        assert blob.numel() < hm.pools[codec].numel() * hm.pools[codec].element_size()
        assert hm.pool_bytes(codec) == blob.numel()


def test_version_1_files_still_load(tmp_path, monkeypatch):
    """A file of version 1 (fixed-width pools) loads to what its version-2 form loads to, in the
    runtime and in the independent decoder; a version-2 file with a coded pool decodes the same."""
    gen = torch.Generator().manual_seed(1)
    source = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(128, 96, generator=gen) * torch.linspace(1, 0.1, 96)}, str(source))
    v2 = tmp_path / "m.hm.safetensors"
    monkeypatch.setattr(build_module, "uniform_build", lambda *_args, **_kwargs: None)  # version 2's codecs only
    compress_checkpoint(source, v2, CompressionOptions(tol=1e-2), Selection(min_size=8))

    def as_version_1(tensors: dict, meta: dict) -> None:
        for name in [n for n in tensors if ".coded." in n]:
            prefix, codec = name.split("coded.")
            decoded = read_file(v2).matrices[prefix.removesuffix(".hm.")].pools[codec]
            tensors[prefix + "pool." + codec] = decoded
            del tensors[name]
        meta["version"] = 1

    def all_coded(tensors: dict, _meta: dict) -> None:
        for name in [n for n in tensors if ".pool.i" in n]:
            prefix, codec = name.split("pool.")
            coded_in_place(tensors, prefix, codec)

    v1 = rewrite_compressed(v2, tmp_path / "v1.hm.safetensors", as_version_1)
    coded = rewrite_compressed(v2, tmp_path / "coded.hm.safetensors", all_coded)
    assert any(".coded." in n for n in reference_decoder.read_container(coded)[0])
    want = load_state_dict(v2)["w"]
    for path in (v1, coded):
        assert torch.equal(load_state_dict(path)["w"], want)
        assert np.array_equal(reference_decoder.decode_file(path).matrices["w"].loaded,
                              want.double().numpy())


def _trained_like(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(256, 192, generator=gen) * torch.linspace(1, 0.05, 192)


def test_integer_codes_are_priced_below_their_width():
    """Gaussian-like rows: every integer codec's codes cost less than their width, and fewer bits
    on longer rows (their absmax step is coarser against the bulk of the values)."""
    pricing = estimate_pricing(_trained_like(0), ("f32", "i8", "i6", "i4"), [32, 64, 128])
    for codec in ("i8", "i6", "i4"):
        assert (pricing.bits[codec] < CODEC[codec].bits).all()
        assert (np.diff(pricing.bits[codec]) < 0).all()
    assert (pricing.bits["i8"] > pricing.bits["i6"]).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_priced_bytes_track_the_file_and_beat_fixed_width_pricing(seed, monkeypatch):
    """The plan's priced bytes are within 5% of the bytes the file stores, and choosing by coded
    prices stores fewer bytes than choosing by fixed widths would, within the same budget."""
    w = _trained_like(seed)
    options = CompressionOptions(tol=1e-2)
    tree = build_tree(tuple(w.shape), options.leaf)
    candidates = analyse(w, tree, auto_codecs(w.dtype))
    plan = optimal_plan(candidates, allowed_error(w, options) ** 2)
    stored = assemble(w, candidates, plan).nbytes
    assert abs(plan.nbytes(candidates) - stored) <= 0.05 * stored
    monkeypatch.setattr(build_module, "uniform_build", lambda *_args, **_kwargs: None)  # planned builds only
    coded = compress_matrix(w, options)
    monkeypatch.setattr(candidates_module, "estimate_pricing", lambda *_args: FIXED_WIDTH)
    fixed = compress_matrix(w, options)
    assert coded.error <= coded.budget and coded.hmatrix.nbytes < fixed.hmatrix.nbytes


# ------------------------------------------------------------------------------------------------
# coded pools by row classes (layout 2, format version 4)

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec=st.sampled_from(["i4", "i6", "i7", "i8", "u8"]), kind=st.sampled_from(DISTRIBUTIONS),
       rows=st.integers(2, 60), length=st.integers(1, 70), classes=st.integers(2, 64), seed=st.integers(0, 10**6))
def test_sectioned_round_trip_is_exact(codec, kind, rows, length, classes, seed):
    """Rows in any classes (empty ones included), any row length and bit width: the pool comes back
    bit for bit from both decoders, and sections decode beside other pools in one pass."""
    from hmcompress.core.coded_pools import sectioned_blob

    rng = np.random.default_rng(seed)
    bits = CODEC[codec].bits
    symbols = draw_symbols(kind, rows * length, bits, seed)
    runs = runs_for(rows * length, length)
    labels = rng.integers(0, classes, rows).astype(np.uint8)
    labels[rng.integers(0, rows)] = classes - 1  # the count of sections is one past the largest class
    blob = sectioned_blob(codec, symbols, runs, labels)
    other = coded_blob(codec, symbols[::-1].copy(), runs)
    expected = pool_from_symbols(codec, torch.from_numpy(symbols).to(torch.uint8), torch.from_numpy(runs))
    decoded, beside = decode_pools([parse_coded(codec, blob, "test"), parse_coded(codec, other, "test")])
    assert torch.equal(decoded, expected)
    assert torch.equal(beside, decode_pools([parse_coded(codec, other, "test")])[0])
    assert np.array_equal(reference_decoder.decode_coded_pool(codec, blob.numpy()), expected.numpy())


def test_rows_of_different_spread_get_tables_of_their_own():
    """The encoder writes layout 2 where the rows' spreads differ (and it is smaller than one
    table: what the estimate promised, within 1%), and one table for rows drawn alike."""
    from hmcompress.core.coded_pools import row_classes, sectioned_blob

    rng = np.random.default_rng(0)
    spread = np.exp(rng.normal(0, 0.8, (512, 1)))
    codes = np.clip(np.round(rng.normal(0, 6, (512, 768)) * spread), -127, 127).astype(np.int64)
    symbols = (codes + 128).reshape(-1)
    runs = np.array([[1, symbols.size]])
    classes = row_classes(symbols, 768, 8)
    assert classes is not None and len(np.unique(classes)) in (2, 4, 8)
    one_table = coded_blob("i8", symbols, runs).numel()
    sectioned = sectioned_blob("i8", symbols, runs, classes).numel()
    assert sectioned < 0.97 * one_table, (sectioned, one_table)
    alike = (np.clip(np.round(rng.normal(0, 6, (512, 768))), -127, 127).astype(np.int64) + 128).reshape(-1)
    assert row_classes(alike, 768, 8) is None


def test_a_file_with_row_classes_is_read_by_every_reader(tmp_path):
    """A matrix whose rows differ in spread is written with row classes (version 4); the runtime and
    the reference decoder read the same weights."""
    gen = torch.Generator().manual_seed(1)
    w = torch.exp(0.8 * torch.randn(256, 1, generator=gen)) * torch.randn(256, 384, generator=gen)
    src = tmp_path / "w.safetensors"
    save_file({"layer.weight": w}, str(src))
    out = tmp_path / "w.hm.safetensors"
    compress_checkpoint(src, out, CompressionOptions(tol=1e-2), Selection(min_size=8))
    cf = read_file(out)
    hm = cf.matrices["layer.weight"]
    layouts = {int(blob[4:8].clone().view(torch.int32)) // 256 for blob in hm.coded.values()}
    assert 2 in layouts and cf.metadata["version"] == 4
    reference = reference_decoder.decode_file(out).matrices["layer.weight"]
    assert np.array_equal(reference.h64, hm.to_dense(torch.float64).numpy())
    assert torch.equal(load_state_dict(out)["layer.weight"], hm.to_dense())
