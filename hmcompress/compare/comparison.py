"""hmcompress beside its baselines on every eligible matrix of a checkpoint.

For each matrix and tolerance: every method's outcome at the tolerance (its fewest bytes within
it, or a fixed bit width's own error), and at a matched size, the bytes hmcompress (auto) needed
there, every method's smallest error. Every figure is measured (see `baselines`). The JSON form is
documented in docs/COMPARE.md (schema: docs/compare.schema.json); `tables` gives the same figures as
rows of text for the terminal and the HTML page, and says plainly where hmcompress is not smallest.

With calibration statistics (``activations``, a stats file of `hmcompress calibrate`) every error
of a matrix the file has G for is its output error on the calibration inputs (`InputsNorm`), and
the tolerances are on it; the other matrices keep the plain Frobenius norm.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable

import numpy as np
import torch

from hmcompress.compare.baselines import FROBENIUS, REFERENCE, InputsNorm, Method, Norm, Outcome, tail_norms
from hmcompress.core.build import as_matrix
from hmcompress.core.weighted import InputWeights
from hmcompress.errors import OptionError, UserError
from hmcompress.io.activations import ActivationStats
from hmcompress.io.checkpoint import Selection, classify, open_checkpoint
from hmcompress.io.pipeline import one_thread
from hmcompress.runtime import dense_nbytes

JSON_FORMAT, JSON_VERSION = "hmcompress-compare", 1
Progress = Callable[[int, int, str], None]


@dataclasses.dataclass
class LayerComparison:
    """Every method's outcomes on one matrix, per tolerance."""

    name: str
    shape: tuple[int, int]
    dtype: str
    norm: float
    bytes_dense: int
    sigma: np.ndarray  # singular values of W (in G's norm: of W G^½; float64, descending), for the spectrum picture
    at_tol: dict[float, dict[str, Outcome]]
    matched: dict[float, dict[str, Outcome | None]]  # at the reference's bytes; None: does not fit
    error_norm: str = FROBENIUS.name  # the norm of every error and of `norm` ("frobenius" or "activations")

    def svd_cut(self, tol: float) -> int:
        """The smallest rank whose exact truncation is within the tolerance."""
        return int(np.flatnonzero(tail_norms(self.sigma**2) <= tol * self.norm)[0])

    def smallest(self, tol: float) -> str:
        """The method with the fewest bytes among those within ``tol`` (the reference wins ties)."""
        return _fewest(self.at_tol[tol], lambda out: out.nbytes, lambda out: out.within(tol))


def _fewest(outcomes: dict, size: Callable, eligible: Callable) -> str:
    candidates = [(size(out), name != REFERENCE, name) for name, out in outcomes.items() if eligible(out)]
    # In G's norm the reference (built for the weights) may miss, and so may every method chosen.
    return min(candidates)[2] if candidates else REFERENCE


def compare_matrix(name: str, matrix: torch.Tensor, tols: list[float], methods: dict[str, Method],
                   keep_stored: bool = False, norm: Norm | None = None) -> LayerComparison:
    """Run every method at every tolerance, then at the reference's bytes for each tolerance.

    Only the outcomes at the primary tolerance (``tols[0]``) keep their H-matrix (for pictures)
    and, with ``keep_stored``, their stored matrix Ŵ (for the task metric); the rest keep figures.
    ``norm``: what errors are measured in (default: Frobenius).
    """
    if norm is None:
        fits = {method_name: method(matrix) for method_name, method in methods.items()}
    else:
        fits = {method_name: method(matrix, norm) for method_name, method in methods.items()}
    at_tol = {tol: {n: fit.at_tol(tol) for n, fit in fits.items()} for tol in tols}
    matched = {}
    for tol in tols:
        budget = at_tol[tol][REFERENCE].nbytes
        matched[tol] = {n: at_tol[tol][n] if n == REFERENCE else fit.at_bytes(budget)
                        for n, fit in fits.items()}
    matched = {tol: {n: out and out.slim() for n, out in outs.items()} for tol, outs in matched.items()}
    at_tol = {tol: {n: _kept(out, tol == tols[0], keep_stored) for n, out in outs.items()}
              for tol, outs in at_tol.items()}
    weights = norm.weights if norm is not None else None
    sigma = (torch.linalg.svdvals(matrix.double()) if weights is None else weighted_spectrum(matrix, weights)).numpy()
    size = at_tol[tols[0]][REFERENCE].norm
    return LayerComparison(name, tuple(matrix.shape), str(matrix.dtype).removeprefix("torch."), size,
                           dense_nbytes(tuple(matrix.shape), matrix.dtype), sigma, at_tol, matched,
                           (norm or FROBENIUS).name)


