"""The rate-distortion figures of the report (issue 18, "the limit, printed"): the Gaussian rate
bounds Shannon's lower bound from above for any distribution, both match the closed forms where
they are known, no quantizer beats the lower bound, and compress / report carry them."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import torch
from helpers import random_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

from hmcompress.core.ratedistortion import entry_variance, gaussian_rate, rate_figures, shannon_lower_bound

HIGH_RATE_GAP = 0.5 * math.log2(math.pi * math.e / 6)  # entropy-coded uniform quantizer over the lower bound


def sample(kind: str, seed: int, n: int = 256) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, n, generator=gen, dtype=torch.float64)
    if kind == "laplace":
        u = torch.rand(n, n, generator=gen, dtype=torch.float64) - 0.5
        return -u.sign() * torch.log1p(-2 * u.abs())
    if kind == "uniform":
        return torch.rand(n, n, generator=gen, dtype=torch.float64)
    if kind == "spiky":  # a few huge outliers on a Gaussian bulk, as trained weights have
        x = torch.randn(n, n, generator=gen, dtype=torch.float64)
        x.view(-1)[:: n * 7] *= 200
        return x
    if kind == "two-valued":
        return torch.randint(0, 2, (n, n), generator=gen).double() * 2 - 1
    return torch.randn(n, 1, generator=gen, dtype=torch.float64).exp() * torch.randn(n, n, generator=gen)  # rows


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["gaussian", "laplace", "uniform", "spiky", "two-valued", "rows"]),
       seed=st.integers(0, 2**31 - 1), rel=st.floats(1e-4, 0.5))
def test_the_lower_bound_never_exceeds_the_gaussian_rate(kind, seed, rel):
    """The Gaussian has the largest entropy of its variance: Shannon's bound for any histogram
    density stays below ½·log2(σ²/D) (plus the bins' own spread: a hundredth of a bit)."""
    x = sample(kind, seed)
    distortion = rel * entry_variance(x)
    gaussian, lower = rate_figures(x, distortion)
    assert 0 <= lower <= gaussian + 0.01  # bins of width w add w²/12 to the variance


def test_closed_forms():
    """Gaussian: both figures ½·log2(σ²/D); Laplace: the lower bound 0.104 bit below (its entropy
    deficit); uniform on [0, 1]: h = 0, so -½·log2(2πe·D)."""
    d = 1e-4
    g = sample("gaussian", 0, 1024)
    assert abs(gaussian_rate(entry_variance(g), d) - 0.5 * math.log2(entry_variance(g) / d)) < 1e-12
    assert abs(shannon_lower_bound(g, d) - 0.5 * math.log2(entry_variance(g) / d)) < 0.01
    lap = sample("laplace", 1, 1024)
    deficit = 0.5 * math.log2(2 * math.pi * math.e * entry_variance(lap)) - math.log2(2 * math.e * (entry_variance(lap) / 2) ** 0.5)
    assert abs(gaussian_rate(entry_variance(lap), d) - shannon_lower_bound(lap, d) - deficit) < 0.01
    u = sample("uniform", 2, 1024)
    assert abs(shannon_lower_bound(u, d) + 0.5 * math.log2(2 * math.pi * math.e * d)) < 0.01


def test_no_uniform_quantizer_beats_the_lower_bound():
    """The empirical entropy of a uniform quantizer's codes at its measured error is at least the
    lower bound, and at high rate about 0.254 bit above it."""
    x = sample("laplace", 3, 1024)
    for step in (0.3, 0.03, 0.003):
        codes = torch.round(x / step)
        distortion = float((codes * step - x).square().mean())
        _counts = torch.unique(codes, return_counts=True)[1].double() / codes.numel()
        entropy = float(-(_counts * _counts.log2()).sum())
        lower = shannon_lower_bound(x, distortion)
        assert entropy >= lower - 0.01
        if step < 0.05:
            assert abs(entropy - lower - HIGH_RATE_GAP) < 0.05


def test_degenerate_inputs():
    assert rate_figures(torch.ones(8, 8), 0.1) == (0.0, 0.0)  # a constant costs nothing
    assert rate_figures(torch.randn(8, 8), 0.0) == (None, None)  # exact storage: no finite rate
    assert rate_figures(torch.tensor([[math.inf, 1.0]]), 0.1) == (None, None)
    assert rate_figures(torch.zeros(0, 4), 0.1) == (None, None)
    big = torch.full((64, 64), 1e6, dtype=torch.float64)
    big[0, 0] += 1e-3  # a large mean over a tiny spread: no cancellation
    assert abs(entry_variance(big) - (1e-3) ** 2 * (1 / 4096) * (1 - 1 / 4096)) < 1e-12


def test_compress_and_report_carry_the_figures(tmp_path):
    source = random_checkpoint(tmp_path / "model.safetensors", 2, 128)
    out = tmp_path / "model.hm.safetensors"
    run = subprocess.run([sys.executable, "-m", "hmcompress", "compress", str(source), "-o", str(out), "--tol", "1e-2",
                          "--json", "-q"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)["results"][0]
    layers = [layer for layer in result["layers"] if layer["compressed"]]
    assert layers
    for layer in layers:
        assert abs(layer["bits_per_weight"] - 8 * layer["bytes_after"] / math.prod(layer["shape"])) < 1e-6
        assert 0 < layer["rd_lower_bits"] <= layer["rd_gaussian_bits"] + 1e-3
    report = subprocess.run([sys.executable, "-m", "hmcompress", "report", str(out), "--wide"], capture_output=True,
                            text=True)
    assert report.returncode == 0 and "R(D) gauss/lower" in report.stdout and "bits/entry stored" in report.stdout
