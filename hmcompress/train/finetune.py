"""Fine-tuning a compressed checkpoint: its H-matrices as trainable layers, and back to the file format.

    model = build()                                    # the architecture (any weights)
    load_compressed(model, "model.hm.safetensors")     # compressed nn.Linear -> trainable nn.HLinear
    ...                                                # train: factors, dense leaves and biases
    save_compressed(model, "tuned.hm.safetensors")     # the same format; hmruntime.patch reads it

`save_compressed` stores each trained layer exactly as its parameters are (the partition and ranks
it was trained with) or, given options, compresses its dense equivalent afresh (e.g. in
``precision="auto"`` to store factors in integer codecs again). The statistics it records are
measured against the trained layer's dense weight, which `dense_state` gives for ``verify``.
"""
from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from hmcompress import runtime
from hmcompress.api import options_from_json
from hmcompress.core.build import CompressionOptions, allowed_error, compress_matrix, error_bound
from hmcompress.core.stats import layer_stats
from hmcompress.io.writer import write_compressed
from hmcompress.runtime import round_to_dtype
from hmcompress.train.layers import TrainableHLinear, hlinear_layers

PASSTHROUGH_REASON = "not an H-matrix layer"


def load_compressed(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a compressed file into ``model``, every compressed `nn.Linear` becoming a trainable
    `hmcompress.train.layers.HLinear` holding the file's H-matrix (decoded to the layer's dtype); returns
    their names. Keys are checked as by ``runtime.patch``, which loads the other tensors. The layers
    remember the file's options (``tol`` of each matrix), which `recompress` uses by default."""
    where = {name: (m.weight.dtype, m.weight.device) for name, m in model.named_modules()
             if isinstance(m, nn.Linear)}
    replaced = runtime.patch(model, path, mode="hmatrix")  # nn.Linear layers only, each then made trainable
    compressed = runtime.read_file(path)
    base, _selection = options_from_json(compressed.metadata.get("options", {}))
    for name in replaced:
        key = f"{name}.weight"
        tol = compressed.metadata["matrices"][key]["stats"].get("tol", base.tol)
        dtype, device = where[name]
        layer = TrainableHLinear(compressed.matrices[key], model.get_submodule(name).bias,
                        dataclasses.replace(base, tol=tol), dtype, device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return list(replaced)


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as the dense model's: each `TrainableHLinear`'s dense equivalent (rounded to
    its dtype) under ``<name>.weight`` in place of its leaves."""
    state = model.state_dict()
    for name, layer in hlinear_layers(model):
        for key in [k for k in state if k.startswith(f"{name}.leaves.")]:
            del state[key]
        state[f"{name}.weight"] = round_to_dtype(layer.to_dense(torch.float64).detach().cpu(), layer.dtype)
    return state


def save_compressed(model: nn.Module, path: str | os.PathLike, *, options: CompressionOptions | None = None,
                    overwrite: bool = False, source: str = "fine-tuned model") -> None:
    """Write ``model`` as a compressed checkpoint (docs/FORMAT.md), atomically.

    Each `TrainableHLinear` is stored as its parameters are (``options=None``), or compressed afresh from its
    dense equivalent with ``options``; every other tensor of the state dict passes through. The
    recorded errors and bounds are measured against the layer's dense weight (`dense_state`).
    """
    state = dense_state(model)
    layers = hlinear_layers(model)
    matrices = {}
    for name, layer in layers:
        key = f"{name}.weight"
        weight = state[key]
        if options is None:
            hm = layer.to_hmatrix()
            stored = hm.to_dense(torch.float64)
            used, strategy = layer.options, "trained"
            error, budget = error_bound(weight.double(), stored, weight.dtype), allowed_error(weight, used)
            sigma = torch.linalg.svdvals(weight.float() if weight.dtype != torch.float64 else weight).double().numpy()
        else:  # the builder has measured it all, W's singular values included
            result = compress_matrix(weight, options)
            hm, stored, error, budget, used, strategy, sigma = (result.hmatrix, result.dense, result.error, result.budget,
                                                                options, result.strategy, result.root_sigma)
        stats = layer_stats(key, weight, hm, stored, error, budget, sigma, used, strategy)
        matrices[key] = (hm, {"orig_shape": list(weight.shape), "stats": stats.to_json()})
    passthrough = {k: (t, PASSTHROUGH_REASON) for k, t in state.items() if k not in matrices}
    header = {"options": {**dataclasses.asdict(options or _layers_options(layers)), "trained": options is None},
              "source": {"file": source, "kind": "model"}, "extra": {}}
    write_compressed(path, matrices, passthrough, header, overwrite=overwrite)


def _layers_options(layers: list[tuple[str, TrainableHLinear]]) -> CompressionOptions:
    """The layers' options for the file header (their largest tolerance if they differ)."""
    if not layers:
        return CompressionOptions(precision="keep")
    first = layers[0][1].options
    return dataclasses.replace(first, tol=max(layer.options.tol for _, layer in layers))