def weighted_spectrum(matrix: torch.Tensor, weights: InputWeights) -> torch.Tensor:
    """The singular values of W G^½ (G = Q Λ Qᵀ: those of W Q Λ^½), whose tails are the errors of
    the best truncations in G's norm (SVD-LLM's, without damping)."""
    values, vectors = torch.linalg.eigh(weights.gram)
    return torch.linalg.svdvals(matrix.double() @ (vectors * values.clamp(min=0).sqrt()))


def _kept(out: Outcome, primary: bool, keep_stored: bool) -> Outcome:
    """Figures always; at the primary tolerance also the H-matrix and, if asked, the stored Ŵ."""
    if not primary:
        return out.slim()
    return out if keep_stored else dataclasses.replace(out, stored=None)


@dataclasses.dataclass
class Total:
    """Sums over the layers an outcome exists for (all of them at a tolerance)."""

    nbytes: int = 0
    bytes_dense: int = 0
    squared_error: float = 0.0
    squared_norm: float = 0.0
    max_rel_error: float = 0.0
    layers: int = 0
    layers_within: int = 0

    def add(self, out: Outcome, bytes_dense: int, tol: float) -> None:
        self.nbytes += out.nbytes
        self.bytes_dense += bytes_dense
        self.squared_error += out.error**2
        self.squared_norm += out.norm**2
        self.max_rel_error = max(self.max_rel_error, out.rel_error)
        self.layers += 1
        self.layers_within += out.within(tol)

    @property
    def ratio(self) -> float | None:
        return self.bytes_dense / self.nbytes if self.nbytes else None

    @property
    def rel_error(self) -> float:
        """||W - Ŵ||_F / ||W||_F over all the matrices together."""
        return math.sqrt(self.squared_error / self.squared_norm) if self.squared_norm else 0.0

    def to_json(self) -> dict:
        return {"bytes": self.nbytes, "bytes_dense": self.bytes_dense, "ratio": self.ratio,
                "rel_error": self.rel_error, "max_rel_error": self.max_rel_error,
                "layers": self.layers, "layers_within": self.layers_within}


@dataclasses.dataclass
class TaskMetrics:
    """The model package's metrics with each method's matrices at one tolerance (analysis protocol)."""

    factory: str
    metric: str  # the headline key
    higher_is_better: bool
    tol: float
    original: dict[str, float]
    methods: dict[str, dict[str, float]]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Comparison:
    source: str
    tolerances: list[float]  # the primary tolerance first, then the sweep, each once
    methods: dict[str, Method]
    layers: list[LayerComparison]
    leaf: int
    task: TaskMetrics | None = None
    activations: str | None = None  # the stats file errors are measured on, where it has G

    @property
    def primary(self) -> float:
        return self.tolerances[0]

    def totals(self, tol: float, matched: bool = False) -> dict[str, Total]:
        """Per method, sums over the layers (at the matched size: over the layers where it fits)."""
        totals = {name: Total() for name in self.methods}
        for layer in self.layers:
            outcomes = (layer.matched if matched else layer.at_tol)[tol]
            for name, out in outcomes.items():
                if out is not None:
                    totals[name].add(out, layer.bytes_dense, tol)
        return totals

    def total_smallest(self, tol: float) -> str:
        """The method with the fewest total bytes among those within ``tol`` on every layer."""
        return _fewest(self.totals(tol), lambda t: t.nbytes, lambda t: t.layers_within == t.layers)

    def not_smallest(self) -> list[dict]:
        """Every (layer or total, tolerance) where a method within the tolerance beats the reference."""
        found = []
        for tol in self.tolerances:
            for layer in self.layers:
                best = layer.smallest(tol)
                if best != REFERENCE:
                    found.append({"layer": layer.name, "tol": tol, "smallest": best,
                                  "bytes": layer.at_tol[tol][best].nbytes,
                                  "reference_bytes": layer.at_tol[tol][REFERENCE].nbytes})
            best = self.total_smallest(tol) if self.layers else REFERENCE
            if best != REFERENCE:
                totals = self.totals(tol)
                found.append({"layer": None, "tol": tol, "smallest": best, "bytes": totals[best].nbytes,
                              "reference_bytes": totals[REFERENCE].nbytes})
        return found

    def to_json(self) -> dict:
        """The documented JSON (docs/COMPARE.md); deterministic for the same input and options."""
        extra = {} if self.activations is None else {"activations": {
            "file": self.activations,
            "error_norm": "relative output error on the calibration inputs, sqrt(tr(E G E^T)) / sqrt(tr(W G W^T)), "
                          "E = W - Ŵ, on the layers the file has G for; relative Frobenius on the others",
            "layers": [layer.name for layer in self.layers if layer.error_norm == InputsNorm.name]}}
        return {**extra, 
            "format": JSON_FORMAT, "version": JSON_VERSION, "source": self.source,
            "tolerances": self.tolerances, "primary_tol": self.primary, "reference": REFERENCE,
            "leaf": self.leaf,
            "methods": [{"name": name, "label": m.label, "bounded": m.bounded} for name, m in self.methods.items()],
            "layers": [_layer_json(layer, self.tolerances, self.activations is not None) for layer in self.layers],
            "totals": [self._totals_json(tol) for tol in self.tolerances],
            "not_smallest": self.not_smallest(),
            "task": self.task.to_json() if self.task else None,
        }

    def _totals_json(self, tol: float) -> dict:
        budget = self.totals(tol)[REFERENCE].nbytes
        smallest = self.total_smallest(tol) if self.layers else REFERENCE
        return {"tol": tol, "smallest": smallest, "reference_smallest": smallest == REFERENCE,
                "methods": {n: t.to_json() for n, t in self.totals(tol).items()},
                "matched": {"budget": budget,
                            "methods": {n: t.to_json() for n, t in self.totals(tol, matched=True).items()}}}


