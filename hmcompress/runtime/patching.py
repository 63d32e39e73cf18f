"""`patch`: load a compressed file into a model, its compressed layers kept compact in memory.

Modes: ``"compact"`` (the default) swaps every `nn.Linear`, Conv1d/2d/3d, `nn.Embedding` and
`nn.LSTMCell` whose weight the file compresses for its compact stand-in (`compact.py`), in the
layout that fits it best by rule; ``"auto"`` times each compact layout the layer offers on a
probe and keeps the fastest; ``"hmatrix"`` runs compressed `nn.Linear` layers as `HLinear` with
float factors (fast on smooth, low-rank matrices; not smaller in memory than what it replaces on
trained weights); ``"dense"`` loads dense weights only (what `load_state_dict` gives).
"""
from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import time

import torch
from torch import nn

from hmcompress.runtime.compact import (
    CONV_FUNCTIONS,
    CompactConv,
    CompactEmbedding,
    CompactLinear,
    CompactLSTMCell,
    CompactMatrix,
    compact_layouts,
    embedding_ready,
    materialized,
)
from hmcompress.runtime.errors import FormatError
from hmcompress.runtime.layers import HLinear
from hmcompress.runtime.matrix import HMatrix
from hmcompress.runtime.read import read_file

PATCH_MODES = ("compact", "auto", "hmatrix", "dense")
# The weights each module kind holds compact; its other parameters (biases) load as they are.
COMPACT_WEIGHTS: dict[type, tuple[str, ...]] = {
    nn.Linear: ("weight",), nn.Embedding: ("weight",), nn.LSTMCell: ("weight_ih", "weight_hh"),
    **{conv: ("weight",) for conv in CONV_FUNCTIONS},
}


@dataclasses.dataclass
class LayerChoice:
    """How `patch` runs one module whose weights the file compresses.

    ``mode``: "compact" (in ``layout``: "int", "float" or "tiles", see `CompactMatrix`),
    "hmatrix" or "dense"; ``seconds``:
    with mode "auto", the probe time of each layout tried; ``reason``: why a module stays dense
    where a compact form was asked for.
    """

    name: str
    mode: str
    layout: str | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    reason: str | None = None


class Patched(list):
    """The names of the modules `patch` replaced (a plain list of str), with every compressed
    module's `LayerChoice` in ``choices`` and, as ``load_state_dict`` reports them, the model's
    keys the file lacked and the file's keys the model lacks (both empty unless ``strict=False``)."""

    def __init__(self, choices: list[LayerChoice], missing_keys: list[str] = (),
                 unexpected_keys: list[str] = ()) -> None:
        super().__init__(sorted(c.name for c in choices if c.mode != "dense"))
        self.choices = sorted(choices, key=lambda c: c.name)
        self.missing_keys, self.unexpected_keys = list(missing_keys), list(unexpected_keys)


