"""Storage codecs: encoding rows of numbers, their exact cost in bytes, and their error.

Decoding lives in the runtime (`hmcompress.runtime.format.decode_rows`); `roundtrip_rows` gives the same
values without the bit packing, for the planner's error estimates. The built matrix is decoded by
the runtime itself and measured in float64 (`build.measured_error`): that is the error reported.
"""
from __future__ import annotations

import torch

from hmcompress.core.feedback import Feedback, feedback_round
from hmcompress.runtime import CODEC, CODEC_TABLE, INTEGER_CODECS, SCALE_DTYPE, pack_codes

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6)
CLIP_MAX_BITS = 6  # wider codes gain nothing measurable from clipping (tested on real checkpoints)
SCALE_BYTES = torch.empty((), dtype=SCALE_DTYPE).element_size()  # per stored row of an integer codec
SOURCE_CODEC = {codec.pool_dtype: codec.name for codec in CODEC_TABLE if not codec.integer}


def source_codec(dtype: torch.dtype) -> str:
    """The codec that stores numbers of a checkpoint's dtype without change."""
    return SOURCE_CODEC[dtype]


def auto_codecs(dtype: torch.dtype) -> tuple[str, ...]:
    """Codecs `--precision auto` chooses from: the source dtype and everything cheaper."""
    source = source_codec(dtype)
    wider = ("f32",) if source == "f64" else ()
    others = tuple(c for c in ("f16", "bf16", "i8", "i7", "i6", "i5", "i4") if c != source)
    return (source, *wider, *others)


def row_bytes(codec: str, length):
    """Bytes one stored row of ``length`` numbers costs, its scale included (ints or numpy arrays;
    a codec with one scale a segment: without it)."""
    spec = CODEC[codec]
    element = torch.empty((), dtype=spec.pool_dtype).element_size()
    return spec.row_length(length) * element + (SCALE_BYTES if spec.integer and not spec.segment_scale else 0)


def encode_rows(codec: str, rows: torch.Tensor, feedback: Feedback | None = None,
                step: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode a (k, L) float tensor; returns the flat pool slice and the per-row scales (or None).
    With ``feedback`` (`core.feedback.Feedback` for a norm G) the rows are rounded with error
    feedback for that norm, else each number to its nearest code; ``step``: see `quantize`."""
    if codec not in INTEGER_CODECS:
        if feedback is not None:
            rows = _feedback_floats(codec, rows, feedback)
        return rows.to(CODEC[codec].pool_dtype).reshape(-1), None
    codes, scales = quantize(codec, rows, feedback, step)
    if CODEC[codec].segment_scale:
        scales = scales[:1]
    if not CODEC[codec].packed:
        return codes.to(CODEC[codec].pool_dtype).reshape(-1), scales
    return pack_codes(codes, CODEC[codec].bits).reshape(-1), scales


def quantize(codec: str, rows: torch.Tensor, feedback: Feedback | None = None,
             step: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (as floats of ``rows``' dtype) and float32 per-row scales of an integer codec.

    Scales are symmetric per row (absmax, or a clipped absmax where that loses less) and stored as
    float32; codes are computed with that float32 scale so decoding reproduces what was measured.
    With ``feedback`` (see `encode_rows`) the codes are rounded with error feedback at those scales.

    ``step``: one step for every row instead (coarser only where a row's largest value needs more
    than the codec's levels at it). For entropy-coded codes that is the better quantizer: a row's
    codes cost what their spread carries, not their width, and at a given total squared error the
    fewest bits go to equal steps (a row's error falls as its step squared, its bits as the
    step's log), where absmax scales give rows with larger values coarser steps.
    """
    bits = CODEC[codec].bits
    levels = (1 << (bits - 1)) - 1
    peak = rows.abs().amax(dim=1) if rows.shape[1] else rows.new_zeros(rows.shape[0])
    if CODEC[codec].segment_scale:  # the one step, whatever the rows' values (codes clamped)
        step = segment_step(codec, [rows]) if step is None else step
        scales = torch.full_like(peak, step, dtype=torch.float32)
    elif step is not None:
        scales = torch.clamp((peak / levels).to(torch.float32), min=step)
    else:
        ratios = CLIP_RATIOS if bits <= CLIP_MAX_BITS else (1.0,)
        scales = _best_scales(rows, peak, levels, ratios)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).to(rows.dtype)
    # A zero scale means an all-zero row (or one below float32's range): its codes round to 0.
    if feedback is not None:
        row_step = safe.double()
        values = feedback_round(rows.double(), feedback,
                                lambda column: torch.round(column / row_step).clamp_(-levels, levels).mul_(row_step))
        return torch.round(values / row_step.unsqueeze(1)).to(rows.dtype), scales
    return torch.round(rows / safe.unsqueeze(1)).clamp_(-levels, levels), scales


