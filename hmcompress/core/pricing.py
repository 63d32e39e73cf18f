"""What a stored row costs the file, as the planner prices it: floats at their width, integer
codes at their entropy-coded size.

Integer pools are stored entropy-coded (`core.entropy`), so a code costs about the empirical
entropy of its codec's codes, not its width: wider codes are cheaper than their width says, and
the planner must see it to pick options by the bytes the file will hold. The entropy is
estimated per codec on a sample of the matrix cut into rows of each block side length (a row's
absmax scale, hence its code spread, depends on its length), plus what the coder's lanes cost.
These are prices for choosing; the file's bytes are measured from the file.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from hmcompress.core.codecs import SCALE_BYTES, quantize, row_bytes
from hmcompress.core.entropy import LANE_BITS
from hmcompress.runtime import CODEC, INTEGER_CODECS

SAMPLE_NUMBERS = 1 << 16  # matrix entries the code entropies are estimated on


@dataclasses.dataclass(frozen=True)
class Pricing:
    """Bits per code of each integer codec at a few row lengths (ascending); none: fixed width."""

    lengths: np.ndarray
    bits: dict[str, np.ndarray]

    def row_bytes(self, codec: str, lengths) -> np.ndarray:
        """Bytes of one stored row for each length, its scale included (vectorised)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if codec not in self.bits:
            return row_bytes(codec, lengths)
        nearest = np.abs(np.log2(np.maximum(lengths, 1))[..., None] - np.log2(self.lengths)).argmin(-1)
        return lengths * self.bits[codec][nearest] / 8 + SCALE_BYTES


FIXED_WIDTH = Pricing(np.ones(1), {})


def estimate_pricing(matrix: torch.Tensor, codecs: tuple[str, ...], lengths: list[int]) -> Pricing:
    """Bits per code of each integer codec among ``codecs`` for rows of each of ``lengths``: the
    entropy of the codes of about `SAMPLE_NUMBERS` entries of ``matrix`` cut into rows of that
    length (every row if the matrix is small), plus `LANE_BITS`, at most the codec's width."""
    integer = [c for c in codecs if c in INTEGER_CODECS]
    if not integer or matrix.numel() == 0:
        return FIXED_WIDTH
    m, n = matrix.shape
    sample = matrix[::max(1, math.ceil(m * n / SAMPLE_NUMBERS))]
    sides = sorted({min(max(1, length), n) for length in lengths})
    bits = {codec: np.empty(len(sides)) for codec in integer}
    for i, side in enumerate(sides):
        rows = sample[:, :n - n % side].reshape(-1, side)
        for codec in integer:
            codes = quantize(codec, rows)[0].reshape(-1)
            codes = codes[torch.isfinite(codes)].to(torch.int64)  # rows beyond float range have no codes
            levels = 1 << CODEC[codec].bits
            p = torch.bincount(codes + levels // 2, minlength=levels).double() / max(1, codes.numel())
            p = p[p > 0]
            entropy = float(-(p * torch.log2(p)).sum())
            bits[codec][i] = min(CODEC[codec].bits, entropy + LANE_BITS)
    return Pricing(np.asarray(sides, dtype=np.float64), bits)
