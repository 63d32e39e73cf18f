"""Verdicts for pipelines: quality gates on a compression, and re-checks of a file's recorded figures.

Gates (``compress --max-error E --min-ratio R``) judge what was just measured:

- max-error: the largest relative Frobenius error ``‖W − H‖_F / ‖W‖_F`` over the compressed
  matrices (0 when nothing is compressed) must be <= E;
- min-ratio: the whole checkpoint's bytes ratio, every tensor's bytes in the source over every
  tensor's bytes written (passthrough tensors included, file headers not), must be >= R.

Re-checks (``verify``) hold each recorded figure against the original W and both forms of the
stored H: as loaded (H64 rounded once to the source dtype) and H64 itself. Each check errs on the
file's side: it fails only when the figure is wrong by more than the rounding of the check's own
float64 arithmetic, so a failure is a real broken promise.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from hmcompress.core.bounds import UNIT64, down, frobenius, frobenius_relative_error, rounding_margin, up
from hmcompress.core.stats import NONFINITE_FIGURES
from hmcompress.core.weighted import activation_energy
from hmcompress.errors import OptionError
from hmcompress.runtime import MATRIX_DTYPE_NAMES, FormatError, HMatrix, brief, dense_nbytes
from hmcompress.runtime.matrix import round_to_dtype

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

# Fields renamed since files were first written: new name -> the name older files use.
LEGACY_NAMES = {"sigma_max_upper": "sigma_max", "sigma_min_lower": "sigma_min"}
_JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "list[int]": (list,),
               "dict[str, int]": (dict,)}


def recorded_fields(cls: type, stats: object, where: str) -> dict:
    """The fields of dataclass ``cls`` found in a file's ``stats`` object, type-checked.

    Unknown keys are ignored (newer writers may add some); a field an older writer stored under
    its former name (`LEGACY_NAMES`) is read from that name; a missing required field or a value
    of the wrong JSON type is a `FormatError` naming ``where`` and the field. A float figure is a
    finite JSON number or one of the strings "inf", "-inf", "nan" (`NONFINITE_FIGURES`: how a
    figure that overflowed float64 is stored); counts (bytes, ranks, sides) are integers in
    [0, 2**63).
    """
    if not isinstance(stats, dict):
        raise FormatError(f"{where}: stats must be a JSON object")
    values = {}
    for field in dataclasses.fields(cls):
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        key = field.name if field.name in stats else LEGACY_NAMES.get(field.name, field.name)
        if key not in stats:
            if required:
                raise FormatError(f"{where}: stats lack {field.name!r}")
            continue
        value = stats[key]
        annotation = str(field.type).replace(" | None", "")
        if annotation == "float" and isinstance(value, str) and value in NONFINITE_FIGURES:
            values[field.name] = NONFINITE_FIGURES[value]  # an overflowed figure, as `LayerStats.to_json` stores it
            continue
        allowed = _JSON_TYPES.get(annotation)
        nullable = "None" in str(field.type)
        wrong = allowed is not None and not (isinstance(value, allowed) or (nullable and value is None))
        if allowed is not None and annotation != "bool" and isinstance(value, bool):
            wrong = True
        if not wrong and annotation == "float" and value is not None:
            # a JSON number beyond float64 (1e400 parses as inf, a 400-digit integer as no float
            # at all) is no figure: hmcompress stores an overflowed one as a string (above)
            wrong = not (math.isfinite(value) if isinstance(value, float) else abs(value) < 2**1023)
        if not wrong and annotation in ("int", "list[int]", "dict[str, int]") and value is not None:  # counts
            counts = [value] if annotation == "int" else value.values() if isinstance(value, dict) else value
            wrong = not all(type(v) is int and 0 <= v < 2**63 for v in counts)
        if wrong:
            raise FormatError(f"{where}: stats field {key!r} has {type(value).__name__} {brief(value)}, "
                              f"expected {field.type}")
        values[field.name] = float(value) if annotation == "float" and type(value) is int else value
    if values.get("compressed") is True and values.get("bytes_after") == 0:  # a block table takes bytes
        raise FormatError(f"{where}: stats field 'bytes_after' is 0 for a compressed matrix")
    return values


# -------------------------------------------------------------------------------- re-checks

def _exceeds(value: float, bound: float) -> bool:
    """``value > bound`` beyond the relative slack of a recorded figure (NaN counts as exceeding)."""
    return not value <= bound * (1 + RELATIVE_SLACK) + 1e-300


def _forms(hm: HMatrix) -> list[tuple[str, torch.Tensor]]:
    """The matrices a user of ``hm`` can get, labelled: H64 rounded once to the source dtype (what
    ``decompress`` and ``hmruntime`` return), then H64 itself if it differs (as float64)."""
    stored = hm.to_dense(torch.float64)
    dtype = MATRIX_DTYPE_NAMES[hm.dtype]
    if hm.dtype == torch.float64:
        return [(f"as loaded ({dtype})", stored)]
    loaded = round_to_dtype(stored, hm.dtype).double()
    if torch.equal(loaded, stored):
        return [(f"as loaded ({dtype})", loaded)]
    return [(f"as loaded ({dtype})", loaded), ("in float64", stored)]


def _scaled(matrix: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(matrix * 2**-e, 2**e)`` with the largest magnitude scaled into [0.5, 1): exact, and safe
    to multiply without overflow or underflow."""
    peak = float(matrix.abs().max()) if matrix.numel() else 0.0
    if not 0 < peak < math.inf:
        return matrix, 1.0
    exponent = math.frexp(peak)[1]
    return matrix * math.ldexp(1.0, -exponent), math.ldexp(1.0, exponent)