def _best_scales(rows: torch.Tensor, peak: torch.Tensor, levels: int,
                 ratios: tuple[float, ...], with_errors: bool = False):
    """Per-row float32 scale minimising the squared error over a few clipping ratios.

    Clipping the largest values a little shrinks the step for all the others; for heavy-tailed rows
    this beats the absmax scale, and absmax (ratio 1) is always among the choices. The search only
    chooses (in float32, which is fast); the chosen scale's error is measured exactly elsewhere.
    ``with_errors`` also returns each row's error norm at its scale, as the search computed it.
    """
    work = rows.float()
    best_scale = (peak / levels).to(torch.float32)
    best_err = None
    if ratios == (1.0,) and not with_errors:
        return best_scale
    for ratio in ratios:
        scale = (peak * ratio / levels).to(torch.float32)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
        err = torch.linalg.vector_norm(torch.round(work / safe).clamp_(-levels, levels).mul_(safe).sub_(work), dim=1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_err = torch.where(better, err, best_err)
    return (best_scale, best_err) if with_errors else best_scale


def segment_step(codec: str, parts: list[torch.Tensor]) -> float:
    """The step of a segment whose rows share one (``segment_scale`` codecs) when none is chosen:
    absmax over all its parts (as a float32, like every scale)."""
    peak = max((float(part.abs().max()) for part in parts if part.numel()), default=0.0)
    return float(torch.tensor(peak / ((1 << (CODEC[codec].bits - 1)) - 1), dtype=torch.float32))


def row_error_norms(codec: str, rows: torch.Tensor) -> torch.Tensor:
    """||roundtrip(row) - row|| of each row of a float32 (k, L) tensor, in float32 (inf where out
    of range): for an integer codec the clipping search's own figure, with no second pass."""
    spec = CODEC[codec]
    if not spec.integer:
        return torch.linalg.vector_norm(roundtrip_rows(codec, rows) - rows, dim=1)
    levels = (1 << (spec.bits - 1)) - 1
    peak = rows.abs().amax(dim=1) if rows.shape[1] else rows.new_zeros(rows.shape[0])
    ratios = CLIP_RATIOS if spec.bits <= CLIP_MAX_BITS else (1.0,)
    return _best_scales(rows, peak, levels, ratios, with_errors=True)[1]


def roundtrip_rows(codec: str, rows: torch.Tensor, feedback: Feedback | None = None,
                   step: float | None = None) -> torch.Tensor:
    """What the rows become after encoding and decoding, in ``rows``' dtype (inf where out of range).

    Integer codes times their float32 scale, without packing the codes into bits and back; in
    float32 the product is rounded (relative 6e-8, far below any code's step), so errors measured
    with it are estimates that the final float64 measurement of the built matrix checks.
    ``feedback``, ``step``: as in `encode_rows`.
    """
    if codec not in INTEGER_CODECS:
        if feedback is not None:
            return _feedback_floats(codec, rows, feedback).to(rows.dtype)
        return rows.to(CODEC[codec].pool_dtype).to(rows.dtype)
    codes, scales = quantize(codec, rows, feedback, step)
    return codes.mul_(scales.to(rows.dtype).unsqueeze(1))


def _feedback_floats(codec: str, rows: torch.Tensor, feedback: Feedback) -> torch.Tensor:
    """Rows rounded to a float codec's numbers with error feedback (float64, exactly representable)."""
    dtype = CODEC[codec].pool_dtype
    return feedback_round(rows.double(), feedback, lambda column: column.to(dtype).double())
