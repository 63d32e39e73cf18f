"""`CompactMatrix`: a compressed matrix held as the file stores it, multiplied without ever forming
a float weight.

Trained weights end, at the tolerances users pick, as integer-coded rows (one float32 scale per
stored row). Those rows are grouped into *bands*, one per column range of the block partition,
each an int8 code matrix laid out (columns, rows) for `torch._int_mm`. A float input cannot meet
int8 codes in that kernel as it is, so each input row is written in fixed point, exactly enough:
three balanced base-256 digits, ``x ≈ step · (d0 + 256·d1 + 65536·d2)`` with ``step = max|x| /
(127·2¹⁶)`` (an error below 2⁻²³ of the row's largest entry, the order of float32's own rounding
of the sums). Integer products of the (3N, n) digits by the codes give every band's exact int32
sums, recombined in float32 and scaled. Where `torch._int_mm` is missing (old torch, CUDA's shape
rules), for float64 models, and for rows with inf, NaN or only subnormal numbers, the codes are
converted to ``dtype`` for the call instead.

Layout "float" (the default below SMALL_MATRIX entries, where each call's count of operations
costs as much as the product) holds the integer codes as H's own: one (m, n) int8 matrix, zero
where no integer row is, with a table of scales, a row of it per column range (`_tile`; where
that would pad the codes by more than TILE_PADDING they stay bands). A call then converts the
codes to float32 and scales them in two operations (H as `load_state_dict` gives it, bit for
bit), adds the few other bands and pairs, and takes one product; where H is a single column range
and the input has fewer rows than columns, the product of the unscaled codes is scaled instead
(one pass over the output, not over H). What stays is one conversion of the codes a call: about
m·n float32 bytes written, 10-20% of a batch-16 product on this CPU.

Two-digit codes (the uniform quantizer's `u8` + `u8lo` blocks) are held as one int8 code a
weight and sparse corrections for the few codes beyond int8 (`digits.join_digits`), which every
layout but "tiles" adds: "float" into the codes it converts (one indexed add of 8 bytes a
correction), "int" as a product of their own (H then equals `load_state_dict`'s within float32
rounding, not bit for bit). Rows and blocks stored in floating codecs form bands of their own, kept at their stored width and
converted for each call. Low-rank blocks beside the bands, up to `MAX_FACTOR_PAIRS` of them, are
*factor pairs*: their two factors' codes as stored, one product by each for a call. Everything
else (more low-rank blocks than that, rows and blocks whose scales or values are not finite) runs
through the tile product of `HLinear` with its factors compact (integer codes with their scales,
floats at their stored width), decoded at each call.
"""
from __future__ import annotations

import functools
import math
import sys
import warnings

import torch
from torch import nn

from hmcompress.runtime.digits import Piece, join_digits
from hmcompress.runtime.format import LOWRANK, ROWS, mask_bytes
from hmcompress.runtime.layers import HLinear
from hmcompress.runtime.matrix import HMatrix, LowRankSegment, RowsSegment
from hmcompress.runtime.packed import (
    codes_from_engine,
    combine_packed,
    fixed_point,
    pack_for_engine,
    packed_bytes,
    packed_digits,
    packed_engine_works,
    packed_product,
)
from hmcompress.runtime.product import tile_product

DIGITS = 3  # balanced base-256 digits of a fixed-point number: 23 bits and a sign
FIXED_LIMIT = 127 << 16  # |x / step| at most this: the top digit stays within ±127
DIGIT_WEIGHTS = (1.0, 256.0, 65536.0)
MAX_BAND_COLUMNS = 1 << 16  # int32 sums of code × digit products (each at most 128²) cannot overflow
MAX_BANDS = 64  # beyond this many column ranges the tile product is the better layout
# The int layout's integer bands hold at most this many codes each, cut by rows (1 MiB: within L2):
# `torch._int_mm` of a batch-1 input's digits by 4096x4096 codes took 4.2 ms in one band, 2.0 ms
# in 16 bands of 256 rows (2048x2048: 0.78 and 0.51 ms).
MAX_BAND_CODES = 1 << 20
# How a `CompactMatrix` runs: integer-coded rows as int8 bands multiplied in integers ("int") or
# held as H's codes and H formed for each call ("float": fewer operations, the better for small
# matrices), or everything through the tile product ("tiles").
LAYOUTS = ("int", "float", "tiles")
SMALLEST_NORMAL = torch.finfo(torch.float32).tiny  # a digits' step below it has lost precision
SMALL_MATRIX = 1 << 18
JOINED_BATCH = 4  # up to this many input rows the int layout joins its bands' sums (fewer operations)
FLOAT_BAND_PADDING = 0.05  # of the stored bytes: what merging the float bands may add in zeros
MAX_FACTOR_PAIRS = 16  # low-rank blocks beside bands taken two products each; more go to the tile product
TILE_PADDING = 0.1  # of the integer codes: what holding them as H's codes may add in zeros
# Up to this many corrections of joined digits, a gather and a scatter add them (int64 rows, 16
# bytes each); beyond, a sparse CSR product (8 bytes each). One-off timings at random positions,
# one thread, batches 1 and 16: 300 in 512 x 512 took 4.1 and 8.6 us gathered, 9.0 and 18.8 us as
# a product; 1045: 5.0 and 21.2 against 9.6 and 20.2; 4000 in 1024 x 1024: 9.5 and 72.7 against
# 12.2 and 36.8; 15,000 in 2048 x 2048: 24.8 and 305 against 18.5 and 83.
GATHERED_CORRECTIONS = 1024
PACKED_SOURCE = "packed"  # a band's source where the quantized engine holds its codes (`packed.py`)
# The engine pads what it packs to its blocks: resident memory measured 1.01x to 1.03x a byte a code
# for bands of 2²⁰ codes and more (2048x512, 512x2048, 4096x4096), 1.12x to 1.36x below (512x512,
# 1024x256, 320x256). Smaller bands stay int8 codes.
MIN_PACKED_CODES = 1 << 20