def _spectral_range(residual: torch.Tensor, exact: bool) -> tuple[float, float]:
    """A rigorous ``(lower, upper)`` range for ``‖R‖₂`` given ``residual`` = fl64(R) (each entry
    within u64 of R's, so ‖residual − R‖₂ <= u64·‖R‖_F): its float64 SVD widened by the SVD's
    rounding when ``exact``; otherwise a power-iteration lower bound and the Frobenius norm."""
    if residual.numel() == 0:
        return 0.0, 0.0
    fro = frobenius(residual) * (1 + frobenius_relative_error(tuple(residual.shape)))
    formed = up(UNIT64 * fro / (1 - UNIT64))  # >= u64·‖R‖_F
    if exact:
        top = float(torch.linalg.svdvals(residual)[0])
        margin = rounding_margin(tuple(residual.shape), torch.float64, top)
        return max(down(top - margin - formed), 0.0), min(up(top + margin + formed), up(fro + formed))
    return max(down(_spectral_lower_bound(residual) - formed), 0.0), up(fro + formed)


def _spectral_lower_bound(matrix: torch.Tensor) -> float:
    """A rigorous lower bound on ``‖matrix‖₂``: ``‖A v‖ / ‖v‖`` after power iteration (on the
    matrix scaled by a power of two), less the rounding of computing it in float64."""
    m, n = matrix.shape
    if matrix.numel() == 0:
        return 0.0
    scaled, scale = _scaled(matrix)
    v = torch.linspace(1.0, 2.0, n, dtype=torch.float64)
    for _ in range(POWER_ITERATIONS):
        w = scaled.T @ (scaled @ v)
        norm = float(torch.linalg.vector_norm(w))
        if not norm > 0 or not math.isfinite(norm):
            break
        v = w / norm
    estimate = float(torch.linalg.vector_norm(scaled @ v) / torch.linalg.vector_norm(v))
    margin = 4 * max(m, n) * UNIT64 * frobenius(scaled)
    return max(down(estimate - margin), 0.0) * scale