def patch(model: nn.Module, path: str | os.PathLike, mode: str = "compact", *,
          keep_compact: bool = False, probe_batch: int = 16, prefix: str = "", strict: bool = True) -> Patched:
    """Load a compressed file into ``model``, its compressed layers kept compact (see the module
    docstring for ``mode``; ``keep_compact`` is `HLinear`'s, for mode "hmatrix").

    ``prefix``: use only the file's tensors whose names start with it, named without it
    (``"model."`` for a file made from a training checkpoint without ``--model-only``). Keys are
    checked as by ``model.load_state_dict(..., strict)``: with ``strict=False`` missing and
    unexpected keys are skipped and listed in the result. A model built on the meta device
    (``with torch.device("meta"): model = build()``) is filled without ever holding its dense
    weights: compact layers are built on the CPU and the other tensors are assigned from the file.
    """
    if mode not in PATCH_MODES:
        raise ValueError(f"mode must be one of {', '.join(PATCH_MODES)}, got {mode!r}")
    compressed = read_file(path).under(prefix)
    file_keys = {*compressed.matrices, *compressed.passthrough}
    state = model.state_dict(keep_vars=True)
    model_keys = set(state)
    owners = _owners(model, compressed.matrices, mode)
    # Biases of replaced layers may be absent from the file (then the layer's own is kept).
    optional = {f"{name}.{p}" for name in owners for p in ("bias", "bias_ih", "bias_hh")} & model_keys
    missing = sorted(model_keys - file_keys - optional)
    unexpected = sorted(file_keys - model_keys)
    if strict and (missing or unexpected):
        raise RuntimeError(f"{path}: does not match the model: missing keys {missing}, "
                           f"unexpected keys {unexpected}"
                           + (f" (its tensors under {prefix!r})" if prefix else "")
                           + ("; a training checkpoint's file may need prefix='model.'" if not prefix and any(
                               k.startswith("model.") for k in unexpected) else ""))
    if "" in owners:
        raise ValueError("cannot replace the model itself by a compressed layer; patch a module containing it")
    # Every shape is checked before anything is expanded: what the model holds bounds what the
    # file may make us allocate.
    shapes = {name: tuple(compressed.metadata["matrices"][name]["orig_shape"]) if name in compressed.matrices
              else tuple(compressed.passthrough[name].shape) for name in file_keys & model_keys}
    for name in sorted(shapes):
        if shapes[name] != tuple(state[name].shape):
            raise RuntimeError(f"{path}: {name} has shape {shapes[name]}, the model's {tuple(state[name].shape)}")
    choices, new_modules = _compact_layers(path, compressed.matrices, owners, mode, keep_compact, probe_batch)
    if mode != "dense":
        choices += [LayerChoice(name, "dense", reason=f"mode {mode!r} has no form for {type(module).__name__}")
                    for name, module in _unsupported(model, compressed.matrices, owners)]
    replaced = {f"{c.name}.{w}" for c in choices if c.mode != "dense"
                for w in COMPACT_WEIGHTS[type(owners[c.name])]}
    dense = {name: compressed.dense(name, max_bytes=max(8, 2 * state[name].element_size()) * state[name].numel())
             for name in sorted((file_keys & model_keys) - replaced)}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in new_modules:
                setattr(parent, child_name, new_modules[id(child)])
    on_meta = any(t.is_meta for t in state.values())
    model.load_state_dict(dense, strict=False, assign=on_meta)
    del compressed, dense, new_modules, state  # the file's tensors: what the layers did not keep
    release_freed_memory()
    return Patched(choices, missing, unexpected)


def release_freed_memory() -> None:
    """Hand the memory that reading and decoding used, now freed, back to the system: glibc keeps
    freed blocks of up to tens of MB for reuse, which would leave the process resident at several
    times what the patched model holds. Elsewhere (no glibc) nothing is done."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def _compact_layers(path: str | os.PathLike, matrices: dict[str, HMatrix], owners: dict[str, nn.Module], mode: str,
                    keep_compact: bool, probe_batch: int) -> tuple[list[LayerChoice], dict[int, nn.Module]]:
    """Each owner's `LayerChoice` and its new layer (by the id of the module it replaces)."""
    choices, new_modules = [], {}
    for name, module in owners.items():
        weights = {w: matrices[_key(name, w)] for w in COMPACT_WEIGHTS[type(module)] if _key(name, w) in matrices}
        try:
            choice, layer = _replacement(name, module, weights, mode, keep_compact, probe_batch)
        except FormatError as err:
            raise FormatError(f"{path}: {_key(name, next(iter(weights)))}: {err}") from None
        choices.append(choice)
        if layer is not None:
            new_modules[id(module)] = layer
    return choices, new_modules