def _outcome_json(out: Outcome | None, bytes_dense: int, tol: float) -> dict | None:
    if out is None:
        return None
    return {"bytes": out.nbytes, "ratio": bytes_dense / out.nbytes if out.nbytes else None,
            "error": out.error, "rel_error": out.rel_error, "within": out.within(tol), "detail": out.detail}


def _layer_json(layer: LayerComparison, tols: list[float], activations: bool = False) -> dict:
    entries = []
    for tol in tols:
        smallest = layer.smallest(tol)
        entries.append({
            "tol": tol, "smallest": smallest, "reference_smallest": smallest == REFERENCE,
            "svd_cut": layer.svd_cut(tol),
            "methods": {n: _outcome_json(o, layer.bytes_dense, tol) for n, o in layer.at_tol[tol].items()},
            "matched": {"budget": layer.at_tol[tol][REFERENCE].nbytes,
                        "methods": {n: _outcome_json(o, layer.bytes_dense, tol)
                                    for n, o in layer.matched[tol].items()}},
        })
    extra = {"error_norm": layer.error_norm} if activations else {}
    return {"name": layer.name, "shape": list(layer.shape), "dtype": layer.dtype, "norm": layer.norm,
            "bytes_dense": layer.bytes_dense, "tolerances": entries, **extra}


def tolerances(tol: float, sweep: str | None) -> list[float]:
    """``tol`` first, then the comma-separated sweep in its order, each tolerance once."""
    values = [tol]
    for part in (sweep or "").split(","):
        if part.strip():
            try:
                values.append(float(part))
            except ValueError:
                raise OptionError("sweep", f"must be comma-separated numbers, got {part.strip()!r}") from None
    for i, value in enumerate(values):
        if not (math.isfinite(value) and 0 < value < 1):
            raise OptionError("sweep" if i else "tol", f"values must lie strictly between 0 and 1, got {value:g}")
    return list(dict.fromkeys(values))


