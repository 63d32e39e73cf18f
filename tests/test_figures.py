"""Every recorded figure holds for what users load, measured independently.

H64 and H (H64 rounded once to the source dtype, what ``decompress`` and ``hmruntime`` return)
come from `reference_decoder` (NumPy, written from docs/FORMAT.md), which must agree bit for bit
with the runtime and the bundled shim; errors are measured with `measure` (exact Frobenius
norms, float64 SVDs with rigorous ranges), never with the tool's own code.
"""
from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys
import tempfile

import corpus
import measure
import numpy as np
import pytest
import reference_decoder as ref
import torch
from helpers import bits
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from safetensors.torch import save_file

from hmcompress.core.bounds import frobenius_relative_error
from hmcompress.core.build import CompressionOptions, as_matrix, compress_matrix, error_bound, measured_error
from hmcompress.core.stats import layer_stats
from hmcompress.io.writer import write_compressed
from hmcompress.runtime import HMatrix, load_state_dict, read_file
from hmcompress.runtime.bundle import shim_source
from hmcompress.runtime.matrix import round_to_dtype

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPE_NAME = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}
# Magnitudes well inside each dtype's normal range (largest, smallest).
RANGE = {torch.float16: (1e3, 1e-2), torch.bfloat16: (1e30, 1e-30), torch.float32: (1e30, 1e-30),
         torch.float64: (1e150, 1e-150)}
KINDS = ["random", "lowrank", "decay", "row_magnitudes", "outlier", "zero_rows", "scaled", "zero"]


def say(text: str) -> None:
    """A note shown with a failing hypothesis example."""
    if currently_in_test_context():
        note(text)


def adversarial(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A source tensor of ``dtype``: random, structured, or built to stress the bounds."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape[0], math.prod(shape[1:])
    big, small = RANGE[dtype]
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if kind == "lowrank":
        rank = 1 + seed % 3
        w = torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, n, generator=gen,
                                                                                   dtype=torch.float64)
    elif kind == "decay":
        u, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        k = min(m, n)
        w = (u[:, :k] * torch.logspace(0, -6, k, dtype=torch.float64)) @ v[:, :k].T
    elif kind == "row_magnitudes":  # rows from the smallest to the largest magnitude
        w = w * torch.logspace(math.log10(small), math.log10(big), m, dtype=torch.float64)[:, None]
    elif kind == "outlier":  # one huge entry in small noise
        w = w * 1e-3
        w.view(-1)[int(torch.randint(0, m * n, (1,), generator=gen))] = big
    elif kind == "zero_rows":
        w[torch.rand(m, generator=gen) < 0.5] = 0
    elif kind == "scaled":
        w = w * (big if seed % 2 else small)
    elif kind == "zero":
        w = torch.zeros(m, n, dtype=torch.float64)
    return w.to(dtype).reshape(shape)


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    """The bundled ``hmruntime.py``, imported from a file as a user would."""
    directory = tmp_path_factory.mktemp("shim")
    path = directory / "hmruntime.py"
    path.write_text(shim_source("test"))
    spec = importlib.util.spec_from_file_location("hmruntime_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def compress_and_write(directory: pathlib.Path, w: torch.Tensor, options: CompressionOptions,
                       name: str = "w") -> tuple[pathlib.Path, dict]:
    """Compress ``w`` as `hmcompress compress` does (the tensor's matrix view, its stats) and write it."""
    result = compress_matrix(as_matrix(w), options)
    stats = layer_stats(name, w, result.hmatrix, result.dense, result.error, result.budget, result.root_sigma,
                        options, result.strategy).to_json()
    path = directory / f"{name}.hm.safetensors"
    header = {"options": {"tol": options.tol, "absolute": options.absolute}, "source": {"file": "x", "kind": "test"},
              "extra": {}}
    write_compressed(path, {name: (result.hmatrix, {"orig_shape": list(w.shape), "stats": stats})}, {}, header)
    return path, stats


def assert_same_bits_everywhere(path: pathlib.Path, name: str, decoded: ref.Matrix, shim) -> None:
    """The reference decoder, the runtime (H64 and H) and the bundled shim agree bit for bit."""
    compressed = read_file(path)
    h64 = compressed.matrices[name].to_dense(torch.float64)
    assert np.array_equal(bits(h64), decoded.h64.view(np.uint64)), "H64 differs from the reference"
    for loaded in (compressed.dense(name), load_state_dict(path)[name], shim.load_state_dict(path)[name]):
        assert tuple(loaded.shape) == decoded.orig_shape and DTYPE_NAME[loaded.dtype] == decoded.dtype
        assert np.array_equal(bits(loaded), decoded.bits), "H differs from the reference"


