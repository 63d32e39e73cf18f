"""Calibration statistics: the second moment of the inputs each compressible layer sees.

`collect` runs a model on the user's batches and accumulates, per ``nn.Linear`` (and, with
``conv``, per ungrouped zero-padded ``nn.Conv1d``/``nn.Conv2d``), the float64 matrix
G = X Xᵀ / N of its inputs X (one input vector per column: a Linear's rows of ``in_features``, a
conv's patches in the order of ``weight.reshape(out_channels, -1)``). It streams: a layer holds
its running sum S = Σ xᵀx and the count N, never the inputs. `write_stats` stores the result as a
safetensors file (docs/FORMAT.md, "Calibration statistics"); `hmcompress.io.activations` reads
and checks it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from hmcompress.errors import USER_CODE_FAILURES, UserError
from hmcompress.io.activations import STATS_FORMAT, STATS_KEY

UNFOLD_NUMBERS = 2**24  # a conv's patches are formed this many numbers at a time


@dataclasses.dataclass(frozen=True)
class LayerInputs:
    """What one layer saw: G = X Xᵀ / N (n x n, float64, exactly symmetric), N input vectors,
    in this many batches."""

    gram: torch.Tensor
    samples: int
    batches: int


class _Sum:
    """A layer's running S = Σ xᵀx (float64), N and the batches it was called in."""

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size
        self.total: torch.Tensor | None = None
        self.samples = 0
        self.batches: set[int] = set()

    def add(self, rows: torch.Tensor, batch: int) -> None:
        if rows.shape[0] == 0:
            return
        if not bool(torch.isfinite(rows).all()):
            raise UserError(f"layer {self.name!r}: its inputs hold NaN or Inf (batch {batch})")
        product = rows.T @ rows
        self.total = product if self.total is None else self.total.add_(product)
        self.samples += rows.shape[0]
        self.batches.add(batch)

    def result(self) -> LayerInputs:
        gram = (self.total / self.samples).cpu()
        return LayerInputs((gram + gram.T) / 2, self.samples, len(self.batches))


def _eligible(module: nn.Module, conv: bool) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (conv and isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1
            and module.padding_mode == "zeros")


def _weight_names(model: nn.Module) -> dict[int, str]:
    """id(weight tensor) -> its first name in ``model.state_dict()`` order."""
    names: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), name)
    return names


