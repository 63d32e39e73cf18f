"""Layers that run a compressed file in a model: `HLinear` (``x @ Hᵀ + b`` without forming H) and
`patch`, which swaps a model's compressed `nn.Linear` layers for them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import torch
from torch import nn

from hmcompress.runtime.errors import FormatError
from hmcompress.runtime.format import DENSE, ROWS
from hmcompress.runtime.matrix import HMatrix
from hmcompress.runtime.product import TilePlan, tile_intervals, tile_product
from hmcompress.runtime.read import read_file

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
    exactly; planes with nothing in them are left out. `decode_planes` inverts this.
    """
    integer = ~torch.isnan(scales)
    safe = torch.where(integer & (scales != 0), scales, torch.ones_like(scales))
    codes = torch.where(integer, torch.round(values / safe), torch.zeros_like(values))
    floats = torch.where(integer, torch.zeros_like(values), values)
    planes = {}
    if bool(codes.any()):
        planes["codes"] = codes.to(torch.int8)
        planes["scale"] = torch.where(integer, scales, torch.zeros_like(scales)).to(torch.float32)
    if bool(floats.any()):
        narrow = [d for d in (torch.float16, torch.bfloat16) if torch.equal(floats.to(d).double(), floats)]
        planes["float"] = floats.to(narrow[0] if narrow else dtype)
    return planes