def _owners(model: nn.Module, matrices: dict[str, HMatrix], mode: str) -> dict[str, nn.Module]:
    """The modules whose weights the file compresses and that ``mode`` may replace, by name."""
    kinds = () if mode == "dense" else (nn.Linear,) if mode == "hmatrix" else tuple(COMPACT_WEIGHTS)
    return {name: module for name, module in model.named_modules()
            if type(module) in kinds and any(_key(name, w) in matrices for w in COMPACT_WEIGHTS[type(module)])}


def _unsupported(model: nn.Module, matrices: dict[str, HMatrix], owners: dict[str, nn.Module]
                 ) -> list[tuple[str, nn.Module]]:
    """Modules that own a compressed tensor directly but are not replaced (they load it dense)."""
    return [(name, module) for name, module in model.named_modules() if name not in owners
            and any(_key(name, p) in matrices for p, _ in module.named_parameters(recurse=False))]


def _key(module_name: str, tensor: str) -> str:
    return f"{module_name}.{tensor}" if module_name else tensor


def _replacement(name: str, module: nn.Module, weights: dict[str, HMatrix], mode: str, keep_compact: bool,
                 probe_batch: int) -> tuple[LayerChoice, nn.Module | None]:
    """The layer that runs ``module`` from its compressed ``weights`` (None: it stays dense)."""
    weight = next(iter(module.parameters()))
    dtype, device = weight.dtype, (torch.device("cpu") if weight.is_meta else weight.device)
    if mode == "hmatrix":
        return LayerChoice(name, "hmatrix"), HLinear(weights["weight"], materialized(module.bias), dtype, device,
                                                     keep_compact=keep_compact)
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None or not embedding_ready(weights["weight"]):
            reason = ("max_norm renormalises rows in place" if module.max_norm is not None
                      else "not integer-coded rows alone")
            return LayerChoice(name, "dense", reason=reason), None
        return LayerChoice(name, "compact", "float"), CompactEmbedding(weights["weight"], dtype, device)
    if isinstance(module, nn.LSTMCell) and len(weights) < 2:
        return LayerChoice(name, "dense", reason="only one of its two weights is compressed"), None
    offered = [compact_layouts(hm) for hm in weights.values()]
    layouts = [layout for layout in offered[0] if all(layout in o for o in offered)]

    def build(layout: str) -> nn.Module:
        if isinstance(module, nn.Linear):
            return CompactLinear(weights["weight"], materialized(module.bias), dtype, device, layout)
        if isinstance(module, nn.LSTMCell):
            return CompactLSTMCell(module, weights, dtype, device, layout)
        return CompactConv(weights["weight"], module, dtype, device, layout)

    if mode == "compact" or len(layouts) == 1:
        return LayerChoice(name, "compact", layouts[0]), build(layouts[0])
    timed = {layout: build(layout) for layout in layouts}
    seconds = {}
    with torch.no_grad():
        for layout, layer in timed.items():
            calls = [_probe_call(matrix, getattr(layer, "pointwise", True), probe_batch, dtype, device)
                     for matrix in layer.modules() if isinstance(matrix, CompactMatrix)]
            seconds[layout] = _seconds(lambda: [call() for call in calls], device.type == "cuda")
    best = min(seconds, key=seconds.get)
    return LayerChoice(name, "compact", best, seconds), timed[best]


def _probe_call(matrix: CompactMatrix, product: bool, batch: int, dtype: torch.dtype, device: torch.device):
    """What a layer does with ``matrix`` at each call, on a random probe: the product, or (for a
    convolution that is not one) forming the kernel."""
    if not product:
        return matrix.dense
    probe = torch.randn(batch, matrix.in_features, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=device, dtype=dtype)
    return lambda: matrix.matmul_t(probe)


def _seconds(call, cuda: bool, budget: float = 0.02, most: int = 50) -> float:
    """The best of several timed calls (after a warm-up), within about ``budget`` seconds."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    call()
    sync()
    best, spent, calls = math.inf, 0.0, 0
    while calls < 3 or (spent < budget and calls < most):
        start = time.perf_counter()
        call()
        sync()
        elapsed = time.perf_counter() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return best