def _fits(module: nn.Module, x: object) -> bool:
    """Whether ``x`` is an input the module accepts (its features or channels where they belong)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
        return False
    if isinstance(module, nn.Linear):
        return x.shape[-1] == module.in_features
    spatial = 2 if isinstance(module, nn.Conv2d) else 1
    return x.dim() in (spatial + 1, spatial + 2) and x.shape[-spatial - 1] == module.in_channels


def _linear_rows(module: nn.Linear, x: torch.Tensor) -> Iterable[torch.Tensor]:
    yield x.detach().reshape(-1, module.in_features).double()


def _conv_rows(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> Iterable[torch.Tensor]:
    """The conv's input patches, one per row, in ``weight.reshape(out, -1)`` order, a few samples
    at a time (a Conv1d is a 2-D conv of width 1)."""
    two_d = isinstance(module, nn.Conv2d)
    x = x.detach()
    if x.dim() == (3 if two_d else 2):  # unbatched input
        x = x.unsqueeze(0)
    if not two_d:
        x = x.unsqueeze(-1)
    kernel = tuple(module.kernel_size) + ((1,) if not two_d else ())
    stride = tuple(module.stride) + ((1,) if not two_d else ())
    dilation = tuple(module.dilation) + ((1,) if not two_d else ())
    if isinstance(module.padding, str):  # "valid" or "same" (stride 1): extra padding on the right, as torch
        pads = [(0, 0) if module.padding == "valid" else (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                for k, d in zip(kernel, dilation)]
    else:
        pads = [(p, p) for p in tuple(module.padding) + ((0,) if not two_d else ())]
    padding = (*pads[1], *pads[0])  # F.pad: last dimension first
    per_sample = module.in_channels * kernel[0] * kernel[1]
    out_h = (x.shape[2] + sum(pads[0]) - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (x.shape[3] + sum(pads[1]) - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    step = max(1, UNFOLD_NUMBERS // max(1, per_sample * max(out_h, 1) * max(out_w, 1)))
    for part in x.split(step):
        padded = F.pad(part.double(), padding) if any(padding) else part.double()
        patches = F.unfold(padded, kernel, dilation=dilation, stride=stride)  # (b, C*kh*kw, positions)
        yield patches.transpose(1, 2).reshape(-1, per_sample)


def collect(model: nn.Module, batches: Iterable, conv: bool = True,
            progress: Callable[[int], None] | None = None, *, data: str = "the calibration data"
            ) -> dict[str, LayerInputs]:
    """Run ``model`` (eval mode, no gradients) on each of ``batches`` and return, per layer that
    was called, the second moment of its inputs, keyed by the weight's name in
    ``model.state_dict()`` (a weight shared by several modules: its first name, all calls summed).

    A batch is passed as ``model(batch)`` (a tensor), ``model(*batch)`` (a tuple or list) or
    ``model(**batch)`` (a dict). ``progress(done)`` is called after each batch. ``data`` names the
    batches' source in messages. Every problem is one line of `UserError`: the data or the model
    raising, non-finite inputs of a layer, no layer reached.
    """
    names = _weight_names(model)
    sums: dict[str, _Sum] = {}
    current = {"batch": 0}
    handles = []

    def hook_for(module: nn.Module, name: str) -> Callable:
        rows_of = _linear_rows if isinstance(module, nn.Linear) else _conv_rows
        size = module.weight[0].numel()
        total = sums.setdefault(name, _Sum(name, size))

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input")
            if not _fits(mod, x):
                return  # the module itself raises, with its own message
            for rows in rows_of(mod, x):
                total.add(rows, current["batch"])

        return hook

    modules = [m for m in model.modules() if _eligible(m, conv) and isinstance(getattr(m, "weight", None),
                                                                                torch.Tensor)]
    if not modules:
        raise UserError("the model has no nn.Linear" + (" or ungrouped conv" if conv else "") + " layer")
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        for module in modules:
            name = names.get(id(module.weight))
            if name is not None:
                handles.append(module.register_forward_pre_hook(hook_for(module, name), with_kwargs=True))
        done = _run(model, batches, current, data, progress)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
    if done == 0:
        raise UserError(f"{data}: gave no batches")
    result = {name: s.result() for name, s in sorted(sums.items()) if s.samples}
    if not result:
        raise UserError(f"{data}: no batch reached a layer of the model")
    return result


def _run(model: nn.Module, batches: Iterable, current: dict, data: str,
         progress: Callable[[int], None] | None) -> int:
    """Feed every batch; the number fed."""
    done = 0
    for _output in feed(model, batches, data, current):
        done += 1
        if progress is not None:
            progress(done)
    return done


def feed(model: nn.Module, batches: Iterable, data: str, current: dict | None = None,
         grad: bool = False) -> Iterator[object]:
    """The model's output on each batch (a tensor: ``model(batch)``; a tuple or list: the
    arguments; a dict: the keyword arguments), without gradients unless ``grad``;
    ``current["batch"]`` says which batch runs. Anything the data or the model raises is one line
    of `UserError` naming ``data``."""
    current = {} if current is None else current
    done = 0
    try:
        iterator = iter(batches)
    except TypeError as err:
        raise UserError(f"{data}: is not an iterable of batches ({err})") from err
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except UserError:
            raise
        except USER_CODE_FAILURES as err:  # the user's code: any failure is one line
            raise UserError(_one_line(f"{data}: batch {done + 1} raised {type(err).__name__}: {err}")) from err
        current["batch"] = done
        try:
            with torch.set_grad_enabled(grad):
                if isinstance(batch, dict):
                    output = model(**batch)
                elif isinstance(batch, (tuple, list)):
                    output = model(*batch)
                else:
                    output = model(batch)
        except UserError as err:
            raise UserError(_one_line(f"{data}: batch {done + 1}: {err}")) from err
        except USER_CODE_FAILURES as err:
            raise UserError(_one_line(f"{data}: the model raised {type(err).__name__} on batch {done + 1}: "
                                      f"{err}")) from err
        done += 1
        yield output


def output_tensors(output: object) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or tuple/list/dict of them, dicts by sorted key;
    other items are skipped), in order; anything else is one line of `UserError`."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = [output[k] for k in sorted(output)]
    if isinstance(output, (tuple, list)):
        return [t for o in output if isinstance(o, (torch.Tensor, tuple, list, dict)) for t in output_tensors(o)]
    raise UserError(f"the model returned {type(output).__name__}, not tensors")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def stats_metadata(stats: dict[str, LayerInputs], source: dict) -> str:
    """The ``hmcompress_stats`` metadata value (deterministic JSON)."""
    layers = {name: {"samples": s.samples, "batches": s.batches} for name, s in sorted(stats.items())}
    return json.dumps({"format": STATS_FORMAT, "layers": layers, "source": source}, sort_keys=True,
                      separators=(",", ":"))


def write_stats(path: str | os.PathLike, stats: dict[str, LayerInputs], source: dict, overwrite: bool) -> None:
    """Write ``stats`` as a safetensors stats file: one float64 G per layer under the weight's
    name, and the metadata ``hmcompress_stats`` (format, per-layer samples and batches, source).

    Written to a temporary file beside ``path`` and renamed: nothing half-written on failure;
    the same stats and source give the same bytes.
    """
    from hmcompress.io.writer import StreamedTensor, write_streamed

    if not stats:
        raise UserError(f"{path}: no layer statistics to write")
    tensors = []
    for name, layer in sorted(stats.items()):
        gram = layer.gram.detach().to("cpu", torch.float64).contiguous()
        if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or layer.samples < 1:
            raise UserError(f"{path}: layer {name!r}: G must be square and seen by at least one input")
        tensors.append(StreamedTensor.of(name, gram, f"layer {name!r}"))
    write_streamed(pathlib.Path(path), tensors, {STATS_KEY: stats_metadata(stats, source)}, overwrite=overwrite)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What `calibrate_checkpoint` wrote."""

    output: pathlib.Path
    stats: dict[str, LayerInputs]
    source: dict
    batches: int

    def to_json(self) -> dict:
        return {"output": str(self.output), "source": self.source, "batches": self.batches,
                "layers": [{"name": name, "size": s.gram.shape[0], "samples": s.samples, "batches": s.batches}
                           for name, s in sorted(self.stats.items())]}