def compare_checkpoint(source: str | pathlib.Path, tols: list[float], methods: dict[str, Method],
                       selection: Selection = Selection(), leaf: int = 32,
                       progress: Progress | None = None, task=None,
                       activations: str | pathlib.Path | None = None) -> Comparison:
    """Compare every method on every matrix of a checkpoint that `compress` would compress.

    ``task`` (an `analysis.ModelTask`): also the task metric of each method at ``tols[0]``.
    ``activations`` (a stats file of `hmcompress calibrate`): errors in G's norm where it has G
    (checked against the checkpoint, and every G checked, before any work).
    """
    if REFERENCE not in methods:
        raise OptionError("methods", f"must include {REFERENCE}, the reference of the matched size")
    ckpt = open_checkpoint(source)
    eligible = [e for e in ckpt.entries if classify(e, selection) is None]
    if not eligible:
        raise UserError(f"{source}: no matrix to compare (none is a floating matrix of at least "
                        f"{selection.min_size}x{selection.min_size} entries; see hmcompress inspect)")
    stats = _checked_stats(activations, ckpt, [e.name for e in eligible], source)
    layers = []
    for index, entry in enumerate(eligible):
        if progress:
            progress(index, len(eligible), entry.name)
        matrix = as_matrix(entry.load())
        if not bool(torch.isfinite(matrix).all()):
            raise UserError(f"{source}: tensor {entry.name!r} contains NaN or Inf values")
        norm = None
        if stats is not None and entry.name in stats.names:  # checked by _checked_stats
            norm = InputsNorm(InputWeights(stats.gram(entry.name, checked=False), stats.samples(entry.name)))
        try:
            with one_thread():  # as compress: the figures may not depend on the thread count
                layers.append(compare_matrix(entry.name, matrix, tols, methods, keep_stored=task is not None,
                                             norm=norm))
        except OverflowError as err:  # compress keeps such a matrix as it is; there is nothing to compare
            raise UserError(f"{source}: tensor {entry.name!r}: {err} (its magnitudes are too large to "
                            "measure; leave it out with --exclude)") from err
    metrics = task_metrics(task, source, layers, list(methods), tols[0]) if task is not None else None
    for layer in layers:  # the stored matrices were kept for the task metric only
        layer.at_tol[tols[0]] = {n: dataclasses.replace(o, stored=None) for n, o in layer.at_tol[tols[0]].items()}
    return Comparison(str(source), tols, methods, layers, leaf, metrics,
                      None if activations is None else str(activations))


def _checked_stats(activations: str | pathlib.Path | None, ckpt, eligible: list[str],
                   source: str | pathlib.Path) -> ActivationStats | None:
    """The stats file, checked as `compress --activations` checks it: it belongs to this
    checkpoint (every matrix of it counts, compared or not), and each G of a compared matrix is
    sound. Each problem is one line of `UserError`."""
    if activations is None:
        return None
    stats = ActivationStats.open(activations)
    shapes = {e.name: tuple(as_matrix(torch.empty(e.shape, device="meta")).shape) for e in ckpt.entries
              if len(e.shape) >= 2}
    stats.check_against(shapes, source)
    for name in sorted(set(stats.names) & set(eligible)):
        stats.gram(name)
    return stats


def task_metrics(task, source: str | pathlib.Path, layers: list[LayerComparison], methods: list[str],
                 tol: float) -> TaskMetrics:
    """Evaluate the model with the checkpoint's weights, then with each method's matrices in place."""
    from hmcompress.evaluate.analysis import original_model  # checks the checkpoint fits the model, in one line if not

    model = original_model(task, source)
    state = model.state_dict()
    original = task.evaluate(model)
    scores = {}
    for name in methods:
        replaced = dict(state)
        for layer in layers:
            stored = layer.at_tol[tol][name].stored
            replaced[layer.name] = stored.reshape(state[layer.name].shape).to(state[layer.name].dtype)
        candidate = task.build()
        candidate.load_state_dict(replaced)
        scores[name] = task.evaluate(candidate.eval())
    metric = task.metric or next(iter(original))
    return TaskMetrics(task.spec, metric, task.higher_is_better, tol, original, scores)


# ------------------------------------------------------------------------------------------------
# The same figures as rows of text (terminal tables and the HTML page)

MISS = "✗"


@dataclasses.dataclass
class TextTable:
    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str]


def _ratio(bytes_dense: int, nbytes: int) -> str:
    return f"{bytes_dense / nbytes:.3g}x" if nbytes else "inf"


def _tol_cell(out: Outcome, bytes_dense: int, tol: float) -> str:
    return f"{_ratio(bytes_dense, out.nbytes)} {out.rel_error:.1e}" + ("" if out.within(tol) else f" {MISS}")


def _verdict(best: str, best_bytes: int, reference_bytes: int) -> str:
    if best == REFERENCE:
        return "yes"
    return f"NO: {best} {best_bytes} B < {reference_bytes} B"


