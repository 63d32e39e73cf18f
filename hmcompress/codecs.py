"""Storage codecs: encoding rows of numbers, their exact cost in bytes and their exact error.

Decoding lives in the runtime (`hmcompress.runtime.decode_rows`), so every error measured here is
the error a user of the file gets.
"""
from __future__ import annotations

import torch

from .runtime import INTEGER_CODECS, POOL_DTYPE, decode_rows, stored_row_length

SCALE_BYTES = 4  # one float32 scale per stored row of an integer codec
INTEGER_LEVELS = {"i8": 127, "i4": 7}
CODEC_OF_DTYPE = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
}
# Unit roundoff of the floating codecs: |fl(x) - x| <= u |x| for values in range.
UNIT_ROUNDOFF = {"f64": 2.0**-53, "f32": 2.0**-24, "f16": 2.0**-11, "bf16": 2.0**-8}


def source_codec(dtype: torch.dtype) -> str:
    """The codec that stores numbers of a checkpoint's dtype without change."""
    return CODEC_OF_DTYPE[dtype]


def auto_codecs(dtype: torch.dtype) -> tuple[str, ...]:
    """Codecs `--precision auto` chooses from: the source dtype and everything cheaper."""
    source = source_codec(dtype)
    wider = ("f32",) if source == "f64" else ()
    others = tuple(c for c in ("f16", "bf16", "i8", "i4") if c != source)
    return (source, *wider, *others)


def row_bytes(codec: str, length: int) -> int:
    """Bytes one stored row of ``length`` numbers costs, its scale included."""
    element = torch.empty((), dtype=POOL_DTYPE[codec]).element_size()
    scale = SCALE_BYTES if codec in INTEGER_CODECS else 0
    return stored_row_length(codec, length) * element + scale


def encode_rows(codec: str, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode a (k, L) float tensor; returns the flat pool slice and the per-row scales (or None).

    Integer codecs use symmetric per-row absmax scales stored as float32; codes are computed with
    that float32 scale so decoding reproduces exactly what was measured.
    """
    if codec not in INTEGER_CODECS:
        return rows.to(POOL_DTYPE[codec]).reshape(-1), None
    levels = INTEGER_LEVELS[codec]
    peak = rows.abs().amax(dim=1) if rows.shape[1] else rows.new_zeros(rows.shape[0])
    scales = (peak / levels).to(torch.float32)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).to(rows.dtype)
    codes = torch.round(rows / safe.unsqueeze(1)).clamp_(-levels, levels)
    codes = torch.where(scales.unsqueeze(1) > 0, codes, torch.zeros_like(codes))
    if codec == "i8":
        return codes.to(torch.int8).reshape(-1), scales
    nibbles = (codes + 8).to(torch.uint8)
    if nibbles.shape[1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1), value=8)
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return packed.reshape(-1), scales


def roundtrip_rows(codec: str, rows: torch.Tensor) -> torch.Tensor:
    """What the rows become after encoding and decoding, in float64 (inf where out of range)."""
    data, scales = encode_rows(codec, rows)
    return decode_rows(codec, data, scales, rows.shape[1], torch.float64)