def recorded_problems(original: torch.Tensor, hm: HMatrix, stats: dict, absolute: bool,
                      where: str, gram: torch.Tensor | None = None) -> tuple[float, list[str]]:
    """Re-measure one matrix; return ``(measured ‖W − H‖_F, problems)``, problems empty if every
    recorded figure holds.

    ``original`` is W (2-D), ``hm`` the stored H, ``stats`` its recorded figures as
    `recorded_fields` type-checked them, ``absolute`` the file's ``--abs`` option (the tolerance
    is then not relative to ‖W‖_F). Every error figure is checked against both forms a user can
    get (`_forms`): H64 rounded once to the source dtype, as loaded, and H64 itself. The measured
    error returned is the larger of the two, as computed in float64. A matrix built for its
    calibration inputs (stats ``norm`` "activations") has its tolerance on those: with ``gram``
    (their G) the data-aware figures are re-measured (`_check_activations`); its plain figures
    are checked in any case, but not against the tolerance.
    """
    for key in ("tol", "budget", "fro_error"):
        if stats.get(key) is None:
            raise FormatError(f"{where}: stats lack {key!r}")
    w = original.double()
    forms = _forms(hm)
    relative_error = frobenius_relative_error(tuple(w.shape))
    measured = max(frobenius(w, form) for _label, form in forms)
    low = measured * (1 - relative_error)  # a lower bound on the exact ‖W − H‖_F
    norm = frobenius(w)
    norm_high = norm * (1 + relative_error)
    tol = float(stats["tol"])
    figures = {key: None if stats.get(key) is None else float(stats[key]) for key in
               ("budget", "fro_error", "rel_error", "spectral_error", "sigma_max_upper", "sigma_min_lower",
                "kappa_h_bound")}
    problems = []

    def check(value: float, bound: float | None, what: str) -> None:
        if bound is not None and _exceeds(value, bound):
            problems.append(f"{what} ({value:.6g} > {bound:.6g})")

    allowed = tol if absolute else up(tol * norm_high, 1)
    if stats.get("norm", "weights") not in ("weights", "activations"):
        raise FormatError(f"{where}: stats field 'norm' is {brief(stats.get('norm'))}, not weights or activations")
    if stats.get("norm") == "activations":
        for key in ("act_error", "act_rel_error", "act_budget"):
            if stats.get(key) is None:
                raise FormatError(f"{where}: stats lack {key!r}, which a matrix built for its inputs records")
        if gram is not None:
            _check_activations(w, forms, gram, stats, tol, absolute, check)
    else:
        check(low, allowed, "‖W − H‖_F above the tolerance")
    check(low, figures["budget"], "‖W − H‖_F above the recorded budget")
    check(low, figures["fro_error"], "‖W − H‖_F above the recorded error")
    if norm > 0:
        check(down(low / norm_high, 1), figures["rel_error"], "relative error above the recorded one")
    small = max(w.shape, default=0) <= VERIFY_SVD_MAX_SIDE and w.numel() > 0
    _check_spectral_error(w, forms, figures["spectral_error"], small, check)
    _check_bytes(w, hm, stats, problems)
    if small:
        _check_spectra(w, forms, figures, check)
    else:
        check(_spectral_lower_bound(w), figures["sigma_max_upper"], "σ_max(W) above its recorded bound")
    return measured, problems


def _check_activations(w: torch.Tensor, forms: list[tuple[str, torch.Tensor]], gram: torch.Tensor, stats: dict,
                       tol: float, absolute: bool, check: Callable[[float, float | None, str], None]) -> None:
    """Re-measure ||(W - H)X||_F / sqrt(N) = sqrt(tr(E G Eᵀ)) on both forms and check the
    recorded data-aware figures and the tolerance against a lower bound on it."""
    if tuple(gram.shape) != (w.shape[1], w.shape[1]):
        check(math.inf, 0.0, f"G is {tuple(gram.shape)}, not for a matrix of {w.shape[1]} columns")
        return
    low = 0.0
    for _label, form in forms:
        value, slack = activation_energy(w, gram, form)
        low = max(low, math.sqrt(max(value - slack, 0.0)))
    value, slack = activation_energy(w, gram)
    norm_high = math.sqrt(max(value + slack, 0.0))
    allowed = tol if absolute else up(tol * norm_high, 1)
    check(down(low, 1), allowed, "‖(W − H)X‖ above the tolerance on the calibration inputs")
    check(down(low, 1), _figure(stats, "act_budget"), "‖(W − H)X‖ above the recorded budget")
    check(down(low, 1), _figure(stats, "act_error"), "‖(W − H)X‖ above the recorded error")
    if norm_high > 0:
        check(down(low / norm_high, 1), _figure(stats, "act_rel_error"), "‖(W − H)X‖ / ‖WX‖ above the recorded one")


