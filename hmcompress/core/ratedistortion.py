"""How far a layer's stored bits are from the rate-distortion limit at its measured error.

Take a matrix's entries as draws of one memoryless source X. No code that reproduces them with
mean squared error D spends, on average, fewer than R(D) bits an entry, and two figures bracket
R(D) at the D a matrix was stored with:

- `gaussian_rate`: ½·log2(σ²/D), the R(D) of a Gaussian of the entries' variance σ². Among
  sources of that variance the Gaussian needs the most bits, so this is an upper bound on R(D)
  (Cover & Thomas, *Elements of Information Theory*, ch. 10);
- `shannon_lower_bound`: h(X) − ½·log2(2πe·D) (Shannon's lower bound), h the differential entropy
  of the entries' histogram density (piecewise uniform over bins narrower than √D where the
  sample allows): a lower bound on R(D) of that density, tight as D → 0, i.e. at the high rates
  (6 to 8 bits) of tol 1e-2.

An entropy-coded uniform quantizer needs about the Shannon bound + ½·log2(πe/6) ≈ 0.254 bit at
high rate. The entries of a weight matrix are not memoryless (rows differ in scale, blocks in
rank): a code that adapts to that structure may spend fewer bits than either figure, which is
why these are "the limit for a memoryless coder", not a floor for hmcompress.
"""
from __future__ import annotations

import math

import torch

SAMPLE_ENTRIES = 1 << 20  # the histogram is taken over at most this many entries (evenly strided)
MAX_BINS = 1 << 16
MIN_PER_BIN = 16  # at most entries / MIN_PER_BIN bins: sparse bins would understate the entropy
BINS_PER_STEP = 4  # bins per √D, where the sample allows


def rate_figures(matrix: torch.Tensor, distortion: float) -> tuple[float | None, float | None]:
    """(`gaussian_rate`, `shannon_lower_bound`) of a matrix's entries at mean squared error
    ``distortion``; (None, None) for an empty matrix or one with a value that is not finite."""
    if not matrix.numel() or not math.isfinite(distortion):
        return None, None
    variance = entry_variance(matrix)
    if not math.isfinite(variance):
        return None, None
    return gaussian_rate(variance, distortion), shannon_lower_bound(matrix, distortion)


def entry_variance(matrix: torch.Tensor) -> float:
    """The variance of the entries, in float64 a slice of rows at a time (no float64 copy of the
    whole matrix; two passes, so a large mean does not cancel a small spread away)."""
    rows = max(1, SAMPLE_ENTRIES // max(1, matrix.shape[1]))
    slices = [slice(start, start + rows) for start in range(0, matrix.shape[0], rows)]
    mean = sum(float(matrix[part].double().sum()) for part in slices) / matrix.numel()
    return sum(float((matrix[part].double() - mean).square().sum()) for part in slices) / matrix.numel()


def gaussian_rate(variance: float, distortion: float) -> float | None:
    """½·log2(σ²/D) bits an entry, at least 0; None where D = 0 (only exact storage reaches it)."""
    if distortion <= 0:
        return None
    if variance <= distortion:
        return 0.0
    return 0.5 * math.log2(variance / distortion)


def shannon_lower_bound(values: torch.Tensor, distortion: float) -> float | None:
    """h − ½·log2(2πe·D) bits an entry, at least 0, for the histogram density of ``values``
    (finite); None where D = 0."""
    if distortion <= 0:
        return None
    flat = values.reshape(-1)
    if flat.numel() > SAMPLE_ENTRIES:
        flat = flat[:: -(-flat.numel() // SAMPLE_ENTRIES)]
    flat = flat.double()
    low, high = float(flat.min()), float(flat.max())
    if not high > low:  # a constant: zero bits
        return 0.0
    bins = max(1, min(MAX_BINS, flat.numel() // MIN_PER_BIN,
                      math.ceil((high - low) * BINS_PER_STEP / math.sqrt(distortion))))
    counts = torch.histc(flat, bins=bins, min=low, max=high)
    p = counts[counts > 0] / flat.numel()
    entropy = float(-(p * torch.log2(p)).sum()) + math.log2((high - low) / bins)  # h of the density
    return max(0.0, entropy - 0.5 * math.log2(2 * math.pi * math.e * distortion))