def assert_figures_hold(w: np.ndarray, decoded: ref.Matrix, stats: dict, options: CompressionOptions) -> None:
    """Every recorded figure against independent measurements of both forms of the stored matrix."""
    norm2 = measure.sq_fro(w)
    budget2, tol2 = measure.sq(stats["budget"]), measure.sq(options.tol)
    # the budget is within the tolerance of the exact ||W||_F
    assert budget2 <= (tol2 if options.absolute else tol2 * norm2)
    spectrum_w = measure.spectrum(w) if w.size else None
    for label, h in (("H", decoded.loaded_matrix), ("H64", decoded.h64)):
        err2 = measure.sq_fro(w, h)  # exact
        say(f"{label}: ||W - H||_F = {math.sqrt(err2)}, budget {stats['budget']}, recorded {stats['fro_error']}")
        assert err2 <= budget2, label
        assert err2 <= measure.sq(stats["fro_error"]), label
        assert err2 <= measure.sq(stats["rel_error"]) * norm2, label
        if not w.size:
            continue
        residual = measure.spectrum(w, h)
        low, _high = residual.top_range
        say(f"{label}: ||W - H||_2 in {residual.top_range}, recorded {stats['spectral_error']}")
        assert low <= stats["spectral_error"], label
        spectrum_h = measure.spectrum(h)
        # Weyl, as the kappa bound uses it: every singular value moves by at most e2
        moved = np.abs(spectrum_h.sigma - spectrum_w.sigma).max() - spectrum_h.radius - spectrum_w.radius
        assert moved <= stats["spectral_error"], label
        if stats["kappa_h_bound"] is not None:
            kappa_low, _ = measure.kappa_range(spectrum_h)
            say(f"{label}: kappa(H) >= {kappa_low}, recorded bound {stats['kappa_h_bound']}")
            assert kappa_low <= stats["kappa_h_bound"], label
    if w.size:
        top_low, _ = spectrum_w.top_range
        assert top_low <= stats["sigma_max_upper"]
        assert stats["sigma_min_lower"] <= float(spectrum_w.sigma[-1]) + spectrum_w.radius


def check_everything(w: torch.Tensor, options: CompressionOptions, shim) -> tuple[ref.Matrix, dict]:
    with tempfile.TemporaryDirectory() as directory:
        path, stats = compress_and_write(pathlib.Path(directory), w, options)
        decoded = ref.decode_file(path).matrices["w"]
        assert_same_bits_everywhere(path, "w", decoded, shim)
    matrix = w.double().numpy().reshape(decoded.shape)
    assert_figures_hold(matrix, decoded, stats, options)
    return decoded, stats


def options_for(w: torch.Tensor, tol: float, absolute: bool, strategy: str, precision: str,
                leaf: int) -> CompressionOptions:
    if absolute:  # an absolute tolerance of the same size: tol times ||W||_F
        tol = tol * float(torch.linalg.vector_norm(w.double())) if w.numel() else tol
    return CompressionOptions(tol=tol, absolute=absolute, strategy=strategy, precision=precision, leaf=leaf)


TOLS = [0.0, 1e-4, 1e-3, 1e-2, 0.1, 0.5]


# ------------------------------------------------------------------------------------ properties

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), dtype=st.sampled_from(DTYPES), m=st.integers(1, 40), n=st.integers(1, 40),
       tol=st.sampled_from(TOLS), absolute=st.booleans(), strategy=st.sampled_from(["optimal", "paper"]),
       precision=st.sampled_from(["auto", "keep"]), leaf=st.sampled_from([2, 4, 8, 16]), seed=st.integers(0, 999))
def test_recorded_figures_hold_for_what_users_load(shim, kind, dtype, m, n, tol, absolute, strategy, precision,
                                                   leaf, seed):
    w = adversarial(kind, (m, n), dtype, seed)
    check_everything(w, options_for(w, tol, absolute, strategy, precision, leaf), shim)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["random", "lowrank", "row_magnitudes", "outlier"]), dtype=st.sampled_from(DTYPES),
       out=st.integers(1, 24), inputs=st.integers(1, 4), kernel=st.sampled_from([(1, 1), (3, 3), (1, 3), (2, 2, 2)]),
       tol=st.sampled_from(TOLS), absolute=st.booleans(), strategy=st.sampled_from(["optimal", "paper"]),
       precision=st.sampled_from(["auto", "keep"]), seed=st.integers(0, 999))