def _figure(stats: dict, key: str) -> float | None:
    return None if stats.get(key) is None else float(stats[key])


def _check_spectral_error(w: torch.Tensor, forms: list[tuple[str, torch.Tensor]], recorded: float | None,
                          exact: bool, check: Callable[[float, float | None, str], None]) -> None:
    """‖W − H‖₂ <= the recorded bound for every form; the second form's residual is only
    decomposed if ‖W − H₁‖₂ + ‖H₁ − H₂‖_F does not already settle it."""
    if recorded is None:
        return
    first_high = None
    for label, form in forms:
        if first_high is not None and up(first_high + _fro_high(forms[0][1], form)) <= recorded:
            continue  # the second form cannot exceed the bound
        low, high = _spectral_range(w - form, exact)
        first_high = high if first_high is None else first_high
        check(low, recorded, f"‖W − H‖₂ above its recorded bound (H {label})")


def _fro_high(a: torch.Tensor, b: torch.Tensor) -> float:
    return frobenius(a, b) * (1 + frobenius_relative_error(tuple(a.shape)))


def _check_bytes(w: torch.Tensor, hm: HMatrix, stats: dict, problems: list[str]) -> None:
    for key, actual in (("bytes_after", hm.nbytes), ("bytes_before", dense_nbytes(tuple(w.shape), hm.dtype))):
        recorded = stats.get(key)
        if recorded is not None and recorded != actual:
            problems.append(f"{key}: recorded {recorded}, actual {actual}")


def _check_spectra(w: torch.Tensor, forms: list[tuple[str, torch.Tensor]], figures: dict,
                   check: Callable[[float, float | None, str], None]) -> None:
    """σ_max(W) <= recorded upper bound, σ_min(W) >= recorded lower bound, κ(H) <= recorded bound
    for every form of H; singular values in float64, each widened by its rounding margin in the
    file's favour."""
    sigma_w = torch.linalg.svdvals(w)
    margin_w = rounding_margin(tuple(w.shape), torch.float64, float(sigma_w[0]))
    check(down(float(sigma_w[0]) - margin_w), figures["sigma_max_upper"], "σ_max(W) above its recorded bound")
    if figures["sigma_min_lower"] is not None:
        check(figures["sigma_min_lower"], up(float(sigma_w[-1]) + margin_w),
              "recorded lower bound on σ_min(W) above σ_min(W)")
    recorded = figures["kappa_h_bound"]
    if recorded is None:
        return
    first = None
    for label, form in forms:
        if first is not None:  # Weyl: the second form's singular values are within ‖H₁ − H₂‖_F
            top, last, margin = first
            shift = margin + _fro_high(forms[0][1], form)
            if down(last - shift) > 0 and up((top + shift) / down(last - shift)) <= recorded:
                continue
        sigma = torch.linalg.svdvals(form)
        top, last = float(sigma[0]), float(sigma[-1])
        margin = rounding_margin(tuple(form.shape), torch.float64, top)
        first = first or (top, last, margin)
        denominator = up(last + margin)
        kappa_low = down(top - margin) / denominator if denominator > 0 else math.inf
        check(kappa_low, recorded, f"κ(H) above its recorded bound (H {label})")