@functools.lru_cache(maxsize=None)
def int_mm_works(device_type: str) -> bool:
    """Whether `torch._int_mm` multiplies int8 matrices of any shape on this kind of device (and
    `int_digits` can read bytes in little-endian order)."""
    if device_type != "cpu" or not hasattr(torch, "_int_mm") or sys.byteorder != "little":
        return False
    try:
        a, b = torch.ones(3, 5, dtype=torch.int8), torch.ones(5, 7, dtype=torch.int8)
        return bool((torch._int_mm(a, b) == 5).all())
    except RuntimeError:
        return False


def int_digits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` (N, n) as fixed-point digits: (DIGITS * N, n) int8, least significant digit
    first, and the float32 ``step`` (N, 1) with ``x ≈ step * Σ_d DIGIT_WEIGHTS[d] · digit_d``
    (unless the row holds inf or NaN, or its largest entry is below about 2⁻¹⁰³ so that ``step``
    is subnormal: then the digits mean little, and callers check ``step``).

    ``fixed = round(x / step)`` is an int32 within ±127·2¹⁶. Adding 0x8080 and flipping the top
    bit of its two low bytes leaves, in its three low bytes read as int8, the balanced digits
    (each within -128..127, the top one within ±127) of the same number.
    """
    fixed, step = fixed_point(x, FIXED_LIMIT)
    balanced = fixed.add_(0x8080).bitwise_xor_(0x8080).view(torch.int8).view(*x.shape, 4)
    return row_major(balanced.permute(2, 0, 1)[:DIGITS].reshape(DIGITS * x.shape[0], x.shape[1])), step


def _usable_steps(step: torch.Tensor) -> bool:
    """Whether every row's fixed-point ``step`` is a normal float32 (not inf, NaN or subnormal)."""
    low, high = torch.aminmax(step)
    return float(low) >= SMALLEST_NORMAL and float(high) < math.inf


def _packs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a layer on ``device`` in ``dtype`` holds its int layout's integer bands packed."""
    return device.type == "cpu" and dtype != torch.float64 and packed_engine_works()


def row_major(matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` with the strides of a fresh row-major tensor, sizes of one included: CPU
    `torch._int_mm` reads a (1, n) operand of strides (1, 1), which `.contiguous()` may leave,
    as if its rows were one number apart (torch 2.13)."""
    if matrix.stride() == (matrix.shape[1], 1):
        return matrix
    return torch.empty(matrix.shape, dtype=matrix.dtype, device=matrix.device).copy_(matrix)


def combine_digits(sums: torch.Tensor, batch: int) -> torch.Tensor:
    """float32 Σ_d DIGIT_WEIGHTS[d] · sums_d of `torch._int_mm`'s int32 (DIGITS * N, r) sums: (N, r)."""
    return (_DIGIT_WEIGHTS.to(sums.device) @ sums.view(DIGITS, -1).to(torch.float32)).view(batch, -1)


_DIGIT_WEIGHTS = torch.tensor([DIGIT_WEIGHTS], dtype=torch.float32)


class _Band:
    """One band: where its codes (int8, or floats as stored), laid out (cols, rows), sit in the flat
    buffer of their dtype; its input columns ``col0 .. col0 + cols``; its rows' place ``start ..
    stop`` in the bands' joined scales and output rows."""

    __slots__ = ("source", "offset", "col0", "cols", "start", "stop", "integer", "full")  # many per layer

    def __init__(self, source: str, offset: int, col0: int, cols: int, start: int, stop: int, full: bool) -> None:
        self.source, self.offset = source, offset
        self.col0, self.cols, self.start, self.stop = col0, cols, start, stop
        self.integer = source in ("band_codes", PACKED_SOURCE)
        self.full = full  # its rows are every output row, in order


BandData = tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]  # col0, cols, rows, codes (cols, rows), scales


class _Pair:
    """One low-rank block ``aᵀ·diag(scales)·b`` (`MAX_FACTOR_PAIRS`): its rows and columns, rank,
    where its factors' codes, a (rank, rows) and b (rank, cols) row-major, sit in the flat buffer
    of their dtype, and its rank's place in the pairs' joined scales (the two factors' scales
    multiplied)."""

    __slots__ = ("row0", "rows", "col0", "cols", "rank", "source", "a_offset", "b_offset", "start")

    def __init__(self, row0: int, rows: int, col0: int, cols: int, rank: int, source: str, a_offset: int,
                 start: int) -> None:
        self.row0, self.rows, self.col0, self.cols, self.rank = row0, rows, col0, cols, rank
        self.source, self.a_offset, self.b_offset, self.start = source, a_offset, a_offset + rank * rows, start


PairData = tuple[int, int, int, int, torch.Tensor, torch.Tensor, torch.Tensor]  # row0, rows, col0, cols, a, b, scales


def _flat_source(codes: torch.Tensor) -> str:
    """The flat buffer codes of this dtype lie in."""
    return "band_codes" if codes.dtype == torch.int8 else f"band_{str(codes.dtype).removeprefix('torch.')}"


