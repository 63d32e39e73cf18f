"""Integer bands as the CPU quantized engine's packed int8 weights: the "int" layout's product on
the CPU, where torch has that engine (fbgemm or oneDNN behind `torch.ops.quantized`).

`torch._int_mm` lays its right operand out anew at every call: a batch-1 input's three digit rows
by 2048x2048 codes took 268 µs, about what the dense float32 product takes. The quantized engine
packs the codes once, at load, at a byte a code, and its product of the same digits took 66 µs
(one-off timings, one thread). Its inputs are bytes with a zero point, and its kernels add pairs of
u8·s8 products in 16 bits, so each input row is written in fixed point as `PACKED_DIGITS` balanced
base-128 digits (-64..63, bytes 0..127 at zero point 64: pairs stay within int16), room for 27
bits and a sign (x / step is rounded in float32, so a row is held to within 2⁻²³ of its largest
entry, as the int layout's base-256 digits hold it); the kernel's float32 output holds each digit
row's int32 sums, exact while they stay below 2²⁴ (bands of up to 2048 columns; wider ones round
a sum as float32 does).

`packed_engine_works` checks once a process, on a product with extreme codes and digits, that the
kernel is there and exact; where it is not (another platform, a torch without it), the bands stay
int8 codes for `torch._int_mm`.
"""
from __future__ import annotations

import functools
import warnings

import torch

PACKED_DIGITS = 4
PACKED_BASE_BITS = 7
PACKED_ZERO_POINT = 64  # a digit d in -64..63 is the byte d + 64
PACKED_LIMIT = 63 << 21  # |x / step| at most this: the top digit stays within ±63
PACKED_BIAS = PACKED_ZERO_POINT * sum(1 << (PACKED_BASE_BITS * k) for k in range(PACKED_DIGITS))
_PACKED_SHIFTS = torch.arange(0, PACKED_BASE_BITS * PACKED_DIGITS, PACKED_BASE_BITS, dtype=torch.int32).view(-1, 1, 1)
_PACKED_WEIGHTS = torch.tensor([[float(1 << (PACKED_BASE_BITS * k)) for k in range(PACKED_DIGITS)]])


def fixed_point(x: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` (N, n) in fixed point: int32 ``round(x / step)`` within ±``limit`` and the
    float32 ``step`` (N, 1), the row's largest magnitude over ``limit`` (1 for a row of zeros; for
    a row with inf or NaN, or so small that ``step`` is subnormal, the numbers mean little and
    callers check ``step``)."""
    x32 = x.float()
    top = x32.abs().amax(1, keepdim=True)
    step = top / limit
    step.masked_fill_(top == 0, 1.0)
    return torch.div(x32, step).round_().to(torch.int32), step


def packed_digits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` (N, n) as `PACKED_DIGITS` balanced base-128 digits: float32 (PACKED_DIGITS * N,
    n), least significant first, each within -64..63, and ``step`` (N, 1) with ``x ≈ step · Σ_k
    128^k · digit_k`` (see `fixed_point` for the rows callers must check)."""
    fixed, step = fixed_point(x, PACKED_LIMIT)
    biased = fixed.add_(PACKED_BIAS).unsqueeze(0)  # within 0 .. 2^28 - 1
    digits = (biased >> _PACKED_SHIFTS.to(x.device)).bitwise_and_((1 << PACKED_BASE_BITS) - 1)
    return digits.view(-1, x.shape[1]).to(torch.float32).sub_(PACKED_ZERO_POINT), step


def combine_packed(sums: torch.Tensor, batch: int) -> torch.Tensor:
    """float32 Σ_k 128^k · sums_k of `packed_product`'s (PACKED_DIGITS * N, r) digit sums: (N, r)."""
    return (_PACKED_WEIGHTS.to(sums.device) @ sums.view(PACKED_DIGITS, -1)).view(batch, -1)


def pack_for_engine(codes: torch.Tensor) -> object:
    """int8 ``codes`` (rows, cols) packed by the quantized engine (its opaque weight object)."""
    rows = codes.shape[0]
    with warnings.catch_warnings():  # torch calls quantized tensors deprecated; the engine is the point
        warnings.simplefilter("ignore")
        weight = torch._make_per_channel_quantized_tensor(
            codes.contiguous(), torch.ones(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.int64), 0)
        return torch.ops.quantized.linear_prepack(weight, None)


def codes_from_engine(packed: object) -> torch.Tensor:
    """The int8 (rows, cols) codes `pack_for_engine` packed."""
    return torch.ops.quantized.linear_unpack(packed)[0].int_repr()


def packed_product(digits: torch.Tensor, packed: object) -> torch.Tensor:
    """float32 ``digits @ codesᵀ`` for float32 digits (R, cols) within -64..63 and packed codes
    (rows, cols): (R, rows), each sum exact below 2²⁴."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        digits, 1.0, PACKED_ZERO_POINT, packed)


def packed_bytes(rows: int, cols: int) -> int:
    """What a packed band holds at least: a byte a code and three 4-byte numbers a row (its column
    offset, scale and zero point). The engine's blocks pad it: resident memory measured 1.01x this
    for 4096x4096 codes, 1.03x for 2048x3000, 1.12x for 1000x777, 1.65x for 4096 rows of 100."""
    return rows * cols + 12 * rows


@functools.lru_cache(maxsize=None)
def packed_engine_works() -> bool:
    """Whether the quantized engine packs int8 codes and multiplies 7-bit digits by them exactly
    here (extreme codes and digits included: a kernel that saturated would show; shapes past the
    engine's blocks in every dimension, and odd sizes, so that each of its code paths runs)."""
    try:
        gen = torch.Generator().manual_seed(0)
        codes = torch.randint(-128, 128, (71, 1103), generator=gen, dtype=torch.int8)
        codes[0], codes[1] = -128, 127
        digits = torch.randint(-64, 64, (131, 1103), generator=gen).float()
        digits[0], digits[1] = -64, 63
        packed = pack_for_engine(codes)
        exact = torch.equal(packed_product(digits, packed).double(), digits.double() @ codes.double().T)
        return exact and torch.equal(codes_from_engine(packed), codes)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
