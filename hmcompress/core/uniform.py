"""One quantization step for every row: the entropy-coded quantizer near the rate-distortion limit.

Integer pools are stored entropy-coded, so a code costs about what its value carries, not its
width. For a total squared error D the fewest bits then go to a uniform quantizer with the same
step everywhere (each row's error falls as its step squared, its bits as the step's log: equal
steps balance them), which lands within about a quarter of a bit per weight of the rate-distortion
limit at the rates used (issue 18). Absmax scales per row, which the planner's codecs use, give a
row with larger values a coarser step and so spend more bits for the same error.

The uniform build stores the whole matrix as one leaf at one step, stored once, in one of two
layouts:

- narrow: int8 codes (codec `u8`); a row whose largest value needs more than 127 steps keeps a
  step of its own (codec `i8`, the smallest step that holds it; float16 beyond `WIDE_STEPS`);
- two digits, for steps finer than 127 hold (tolerances below about 3e-3 on trained weights):
  each code k = B·hi + lo, |hi| <= 127, -B/2 <= lo < B/2, B a power of two up to 128, stored as
  two dense segments that add, `u8` at step B·s and `u8lo` at step s, each entropy-coded on its
  own: the high digits carry the distribution's shape, the low ones are nearly uniform, so the
  pair costs about what k's entropy is, with 8-bit symbols. B is the one whose pools are
  estimated smallest (a larger B gives the high digits a smaller table); the narrow build's
  values are stored so too where that is smaller (small matrices, whose tables weigh most).

The smaller layout that holds the budget is kept (the narrow one on a tie), and only where it is
smaller than the planned build. Its error is measured like every build's. The compact layers
hold two-digit codes as one int8 code a weight plus sparse corrections for the few beyond int8
(`hmcompress.runtime.digits`), so the layout costs no more memory than the narrow one.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from hmcompress.core.codecs import SCALE_BYTES, roundtrip_rows
from hmcompress.core.coded_pools import estimated_bytes, with_coded_pools
from hmcompress.core.feedback import Feedback, feedback_round, two_sided_round
from hmcompress.core.packer import Packer
from hmcompress.runtime import CODEC, DENSE, ROWS, HMatrix, row_mask

SHARED_CODEC = "u8"  # int8 codes, one step for the segment
LOW_CODEC = "u8lo"  # the low digits of two-digit codes, one step for the segment
MAX_BASE = 128  # the largest B of two-digit codes (low digits in [-64, 64), within int8)
ROW_CODEC = "i8"  # int8 codes, a step per row: rows whose largest value needs more than 127 steps
WIDE_CODEC = "f16"  # rows whose largest value needs more than `WIDE_STEPS` steps
LEVELS = (1 << (CODEC[SHARED_CODEC].bits - 1)) - 1
# Beyond this many steps a row's int8 codes at its own step lose more than float16 costs more, at
# the uniform quantizer's exchange rate (2·ln 2·step²/12 of squared error a bit): about 9 bits a
# number more for float16 against an int8 error per number of (peak/127)²/12 above step²/12.
WIDE_STEPS = 448
SEARCH_STEPS = 8  # steps tried while searching for the largest that holds
MISS_SHRINK = 0.9  # where none of those held: each further step this times the last that missed
HEADROOM = 0.999  # each step tried aims this far below the budget (the error is nearly linear in it)
PRICE_SAMPLE = 1 << 18  # codes whose entropy prices a layout before its search
PRICE_MARGIN = 1.05  # a layout promising more than this times the planned build's bytes is not searched
ROW_BLOCKS = 64  # two-sided rounding: rows in at most this many blocks (each a pass over the columns)
STEP_CLASSES = 2  # two-sided rounding: rows share a step where theirs round to one power of 2^(1/this)
STEP_OCTAVES = 3  # and rows' steps stay within this many factors of two of the build's step
STEP_GAIN_MARGIN = 2  # rows' own steps: their estimated saving over their scales' bytes at least this
MAX_BUMPED = 1 / 8  # share of rows that may need a coarser step than their own to fit int8 codes
# Steps a float32 scale holds, with room for a row's own scale (up to `WIDE_STEPS` steps) to stay finite.
_STEPS = (float(torch.finfo(torch.float32).tiny), float(torch.finfo(torch.float32).max) / (2 * WIDE_STEPS))


def row_groups(work: torch.Tensor, step: float, codecs: tuple[str, ...]) -> list[tuple[str, torch.Tensor]]:
    """(codec, row indices) of the uniform build at ``step``, in codec-id order: rows whose largest
    value fits 127 steps share the step (`SHARED_CODEC`); wider ones have their own (`ROW_CODEC`),
    or are stored as float16 beyond `WIDE_STEPS` steps where ``codecs`` allow it."""
    peak = work.abs().amax(dim=1) if work.shape[1] else work.new_zeros(work.shape[0])
    step32 = torch.tensor(step, dtype=torch.float32)
    fits = (peak / LEVELS).to(torch.float32) <= step32  # exactly where `quantize`'s clamp picks the step
    wide = (peak > WIDE_STEPS * float(step32)) if WIDE_CODEC in codecs else torch.zeros_like(fits)
    groups = ((SHARED_CODEC, fits), (ROW_CODEC, ~fits & ~wide), (WIDE_CODEC, wide))
    chosen = [(codec, torch.nonzero(mask).reshape(-1)) for codec, mask in groups if bool(mask.any())]
    return sorted(chosen, key=lambda group: CODEC[group[0]].id)


def uniform_values(work: torch.Tensor, step: float, codecs: tuple[str, ...],
                   feedback: Feedback | None = None, digits: bool = False,
                   row_feedback: Feedback | None = None) -> torch.Tensor:
    """What the uniform build at ``step`` stores (``digits``: in two-digit codes), in ``work``'s
    dtype, without encoding it; with ``row_feedback``, rounded for the two-sided norm at
    `two_sided_steps` (`feedback.two_sided_round`)."""
    if row_feedback is not None:
        steps, limit = two_sided_steps(work, step, row_feedback)
        return two_sided_round(work, feedback, row_feedback, steps, limit, ROW_BLOCKS)
    if digits:
        step32, base = _digit_codes(work, step)
        limit = LEVELS * base + base // 2 - 1  # high digit floor((k + B/2) / B) within ±127

        def round_column(column: torch.Tensor) -> torch.Tensor:
            return torch.round(column / step32).clamp_(-limit, limit).mul_(step32)
        return round_column(work) if feedback is None else feedback_round(work, feedback, round_column)
    out = torch.empty_like(work)
    for codec, rows in row_groups(work, step, codecs):
        out[rows] = roundtrip_rows(codec, work[rows], feedback, step)
    return out


def narrow_hmatrix(matrix: torch.Tensor, step: float, codecs: tuple[str, ...],
                   feedback: Feedback | None = None) -> HMatrix:
    """``matrix`` as one leaf quantized at ``step`` in `row_groups` (with ``feedback``: rounded
    with error feedback for its norm), its integer pools entropy-coded where that is smaller."""
    m, n = matrix.shape
    work = _work(matrix, feedback)
    packer = Packer()
    groups = row_groups(work, step, codecs)
    for codec, rows in groups:
        if len(groups) == 1:
            packer.add(0, DENSE, codec, 0, [work], feedback, step)
        else:
            packer.add(0, ROWS, codec, rows.numel(), [work[rows]], feedback, step)
            packer.row_masks.append(row_mask(rows, m))
    return with_coded_pools(packer.finish((m, n), matrix.dtype, [[0, 0, m, n, 0]]))


def digits_hmatrix(values: torch.Tensor, step: float, dtype: torch.dtype, base: int | None = None) -> HMatrix:
    """The two-digit build of ``values`` (`uniform_values` at ``step`` with ``digits``: already
    on its grid) as one leaf of a matrix of ``dtype``, its pools entropy-coded where smaller;
    ``base``: B, by default the one `_cheapest_digits` estimates smallest."""
    m, n = values.shape
    step32, smallest = _digit_codes(values, step)
    codes = torch.round(values.double() / step32)
    base = base or _cheapest_digits(_sample(codes), smallest)[1]
    high = torch.floor((codes + base // 2) / base)
    packer = Packer()
    packer.add(0, DENSE, SHARED_CODEC, 0, [high * (base * step32)], None, base * step32)
    packer.add(0, DENSE, LOW_CODEC, 0, [(codes - base * high) * step32], None, step32)
    return with_coded_pools(packer.finish((m, n), dtype, [[0, 0, m, n, 0]]))


def two_sided_steps(work: torch.Tensor, step: float, row_feedback: Feedback) -> tuple[torch.Tensor, int]:
    """Each row's step (float64 holding float32 scales) and the codes' limit where rows are
    rounded for K (`feedback.two_sided_round`).

    Rounding row i in turn adds its rounding error to the loss weighted by 1/U_ii² (U: the factor
    of K⁻¹ in the rows' order), so at a given loss the fewest bits go to steps proportional to
    U_ii (reverse water-filling over the rows), which saves half the log2 of the weights'
    arithmetic over geometric mean a number (0.02 to 0.43 bit on the char transformer's layers,
    a one-off estimate from their K). The format keeps one shared step a block (`SHARED_CODEC`);
    other steps are per-row scales of `ROW_CODEC`, 4 bytes a row. So the rows whose step, ``step``
    times U_ii over U's geometric mean, rounds to the most common power of 2^(1/`STEP_CLASSES`)
    share that one, the others keep their own (coarser where the row's largest value needs more
    than 127 of them), where that saves at least `STEP_GAIN_MARGIN` times the scales' bytes by
    the estimate above and at most `MAX_BUMPED` of the rows need a coarser step. Elsewhere every
    row has ``step``, with two-digit codes' room."""
    m = work.shape[0]
    scales = row_feedback.upper.diagonal().double()
    gain = 0.5 * math.log2(float(scales.pow(-2).mean()) / float(scales.pow(-2).log().mean().exp()))
    logs = torch.empty_like(scales)
    logs[row_feedback.order] = torch.log2(scales) - torch.log2(scales).mean()
    ideal = logs.clamp_(-STEP_OCTAVES, STEP_OCTAVES)
    classes = torch.round(ideal * STEP_CLASSES)
    values, counts = torch.unique(classes, return_counts=True)
    shared = values[torch.argmax(counts)]  # the first (smallest) of the most common
    own = classes != shared
    peak = work.abs().amax(dim=1) if work.shape[1] else work.new_zeros(m)
    fits = torch.log2(peak.clamp_min(1e-300) / (LEVELS * step))
    exponents = torch.where(own, ideal, shared / STEP_CLASSES)
    bumped = fits > exponents
    saves = gain * work.numel() >= STEP_GAIN_MARGIN * 8 * SCALE_BYTES * int((own | bumped).sum())
    if saves and float(bumped.double().mean()) <= MAX_BUMPED and _STEPS[0] <= step * 2.0 ** -STEP_OCTAVES:
        steps = (step * torch.exp2(torch.maximum(exponents, fits))).to(torch.float32).double()
        short = peak > LEVELS * steps  # float32 rounded a bumped step below what its row needs
        steps[short] = torch.nextafter(steps[short].float(), torch.tensor(math.inf)).double()
        if float(steps.max()) <= _STEPS[1]:
            return steps, LEVELS
    step32, base = _digit_codes(work, step)
    return torch.full((m,), step32, dtype=torch.float64), LEVELS * base + base // 2 - 1


def grid_hmatrix(values: torch.Tensor, steps: torch.Tensor, dtype: torch.dtype) -> HMatrix:
    """Values on their rows' grids (`two_sided_steps`) as one leaf: the rows of the most common
    step as narrow int8 codes at that one step, the others as int8 codes at their own scales; or,
    where every row shares the step and the codes do not fit int8, two-digit codes."""
    m, n = values.shape
    distinct, counts = torch.unique(steps, return_counts=True)
    shared = float(distinct[torch.argmax(counts)])
    if len(distinct) == 1 and float(values.abs().max()) / shared > LEVELS:
        return digits_hmatrix(values, shared, dtype)
    packer = Packer()
    if len(distinct) == 1:
        packer.add(0, DENSE, SHARED_CODEC, 0, [values], None, shared)
    else:
        for codec, rows in ((SHARED_CODEC, torch.nonzero(steps == shared)), (ROW_CODEC, torch.nonzero(steps != shared))):
            rows = rows.reshape(-1)
            packer.add(0, ROWS, codec, rows.numel(), [values[rows]], None,
                       shared if codec == SHARED_CODEC else steps[rows].to(torch.float32))
            packer.row_masks.append(row_mask(rows, m))
    return with_coded_pools(packer.finish((m, n), dtype, [[0, 0, m, n, 0]]))


def _cheapest_digits(sample: torch.Tensor, smallest: int) -> tuple[float, int]:
    """(estimated coded bytes of the ``sample`` of codes, B) for the B (a power of two from
    ``smallest``, the least that holds the codes, to `MAX_BASE`) whose two digit pools are
    estimated to take the fewest coded bytes: a larger B leaves the high digits fewer symbols (a
    smaller table) and costs what the low digits depend on the high ones. Any B at least
    ``smallest`` stores the same values."""
    options = []
    base = smallest
    while base <= MAX_BASE:
        high = torch.floor((sample + base // 2) / base)
        options.append((sum(_estimate(d) for d in (high, sample - base * high)), base))
        base *= 2
    return min(options)


def _sample(codes: torch.Tensor) -> torch.Tensor:
    """Up to `PRICE_SAMPLE` of ``codes``, evenly strided."""
    flat = codes.reshape(-1)
    return flat[::max(1, flat.numel() // PRICE_SAMPLE)]


def _estimate(codes: torch.Tensor) -> float:
    """`estimated_bytes` of int8-range codes held as floats."""
    return estimated_bytes(np.bincount((codes + 128).to(torch.int64).numpy(), minlength=256))


def first_step(allowed: float, entries: float) -> float:
    """The step whose rounding error alone would spend the budget (each number's error uniform on
    ±step/2: variance step²/12); none (inf) for no entries."""
    return allowed * math.sqrt(12.0 / entries) if entries > 0 else math.inf


def uniform_build(matrix: torch.Tensor, allowed: float, step: float, codecs: tuple[str, ...],
                  measure: Callable[[torch.Tensor], float], feedback: Feedback | None = None,
                  smaller_than: int | None = None,
                  row_feedback: Feedback | None = None) -> tuple[HMatrix, torch.Tensor, float] | None:
    """The smaller of the narrow and (where ``step`` needs more than 127 steps in some row) the
    two-digit uniform build, each at the largest step found whose measured error is within ``allowed``: (matrix,
    its float64 form, its error), or None if neither held, ``codecs`` lack `ROW_CODEC` (integer
    codes are not allowed), or it takes ``smaller_than`` bytes or more.
    ``step`` is the first step tried (`search_step`); ``measure`` bounds a float64 matrix's
    error; the result is measured again as decoded. A layout whose codes at the first step
    promise more than ``smaller_than`` (`promised_bytes`) is not searched. With ``row_feedback``
    the rows are rounded for the two-sided norm (`uniform_values`) on their grids
    (`two_sided_steps`) and stored as `grid_hmatrix` lays them out."""
    if not allowed > 0 or matrix.numel() == 0 or ROW_CODEC not in codecs:
        return None
    work = _work(matrix, feedback or row_feedback)
    representable = _STEPS[0] <= step <= _STEPS[1]
    if row_feedback is not None:  # values on their rows' grids, kept like two-digit ones (`held_values`)
        if not representable:
            return None
        modes = [True]
    else:
        modes = [False, True] if representable and float(work.abs().max()) > LEVELS * step else [False]
    built = {}
    for digits in modes:
        held_values: list[torch.Tensor] = []  # two digits: the values at the last step that held, the largest

        def error_at(s: float) -> float:
            values = uniform_values(work, s, codecs, feedback, digits, row_feedback)
            error = measure(values.double())
            if digits and error <= allowed:
                held_values[:] = [values]  # encoded as they are: rounding them again costs a feedback pass
            return error
        first = None
        if smaller_than is not None and _STEPS[0] <= step <= _STEPS[1]:
            values = uniform_values(work, step, codecs, feedback, digits, row_feedback)
            first = measure(values.double())
            if promised_bytes(values, step, first, allowed) > PRICE_MARGIN * smaller_than:
                continue
            held_values[:] = [values] if digits and first <= allowed else []
        held = search_step(step, allowed, error_at, first)
        if held is None:
            continue
        if row_feedback is not None:
            hm = grid_hmatrix(held_values[0], two_sided_steps(work, held, row_feedback)[0], matrix.dtype)
        elif digits:
            hm = digits_hmatrix(held_values[0], held, matrix.dtype)
        else:
            hm = narrow_hmatrix(matrix, held, codecs, feedback)
        dense = hm.to_dense(torch.float64)
        base = _split_base(dense, held) if set(hm.pools) == {SHARED_CODEC} else None
        if base is not None:
            split = digits_hmatrix(dense, held, matrix.dtype, base)  # the same values, which may code smaller
            if split.nbytes < hm.nbytes and torch.equal(split.to_dense(torch.float64), dense):
                hm = split
        error = measure(dense)
        if error <= allowed:
            built[digits] = (hm, dense, error)
    chosen = min(built.values(), key=lambda b: b[0].nbytes, default=None)  # narrow first: it wins ties
    return chosen if chosen is not None and (smaller_than is None or chosen[0].nbytes < smaller_than) else None


def _split_base(values: torch.Tensor, step: float) -> int | None:
    """The B at which the narrow build's ``values`` (codes within ±127 steps) are estimated, from
    a sample, to code smaller as two digits (small matrices: the high digits' table is smaller);
    None where one pool is estimated smaller."""
    step32, smallest = _digit_codes(values, step)
    sample = torch.round(_sample(values).double() / step32)
    size, base = _cheapest_digits(sample, smallest)
    return base if size < _estimate(sample) else None


def promised_bytes(values: torch.Tensor, step: float, error: float, allowed: float) -> float:
    """About the bytes of a uniform build whose values at ``step`` measured ``error``: the
    empirical entropy of their codes (on at most `PRICE_SAMPLE` of them) plus log2(error /
    allowed) a number (the step that spends the budget; the error is nearly proportional to the
    step), without the pools' tables, lanes and scales."""
    flat = values.reshape(-1)
    codes = torch.round(flat[::max(1, flat.numel() // PRICE_SAMPLE)].double() / step)
    counts = torch.unique(codes, return_counts=True)[1].double()
    share = counts / counts.sum()
    bits = float(-(share * torch.log2(share)).sum())
    if error > 0 and math.isfinite(error):
        bits += math.log2(error / allowed)
    return max(bits, 0.0) * flat.numel() / 8


def search_step(step: float, allowed: float, error_at: Callable[[float], float],
                first: float | None = None) -> float | None:
    """The largest step found (of `SEARCH_STEPS` tried) whose ``error_at`` is within ``allowed``
    (``first``: the error at ``step`` where it is known), or None. Each next step scales the last
    by budget / error (the error of a uniform quantizer is nearly proportional to its step),
    between the largest that held and the smallest that missed once both are known. Coarse steps
    (a few levels a row) err far from proportionally to the step, and the search can creep down
    by a percent a try without holding: where none held, up to `SEARCH_STEPS` more steps follow,
    each `MISS_SHRINK` times the last that missed."""
    held, missed = _search(step, allowed, error_at, first)
    for _ in range(SEARCH_STEPS if not held and missed < math.inf else 0):
        step = missed * MISS_SHRINK
        if not _STEPS[0] <= step <= _STEPS[1]:
            break
        error = error_at(step)
        if not math.isfinite(error):
            break
        if error <= allowed:
            return step
        missed = step
    return held or None


def _search(step: float, allowed: float, error_at: Callable[[float], float],
            first: float | None) -> tuple[float, float]:
    """`search_step`'s first `SEARCH_STEPS` tries: (the largest step that held or 0, the smallest
    that missed or inf)."""
    held, missed = 0.0, math.inf
    for _ in range(SEARCH_STEPS):
        if not _STEPS[0] <= step <= _STEPS[1]:  # a step (or a row's scale) float32 cannot hold
            break
        error = error_at(step) if first is None else first
        first = None
        if not math.isfinite(error):
            break
        if error <= allowed:
            held = step
            if error >= HEADROOM * HEADROOM * allowed:
                break
        else:
            missed = step
        step = step * HEADROOM * allowed / error if error > 0 else 2 * step
        if missed < math.inf and not held < step < missed:
            step = math.sqrt(held * missed) if held else missed / 2
    return held, missed


def _digit_codes(work: torch.Tensor, step: float) -> tuple[float, int]:
    """(the step as its float32 scale stores it, B: the smallest power of two from 2 to
    `MAX_BASE` whose two-digit codes hold the matrix's largest value at it)."""
    step32 = float(torch.tensor(step, dtype=torch.float32))
    peak = float(work.abs().max()) / step32 if work.numel() else 0.0
    base = 2
    while base < MAX_BASE and LEVELS * base + base // 2 - 1 < peak:
        base *= 2
    return step32, base


def _work(matrix: torch.Tensor, feedback: Feedback | None) -> torch.Tensor:
    """The precision rows are rounded in: float64 with feedback (as `codecs.quantize` does), else
    the planner's (float32 unless the matrix is float64)."""
    return matrix.double() if feedback is not None or matrix.dtype == torch.float64 else matrix.float()