class CompactMatrix(nn.Module):
    """``x @ Hᵀ`` for a packed H-matrix H, held compact (see the module's docstring).

    ``layout`` "int" or "float": integer-coded rows and blocks as int8 bands multiplied in
    integers, or as H's int8 codes (``codes``, ``range_scales``) from which H is formed for each
    call; the rest through the tile product; "tiles": everything
    through the tile product, compact. The bands' codes lie in one flat buffer per dtype (a
    tensor a band would cost more than small bands hold). All tensors are non-persistent
    buffers, so ``.to()`` moves them. `compact_layouts` says which layouts a matrix offers, the
    default first. ``join``: two-digit codes held joined (see the module's docstring; embeddings,
    whose looked-up rows would have to find their corrections, hold both digits). ``pack``: on the
    CPU, the int layout's integer bands packed by the quantized engine (`packed.py`; not for
    layers that form H for each call from the codes).
    """

    def __init__(self, hmatrix: HMatrix, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, layout: str | None = None, join: bool = True,
                 pack: bool = True) -> None:
        super().__init__()
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        pieces, pairs, rest = ([], [], hmatrix) if layout == "tiles" else _split(hmatrix)
        pieces, corrections = join_digits(pieces) if join else (pieces, None)
        layout = layout or _layouts(pieces, hmatrix.shape)[0]
        if layout == "tiles":
            pieces, pairs, rest, corrections = [], [], hmatrix, None
        dtype = dtype or torch.float32
        self.out_features, self.in_features = hmatrix.shape
        self.layout = layout
        self.stored_bytes = hmatrix.nbytes
        if layout != "tiles" and not pieces:
            raise ValueError(f"layout {layout!r} needs integer-coded rows or blocks; this matrix has none")
        bands = [(col0, cols, rows, codes.T, scales) for col0, cols, rows, codes, scales
                 in _bands(pieces, self.out_features)]
        # On the CPU, the int layout's integer bands are packed by the quantized engine (`packed.py`),
        # whole, where each is large enough; else they stay int8 codes for `torch._int_mm`, cut to
        # its cache-sized bands.
        self._packed: list[object] = []
        packing = False
        if layout == "int":
            bands = _merge_float_bands(bands, self.in_features, hmatrix.nbytes)
            packing = (pack and _packs(torch.device(device or "cpu"), dtype or torch.float32)
                       and all(b[3].numel() >= MIN_PACKED_CODES for b in bands if b[3].dtype == torch.int8))
            bands = bands if packing else _cache_sized(bands)
        tiled = _tile(bands, self.out_features, self.in_features) if layout == "float" else None
        self._widths: tuple[int, ...] = ()  # with the integer codes held as H: each column range's width
        if tiled is not None:
            codes, table, self._widths, bands = tiled
            self.register_buffer("codes", codes.to(device), persistent=False)
            self.register_buffer("range_scales", table.to(device), persistent=False)
            if len(set(self._widths)) > 1:
                self.register_buffer("range_widths", torch.tensor(self._widths, device=device), persistent=False)
        self._bands: list[_Band] = []
        self.indexed = False
        flat: dict[str, list[torch.Tensor]] = {}
        start = 0
        sizes: dict[str, int] = {}

        def place(codes: torch.Tensor) -> tuple[str, int]:  # appended to its dtype's flat buffer
            source = _flat_source(codes)
            flat.setdefault(source, []).append(codes.reshape(-1))
            offset = sizes.get(source, 0)
            sizes[source] = offset + codes.numel()
            return source, offset

        for col0, cols, rows, codes, _scales in bands:
            full = torch.equal(rows, torch.arange(self.out_features))
            if packing and codes.dtype == torch.int8:
                self._packed.append(pack_for_engine(codes.T))
                where = (PACKED_SOURCE, len(self._packed) - 1)
            else:
                where = place(codes)
            self._bands.append(_Band(*where, col0, cols, start, start + rows.numel(), full))
            start += rows.numel()
        self._pairs: list[_Pair] = []
        ranks = 0
        for row0, rows, col0, cols, a, b, _scales in pairs:
            source, offset = place(torch.cat([a.reshape(-1), b.reshape(-1)]))
            self._pairs.append(_Pair(row0, rows, col0, cols, a.shape[0], source, offset, ranks))
            ranks += a.shape[0]
        for source, parts in flat.items():
            self.register_buffer(source, torch.cat(parts).to(device), persistent=False)
        if bands:
            self.register_buffer("band_scales", torch.cat([b[4] for b in bands]).to(device=device, dtype=torch.float32),
                                 persistent=False)
            # A row table only where some band holds other rows than all of the output's, in order.
            self.indexed = not all(b.full for b in self._bands)
            if self.indexed:
                self.register_buffer("band_rows", torch.cat([b[2] for b in bands]).to(device), persistent=False)
        if pairs:
            self.register_buffer("pair_scales", torch.cat([p[6] for p in pairs]).to(device=device, dtype=torch.float32),
                                 persistent=False)
        self.corrected = corrections is not None
        # Where H's codes are held (layout "float"), each call converts them to float32 anyway: the
        # corrections' excess joins them there, one indexed add (`_code_matrix`).
        self.corrections_in_codes = self.corrected and tiled is not None
        self._sparse_product = (self.corrected and not self.corrections_in_codes
                                and corrections.rows.numel() > GATHERED_CORRECTIONS)
        if self.corrections_in_codes:
            index = corrections.rows.to(torch.int64) * self.in_features + corrections.cols
            order = torch.argsort(index)
            self.register_buffer("correction_index", index[order].to(device=device, dtype=torch.int32),
                                 persistent=False)
            self.register_buffer("correction_excess", corrections.excess[order].to(device), persistent=False)
        elif corrections is not None:  # by rows (a sparse product: each row's start) or one by one
            order = torch.argsort(corrections.rows.to(torch.int64) * self.in_features + corrections.cols)
            if self._sparse_product:
                starts = torch.zeros(self.out_features + 1, dtype=torch.int32)
                starts[1:] = torch.cumsum(torch.bincount(corrections.rows.to(torch.int64),
                                                         minlength=self.out_features), 0)
                self.register_buffer("correction_starts", starts.to(device), persistent=False)
            else:  # int64 rows: torch's index_add_ along a row is many times slower with int32 ones
                self.register_buffer("correction_rows", corrections.rows[order].to(device=device, dtype=torch.int64),
                                     persistent=False)
            self.register_buffer("correction_cols", corrections.cols[order].to(device), persistent=False)
            self.register_buffer("correction_values", corrections.values[order].to(device), persistent=False)
        self.rest = None if rest is None else HLinear(rest, dtype=dtype, device=device, keep_compact=True)
        # All of H one int8 code matrix over one column range, one scale a row: a product needs
        # neither H nor more than two operations (see `matmul_t`).
        self._lean = len(self._widths) == 1 and not self._bands and not self._pairs and self.rest is None
        self.register_buffer("anchor", torch.zeros(0, dtype=dtype, device=device), persistent=False)

    def _codes(self, band: _Band) -> torch.Tensor:
        """A band's codes, (cols, rows) row-major: a view of its dtype's flat buffer (a packed band's
        unpacked, for the float path's rare calls: rows with inf or NaN)."""
        if band.source == PACKED_SOURCE:
            return codes_from_engine(self._packed[band.offset]).T
        return self._band_slice(band).view(band.cols, band.stop - band.start)

    def _band_slice(self, band: _Band) -> torch.Tensor:
        """A band's codes as they lie in its dtype's flat buffer (1-D)."""
        return self._buffers[band.source][band.offset:band.offset + band.cols * (band.stop - band.start)]

    def _apply(self, fn, recurse: bool = True):
        """`nn.Module._apply` (``.to()``, ``.cuda()``, ``.double()``), and packed bands unpacked into
        int8 codes, after the factor pairs' in the int8 flat buffer, where the layer no longer
        packs (another device, float64)."""
        super()._apply(fn, recurse)
        anchor = self._buffers["anchor"]
        if self._packed and not _packs(anchor.device, anchor.dtype):
            held = self._buffers.get("band_codes")
            parts = [] if held is None else [held]
            offset = 0 if held is None else held.numel()
            for band in self._bands:
                if band.source == PACKED_SOURCE:
                    parts.append(self._codes(band).reshape(-1).to(anchor.device))
                    band.source, band.offset = "band_codes", offset
                    offset += parts[-1].numel()
            self.register_buffer("band_codes", torch.cat(parts), persistent=False)
            self._packed = []
        return self

    def _factors(self, pair: _Pair) -> tuple[torch.Tensor, torch.Tensor]:
        """A pair's factor codes a (rank, rows) and b (rank, cols): views of their flat buffer."""
        flat = self._buffers[pair.source]
        return (flat[pair.a_offset:pair.b_offset].view(pair.rank, pair.rows),
                flat[pair.b_offset:pair.b_offset + pair.rank * pair.cols].view(pair.rank, pair.cols))

    @property
    def held_bytes(self) -> int:
        """Bytes of every tensor held (codes, scales, index tables, the rest's compact factors) and
        of the packed bands (`engine_bytes`)."""
        return sum(b.numel() * b.element_size() for b in self.buffers()) + self.engine_bytes

    @property
    def engine_bytes(self) -> int:
        """Bytes the quantized engine holds for the packed bands (`packed.packed_bytes`): not tensors,
        so not among the module's buffers."""
        return sum(packed_bytes(band.stop - band.start, band.cols) for band in self._bands
                   if band.source == PACKED_SOURCE)

    def matmul_t(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ Hᵀ (+ bias)`` for x (N, in_features) in the layer's dtype: (N, out_features)."""
        buffers = self._buffers
        dtype = buffers["anchor"].dtype
        if self._lean and dtype == torch.float32 and x.shape[0] < self.in_features:
            # Fewer input rows than columns: scaling the product's rows costs less than scaling H.
            y = nn.functional.linear(x, self._code_matrix())
            return y.mul_(buffers["range_scales"]) if bias is None else torch.addcmul(bias, y, buffers["range_scales"])
        if self.layout == "float":  # H formed for the call (its integer codes in a few operations), one product
            if self.rest is None:
                return nn.functional.linear(x, self._formed(dtype), bias)
            return nn.functional.linear(x, self._formed(dtype)).add_(tile_product(self.rest._decoded_plan(), x, bias))
        rest = None if self.rest is None else tile_product(self.rest._decoded_plan(), x, bias)
        if not self._bands and not self._pairs:
            return rest
        packed = bool(self._packed)
        # Integer digits carry no gradient: an input that autograd follows takes the float path.
        integer = (self.layout == "int" and self._bands[0].integer and dtype != torch.float64
                   and (packed or int_mm_works(x.device.type)) and not (x.requires_grad and torch.is_grad_enabled()))
        work = torch.float32 if integer else dtype  # the integer sums are scaled in float32
        out = torch.zeros(x.shape[0], self.out_features, dtype=work, device=x.device)
        scales = buffers["band_scales"]
        floating = self._bands
        if integer:
            digits, step = packed_digits(x) if packed else int_digits(x)
            # Rows with inf or NaN (the float product spreads them) or so tiny that ``step`` is
            # subnormal (it would lose its precision) take the float path.
            if _usable_steps(step):
                floating = [b for b in self._bands if not b.integer]
                integer_bands = self._bands[:len(self._bands) - len(floating)]
                if packed:
                    for b in integer_bands:
                        sums = packed_product(digits[:, b.col0:b.col0 + b.cols], self._packed[b.offset])
                        self._add(out, b, combine_packed(sums, x.shape[0]).mul_(scales[b.start:b.stop]))
                elif x.shape[0] <= JOINED_BATCH:  # few rows: all bands' sums combined and added at once
                    sums = [torch._int_mm(digits[:, b.col0:b.col0 + b.cols], self._codes(b)) for b in integer_bands]
                    part = combine_digits(torch.cat(sums, 1) if len(sums) > 1 else sums[0], x.shape[0])
                    self._add_joined(out, integer_bands, part.mul_(scales[:integer_bands[-1].stop]))
                else:  # more rows: band by band, never a joined copy of every band's int32 sums
                    for b in integer_bands:
                        sums = torch._int_mm(digits[:, b.col0:b.col0 + b.cols], self._codes(b))
                        self._add(out, b, combine_digits(sums, x.shape[0]).mul_(scales[b.start:b.stop]))
                out.mul_(step)
        inputs = x if x.dtype == work else x.to(work)
        for b in floating:  # codes (or floats) times inputs, then the scales
            self._add(out, b, (inputs[:, b.col0:b.col0 + b.cols] @ self._codes(b).to(work)).mul_(
                scales[b.start:b.stop].to(work)))
        for pair in self._pairs:  # ((x·bᵀ)·scales)·a into the block's rows
            a, b = self._factors(pair)
            inner = (inputs[:, pair.col0:pair.col0 + pair.cols] @ b.to(work).T).mul_(
                buffers["pair_scales"][pair.start:pair.start + pair.rank].to(work))
            out[:, pair.row0:pair.row0 + pair.rows].addmm_(inner, a.to(work))
        if self.corrected:
            self._add_corrections(out, inputs)
        if rest is not None:
            out.add_(rest)
        elif bias is not None:
            out.add_(bias)
        return out if work == dtype else out.to(dtype)

    def _add_joined(self, out: torch.Tensor, bands: list[_Band], part: torch.Tensor) -> None:
        """Add the leading ``bands``' joined (N, rows) part into the output: summed over the bands
        where each holds every row in order, else by the joined row table."""
        if all(b.full for b in bands):
            out.add_(part.view(out.shape[0], len(bands), self.out_features).sum(1))
        else:
            out.index_add_(1, self._buffers["band_rows"][:bands[-1].stop], part)

    def _corrections(self, dtype: torch.dtype) -> torch.Tensor:
        """The corrections of joined digits (`digits.join_digits`), more than
        `GATHERED_CORRECTIONS` of them, as a sparse (m, n) CSR matrix over the held buffers (no
        copy; checked when built)."""
        buffers = self._buffers
        _quiet_sparse_csr()
        return torch.sparse_csr_tensor(buffers["correction_starts"], buffers["correction_cols"],
                                       buffers["correction_values"].to(dtype), (self.out_features, self.in_features),
                                       check_invariants=False)

    def _correction_rows(self) -> torch.Tensor:
        """Each correction's row (int64), held as it is or from the CSR row starts."""
        buffers = self._buffers
        if not self._sparse_product:
            return buffers["correction_rows"].to(torch.int64)
        starts = buffers["correction_starts"]
        return torch.repeat_interleave(torch.arange(self.out_features, device=starts.device), starts.diff())

    def _code_matrix(self) -> torch.Tensor:
        """H's integer codes (layout "float") in float32, the corrections' excess added: each entry
        the whole code k, exactly (|k| is far below 2²⁴)."""
        buffers = self._buffers
        codes = buffers["codes"].to(torch.float32)
        if self.corrections_in_codes:
            codes.view(-1).index_add_(0, buffers["correction_index"], buffers["correction_excess"])
        return codes

    def _add_corrections(self, out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """``out`` (N, m) plus the corrections' terms of ``inputs @ Hᵀ`` (`GATHERED_CORRECTIONS`)."""
        buffers = self._buffers
        if self._sparse_product:
            return out.add_((self._corrections(out.dtype) @ inputs.T).T)
        terms = inputs.index_select(1, buffers["correction_cols"]).mul_(buffers["correction_values"].to(out.dtype))
        return out.index_add_(1, buffers["correction_rows"], terms)

    def _add(self, out: torch.Tensor, band: _Band, part: torch.Tensor) -> None:
        """Add a band's (N, rows) part into the output's columns of its rows."""
        if band.full:
            out.add_(part)
        else:
            out.index_add_(1, self._buffers["band_rows"][band.start:band.stop], part)

    def _formed(self, dtype: torch.dtype) -> torch.Tensor:
        """H (m, n) in ``dtype`` for one call, but for the rest's tile product: the integer codes
        held as H times their rows' scales (each product rounded once in float32: the dense weight
        `load_state_dict` gives, bit for bit), then the other bands, the factor pairs and the
        corrections of joined digits added."""
        buffers = self._buffers
        if self._widths:
            out = scaled_codes(self._code_matrix(), buffers["range_scales"], self._widths, buffers.get("range_widths"))
            out = out if dtype == torch.float32 else out.to(dtype)
        else:
            out = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=buffers["anchor"].device)
        return self._add_bands(out)

    def _add_bands(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` (m, n) plus the bands', the factor pairs' and the corrections' terms of H."""
        buffers = self._buffers
        dtype = out.dtype
        wide = torch.promote_types(dtype, torch.float32)
        for band in self._bands:
            values = (self._codes(band).to(wide) * buffers["band_scales"][band.start:band.stop].to(wide)).T.to(dtype)
            if band.full:
                out[:, band.col0:band.col0 + band.cols] += values
            else:
                out[:, band.col0:band.col0 + band.cols].index_add_(0, buffers["band_rows"][band.start:band.stop], values)
        for pair in self._pairs:
            a, b = self._factors(pair)
            scales = buffers["pair_scales"][pair.start:pair.start + pair.rank].to(dtype)
            out[pair.row0:pair.row0 + pair.rows, pair.col0:pair.col0 + pair.cols].addmm_(
                (a.to(dtype) * scales.unsqueeze(1)).T, b.to(dtype))
        if self.corrected and not self.corrections_in_codes:
            out.view(-1).index_add_(0, self._correction_rows() * self.in_features + buffers["correction_cols"],
                                    buffers["correction_values"].to(dtype))
        return out

    def dense(self) -> torch.Tensor:
        """H in the layer's dtype, formed for one call (convolutions that are not matrix products)."""
        buffers = self._buffers
        dtype = buffers["anchor"].dtype
        if self.rest is None:
            return self._formed(dtype)
        eye = torch.eye(self.in_features, dtype=dtype, device=buffers["anchor"].device)
        return self._formed(dtype).add_(tile_product(self.rest._decoded_plan(), eye).T)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
                f"bands={len(self._bands)}, pairs={len(self._pairs)}, bytes={self.stored_bytes}, held={self.held_bytes}")


@functools.lru_cache(maxsize=None)
def _quiet_sparse_csr() -> None:
    """torch warns once a process that its sparse CSR tensors are a beta feature; the corrections
    use only their product by a dense matrix, so that warning is spent here, unseen."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.sparse_csr_tensor(torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0),
                                (1, 1), check_invariants=False)


def scaled_codes(codes: torch.Tensor, table: torch.Tensor, widths: tuple[int, ...],
                 repeats: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (r, n): integer ``codes`` (r, n; int8, or float32 holding integers, then scaled in
    place) times their scales, ``table`` (len(widths), r) holding a row of them for each column
    range, of these ``widths`` (in order, summing to n; ``repeats`` the widths as a tensor where
    they are not all equal). Each product is rounded once."""
    out = codes.to(torch.float32)
    if len(widths) == 1:
        return out.mul_(table.T)
    if repeats is None:
        out.view(codes.shape[0], len(widths), widths[0]).mul_(table.T.unsqueeze(2))
        return out
    return out.mul_(table.repeat_interleave(repeats, 0, output_size=codes.shape[1]).T)


def _tile(bands: list[BandData], rows: int, cols: int
          ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], list[BandData]] | None:
    """The integer bands as H's codes would be: one (rows, cols) int8 matrix (zero where no band
    has a row) with a (ranges, rows) table of float32 scales, a row of it for each column range
    (a band's, or a gap between them: zeros); the ranges' widths; and the other (floating)
    bands. None where bands overlap in part, a row is twice in a range, or that matrix would hold
    more than TILE_PADDING beyond the bands' codes (rows no band has, columns only low-rank
    blocks or floating bands cover)."""
    integer = [b for b in bands if not b[3].is_floating_point()]
    held = sum(b[1] * b[2].numel() for b in integer)
    if not integer or rows * cols > (1 + TILE_PADDING) * held:
        return None
    spans = sorted({(b[0], b[1]) for b in integer})
    widths, index, at = [], {}, 0
    for col0, width in spans:
        if col0 < at:  # overlapping ranges
            return None
        if col0 > at:
            widths.append(col0 - at)
        index[(col0, width)] = len(widths)
        widths.append(width)
        at = col0 + width
    if at < cols:
        widths.append(cols - at)
    codes = torch.zeros(rows, cols, dtype=torch.int8)
    table = torch.zeros(len(widths), rows, dtype=torch.float32)
    taken = torch.zeros(len(widths), rows, dtype=torch.bool)
    for col0, width, band_rows, band_codes, scales in integer:
        k = index[(col0, width)]
        if bool(taken[k, band_rows].any()):
            return None
        taken[k, band_rows] = True
        codes[band_rows, col0:col0 + width] = band_codes.T
        table[k, band_rows] = scales.to(torch.float32)
    return codes, table, tuple(widths), [b for b in bands if b[3].is_floating_point()]


def _cache_sized(bands: list[BandData]) -> list[BandData]:
    """The integer bands cut by rows into bands of at most `MAX_BAND_CODES` codes (the others as
    they are)."""
    out = []
    for col0, cols, rows, codes, scales in bands:
        step = max(1, MAX_BAND_CODES // cols)
        if codes.is_floating_point() or rows.numel() <= step:
            out.append((col0, cols, rows, codes, scales))
            continue
        out += [(col0, cols, rows[a:a + step], codes[:, a:a + step], scales[a:a + step])
                for a in range(0, rows.numel(), step)]
    return out


def _merge_float_bands(bands: list[BandData], cols: int, stored_bytes: int) -> list[BandData]:
    """The float bands (a few rows each, stored in floating codecs; they come last) as one band
    over every column, zero outside each one's columns: one product a call instead of one a band,
    where that padding costs at most FLOAT_BAND_PADDING of the stored bytes."""
    floats = [b for b in bands if b[3].is_floating_point()]
    if len(floats) < 2 or len({b[3].dtype for b in floats}) != 1:
        return bands
    rows = sum(b[2].numel() for b in floats)
    if cols * rows * floats[0][3].element_size() > FLOAT_BAND_PADDING * stored_bytes:
        return bands
    merged = torch.zeros(cols, rows, dtype=floats[0][3].dtype)
    at = 0
    for col0, width, band_rows, codes, _scales in floats:
        merged[col0:col0 + width, at:at + band_rows.numel()] = codes
        at += band_rows.numel()
    return bands[:len(bands) - len(floats)] + [(0, cols, torch.cat([b[2] for b in floats]), merged,
                                                torch.cat([b[4] for b in floats]))]


def compact_layouts(hmatrix: HMatrix) -> tuple[str, ...]:
    """The layouts `CompactMatrix` offers for ``hmatrix``, the default first: "float" where its rows
    and dense blocks fall in at most MAX_BANDS column ranges (per dtype), "int" too where some of
    them are integer-coded (first, for matrices of over SMALL_MATRIX entries: below, the count of
    operations dominates), and always "tiles"."""
    return _layouts(_split(hmatrix)[0], hmatrix.shape)  # joining digits leaves the pieces' spans and dtypes


def _layouts(pieces: list[Piece], shape: tuple[int, int]) -> tuple[str, ...]:
    """`compact_layouts` from a matrix's pieces (`_split`) and shape."""
    if not pieces or len({(p[0], p[1], p[3].dtype) for p in pieces}) > MAX_BANDS:
        return ("tiles",)
    if not any(p[3].dtype == torch.int8 for p in pieces):
        return ("float", "tiles")
    small = shape[0] * shape[1] <= SMALL_MATRIX
    return ("float", "int", "tiles") if small else ("int", "float", "tiles")


def _split(hm: HMatrix) -> tuple[list[Piece], list[PairData], HMatrix | None]:
    """Rows and dense blocks as pieces (output rows, values as stored: int8 codes with their
    scales, or floats with scales of 1), where their scales or values are finite; low-rank
    segments as factor pairs (codes as stored, the factors' scales multiplied), where they are
    finite and at most `MAX_FACTOR_PAIRS`; every other segment as an H-matrix of its own (None if
    there is none)."""
    pieces: list[Piece] = []
    pairs: list[PairData] = []
    keep: list[bool] = []
    lowrank = int((hm.segments[:, 1] == LOWRANK).sum())
    for s in hm.segment_values(raw=True):
        if s.kind == LOWRANK:
            pair = _pair(s) if lowrank <= MAX_FACTOR_PAIRS else None
            keep.append(pair is None)
            if pair is not None:
                pairs.append(pair)
            continue
        values = s.values if isinstance(s, RowsSegment) else s.block
        integer = s.scales is not None
        finite = bool(torch.isfinite(s.scales if integer else values).all())
        keep.append(not finite)
        if finite:
            rows = s.row0 + (s.index if isinstance(s, RowsSegment) else torch.arange(s.rows))
            scales = s.scales if integer else torch.ones(values.shape[0])
            pieces.append((s.col0, s.cols, rows, values.to(torch.int8) if integer else values, scales))
    if all(keep):
        return pieces, pairs, hm
    if not any(keep):
        return pieces, pairs, None
    return pieces, pairs, _subset(hm, keep)


def _pair(s: LowRankSegment) -> PairData | None:
    """A low-rank segment as a factor pair (int8 codes, or floats as stored, and the product of
    the factors' scales), or None where a value is not finite or the product is not a normal
    float32."""
    integer = s.a_scales is not None
    if integer:
        scales = s.a_scales.double() * s.b_scales.double()
        a, b = s.a.to(torch.int8), s.b.to(torch.int8)
    else:
        scales = torch.ones(s.a.shape[0], dtype=torch.float64)
        a, b = s.a, s.b
    held = scales.float()  # as the layer holds them: a product out of float32's normal range stays in the tile product
    in_range = bool((torch.isfinite(held) & ((scales == 0) | (held.abs() >= SMALLEST_NORMAL))).all())
    finite = in_range and (integer or bool(torch.isfinite(a).all() and torch.isfinite(b).all()))
    return (s.row0, s.rows, s.col0, s.cols, a, b, scales) if finite else None


def _subset(hm: HMatrix, keep: list[bool]) -> HMatrix:
    """``hm`` with only the segments marked in ``keep`` (their row bitmaps with them)."""
    segments = hm.segments
    masks, cursor = [], 0
    block_rows = hm.blocks[:, 2].tolist()
    for (block, kind), kept in zip(segments[:, :2].tolist(), keep):
        if kind == ROWS:
            size = mask_bytes(block_rows[block])
            if kept:
                masks.append(hm.row_masks[cursor:cursor + size])
            cursor += size
    row_masks = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.uint8)
    return HMatrix(hm.shape, hm.dtype, hm.blocks, segments[torch.tensor(keep, dtype=torch.bool)],
                   hm.pools, hm.scales, row_masks)


def _bands(pieces: list[Piece], rows: int) -> list[Piece]:
    """Pieces on the same columns and of the same dtype joined into bands (rows sorted, never the
    same row twice in a band), each cut into at most MAX_BAND_COLUMNS columns."""
    groups: dict[tuple[bool, int, int, str], list[tuple[list[Piece], torch.Tensor]]] = {}
    for piece in pieces:  # integer bands first (one integer product for all), then float ones by dtype
        codes = piece[3]
        bands = groups.setdefault((codes.is_floating_point(), piece[0], piece[1], str(codes.dtype)), [])
        free = [(members, taken) for members, taken in bands if not bool(taken[piece[2]].any())]
        if not free:
            bands.append(([], torch.zeros(rows, dtype=torch.bool)))
            free = bands[-1:]
        members, taken = free[0]
        members.append(piece)
        taken[piece[2]] = True
    out = []
    for (_floating, col0, cols, _dtype), bands in sorted(groups.items()):
        for members, _taken in bands:
            band_rows = torch.cat([p[2] for p in members])
            order = torch.argsort(band_rows)
            codes = torch.cat([p[3] for p in members])[order]
            scales = torch.cat([p[4] for p in members])[order]
            for start in range(0, cols, MAX_BAND_COLUMNS):
                width = min(MAX_BAND_COLUMNS, cols - start)
                out.append((col0 + start, width, band_rows[order], codes[:, start:start + width], scales))
    return out


def materialized(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A module's tensor, or zeros of its shape in its place where it is on the meta device (`patch`
    assigns the file's values afterwards)."""
    if tensor is None or not tensor.is_meta:
        return tensor
    return nn.Parameter(torch.zeros(tensor.shape, dtype=tensor.dtype), requires_grad=tensor.requires_grad)


def _bias(bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device | str | None) -> nn.Parameter | None:
    """A layer's bias as its own trainable parameter in ``dtype`` on ``device`` (None stays None)."""
    bias = materialized(bias)
    if bias is None:
        return None
    trainable = bias.requires_grad if isinstance(bias, nn.Parameter) else True
    return nn.Parameter(bias.detach().to(device=device, dtype=dtype).clone(), requires_grad=trainable)


class CompactLinear(CompactMatrix):
    """``y = x @ Hᵀ + bias``: `nn.Linear`'s compact stand-in (a `CompactMatrix` with a bias: one
    module, not two, for a layer's few kilobytes of Python objects)."""

    def __init__(self, hmatrix: HMatrix, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, layout: str | None = None, pack: bool = True) -> None:
        super().__init__(hmatrix, dtype, device, layout, pack=pack)
        self.register_parameter("bias", _bias(bias, dtype or torch.float32, device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._buffers["anchor"].dtype
        if x.dim() == 2 and x.dtype == dtype and x.shape[1] == self.in_features:  # the common case, lean
            return self.matmul_t(x, self._parameters["bias"])
        shape = x.shape
        if shape[-1] != self.in_features:
            raise ValueError(f"CompactLinear expects inputs with {self.in_features} features, got {tuple(shape)}")
        rows = x.reshape(-1, self.in_features)
        y = self.matmul_t(rows if rows.dtype == dtype else rows.to(dtype), self._parameters["bias"])
        y = y.reshape(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bias={self.bias is not None}"


CONV_FUNCTIONS = {nn.Conv1d: nn.functional.conv1d, nn.Conv2d: nn.functional.conv2d, nn.Conv3d: nn.functional.conv3d}


class CompactConv(CompactMatrix):
    """A Conv1d/2d/3d whose kernel (out, in/groups, *k), compressed as the (out, in/groups·∏k)
    matrix, stays compact. Pointwise convolutions (1x1 kernel, stride 1, no padding, one group)
    are the matrix product over channels; the others form their kernel for each call."""

    def __init__(self, hmatrix: HMatrix, conv: nn.Module, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, layout: str | None = None) -> None:
        pointwise = (all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride)
                     and conv.groups == 1 and conv.padding in ("valid", tuple(0 for _ in conv.kernel_size)))
        # A kernel formed for each call reads its bands' codes: packed, they would be unpacked each time.
        super().__init__(hmatrix, dtype, device, layout, pack=pointwise)
        self.pointwise = pointwise
        self.function = CONV_FUNCTIONS[type(conv)]
        self.kernel_shape = tuple(conv.weight.shape)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self.reversed_padding = conv._reversed_padding_repeated_twice
        # A Conv1d whose matrix has a tile product part multiplies its input's windows: forming
        # its kernel would take that product of an identity, as costly, and then the convolution.
        self.windows = (type(conv) is nn.Conv1d and not self.pointwise and conv.groups == 1
                        and not isinstance(conv.padding, str) and self.rest is not None)
        self.register_parameter("bias", _bias(conv.bias, dtype or torch.float32, device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self._buffers["anchor"].dtype
        inputs = x if x.dtype == dtype else x.to(dtype)
        bias = self._parameters["bias"]
        if self.pointwise:
            channels_last = inputs.movedim(-len(self.kernel_shape) + 1, -1)
            y = self.matmul_t(channels_last.reshape(-1, channels_last.shape[-1]), bias)
            y = y.reshape(*channels_last.shape[:-1], -1).movedim(-1, -len(self.kernel_shape) + 1)
        elif self.windows:
            y = self._windows_product(inputs, bias)
        else:
            weight = self.dense().reshape(self.kernel_shape)
            if self.padding_mode != "zeros":
                inputs = nn.functional.pad(inputs, self.reversed_padding, mode=self.padding_mode)
                y = self.function(inputs, weight, bias, self.stride, 0, self.dilation, self.groups)
            else:
                y = self.function(inputs, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _windows_product(self, inputs: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """A Conv1d as the product of its input's windows (batch · positions, channels · kernel)
        by Hᵀ."""
        batched = inputs.dim() == 3
        seq = inputs if batched else inputs.unsqueeze(0)
        if self.padding_mode != "zeros":
            seq = nn.functional.pad(seq, self.reversed_padding, mode=self.padding_mode)
        elif self.padding[0]:
            seq = nn.functional.pad(seq, (self.padding[0], self.padding[0]))
        size, dilation = self.kernel_shape[2], self.dilation[0]
        windows = seq.unfold(2, (size - 1) * dilation + 1, self.stride[0])  # (batch, channels, positions, span)
        if dilation > 1:
            windows = windows[..., ::dilation]
        y = self.matmul_t(windows.permute(0, 2, 1, 3).reshape(-1, self.in_features), bias)
        y = y.view(seq.shape[0], windows.shape[2], -1).transpose(1, 2).contiguous()
        return y if batched else y.squeeze(0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel_shape}, stride={self.stride}, pointwise={self.pointwise}"


class CompactEmbedding(CompactMatrix):
    """`nn.Embedding`'s compact stand-in: each looked-up row gathered from the int8 codes and
    scaled (`embedding_ready` says which matrices it can hold)."""

    def __init__(self, hmatrix: HMatrix, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        if not embedding_ready(hmatrix):
            raise ValueError("a compact embedding needs rows and dense blocks alone, each band holding every row")
        super().__init__(hmatrix, dtype, device, "float", join=False)  # looked-up rows hold no corrections
        self.num_embeddings, self.embedding_dim = hmatrix.shape
        for band in self._bands:  # laid out (rows, cols): a looked-up row's codes are contiguous
            self._band_slice(band).copy_(super()._codes(band).T.reshape(-1))

    def _row_codes(self, band: _Band) -> torch.Tensor:
        """A band's codes, (rows, cols) row-major: a view of its dtype's flat buffer."""
        return self._band_slice(band).view(band.stop - band.start, band.cols)

    def _codes(self, band: _Band) -> torch.Tensor:
        return self._row_codes(band).T

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers
        dtype = buffers["anchor"].dtype
        flat = index.reshape(-1)
        if self._widths:  # the looked-up rows of the codes held as H, times their scales
            out = scaled_codes(buffers["codes"].index_select(0, flat), buffers["range_scales"].index_select(1, flat),
                               self._widths, buffers.get("range_widths"))
            out = out if dtype == torch.float32 else out.to(dtype)
        else:
            out = torch.zeros(flat.numel(), self.embedding_dim, dtype=dtype, device=buffers["anchor"].device)
        for band in self._bands:
            codes = self._row_codes(band).index_select(0, flat)
            scales = buffers["band_scales"][band.start:band.stop][flat]
            out[:, band.col0:band.col0 + band.cols] += codes.to(dtype) * scales.to(dtype).unsqueeze(1)
        return out.reshape(*index.shape, self.embedding_dim)


def embedding_ready(hmatrix: HMatrix) -> bool:
    """Whether `CompactEmbedding` can hold ``hmatrix``: rows and dense blocks alone (finite), each
    band holding every row."""
    pieces, pairs, rest = _split(hmatrix)
    if rest is not None or pairs or len({(p[0], p[1], p[3].dtype) for p in pieces}) > MAX_BANDS:
        return False
    rows = hmatrix.shape[0]
    return all(torch.equal(band[2], torch.arange(rows)) for band in _bands(pieces, rows))


class CompactLSTMCell(nn.Module):
    """`nn.LSTMCell` with both its weights compact. Gates in torch's order: input, forget, cell,
    output."""

    def __init__(self, cell: nn.LSTMCell, weights: dict[str, HMatrix], dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, layout: str | None = None) -> None:
        super().__init__()
        dtype = dtype or torch.float32
        self.input_size, self.hidden_size = cell.input_size, cell.hidden_size
        self.weight_ih = CompactMatrix(weights["weight_ih"], dtype, device, layout)
        self.weight_hh = CompactMatrix(weights["weight_hh"], dtype, device, layout)
        self.register_parameter("bias_ih", _bias(cell.bias_ih, dtype, device))
        self.register_parameter("bias_hh", _bias(cell.bias_hh, dtype, device))

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        batched = x.dim() == 2
        if not batched:
            x = x.unsqueeze(0)
            hx = None if hx is None else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if hx is None:
            zeros = torch.zeros(x.shape[0], self.hidden_size, dtype=x.dtype, device=x.device)
            hx = (zeros, zeros)
        h, c = hx
        modules, parameters = self._modules, self._parameters
        gates = modules["weight_ih"].matmul_t(x, parameters["bias_ih"]).add_(
            modules["weight_hh"].matmul_t(h, parameters["bias_hh"]))
        i, f, _, o = gates.sigmoid().chunk(4, 1)  # one operation for the three sigmoid gates
        c = torch.addcmul(f * c, i, gates[:, 2 * self.hidden_size:3 * self.hidden_size].tanh())
        h = o * c.tanh()
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))
