"""`HLinear`: ``x @ Hᵀ + b`` through the tile product, without forming H (factors decoded to
float once, or kept compact and decoded at each call).
"""
from __future__ import annotations

import torch
from torch import nn

from hmcompress.runtime.errors import FormatError
from hmcompress.runtime.format import DENSE, ROWS
from hmcompress.runtime.matrix import HMatrix
from hmcompress.runtime.product import TilePlan, tile_intervals, tile_product

# What an `HLinear` may hold and loop over, checked from the tables before anything is built: a
# few bytes of blocks must not ask for gigabytes of padded factors or minutes of layout.
PLAN_NUMBERS_PER_STORED_BYTE = 64
MIN_PLAN_NUMBERS = 1 << 25
PLAN_STEPS_PER_ENTRY = 16  # layout steps (tiles, slot placements) per block or segment
MIN_PLAN_STEPS = 1 << 21


def plan_size(hmatrix: HMatrix) -> tuple[int, int]:
    """(numbers, steps): float64 numbers the tile plan of ``hmatrix`` holds (padded factors, index
    tables, the identity and placement factors of dense and rows terms) and the layout steps
    `TilePlan.build` takes (tiles, and each term once per tile it spans), computed from the block
    and segment tables alone, as `product.tiles` and `product.Stage` lay them out."""
    m, n = hmatrix.shape
    seg = hmatrix.segments.to(torch.int64)
    if not seg.shape[0]:
        return m + n, 2
    blocks = hmatrix.blocks.to(torch.int64)[seg[:, 0]]
    kind, rank = seg[:, 1], seg[:, 3]
    rows, cols = blocks[:, 2], blocks[:, 3]
    k = torch.where(kind == DENSE, rows, rank)
    numbers = float((torch.where(kind == DENSE, rows * rows, 0) + torch.where(kind == ROWS, rows * k, 0)).double().sum())
    steps = 0
    for start, length, size in ((blocks[:, 1], cols, n), (blocks[:, 0], rows, m)):
        stage_numbers, stage_steps = _stage_size(start, length, k, size)
        numbers += stage_numbers
        steps += stage_steps
    return int(min(numbers, 2.0**62)), steps


def _stage_size(start: torch.Tensor, length: torch.Tensor, k: torch.Tensor, size: int) -> tuple[float, int]:
    edges, parts = tile_intervals(torch.cat([start, start + length]), size)
    if not parts.numel():
        return 0.0, 0
    lengths = edges[1:] - edges[:-1]
    width = int(((lengths + parts - 1) // parts).max())
    tiles = int(parts.sum())
    first = torch.searchsorted(edges, start.contiguous())
    last = torch.searchsorted(edges, (start + length).contiguous())
    depth = int(torch.cumsum(torch.zeros(edges.numel(), dtype=torch.int64).index_add_(0, first, k)
                             .index_add_(0, last, -k), 0).max())
    spanned = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(parts, 0)])
    slots = int((spanned[last] - spanned[first]).sum())
    return float(tiles) * width * (depth + 2) + 2.0 * tiles * depth, tiles + slots


def check_plan_size(hmatrix: HMatrix) -> None:
    """Refuse (`FormatError`) a matrix whose `HLinear` plan would be far larger than the bytes the
    file stores for it, or take far more layout steps than it has blocks and segments."""
    numbers, steps = plan_size(hmatrix)
    allowed = max(MIN_PLAN_NUMBERS, PLAN_NUMBERS_PER_STORED_BYTE * hmatrix.nbytes)
    entries = int(hmatrix.blocks.shape[0]) + int(hmatrix.segments.shape[0])
    if numbers > allowed:
        raise FormatError(f"running its {hmatrix.shape[0]}x{hmatrix.shape[1]} matrix as an HLinear would take "
                          f"{numbers} numbers, more than the {allowed} allowed for the {hmatrix.nbytes} bytes "
                          "it stores (its dense form may do: mode='dense')")
    if steps > max(MIN_PLAN_STEPS, PLAN_STEPS_PER_ENTRY * entries):
        raise FormatError(f"laying out its {hmatrix.shape[0]}x{hmatrix.shape[1]} matrix as an HLinear would take "
                          f"{steps} steps for {entries} blocks and segments (its dense form may do: mode='dense')")