def tol_table(c: Comparison, tol: float) -> TextTable:
    """Bytes ratio and relative error of every method at one tolerance, per layer and in total."""
    rows = []
    for layer in c.layers:
        best = layer.smallest(tol)
        outs = layer.at_tol[tol]
        rows.append([layer.name, "x".join(map(str, layer.shape))]
                    + [_tol_cell(outs[n], layer.bytes_dense, tol) for n in c.methods]
                    + [_verdict(best, outs[best].nbytes, outs[REFERENCE].nbytes)])
    totals = c.totals(tol)
    if c.layers:
        best = c.total_smallest(tol)
        cells = [f"{_ratio(t.bytes_dense, t.nbytes)} {t.rel_error:.1e}"
                 + ("" if t.layers_within == t.layers else f" {MISS}{t.layers - t.layers_within}")
                 for t in totals.values()]
        rows.append(["total", ""] + cells + [_verdict(best, totals[best].nbytes, totals[REFERENCE].nbytes)])
    beaten = [r for r in c.not_smallest() if r["tol"] == tol]
    summary = (f"{REFERENCE} has the fewest bytes among the methods within tol {tol:g} on every layer and in total."
               if not beaten else
               f"{REFERENCE} is NOT the smallest on {len(beaten)} of {len(c.layers) + 1} rows at tol {tol:g}: "
               + "; ".join(f"{r['layer'] or 'total'} ({r['smallest']})" for r in beaten) + ".")
    notes = [summary,
             f"cells: bytes ratio (dense / stored) and measured relative Frobenius error; {MISS} = not within "
             f"tol (fixed bit widths are shown at their own error; in the total row {MISS}N counts the layers "
             "missed); total error = ||W - Ŵ||_F / ||W||_F over all the matrices together."]
    if c.activations is not None:
        notes[1:] = [error_norm_note(c)]
    return TextTable(f"{c.source} at tol {tol:g}", ["layer", "shape", *c.methods, f"{REFERENCE} smallest?"],
                     rows, notes)


def error_norm_note(c: Comparison) -> str:
    """The line that says which norm a comparison with calibration statistics measured in."""
    weighted = sum(layer.error_norm == InputsNorm.name for layer in c.layers)
    plain = [layer.name for layer in c.layers if layer.error_norm != InputsNorm.name]
    return (f"errors are OUTPUT errors on the calibration inputs of {c.activations} (G = X Xᵀ / N): cells show "
            f"the bytes ratio (dense / stored) and the measured sqrt(tr(E G Eᵀ)) / sqrt(tr(W G Wᵀ)), "
            f"E = W - Ŵ, on {weighted} of {len(c.layers)} layers"
            + (f"; relative Frobenius on the {len(plain)} without G ({', '.join(plain[:3])}"
               f"{', ...' if len(plain) > 3 else ''})" if plain else "")
            + f"; tol is on that error; {MISS} = not within tol (fixed bit widths at their own error; "
            f"in the total row {MISS}N counts the layers missed); total error = sqrt(Σ errors² / Σ norms²).")


def matched_table(c: Comparison, tol: float) -> TextTable:
    """Relative error of every method within the bytes hmcompress (auto) needs at ``tol``."""
    def cell(out: Outcome | None) -> str:
        return "does not fit" if out is None else f"{out.rel_error:.2e}"

    rows = []
    for layer in c.layers:
        outs = layer.matched[tol]
        budget = outs[REFERENCE].nbytes
        best = _fewest(outs, lambda o: o.error, lambda o: o is not None)
        rows.append([layer.name, f"{budget} B ({_ratio(layer.bytes_dense, budget)})"]
                    + [cell(outs[n]) for n in c.methods] + [best])
    notes = [f"Each method's smallest measured relative error within the bytes {REFERENCE} needs at tol {tol:g} "
             "(SVD: the largest rank that fits; pruning: the most entries; H-matrix methods: bisection on "
             "their tolerance; quantizers: their one size, if it fits)."]
    if c.activations is not None:
        notes.append(f"errors in the norm of the calibration inputs of {c.activations} where it has G (see above).")
    return TextTable(f"{c.source}: matched size ({REFERENCE} bytes at tol {tol:g})",
                     ["layer", "budget", *c.methods, "smallest error"], rows, notes)


def task_table(t: TaskMetrics) -> TextTable:
    """Every metric of the model package, original and with each method's matrices."""
    keys = list(t.original)

    def cell(value: object) -> str:
        return f"{value:.6g}" if isinstance(value, float) else str(value)

    rows = [["original", *(cell(t.original[k]) for k in keys), ""]]
    for name, scores in t.methods.items():
        change = float(scores[t.metric]) - float(t.original[t.metric])
        rows.append([name, *(cell(scores.get(k, "")) for k in keys), f"{change:+.4g}"])
    better = "higher" if t.higher_is_better else "lower"
    return TextTable(f"task metric ({t.factory}) at tol {t.tol:g}", ["method", *keys, f"change in {t.metric}"],
                     rows, [f"{t.metric}: {better} is better. Each method's compared matrices replace the "
                            "checkpoint's; every other tensor is the checkpoint's own."])


def tables(c: Comparison) -> list[TextTable]:
    """At every tolerance: the tolerance table, then the matched-size table; then the task metric."""
    out = [table for tol in c.tolerances for table in (tol_table(c, tol), matched_table(c, tol))]
    return out + ([task_table(c.task)] if c.task else [])