def load_data_hook(factory: str, data: str | None) -> tuple[str, Callable[[], Iterable]]:
    """The data hook: ``data`` (``module:function``) or else the factory module's
    ``calibration_batches``; its spec and the function."""
    from hmcompress.evaluate import analysis

    if data is not None:
        return data, analysis.load_hooks(data, ())[1]["factory"]
    module, _hooks = analysis.load_hooks(factory, ())
    hook = getattr(module, "calibration_batches", None)
    if not callable(hook):
        raise UserError(f"{factory}: module {module.__name__!r} has no calibration_batches(); "
                        "pass --data MODULE:FUNCTION")
    return f"{module.__name__}:calibration_batches", hook


def calibrate_checkpoint(factory: str, checkpoint: str | os.PathLike, output: str | os.PathLike,
                         data: str | None = None, conv: bool = True, overwrite: bool = False,
                         progress: Callable[[int], None] | None = None) -> Calibration:
    """`collect` on the model ``factory`` names (``module:function``), filled from ``checkpoint``
    (never unpickling code), fed by the ``data`` hook (default: the factory module's
    ``calibration_batches``); then `write_stats` to ``output``. Every problem is one line of
    `UserError`, raised before anything is written."""
    from hmcompress.evaluate import analysis

    checkpoint, output = pathlib.Path(checkpoint), pathlib.Path(output)
    if output.exists() and checkpoint.exists() and output.resolve() == checkpoint.resolve():
        raise UserError(f"{output}: refusing to overwrite the input file")
    if output.exists() and not overwrite:
        from hmcompress.errors import OutputExists

        raise OutputExists(output)
    if not output.parent.is_dir():
        raise UserError(f"{output.parent}: output directory does not exist")
    task = analysis.factory_task(factory)
    data_spec, hook = load_data_hook(factory, data)
    model = analysis.original_model(task, checkpoint)
    try:
        batches = hook()
    except USER_CODE_FAILURES as err:  # the user's code
        raise UserError(_one_line(f"{data_spec}: raised {type(err).__name__}: {err}")) from err
    fed = [0]

    def tick(done: int) -> None:
        fed[0] = done
        if progress is not None:
            progress(done)

    stats = collect(model, batches, conv, tick, data=data_spec)
    source = {"factory": factory, "data": data_spec, "checkpoint": checkpoint.name, "conv": conv}
    write_stats(output, stats, source, overwrite)
    return Calibration(output, stats, source, fed[0])
