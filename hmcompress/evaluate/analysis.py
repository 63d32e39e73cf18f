"""Does a compressed model still do its job? Task metric, output error, NTK, error propagation.

Weight error is a proxy; this module measures function. A *model package* (the module of a factory
spec such as ``sample_models.classifier:build``) provides:

- the factory itself: ``build() -> nn.Module`` (untrained architecture; the checkpoint fills it);
- ``evaluate(model) -> dict[str, float]``: task metrics on the package's own data;
- ``sample_inputs(n) -> Tensor``: ``n`` fixed inputs (one batch) for output and NTK comparisons;
- optionally ``METRIC`` (the headline key of ``evaluate``; default its first key),
  ``HIGHER_IS_BETTER`` (default True) and ``ntk_output(outputs, inputs) -> (n, k)``, the function
  whose NTK is taken (default: each input's outputs, flattened);
- for `hmcompress recalibrate` (`hmcompress.train.recalibrate`): ``calibration_loss(model) -> Tensor``,
  a scalar loss on the package's own data (for a PINN, its physics loss).

The compressed model is loaded with `hmcompress.runtime`, which is byte for byte the
``hmruntime.py`` copied beside every compressed file, so what is measured is what a user runs.
(The copy beside the file is not imported: evaluating a file must not execute code found next to
it.) The task metric and output error use ``patch`` (compact layers, no dense H formed); the NTK
uses the dense weights from ``load_state_dict`` (θ_H = the reconstructed weights, DESIGN.md §2).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import pathlib
import tempfile
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from hmcompress import runtime
from hmcompress.api import compress_checkpoint, options_from_json
from hmcompress.compare.baselines import TruncatedSVD
from hmcompress.core.build import CompressionOptions, as_matrix
from hmcompress.errors import USER_CODE_FAILURES, UserError
from hmcompress.io.checkpoint import Selection, open_checkpoint

SWEEP_TOLS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)
JACOBIAN_BYTES = 512 * 2**20  # the NTK uses fewer inputs rather than hold a larger Jacobian
OUTPUT = "(model output)"  # the row after the last layer; no module can be named so by accident


@dataclasses.dataclass(frozen=True)
class ModelTask:
    """A model package resolved from its factory spec."""

    spec: str
    build: Callable[[], nn.Module]
    evaluate: Callable[[nn.Module], dict]
    sample_inputs: Callable[[int], torch.Tensor]
    metric: str
    higher_is_better: bool
    ntk_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


def load_task(spec: str) -> ModelTask:
    """Import ``module:factory`` and check that its module offers the evaluation hooks."""
    module, hooks = load_hooks(spec, ("evaluate", "sample_inputs"))
    return ModelTask(spec, hooks["factory"], hooks["evaluate"], hooks["sample_inputs"],
                     getattr(module, "METRIC", ""), bool(getattr(module, "HIGHER_IS_BETTER", True)),
                     getattr(module, "ntk_output", None))


def factory_task(spec: str) -> ModelTask:
    """A task with only the factory of ``module:factory`` (for what builds and runs the model
    without evaluating it: calibration, the model-level budget); the factory's failures and a
    result that is no module are one line of `UserError`."""
    _module, hooks = load_hooks(spec, ())
    build = hooks["factory"]

    def built() -> nn.Module:
        try:
            model = build()
        except USER_CODE_FAILURES as err:  # the user's code
            raise UserError(" ".join(f"{spec}: the factory raised {type(err).__name__}: {err}".split())) from err
        if not isinstance(model, nn.Module):
            raise UserError(f"{spec}: the factory returned {type(model).__name__}, not an nn.Module")
        return model

    return ModelTask(spec, built, None, None, "", True, None)


def load_hooks(spec: str, names: tuple[str, ...]) -> tuple[object, dict[str, Callable]]:
    """Import ``module:factory``; its module and the factory (as ``"factory"``) with the callables
    ``names`` of the module, each checked."""
    module_name, _, factory_name = spec.partition(":")
    if not module_name or not factory_name:
        raise UserError(f"{spec}: model factory must look like 'package.module:build'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"{spec}: cannot import {module_name!r}: {err}") from err
    hooks = {name: getattr(module, name, None) for name in (factory_name, *names)}
    missing = [name for name, hook in hooks.items() if not callable(hook)]
    if missing:
        raise UserError(f"{spec}: module {module_name!r} has no callable {', '.join(missing)} "
                        "(see hmcompress.evaluate.analysis for the protocol)")
    return module, {"factory": hooks[factory_name], **{name: hooks[name] for name in names}}


def _names(keys: Sequence[str], limit: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _fill(task: ModelTask, model: nn.Module, state: dict[str, torch.Tensor], path: object) -> nn.Module:
    """``model.load_state_dict(state)``, with a mismatch named in one line."""
    expected = model.state_dict()
    problems = []
    if missing := expected.keys() - state.keys():
        problems.append(f"missing {_names(missing)}")
    if unexpected := state.keys() - expected.keys():
        problems.append(f"unexpected {_names(unexpected)}")
    if wrong := [k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape]:
        problems.append(f"other shapes for {_names(wrong)}")
    if problems:
        raise UserError(f"{path}: does not fit {task.spec}: {'; '.join(problems)}")
    model.load_state_dict(state)
    return model.eval()


def original_model(task: ModelTask, checkpoint: str | pathlib.Path, names: dict[str, str] | None = None) -> nn.Module:
    """``build()`` filled from a checkpoint (any format `hmcompress` reads, never unpickling code);
    ``names``: the tensors to take, source name -> the model's (a training checkpoint's model part)."""
    entries = open_checkpoint(checkpoint).entries
    state = {(names or {}).get(e.name, e.name): e.load() for e in entries if names is None or e.name in names}
    return _fill(task, task.build(), state, checkpoint)


def compressed_model(task: ModelTask, compressed: str | pathlib.Path, mode: str = "compact") -> nn.Module:
    """``build()`` loaded from a compressed file through the runtime shim (``patch``: compact
    layers, as a user deploys it; ``mode="dense"``: ``load_state_dict``'s dense weights)."""
    model = task.build()
    if mode == "dense":
        return _fill(task, model, runtime.load_state_dict(compressed), compressed)
    return patched(model, compressed, task.spec).eval()


def patched(model: nn.Module, compressed: str | pathlib.Path, what: str) -> nn.Module:
    """``runtime.patch(model, compressed)``, a file that does not fit ``what`` (the model, named)
    being one line of `UserError`."""
    try:
        runtime.patch(model, compressed)
    except (RuntimeError, ValueError) as err:
        problem = str(err).splitlines()[0].removeprefix(f"{compressed}: ")
        raise UserError(f"{compressed}: does not fit {what}: {problem}") from err
    return model


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖_F / ‖exact‖_F in float64."""
    exact = exact.double()
    return float(torch.linalg.vector_norm(approx.double() - exact) / torch.linalg.vector_norm(exact))


# ---------------------------------------------------------------------------------------------
# Empirical neural tangent kernel

def empirical_ntk(model: nn.Module, inputs: torch.Tensor,
                  output_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                  chunk: int = 8) -> torch.Tensor:
    """Θ = J Jᵀ (float64) with J = ∂f/∂θ over all parameters, for f(x) = ``output_fn(model(x), x)``
    flattened per input (default: ``model(x)``); rows ordered (input, output component).

    J is computed per input with ``vmap(jacrev)`` in chunks of inputs and kept in the model's
    dtype; the products are formed one parameter tensor at a time in float64.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def per_input(theta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        batch = x.unsqueeze(0)
        out = functional_call(model, (theta, buffers), (batch,))
        return (output_fn(out, batch) if output_fn else out).reshape(-1)

    jacobian = vmap(jacrev(per_input), in_dims=(None, 0))
    blocks: dict[str, list[torch.Tensor]] = {name: [] for name in params}
    for part in inputs.split(chunk):
        for name, block in jacobian(params, part).items():
            blocks[name].append(block.reshape(block.shape[0] * block.shape[1], -1))
    theta_ntk = None
    for name in params:
        j = torch.cat(blocks.pop(name)).double()
        product = j @ j.T
        theta_ntk = product if theta_ntk is None else theta_ntk + product
    return theta_ntk


def ntk_inputs(model: nn.Module, task: ModelTask, requested: int) -> torch.Tensor:
    """Up to ``requested`` sample inputs, fewer where J would exceed JACOBIAN_BYTES."""
    probe = task.sample_inputs(1)
    with torch.no_grad():
        out = model(probe)
        outputs = (task.ntk_output(out, probe) if task.ntk_output else out).numel()
    per_input = outputs * sum(p.numel() * p.element_size() for p in model.parameters())
    return task.sample_inputs(max(2, min(requested, JACOBIAN_BYTES // per_input)))


@dataclasses.dataclass
class NTKComparison:
    """‖Θ_H − Θ‖_F / ‖Θ‖_F and the extreme eigenvalues of both kernels."""

    inputs: int
    size: int  # Θ is size x size (inputs x outputs per input)
    rel_fro: float
    eig_max: float
    eig_max_compressed: float
    eig_min: float
    eig_min_compressed: float


def compare_ntk(theta: torch.Tensor, theta_compressed: torch.Tensor, inputs: int) -> NTKComparison:
    eig = torch.linalg.eigvalsh(theta)
    eig_c = torch.linalg.eigvalsh(theta_compressed)
    return NTKComparison(inputs, theta.shape[0], relative_error(theta_compressed, theta),
                         float(eig[-1]), float(eig_c[-1]), float(eig[0]), float(eig_c[0]))


# ---------------------------------------------------------------------------------------------
# Error propagation through the layers

@torch.no_grad()
def layer_outputs(model: nn.Module, inputs: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The output of each named submodule (forward hooks) and of the model (key `OUTPUT`), in
    the order the modules ran."""
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(
        lambda _module, _args, out, name=name: captured.setdefault(name, out.detach()))
        for name in names]
    try:
        captured[OUTPUT] = model(inputs).detach()
    finally:
        for handle in handles:
            handle.remove()
    return captured


@dataclasses.dataclass
class LayerError:
    """One layer of the error-propagation table: weight errors, then activation errors."""

    name: str
    shape: list[int]
    weight_error: float  # ‖W − H‖_F / ‖W‖_F (measured, recorded in the file)
    weight_error_svd: float
    svd_rank: int | None  # None for the model output row
    activation_error: float  # ‖a_H − a‖_F / ‖a‖_F over the sample inputs, after this layer
    activation_error_svd: float


def error_propagation(original: nn.Module, compressed: nn.Module, svd_model: nn.Module, inputs: torch.Tensor,
                      weights: dict[str, tuple[list[int], float, float, int]]) -> list[LayerError]:
    """Activation errors of both approximations after each module named in ``weights`` (module
    name -> weight shape, weight error of H, of SVD, SVD rank) and at the output (last row), in
    the order the modules ran."""
    acts = layer_outputs(original, inputs, list(weights))
    acts_h = layer_outputs(compressed, inputs, list(weights))
    acts_svd = layer_outputs(svd_model, inputs, list(weights))
    rows = []
    for name, exact in acts.items():
        shape, error, error_svd, rank = weights.get(name, (list(exact.shape[1:]), math.nan, math.nan, None))
        rows.append(LayerError(name, shape, error, error_svd, rank, relative_error(acts_h[name], exact),
                               relative_error(acts_svd[name], exact)))
    return rows


# ---------------------------------------------------------------------------------------------
# Truncated SVD at the same tolerance (the paper's comparison)

class SVDBaseline:
    """Each compressed matrix replaced by its truncated SVD of the smallest rank within a relative
    (or absolute) Frobenius tolerance, as `compare` counts it (`baselines.TruncatedSVD`: one rank
    per matrix, factors in the matrix's dtype, the error measured after rounding them).
    Factorisations are computed once."""

    def __init__(self, state: dict[str, torch.Tensor], names: Sequence[str]) -> None:
        self.state = state
        self.fits = {name: TruncatedSVD()(as_matrix(state[name])) for name in names}

    def rank(self, name: str, tol: float, absolute: bool = False) -> int:
        """Smallest r with ‖W − W_r‖_F ≤ tol·‖W‖_F (tol itself if ``absolute``), W_r as stored."""
        fit = self.fits[name]
        return fit.rank_at_limit(tol if absolute else tol * fit.target.norm)

    def truncated(self, tol: float, absolute: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """A state dict with every factored matrix truncated, and the ranks used."""
        state, ranks = dict(self.state), {}
        for name, fit in self.fits.items():
            r = ranks[name] = self.rank(name, tol, absolute)
            original = self.state[name]
            state[name] = fit.stored(r).to(original.dtype).reshape(original.shape)
        return state, ranks

    def nbytes(self, ranks: dict[str, int]) -> int:
        """Bytes of the factors (r·(m+n) numbers, or the dense matrix where that is smaller)."""
        return sum(min(r * self.fits[name].rank_bytes, self.state[name].numel() * self.state[name].element_size())
                   for name, r in ranks.items())

    def dense_nbytes(self) -> int:
        return sum(self.state[name].numel() * self.state[name].element_size() for name in self.fits)


# ---------------------------------------------------------------------------------------------
# Everything together

@dataclasses.dataclass
class SweepRow:
    """One tolerance of the sweep: sizes and the task metric of H and of SVD at that tolerance."""

    tol: float
    ratio: float  # whole checkpoint, bytes before / after
    matrix_ratio: float  # compressed matrices only
    max_weight_error: float
    metric: float
    svd_matrix_ratio: float
    svd_metric: float


@dataclasses.dataclass
class Evaluation:
    model: str
    checkpoint: str
    compressed: str
    tol: float
    absolute: bool
    metric: str
    higher_is_better: bool
    metrics: dict[str, float]  # original model
    metrics_compressed: dict[str, float]
    metrics_svd: dict[str, float]
    samples: int
    output_error: float
    output_error_svd: float
    matrix_bytes: int
    matrix_bytes_compressed: int
    matrix_bytes_svd: int
    ntk: NTKComparison
    ntk_svd: NTKComparison
    layers: list[LayerError]
    sweep: list[SweepRow]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FunctionalCheck:
    """Does the compressed model still do its job: its output beside the original's on the
    package's sample inputs, and the package's headline metric of each."""

    model: str
    samples: int
    output_error: float  # ||f(x) - f_H(x)||_F / ||f(x)||_F over the samples
    metric: str
    original: float
    compressed: float

    def line(self) -> str:
        return (f"model check ({self.model}): output error {self.output_error:.3e} on {self.samples} sample "
                f"inputs; {self.metric} {self.original:.6g} -> {self.compressed:.6g}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def functional_check(task: ModelTask, checkpoint: str | pathlib.Path, compressed: str | pathlib.Path,
                     names: dict[str, str] | None = None, samples: int = 64) -> FunctionalCheck:
    """Run the original and the compressed model (through the shim, as users load it) on the
    package's sample inputs and evaluation (``names``: as for `original_model`)."""
    original, rebuilt = original_model(task, checkpoint, names), compressed_model(task, compressed)
    inputs = task.sample_inputs(samples)
    with torch.no_grad():
        error = relative_error(rebuilt(inputs), original(inputs))
    metric = task.metric or next(iter(task.evaluate(original)))
    return FunctionalCheck(task.spec, int(inputs.shape[0]), error, metric,
                           _metric(task, task.evaluate(original)), _metric(task, task.evaluate(rebuilt)))


def _metric(task: ModelTask, result: dict) -> float:
    key = task.metric or next(iter(result))
    if key not in result:
        raise UserError(f"{task.spec}: evaluate() returned no {key!r} (METRIC)")
    return float(result[key])


def sweep(task: ModelTask, checkpoint: str | pathlib.Path, tols: Sequence[float],
          options: CompressionOptions, selection: Selection, svd: SVDBaseline,
          progress: Callable[[str], None] | None = None) -> list[SweepRow]:
    """Compress ``checkpoint`` at each tolerance (other options as given) into a temporary
    directory, load each file through the runtime shim and score it; SVD at the same tolerance."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="hmcompress-sweep-") as tmp:
        for tol in tols:
            if progress:
                progress(f"sweep: tol {tol:g}")
            opts = dataclasses.replace(options, tol=tol)
            target = pathlib.Path(tmp) / f"tol{tol:g}.hm.safetensors"
            result = compress_checkpoint(checkpoint, target, opts, selection, overwrite=True)
            totals = result.totals()
            metric = _metric(task, task.evaluate(compressed_model(task, target)))
            state, ranks = svd.truncated(tol, options.absolute)
            svd_metric = _metric(task, task.evaluate(_fill(task, task.build(), state, "svd")))
            rows.append(SweepRow(tol, totals["ratio"], totals["matrix_ratio"], totals["max_rel_error"],
                                 metric, svd.dense_nbytes() / svd.nbytes(ranks), svd_metric))
    return rows


def evaluate_compressed(task: ModelTask, checkpoint: str | pathlib.Path, compressed: str | pathlib.Path,
                        samples: int = 64, ntk_samples: int = 32, sweep_tols: Sequence[float] = (),
                        progress: Callable[[str], None] | None = None) -> Evaluation:
    """Compare the original model with its compressed file (and with truncated SVD at the file's
    tolerance): task metric, output error, NTK, per-layer error propagation, optional sweep."""
    def say(message: str) -> None:
        if progress:
            progress(message)

    file = runtime.read_file(compressed)
    meta = file.metadata
    options, selection = options_from_json(meta.get("options", {}))
    names = sorted(meta["matrices"])
    say("loading models")
    original = original_model(task, checkpoint)
    state = original.state_dict()
    missing = [name for name in names if name not in state]
    if missing:
        raise UserError(f"{compressed}: matrices {missing} are not parameters of {task.spec}")
    patched = compressed_model(task, compressed)
    svd = SVDBaseline({k: v.detach() for k, v in state.items()}, names)
    svd_state, ranks = svd.truncated(options.tol, options.absolute)
    svd_model = _fill(task, task.build(), svd_state, "svd")

    say("task metric")
    metrics = task.evaluate(original)
    metrics_h = task.evaluate(patched)
    metrics_svd = task.evaluate(svd_model)

    say("error propagation")
    inputs = task.sample_inputs(samples)
    modules = dict(original.named_modules())
    weights = {}  # module -> its compressed weight's shape, errors (H, SVD) and SVD rank
    for name in names:
        module = name.removesuffix(".weight")
        if module != name and module in modules:
            weights[module] = (list(state[name].shape), meta["matrices"][name]["stats"]["rel_error"],
                               relative_error(svd_state[name], state[name]), ranks[name])
    layers = error_propagation(original, patched, svd_model, inputs, weights)

    say("neural tangent kernel")
    dense_h = compressed_model(task, compressed, mode="dense")
    x_ntk = ntk_inputs(original, task, ntk_samples)
    theta = empirical_ntk(original, x_ntk, task.ntk_output)
    ntk = compare_ntk(theta, empirical_ntk(dense_h, x_ntk, task.ntk_output), len(x_ntk))
    ntk_svd = compare_ntk(theta, empirical_ntk(svd_model, x_ntk, task.ntk_output), len(x_ntk))

    rows = sweep(task, checkpoint, sweep_tols, options, selection, svd, say) if sweep_tols else []
    return Evaluation(
        model=task.spec, checkpoint=str(checkpoint), compressed=str(compressed), tol=options.tol,
        absolute=options.absolute, metric=task.metric or next(iter(metrics)),
        higher_is_better=task.higher_is_better, metrics=metrics, metrics_compressed=metrics_h,
        metrics_svd=metrics_svd, samples=len(inputs),
        output_error=layers[-1].activation_error, output_error_svd=layers[-1].activation_error_svd,
        matrix_bytes=svd.dense_nbytes(),
        matrix_bytes_compressed=sum(file.matrices[name].nbytes for name in names),
        matrix_bytes_svd=svd.nbytes(ranks), ntk=ntk, ntk_svd=ntk_svd, layers=layers, sweep=rows)