def decode_planes(planes: dict[str, torch.Tensor], dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """The factors in ``dtype`` from `compact_planes` (codes times scales rounded once, in float32
    or float64, as decoding straight into ``dtype`` would)."""
    out = torch.zeros(shape, dtype=dtype, device=planes["anchor"].device)
    if "codes" in planes:
        wide = torch.promote_types(dtype, torch.float32)
        out = out + (planes["codes"].to(wide) * planes["scale"].to(wide)).to(dtype)
    if "float" in planes:
        out = out + planes["float"].to(dtype)
    return out


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
            elif keep_compact:
                planes = compact_planes(tensor, scales[name], dtype)
                self._planes[name] = tuple(planes)
                for part, plane in planes.items():
                    self.register_buffer(f"{name}_{part}", plane.to(device), persistent=False)
            else:
                self.register_buffer(name, tensor.to(device=device, dtype=dtype), persistent=False)
        if bias is not None:
            trainable = bias.requires_grad if isinstance(bias, nn.Parameter) else True
            bias = nn.Parameter(bias.detach().to(device=device, dtype=dtype).clone(),
                                requires_grad=trainable)
        self.register_parameter("bias", bias)  # None too: `forward` reads `_parameters`
        self.register_buffer("anchor", torch.zeros(0, dtype=dtype, device=device), persistent=False)

    def _decoded_plan(self) -> dict[str, torch.Tensor]:
        """With keep_compact: the buffers plus ``u`` and ``v`` decoded from their planes."""
        buffers = self._buffers
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
        plan = self._decoded_plan() if self.keep_compact else self._buffers  # not `Module.__getattr__`: ~1 us a name
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


PATCH_MODES = ("hmatrix", "dense", "auto")


@dataclasses.dataclass
class LayerChoice:
    """How `patch` runs one compressed `nn.Linear`, and the probe timings behind an "auto" choice."""

    name: str
    mode: str  # "hmatrix" or "dense"
    hmatrix_seconds: float | None = None
    dense_seconds: float | None = None


class Patched(list):
    """The names of the modules `patch` replaced by `HLinear` (a plain list of str), with every
    compressed linear layer's `LayerChoice` in ``choices`` and, as ``load_state_dict`` reports
    them, the model's keys the file lacked and the file's keys the model lacks (both empty unless
    ``strict=False``)."""

    def __init__(self, choices: list[LayerChoice], missing_keys: list[str] = (),
                 unexpected_keys: list[str] = ()) -> None:
        super().__init__(sorted(c.name for c in choices if c.mode == "hmatrix"))
        self.choices = sorted(choices, key=lambda c: c.name)
        self.missing_keys, self.unexpected_keys = list(missing_keys), list(unexpected_keys)


def patch(model: nn.Module, path: str | os.PathLike, mode: str = "hmatrix", *,
          keep_compact: bool = False, probe_batch: int = 16, prefix: str = "", strict: bool = True) -> Patched:
    """Load a compressed file into ``model``, running compressed `nn.Linear` layers as `HLinear`.

    ``mode="hmatrix"`` replaces every `nn.Linear` whose weight is compressed; ``"dense"`` loads
    dense weights only; ``"auto"`` times both on a random probe of ``probe_batch`` rows and keeps
    the faster per layer (see ``.choices`` of the result). ``keep_compact`` keeps integer-coded
    factors compact (see `HLinear`). ``prefix``: use only the file's tensors whose names start
    with it, named without it (``"model."`` for a file made from a training checkpoint without
    ``--model-only``). Keys are checked as by ``model.load_state_dict(..., strict)``: with
    ``strict=False`` missing and unexpected keys are skipped and listed in the result.
    """
    if mode not in PATCH_MODES:
        raise ValueError(f"mode must be one of {', '.join(PATCH_MODES)}, got {mode!r}")
    compressed = read_file(path).under(prefix)
    file_keys = {*compressed.matrices, *compressed.passthrough}
    model_keys = set(model.state_dict().keys())
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and _key(name, "weight") in compressed.matrices}
    # Biases of replaced layers may be absent from the file (then the layer's own is kept).
    optional = {_key(name, "bias") for name in linears} if mode != "dense" else set()
    missing = sorted(model_keys - file_keys - optional)
    unexpected = sorted(file_keys - model_keys)
    if strict and (missing or unexpected):
        raise RuntimeError(f"{path}: does not match the model: missing keys {missing}, "
                           f"unexpected keys {unexpected}"
                           + (f" (its tensors under {prefix!r})" if prefix else "")
                           + ("; a training checkpoint's file may need prefix='model.'" if not prefix and any(
                               k.startswith("model.") for k in unexpected) else ""))
    if "" in linears and mode != "dense":
        raise ValueError("cannot replace the model itself by an HLinear; patch a module containing it")
    # Every shape is checked before anything is expanded: what the model holds bounds what the
    # file may make us allocate.
    state = model.state_dict()
    shapes = {name: tuple(compressed.metadata["matrices"][name]["orig_shape"]) if name in compressed.matrices
              else tuple(compressed.passthrough[name].shape) for name in file_keys & model_keys}
    for name in sorted(shapes):
        if shapes[name] != tuple(state[name].shape):
            raise RuntimeError(f"{path}: {name} has shape {shapes[name]}, the model's {tuple(state[name].shape)}")
    choices, new_modules = [], {}
    for name, module in linears.items():
        hm = compressed.matrices[_key(name, "weight")]
        if tuple(hm.shape) != (module.out_features, module.in_features):
            raise RuntimeError(f"{path}: {name}.weight has shape {tuple(hm.shape)}, the model's "
                               f"{(module.out_features, module.in_features)}")
        if mode == "dense":
            choices.append(LayerChoice(name, "dense"))
            continue
        try:
            layer = HLinear(hm, module.bias, dtype=module.weight.dtype, device=module.weight.device,
                            keep_compact=keep_compact)
        except FormatError as err:
            raise FormatError(f"{path}: {_key(name, 'weight')}: {err}") from None
        choice = LayerChoice(name, "hmatrix")
        if mode == "auto":
            choice = _faster(name, layer, hm, module, probe_batch)
        choices.append(choice)
        if choice.mode == "hmatrix":
            new_modules[id(module)] = layer
    replaced = {c.name for c in choices if c.mode == "hmatrix"}
    dense = {name: compressed.dense(name, max_bytes=max(8, 2 * state[name].element_size()) * state[name].numel())
             for name in sorted((file_keys & model_keys) - {_key(n, "weight") for n in replaced})}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in new_modules:
                setattr(parent, child_name, new_modules[id(child)])
    model.load_state_dict(dense, strict=False)
    return Patched(choices, missing, unexpected)


def _key(module_name: str, tensor: str) -> str:
    return f"{module_name}.{tensor}" if module_name else tensor


def _faster(name: str, layer: HLinear, hm: HMatrix, module: nn.Linear, probe_batch: int) -> LayerChoice:
    """Time `layer` against a dense `nn.Linear` holding H on the same probe; the faster wins."""
    weight = module.weight
    dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(hm.to_dense(weight.dtype))
        probe = torch.randn(probe_batch, module.in_features, generator=torch.Generator().manual_seed(0))
        probe = probe.to(device=weight.device, dtype=weight.dtype)
        h_time, d_time = _seconds(layer, probe), _seconds(dense, probe)
    return LayerChoice(name, "hmatrix" if h_time <= d_time else "dense", h_time, d_time)


def _seconds(fn: nn.Module, probe: torch.Tensor, budget: float = 0.02, most: int = 50) -> float:
    """The best of several timed calls (after a warm-up), within about ``budget`` seconds."""
    sync = torch.cuda.synchronize if probe.is_cuda else (lambda: None)
    fn(probe)
    sync()
    best, spent, calls = math.inf, 0.0, 0
    while calls < 3 or (spent < budget and calls < most):
        start = time.perf_counter()
        fn(probe)
        sync()
        elapsed = time.perf_counter() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return best