def test_conv_kernels_are_their_matrix_view_and_their_figures_hold(shim, kind, dtype, out, inputs, kernel, tol,
                                                                   absolute, strategy, precision, seed):
    w = adversarial(kind, (out, inputs, *kernel), dtype, seed)
    decoded, _stats = check_everything(w, options_for(w, tol, absolute, strategy, precision, 4), shim)
    # the loaded kernel is the decoded matrix in C order: entry [r, c] of H is kernel entry r*n + c
    assert decoded.bits.shape == tuple(w.shape)
    assert np.array_equal(decoded.bits.reshape(decoded.shape), ref.round_to_bits(decoded.h64, decoded.dtype))


# ------------------------------------------------------------------------------------ adversarial cases

ADVERSARIAL = [  # (kind, shape, dtype, options): the examples and their relatives
    ("row_magnitudes", (128, 128), torch.bfloat16, dict(tol=1e-2, precision="keep")),
    ("row_magnitudes", (128, 128), torch.bfloat16, dict(tol=1e-2, precision="auto")),
    ("outlier", (96, 80), torch.float32, dict(tol=1e-2, strategy="paper")),
    ("outlier", (96, 80), torch.bfloat16, dict(tol=1e-2, strategy="paper")),
    ("lowrank", (80, 64), torch.bfloat16, dict(tol=1e-2)),
    ("lowrank", (80, 64), torch.float16, dict(tol=1e-3, precision="keep")),
    ("zero_rows", (64, 80), torch.bfloat16, dict(tol=1e-2)),
    ("decay", (64, 64), torch.float32, dict(tol=1e-4)),
    ("scaled", (48, 40), torch.float64, dict(tol=1e-2)),
    ("row_magnitudes", (64, 48), torch.float64, dict(tol=1e-2, absolute=True)),
]


@pytest.mark.parametrize("kind, shape, dtype, changes", ADVERSARIAL,
                         ids=[f"{k}-{DTYPE_NAME[d]}-{'-'.join(f'{a}={b}' for a, b in c.items())}"
                              for k, _s, d, c in ADVERSARIAL])
def test_adversarial_matrices(shim, kind, shape, dtype, changes):
    w = adversarial(kind, shape, dtype, seed=1)
    options = dict(changes)
    if options.pop("absolute", False):
        options.update(absolute=True, tol=options["tol"] * float(torch.linalg.vector_norm(w.double())))
    check_everything(w, CompressionOptions(**options), shim)


