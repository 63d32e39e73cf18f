"""Recalibration: after compression, retrain the tensors the file stores exactly on the task's loss.

Compressing a layer moves its output; the parameters a compressed file keeps as they were (the
biases, and layers too small or thin to compress) can take up part of that move, as bias
correction does after quantization. `recalibrate` runs the model through the runtime shim's
`patch` (as it will be used), trains only those parameters with L-BFGS on a loss the caller
gives (for a PINN its physics loss: no data needed), and writes a new compressed file with the
H-matrices exactly as they were, so their recorded errors and bounds still hold (`verify`
re-checks them), the passthrough tensors replaced and the header's ``"recalibrated"`` entry
saying what changed.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable

import torch
from torch import nn

from hmcompress.errors import UserError
from hmcompress.evaluate.analysis import patched
from hmcompress.io.writer import write_compressed, write_runtime_shim
from hmcompress.runtime import read_file

STEPS = 100  # L-BFGS iterations; the sample PINN: 18 s, and 300 gain little (rel. L2 2.19e-3 -> 2.14e-3)
PROGRESS_EVERY = 20


@dataclasses.dataclass
class Recalibration:
    output: pathlib.Path
    tensors: list[str]  # the passthrough tensors retrained
    numbers: int  # how many numbers they hold
    loss_before: float
    loss_after: float

    def to_json(self) -> dict:
        return {"output": str(self.output), "tensors": self.tensors, "numbers": self.numbers,
                "loss_before": self.loss_before, "loss_after": self.loss_after}


def recalibrate(model: nn.Module, compressed: str | os.PathLike, loss: Callable[[nn.Module], torch.Tensor],
                output: str | os.PathLike, *, steps: int = STEPS, overwrite: bool = False,
                progress: Callable[[str], None] | None = None) -> Recalibration:
    """Write ``output``: ``compressed`` with its floating passthrough tensors that are parameters of
    ``model`` retrained by ``steps`` L-BFGS iterations on ``loss(model)``.

    ``model`` is patched with the compressed file in place (its compressed layers become
    `TrainableHLinear`s) and left holding the retrained values, only those requiring gradients. The
    H-matrices are copied unchanged.
    """
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    source = read_file(compressed)
    patched(model, compressed, type(model).__name__)
    parameters = dict(model.named_parameters())
    names = sorted(name for name, tensor in source.passthrough.items()
                   if name in parameters and tensor.is_floating_point())
    if not names:
        raise UserError(f"{compressed}: no passthrough tensor is a floating-point parameter of the model: "
                        "nothing to recalibrate")
    before, after = retrain(model, names, loss, steps, progress)
    if not after <= before:  # L-BFGS's line search never accepts a worse point; NaN lands here too
        raise UserError(f"{compressed}: recalibration did not lower the loss ({before:.6g} -> {after:.6g})")
    meta = source.metadata
    passthrough = {name: (parameters[name].detach().to(tensor.dtype).contiguous() if name in names else tensor,
                          meta["passthrough"][name]) for name, tensor in source.passthrough.items()}
    matrices = {name: (hm, meta["matrices"][name]) for name, hm in source.matrices.items()}
    result = Recalibration(pathlib.Path(output), names, sum(parameters[n].numel() for n in names), before, after)
    header = {key: value for key, value in meta.items()
              if key not in ("format", "version", "matrices", "passthrough")}
    header["recalibrated"] = {"from": pathlib.Path(compressed).name, "steps": steps, "tensors": names,
                              "loss_before": before, "loss_after": after}
    write_compressed(output, matrices, passthrough, header, overwrite=overwrite)
    write_runtime_shim(pathlib.Path(output).parent)
    return result


def retrain(model: nn.Module, names: list[str], loss: Callable[[nn.Module], torch.Tensor],
            steps: int, progress: Callable[[str], None] | None = None) -> tuple[float, float]:
    """Train only the parameters ``names`` of ``model`` (the others are frozen) by ``steps`` L-BFGS
    iterations on ``loss(model)``; returns the loss before and after. Also the control experiment:
    the same training of an uncompressed model. ``progress`` gets a line every PROGRESS_EVERY
    loss evaluations."""
    parameters = dict(model.named_parameters())
    for parameter in parameters.values():
        parameter.requires_grad_(False)
    trained = [parameters[name].requires_grad_(True) for name in names]
    before = _loss_value(loss, model)
    optimizer = torch.optim.LBFGS(trained, lr=1.0, max_iter=steps, history_size=50, tolerance_grad=1e-12,
                                  tolerance_change=1e-15, line_search_fn="strong_wolfe")
    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        optimizer.zero_grad()
        value = loss(model)
        value.backward()
        evaluations += 1
        if progress and evaluations % PROGRESS_EVERY == 0:
            progress(f"{evaluations} loss evaluations, loss {float(value.detach()):.6g}")
        return value

    optimizer.step(closure)
    return before, _loss_value(loss, model)


def _loss_value(loss: Callable[[nn.Module], torch.Tensor], model: nn.Module) -> float:
    return float(loss(model).detach())  # not under no_grad: a loss may differentiate the model


def describe(entry: object) -> str:
    """One line for `report` from a file's ``"recalibrated"`` header entry (any JSON value: the
    file may not come from us, so nothing is assumed about its types)."""
    if not isinstance(entry, dict):
        return "recalibrated: (malformed entry)"
    tensors = entry.get("tensors")
    count = len(tensors) if isinstance(tensors, list) else "?"
    before, after = (_shown(entry.get(key)) for key in ("loss_before", "loss_after"))
    return (f"recalibrated from {entry.get('from')}: {count} passthrough tensors retrained "
            f"({entry.get('steps')} L-BFGS steps; calibration loss {before} -> {after}); "
            "the H-matrices are unchanged")


def _shown(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