def compact_planes(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Factors as int8 codes times float32 scales, plus a plane for floating-coded pieces.

    The float plane takes the narrowest of float16, bfloat16 and ``dtype`` that holds its values
    exactly; planes with nothing in them are left out. Where that plane is ``dtype`` itself, the
    0/1 placements of dense and rows terms (scale 1) join it, exactly: a factor then needs no
    decoding at each call. `decode_planes` inverts this.
    """
    integer = ~torch.isnan(scales)
    floating = ~integer & (values != 0)
    if bool(floating.any()):
        floats = torch.where(integer, torch.zeros_like(values), values)
        narrow = [d for d in (torch.float16, torch.bfloat16) if torch.equal(floats.to(d).double(), floats)]
        float_dtype = narrow[0] if narrow else dtype
        if float_dtype == dtype:
            integer = integer & (scales != 1)
    safe = torch.where(integer & (scales != 0), scales, torch.ones_like(scales))
    codes = torch.where(integer, torch.round(values / safe), torch.zeros_like(values))
    floats = torch.where(integer, torch.zeros_like(values), values)
    planes = {}
    if bool(codes.any()):
        planes["codes"] = codes.to(torch.int8)
        planes["scale"] = torch.where(integer, scales, torch.zeros_like(scales)).to(torch.float32)
    if bool(floats.any()):
        planes["float"] = floats.to(float_dtype)
    return planes


def _decoded_as_held(planes: dict[str, torch.Tensor], dtype: torch.dtype) -> bool:
    """Whether `decode_planes` would return ``planes``' one plane as it is: a float plane in
    ``dtype`` (held so, the factor needs no decoding at each call)."""
    return set(planes) == {"float"} and planes["float"].dtype == dtype


def decode_planes(planes: dict[str, torch.Tensor], dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """The factors in ``dtype`` from `compact_planes` (codes times scales rounded once, in float32
    or float64, as decoding straight into ``dtype`` would). A single plane costs no extra pass:
    a float plane already in ``dtype`` is returned as it is."""
    parts = []
    if "codes" in planes:
        wide = torch.promote_types(dtype, torch.float32)
        parts.append((planes["codes"].to(wide) * planes["scale"].to(wide)).to(dtype))
    if "float" in planes:
        parts.append(planes["float"].to(dtype))
    if not parts:
        return torch.zeros(shape, dtype=dtype, device=planes["anchor"].device)
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


class HLinear(nn.Module):
    """``y = x @ Hᵀ + bias`` for a packed H-matrix H, without forming H.

    The two-stage tile product (see `TilePlan`) costs a fixed handful of tensor operations per
    call, whatever the number of blocks. Factors are decoded once into ``dtype``; with
    ``keep_compact`` they stay as int8 codes with float32 scales (plus a float16, bfloat16 or
    ``dtype`` plane for pieces stored in floating codecs) and are decoded on every call: less
    memory, more time. All tensors are (non-persistent) buffers, so ``.to()`` moves them; ``bias``
    stays a trainable parameter.
    """

    def __init__(self, hmatrix: HMatrix, bias: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 keep_compact: bool = False) -> None:
        super().__init__()
        dtype = dtype or torch.float32
        self.out_features, self.in_features = hmatrix.shape
        self.blocks = int(hmatrix.blocks.shape[0])
        self.stored_bytes = hmatrix.nbytes
        self.keep_compact = keep_compact
        check_plan_size(hmatrix)
        plan = TilePlan.build(hmatrix)
        tensors, scales = plan.tensors(), plan.scales()
        # Buffers are named as `tile_product` names its tensors, so that (unless compact) the
        # buffer dict is the plan: nothing to assemble per call.
        self._factor_shapes = {name: tensors[name].shape for name in ("u", "v")}
        self._planes: dict[str, tuple[str, ...]] = {}  # with keep_compact: each factor's planes
        for name, tensor in tensors.items():
            if name not in self._factor_shapes:
                self.register_buffer(name, tensor.to(device), persistent=False)
            elif keep_compact and not _decoded_as_held(planes := compact_planes(tensor, scales[name], dtype), dtype):
                self._planes[name] = tuple(planes)
                for part, plane in planes.items():
                    self.register_buffer(f"{name}_{part}", plane.to(device), persistent=False)
            else:  # float factors, or compact ones that are a single plane in ``dtype`` already (the same bytes)
                self.register_buffer(name, tensor.to(device=device, dtype=dtype), persistent=False)
        if bias is not None:
            trainable = bias.requires_grad if isinstance(bias, nn.Parameter) else True
            bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype).clone(),
                                requires_grad=trainable)
        self.register_parameter("bias", bias)  # None too: `forward` reads `_parameters`
        self.register_buffer("anchor", torch.zeros(0, dtype=dtype, device=device), persistent=False)

    def _decoded_plan(self) -> dict[str, torch.Tensor]:
        """With keep_compact: the buffers plus ``u`` and ``v`` decoded from their planes (the
        buffers alone where neither factor needs decoding)."""
        buffers = self._buffers
        if not self._planes:
            return buffers
        anchor = buffers["anchor"]
        plan = dict(buffers)
        for name, parts in self._planes.items():
            planes = {part: buffers[f"{name}_{part}"] for part in parts}
            plan[name] = decode_planes({**planes, "anchor": anchor}, anchor.dtype, self._factor_shapes[name])
        return plan

    @property
    def held_bytes(self) -> int:
        """Bytes of the tensors held for the product (factors or their codes, scales, index tables)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if shape[-1] != self.in_features:
            raise ValueError(f"HLinear expects inputs with {self.in_features} features, got {tuple(shape)}")
        plan = self._decoded_plan()  # not `Module.__getattr__`: ~1 us a name
        dtype = plan["anchor"].dtype
        rows = x if len(shape) == 2 else x.reshape(-1, self.in_features)
        y = tile_product(plan, rows if rows.dtype == dtype else rows.to(dtype), self._parameters["bias"])
        if len(shape) != 2:
            y = y.reshape(*shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"blocks={self.blocks}, bytes={self.stored_bytes}, held={self.held_bytes}, "
                f"bias={self.bias is not None}, dtype={str(self.anchor.dtype).removeprefix('torch.')}"
                f"{', compact' if self.keep_compact else ''}")
