"""End-to-end inference: compressed models run through `hmruntime.patch` against the originals.

- the sample models (``sample_models.<name>``: build, CHECKPOINT, sample_inputs) compressed at
  tol 1e-2 (auto precision), patched with ``mode="auto"`` (per layer, the faster of H and dense);
- every real checkpoint in ../shared/checkpoints as the set of its compressed linear layers (no
  model definitions ship with them): each layer applied to a batch of 16 random inputs.
Times are medians of interleaved calls in one process. Usage: python -m benchmarks.models
"""
from __future__ import annotations

import importlib
import pathlib
import tempfile

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from benchmarks import print_table
from benchmarks.checkpoints import checkpoint_files
from benchmarks.runtime import paired_times
from hmcompress.api import compress_checkpoint
from hmcompress.core.build import CompressionOptions
from hmcompress.io.checkpoint import Selection, classify, open_checkpoint
from hmcompress.runtime import patch

SAMPLE_MODELS = ("classifier", "burgers_pinn", "char_transformer")
BATCH = 16


class LinearBag(nn.Module):
    """Linear layers of the given weights' shapes, each applied to its own input."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights)
        with torch.no_grad():
            for layer, w in zip(self.layers, weights):
                layer.weight.copy_(w)

    def forward(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [layer(x) for layer, x in zip(self.layers, inputs)]


def sample_model_rows(directory: pathlib.Path) -> list[list[str]]:
    rows = []
    for name in SAMPLE_MODELS:
        module = importlib.import_module(f"sample_models.{name}")
        if not module.CHECKPOINT.exists():
            continue
        out = directory / f"{name}.hm.safetensors"
        compress_checkpoint(module.CHECKPOINT, out, CompressionOptions(tol=1e-2), workers=2)
        original = module.build().eval()
        original.load_state_dict(load_file(str(module.CHECKPOINT)))
        compressed = module.build().eval()
        patched = patch(compressed, out, mode="auto", probe_batch=BATCH)
        x = module.sample_inputs(BATCH)
        with torch.no_grad():
            h_time, d_time = paired_times(lambda: compressed(x), lambda: original(x))
        rows.append([f"sample model {name}", f"{len(patched)} of {len(patched.choices)} layers as H",
                     f"{h_time / d_time:.3f}"])
    return rows


def checkpoint_rows(directory: pathlib.Path) -> list[list[str]]:
    rows = []
    for path in checkpoint_files():
        ckpt = open_checkpoint(path)
        weights = [e.load().float() for e in ckpt.entries
                   if len(e.shape) == 2 and classify(e, Selection()) is None]
        if not weights:
            continue
        original = LinearBag(weights)
        bag = directory / "bag.safetensors"
        save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(bag))
        out = directory / "bag.hm.safetensors"
        compress_checkpoint(bag, out, CompressionOptions(tol=1e-2), overwrite=True, workers=2)
        compressed = LinearBag(weights)
        patched = patch(compressed, out, mode="auto", probe_batch=BATCH)
        inputs = [torch.randn(BATCH, w.shape[1]) for w in weights]
        with torch.no_grad():
            h_time, d_time = paired_times(lambda: compressed(inputs), lambda: original(inputs))
        rows.append([f"{path.parent.name}/{path.name} ({len(weights)} linear layers)",
                     f"{len(patched)} of {len(patched.choices)} layers as H", f"{h_time / d_time:.3f}"])
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = sample_model_rows(pathlib.Path(tmp)) + checkpoint_rows(pathlib.Path(tmp))
    print_table(f"End-to-end inference, batch {BATCH}, {torch.get_num_threads()} threads: patch(mode='auto') "
                "vs the original (tol 1e-2, auto precision)",
                ["model", "layers run as H-matrices", "time compressed / original"], rows)


if __name__ == "__main__":
    main()