@pytest.mark.parametrize("scale", [1e-170, 1e-150, 1e150, 1e170])
def test_float64_entries_whose_squares_leave_the_range(shim, scale):
    """Squares of 1e-170 underflow and of 1e170 overflow in float64: the measured error still
    bounds the exact one, tightly (the norms scale each chunk by a power of two first)."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(40, 32, generator=gen, dtype=torch.float64) * scale
    h = w + torch.randn(40, 32, generator=gen, dtype=torch.float64) * (scale * 1e-3)
    exact = math.sqrt(measure.sq_fro(w.numpy() / scale, h.numpy() / scale)) * scale
    measured = measured_error(w, h, torch.float64)
    assert abs(measured - exact) <= exact * frobenius_relative_error(tuple(w.shape))
    assert exact <= error_bound(w, h, torch.float64) <= exact * (1 + 1e-9)
    check_everything(w, CompressionOptions(tol=1e-2), shim)


# ------------------------------------------------------------------------------------ rounding once

def test_rounding_is_once_from_float64(shim, tmp_path):
    assert float(round_to_dtype(torch.tensor([1 + 2**-8 + 2**-30], dtype=torch.float64), torch.bfloat16)) == 1.0078125
    assert float(round_to_dtype(torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64), torch.float16)) == 1 + 2**-10
    # (torch's own conversion goes through float32 and gives 1.0 for both)
    # A bfloat16 matrix whose stored float64 value needs it: decoded by the runtime, the shim and the reference.
    for dtype, value, expected in ((torch.bfloat16, 1 + 2**-8 + 2**-30, 1.0078125),
                                   (torch.float16, 1 + 2**-11 + 2**-40, 1 + 2**-10)):
        hm = HMatrix((1, 1), dtype, torch.tensor([[0, 0, 1, 1, 0]], dtype=torch.int32),
                     torch.tensor([[0, 0, 0, 0, 0, -1]], dtype=torch.int32),
                     {"f64": torch.tensor([value], dtype=torch.float64)}, {})
        assert float(hm.to_dense()) == expected
        path = tmp_path / f"{DTYPE_NAME[dtype]}.hm.safetensors"
        write_compressed(path, {"w": (hm, {"orig_shape": [1, 1], "stats": {}})}, {}, corpus_header())
        decoded = ref.decode_file(path).matrices["w"]
        assert float(decoded.loaded[0, 0]) == expected
        assert_same_bits_everywhere(path, "w", decoded, shim)


def corpus_header() -> dict:
    return {"options": {"tol": 0.01}, "source": {"file": "x", "kind": "test"}, "extra": {}}


def edge_values() -> np.ndarray:
    """float64 values around every rounding hazard of float16, bfloat16 and float32: ties and
    their neighbours, subnormals, the overflow thresholds, float64 subnormals, signed zeros."""
    values = [0.0, -0.0, np.inf, -np.inf, 5e-324, -5e-324, 2.0**-1022, 1.7976931348623157e308]
    for fraction_bits, least, largest in ((10, -24, 65504.0), (7, -133, 3.3895313892515355e38),
                                          (23, -149, 3.4028234663852886e38)):
        spacing = 2.0 ** (np.arange(least, 128))
        for base in (1.0, 1.5, 1.25):
            for step in spacing[::7]:
                tie = base * step * 2.0**fraction_bits + step / 2
                values += [tie, np.nextafter(tie, 0), np.nextafter(tie, np.inf)]
        ulp = 2.0 ** (math.floor(math.log2(largest)) - fraction_bits)
        threshold = largest + ulp / 2
        values += [largest, threshold, np.nextafter(threshold, 0), np.nextafter(threshold, np.inf)]
        values += [2.0**least * k / 4 for k in range(1, 12)]
    values = np.array(values, dtype=np.float64)
    return np.concatenate([values, -values])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_round_to_dtype_is_correctly_rounded(dtype):
    """The runtime's rounding against the reference decoder's integer rounding (and NumPy's own
    float64 -> float16/float32 conversion), bit for bit, on hazards and on random values."""
    rng = np.random.default_rng(0)
    randoms = rng.standard_normal(200_000) * np.exp2(rng.uniform(-160, 140, 200_000))
    values = np.concatenate([edge_values(), randoms])
    with np.errstate(over="ignore"):
        runtime = bits(round_to_dtype(torch.from_numpy(values), dtype))
        assert np.array_equal(runtime, ref.round_to_bits(values, DTYPE_NAME[dtype]))
        if dtype in (torch.float16, torch.float32):
            numpy_type = np.float16 if dtype == torch.float16 else np.float32
            assert np.array_equal(runtime, values.astype(numpy_type).view(runtime.dtype))


# ------------------------------------------------------------------------------------ verify

def test_verify_fails_a_spectral_error_that_holds_only_for_the_float64_form(cli, tmp_path):
    """The tool before this check measured ||W - H64||_2 only; on this bfloat16 matrix the
    loaded H's is 6% larger. A file recording the float64 form's figure must fail `verify`."""
    w = adversarial("row_magnitudes", (128, 128), torch.bfloat16, seed=0)
    original = tmp_path / "model.safetensors"
    save_file({"w": w}, str(original))
    good = tmp_path / "good.hm.safetensors"
    assert cli("compress", original, "-o", good, "--tol", "1e-2", "--min-size", "8", "--quiet").code == 0
    decoded = ref.decode_file(good).matrices["w"]
    matrix = w.double().numpy()
    _low64, high64 = measure.spectrum(matrix, decoded.h64).top_range
    low, _high = measure.spectrum(matrix, decoded.loaded_matrix).top_range
    assert low > 1.05 * high64  # the case: the loaded form's error is well above the float64 form's
    assert cli("verify", good, "--original", original).code == 0
    bad = corpus.rewrite_compressed(
        good, tmp_path / "bad.hm.safetensors",
        lambda _tensors, meta: meta["matrices"]["w"]["stats"].update(spectral_error=high64 * (1 + 1e-6)))
    run = cli("verify", bad, "--original", original, "--json")
    assert run.code == 1, run.stdout
    (check,) = json.loads(run.stdout)["matrices"]
    assert any("‖W − H‖₂ above its recorded bound (H as loaded (bfloat16))" in p for p in check["problems"])
    assert not any("(H in float64)" in p for p in check["problems"]), check["problems"]


def test_files_with_the_former_stat_names_still_report_and_verify(cli, tmp_path):
    """Files of hmcompress 0.1 call the sigma bounds "sigma_max" and "sigma_min"."""
    directory = tmp_path / "c"
    directory.mkdir()
    good = corpus.good_compressed(directory)

    def rename(_tensors, meta):
        stats = meta["matrices"][corpus.COMPRESSED_NAME]["stats"]
        stats["sigma_max"], stats["sigma_min"] = stats.pop("sigma_max_upper"), stats.pop("sigma_min_lower")

    old = corpus.rewrite_compressed(good, tmp_path / "old.hm.safetensors", rename)
    new_layer = _layer(cli, good)
    old_layer = _layer(cli, old)
    assert old_layer["sigma_max_upper"] == new_layer["sigma_max_upper"] > 0
    assert old_layer["sigma_min_lower"] == new_layer["sigma_min_lower"]
    run = cli("verify", old, "--original", directory / "original.safetensors", "--json")
    assert run.code == 0, run.stdout
    bad = corpus.rewrite_compressed(old, tmp_path / "bad.hm.safetensors", lambda _t, meta: meta["matrices"][
        corpus.COMPRESSED_NAME]["stats"].update(sigma_max=old_layer["sigma_max_upper"] * 0.5))
    run = cli("verify", bad, "--original", directory / "original.safetensors", "--json")
    assert run.code == 1
    (check,) = json.loads(run.stdout)["matrices"]
    assert any("σ_max(W) above its recorded bound" in p for p in check["problems"]), check["problems"]


def _layer(cli, path: pathlib.Path) -> dict:
    run = cli("report", path, "--json")
    assert run.code == 0, run.stderr
    return next(layer for layer in json.loads(run.stdout)["layers"] if layer["name"] == corpus.COMPRESSED_NAME)


# ------------------------------------------------------------------------------------ end to end

@pytest.mark.parametrize("flags", [("--tol", "1e-2", "--strategy", "paper", "--precision", "keep"),
                                   ("--tol", "0.05", "--abs")], ids=["relative-paper-keep", "absolute-optimal-auto"])
def test_cli_files_of_every_dtype_and_conv_kernels(cli, shim, tmp_path, flags):
    """`compress --conv` on 2-D matrices and conv kernels of every dtype: `verify` passes, and the
    reference decoder's H is what `decompress` and the shim return, within every recorded figure."""
    tensors = {}
    for i, dtype in enumerate(DTYPES):
        tensors[f"fc{i}.weight"] = adversarial("lowrank" if i % 2 else "random", (48, 40), dtype, seed=i) \
            + adversarial("random", (48, 40), dtype, seed=10 + i) * 0.05
        tensors[f"conv{i}.weight"] = adversarial("random", (16, 4, 3, 3), dtype, seed=20 + i)
    original = tmp_path / "model.safetensors"
    save_file(tensors, str(original))
    out = tmp_path / "model.hm.safetensors"
    run = cli("compress", original, "-o", out, "--conv", "--min-size", "8", "--leaf", "8", *flags, "--json",
              "--quiet")
    assert run.code == 0, run.stderr
    assert cli("verify", out, "--original", original).code == 0
    dense = tmp_path / "dense.safetensors"
    assert cli("decompress", out, "-o", dense).code == 0
    from safetensors.torch import load_file
    decompressed = load_file(str(dense))
    decoded = ref.decode_file(out)
    options = decoded.metadata["options"]
    assert set(decoded.matrices) == set(tensors)
    for name, w in tensors.items():
        matrix = decoded.matrices[name]
        assert matrix.orig_shape == tuple(w.shape) and matrix.shape == tuple(as_matrix(w).shape)
        assert np.array_equal(bits(decompressed[name]), matrix.bits), name
        assert_same_bits_everywhere(out, name, matrix, shim)
        stats = decoded.metadata["matrices"][name]["stats"]
        assert_figures_hold(as_matrix(w).double().numpy(), matrix, stats,
                            CompressionOptions(tol=options["tol"], absolute=options["absolute"]))
