"""Verdicts for pipelines: quality gates on a compression, and re-checks of a file's recorded figures.

Gates (``compress --max-error E --min-ratio R``) judge what was just measured:

- max-error: the largest relative Frobenius error ``‖W − H‖_F / ‖W‖_F`` over the compressed
  matrices (0 when nothing is compressed) must be <= E;
- min-ratio: the whole checkpoint's bytes ratio, every tensor's bytes in the source over every
  tensor's bytes written (passthrough tensors included, file headers not), must be >= R.

Re-checks (``verify``) hold each recorded figure against the original W and the stored H. Each
check errs on the file's side: it fails only when the figure is wrong by more than the rounding
of the check's own float64 arithmetic, so a failure is a real broken promise.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from hmcompress.core.bounds import rounding_margin
from hmcompress.core.build import measured_error
from hmcompress.errors import OptionError
from hmcompress.runtime import FormatError, HMatrix, dense_nbytes

VERIFY_SVD_MAX_SIDE = 2048  # larger matrices: sigma and kappa(H) are not recomputed (too slow)
POWER_ITERATIONS = 30
RELATIVE_SLACK = 1e-9  # recorded figures are printed rounded to ~15 digits


class _Layer(Protocol):
    name: str
    compressed: bool
    rel_error: float


@dataclasses.dataclass(frozen=True)
class Gates:
    """Thresholds a compression must meet; None disables a gate."""

    max_error: float | None = None
    min_ratio: float | None = None

    def __post_init__(self) -> None:
        for option, value in (("max_error", self.max_error), ("min_ratio", self.min_ratio)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise OptionError(option, f"must be a finite number >= 0, got {value}")

    def failures(self, layers: Sequence[_Layer], totals: dict) -> list[str]:
        """One sentence per gate the result misses (empty: every gate passed)."""
        failures = []
        if self.max_error is not None:
            worst = max((layer for layer in layers if layer.compressed), key=lambda l: l.rel_error, default=None)
            if worst is not None and not worst.rel_error <= self.max_error:
                failures.append(f"relative error {worst.rel_error:.6g} of {worst.name!r} exceeds "
                                f"--max-error {self.max_error:g}")
        if self.min_ratio is not None:
            ratio = totals["ratio"]
            if ratio is not None and not ratio >= self.min_ratio:
                failures.append(f"bytes ratio {ratio:.6g} is below --min-ratio {self.min_ratio:g}")
        return failures


# -------------------------------------------------------------------------------- recorded stats

_JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "list[int]": (list,),
               "dict[str, int]": (dict,)}


def recorded_fields(cls: type, stats: object, where: str) -> dict:
    """The fields of dataclass ``cls`` found in a file's ``stats`` object, type-checked.

    Unknown keys are ignored (newer writers may add some); a missing required field or a value
    of the wrong JSON type is a `FormatError` naming ``where`` and the field.
    """
    if not isinstance(stats, dict):
        raise FormatError(f"{where}: stats must be a JSON object")
    values = {}
    for field in dataclasses.fields(cls):
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if field.name not in stats:
            if required:
                raise FormatError(f"{where}: stats lack {field.name!r}")
            continue
        value = stats[field.name]
        annotation = str(field.type).replace(" | None", "")
        allowed = _JSON_TYPES.get(annotation)
        nullable = "None" in str(field.type)
        wrong = allowed is not None and not (isinstance(value, allowed) or (nullable and value is None))
        if allowed is not None and annotation != "bool" and isinstance(value, bool):
            wrong = True
        if wrong:
            raise FormatError(f"{where}: stats field {field.name!r} has {type(value).__name__} {value!r}, "
                              f"expected {field.type}")
        values[field.name] = value
    return values


# -------------------------------------------------------------------------------- re-checks

def _exceeds(value: float, bound: float) -> bool:
    """``value > bound`` beyond the relative slack of a recorded figure (NaN counts as exceeding)."""
    return not value <= bound * (1 + RELATIVE_SLACK) + 1e-300


def _spectral_lower_bound(matrix: torch.Tensor) -> float:
    """A rigorous lower bound on ``‖matrix‖₂``: ``‖A v‖ / ‖v‖`` after power iteration, less the
    rounding of computing it in float64."""
    m, n = matrix.shape
    if matrix.numel() == 0:
        return 0.0
    v = torch.linspace(1.0, 2.0, n, dtype=torch.float64)
    for _ in range(POWER_ITERATIONS):
        w = matrix.T @ (matrix @ v)
        norm = float(torch.linalg.vector_norm(w))
        if not norm > 0 or not math.isfinite(norm):
            break
        v = w / norm
    estimate = float(torch.linalg.vector_norm(matrix @ v) / torch.linalg.vector_norm(v))
    margin = rounding_margin((m, n), torch.float64, float(torch.linalg.matrix_norm(matrix)))
    return max(estimate - margin, 0.0)


def recorded_problems(original: torch.Tensor, hm: HMatrix, stats: dict, absolute: bool,
                      where: str) -> tuple[float, list[str]]:
    """Re-measure one matrix; return ``(measured ‖W − H‖_F, problems)``, problems empty if every
    recorded figure holds.

    ``original`` is W (2-D), ``hm`` the stored H, ``stats`` its recorded figures as
    `recorded_fields` type-checked them, ``absolute`` the file's ``--abs`` option (the tolerance
    is then not relative to ‖W‖_F).
    """
    for key in ("tol", "budget", "fro_error"):
        if stats.get(key) is None:
            raise FormatError(f"{where}: stats lack {key!r}")
    w = original.double()
    stored = hm.to_dense(torch.float64)
    measured = measured_error(w, stored, hm.dtype)
    norm = float(torch.linalg.matrix_norm(w)) if w.numel() else 0.0
    tol = float(stats["tol"])
    figures = {key: None if stats.get(key) is None else float(stats[key]) for key in
               ("budget", "fro_error", "rel_error", "spectral_error", "sigma_max", "sigma_min", "kappa_h_bound")}
    problems = []

    def check(value: float, bound: float | None, what: str) -> None:
        if bound is not None and _exceeds(value, bound):
            problems.append(f"{what} ({value:.6g} > {bound:.6g})")

    allowed = tol if absolute else tol * norm
    check(measured, allowed, "‖W − H‖_F above the tolerance")
    check(measured, figures["budget"], "‖W − H‖_F above the recorded budget")
    check(measured, figures["fro_error"], "‖W − H‖_F above the recorded error")
    if norm > 0:
        check(measured / norm, figures["rel_error"], "relative error above the recorded one")
    check(_spectral_lower_bound(w - stored), figures["spectral_error"], "‖W − H‖₂ above its recorded bound")
    _check_bytes(w, hm, stats, problems)
    if max(w.shape, default=0) <= VERIFY_SVD_MAX_SIDE and w.numel():
        _check_spectra(w, stored, figures, check)
    else:
        check(_spectral_lower_bound(w), figures["sigma_max"], "σ_max(W) above its recorded bound")
    return measured, problems


def _check_bytes(w: torch.Tensor, hm: HMatrix, stats: dict, problems: list[str]) -> None:
    for key, actual in (("bytes_after", hm.nbytes), ("bytes_before", dense_nbytes(tuple(w.shape), hm.dtype))):
        recorded = stats.get(key)
        if recorded is not None and recorded != actual:
            problems.append(f"{key}: recorded {recorded}, actual {actual}")


def _check_spectra(w: torch.Tensor, stored: torch.Tensor, figures: dict,
                   check: Callable[[float, float | None, str], None]) -> None:
    """σ_max(W) <= recorded upper bound, σ_min(W) >= recorded lower bound, κ(H) <= recorded bound;
    singular values in float64, each widened by its rounding margin in the file's favour."""
    sigma_w = torch.linalg.svdvals(w)
    margin_w = rounding_margin(tuple(w.shape), torch.float64, float(sigma_w[0]))
    check(float(sigma_w[0]) - margin_w, figures["sigma_max"], "σ_max(W) above its recorded bound")
    if figures["sigma_min"] is not None:
        check(figures["sigma_min"], float(sigma_w[-1]) + margin_w, "recorded lower bound on σ_min(W) above σ_min(W)")
    if figures["kappa_h_bound"] is None:
        return
    sigma_h = torch.linalg.svdvals(stored)
    margin_h = rounding_margin(tuple(stored.shape), torch.float64, float(sigma_h[0]))
    denominator = float(sigma_h[-1]) + margin_h
    kappa_low = (float(sigma_h[0]) - margin_h) / denominator if denominator > 0 else math.inf
    check(kappa_low, figures["kappa_h_bound"], "κ(H) above its recorded bound")

