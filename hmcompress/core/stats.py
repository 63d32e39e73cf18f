"""What the report says about each tensor: measured errors, bounds, structure and bytes.

One `LayerStats` per tensor is computed when a matrix is compressed, stored in the file's
metadata, and read back by `report`: one source of truth, never recomputed.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from hmcompress.core.bounds import UNIT64, compute_bounds
from hmcompress.core.build import ActivationFigures, CompressionOptions, as_matrix
from hmcompress.core.ratedistortion import rate_figures
from hmcompress.runtime import DENSE, LOWRANK, ROWS, HMatrix, dense_nbytes


@dataclasses.dataclass
class LayerStats:
    """What the report says about one tensor (compressed or passed through)."""

    name: str
    shape: list[int]
    dtype: str
    bytes_before: int
    bytes_after: int
    compressed: bool
    reason: str = ""  # why it passed through
    blocks_lowrank: int = 0  # low-rank leaves (zero blocks included)
    blocks_rows: int = 0  # leaves stored row by row, each row in its own precision
    blocks_dense: int = 0
    max_rank: int = 0
    mean_rank: float = 0.0
    codecs: dict[str, int] = dataclasses.field(default_factory=dict)  # codec -> bytes
    # Errors and bounds (docs/FORMAT.md, "Statistics"). "H" is both forms of the stored matrix:
    # H64, its float64 reconstruction, and H64 rounded once to the source dtype (what users load);
    # every error figure is an upper bound for both, every bound holds for the exact quantities.
    tol: float = 0.0  # the relative (or absolute) tolerance asked for
    budget: float = 0.0  # allowed ||W - H||_F: tol (absolute) or tol times a lower bound on ||W||_F
    fro_error: float = 0.0  # upper bound on ||W - H||_F (measured in float64, widened by its rounding)
    rel_error: float = 0.0  # upper bound on ||W - H||_F / ||W||_F
    spectral_error: float = 0.0  # upper bound on ||W - H||_2
    spectral_method: str = ""  # "svd": residuals' SVDs widened by their rounding; "frobenius": fro_error
    sigma_max_upper: float = 0.0  # upper bound on sigma_max(W) (files of hmcompress 0.1: "sigma_max")
    sigma_min_lower: float = 0.0  # lower bound on sigma_min(W), >= 0 (files of hmcompress 0.1: "sigma_min")
    kappa_w: float | None = None  # sigma_max(W) / sigma_min(W) as computed: an estimate; None: singular, or not computed
    kappa_h_bound: float | None = None  # upper bound on kappa(H) (Weyl); None: unbounded
    kappa_h_paper: float | None = None  # the paper's Theorem 1(c) figure: not a bound
    strategy: str = ""
    # The rate-distortion limit at the measured mean squared error D = fro_error² / entries, bits
    # an entry (core.ratedistortion); None where D = 0, and in files written before these figures.
    rd_gaussian_bits: float | None = None  # a Gaussian of the entries' variance: an upper bound on R(D)
    rd_lower_bits: float | None = None  # Shannon's lower bound for the entries' histogram density
    # The norm the budget was on (`compress --activations`, docs/FORMAT.md "Data-aware budget"):
    # "weights", ||W - H||_F <= tol ||W||_F; "activations", ||(W - H) X||_F <= tol ||W X||_F on the
    # calibration inputs X, i.e. tr(E G Eᵀ) <= tol² tr(W G Wᵀ) with G = X Xᵀ / N. Under
    # "activations" `budget` is inf (the plain figures still hold for any input, unbudgeted).
    norm: str = "weights"
    act_error: float | None = None  # upper bound on sqrt(tr(E G Eᵀ)) = ||(W - H) X||_F / sqrt(N)
    act_rel_error: float | None = None  # upper bound on ||(W - H) X||_F / ||W X||_F
    act_budget: float | None = None  # allowed sqrt(tr(E G Eᵀ))
    act_samples: int | None = None  # N: the calibration input vectors behind G

    @property
    def entries(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits an entry: everything the matrix costs in the file (scales, tables) included."""
        return 8 * self.bytes_after / self.entries if self.entries else 0.0

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else math.inf

    def to_json(self) -> dict:
        """The stats as JSON values; a float figure that is not finite (one that overflowed
        float64) is stored as the string "inf", "-inf" or "nan" (`NONFINITE_FIGURES`)."""
        data = {}
        for field in _FIELDS:  # not dataclasses.asdict: its deep copies cost seconds for 50,000 tensors
            value = getattr(self, field)
            data[field] = list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) \
                else encode_figure(value)
        data["ratio"] = round(self.ratio, 6) if math.isfinite(self.ratio) else None
        data["bits_per_weight"] = round(self.bits_per_weight, 6)
        return data


_FIELDS = tuple(field.name for field in dataclasses.fields(LayerStats))
# JSON has no infinities: a figure that overflowed float64 is stored as one of these strings, and
# read back as the float it names (`core.verdicts.recorded_fields`).
NONFINITE_FIGURES = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def encode_figure(value: object) -> object:
    """``value``, or for a non-finite float the string that names it in a file."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def totals(layers: list[LayerStats]) -> dict:
    """Byte totals over the whole checkpoint and over the compressed matrices alone."""
    comp = [s for s in layers if s.compressed]
    before = sum(s.bytes_before for s in layers)
    after = sum(s.bytes_after for s in layers)
    c_before = sum(s.bytes_before for s in comp)
    c_after = sum(s.bytes_after for s in comp)
    return {
        "tensors": len(layers),
        "compressed": len(comp),
        "bytes_before": before,
        "bytes_after": after,
        "ratio": before / after if after else None,
        "matrix_bytes_before": c_before,
        "matrix_bytes_after": c_after,
        "matrix_ratio": c_before / c_after if c_after else None,
        "max_rel_error": max((s.rel_error for s in comp), default=0.0),
        **rate_totals(comp),
    }


def rate_totals(comp: list[LayerStats]) -> dict:
    """Bits an entry over the compressed matrices (entry-weighted means), and the rate-distortion
    figures over those that carry them (None where none does)."""
    entries = sum(s.entries for s in comp)
    rated = [s for s in comp if s.rd_gaussian_bits is not None and s.rd_lower_bits is not None]
    rated_entries = sum(s.entries for s in rated)

    def mean(values) -> float | None:
        return round(sum(values) / rated_entries, 6) if rated_entries else None

    return {
        "bits_per_weight": round(8 * sum(s.bytes_after for s in comp) / entries, 6) if entries else None,
        "rated_bits_per_weight": mean(8 * s.bytes_after for s in rated),
        "rd_gaussian_bits": mean(s.rd_gaussian_bits * s.entries for s in rated),
        "rd_lower_bits": mean(s.rd_lower_bits * s.entries for s in rated),
    }


def layer_stats(name: str, original: torch.Tensor, hm: HMatrix, stored: torch.Tensor, error: float,
                budget: float, sigma, options: CompressionOptions, strategy: str,
                activation: ActivationFigures | None = None) -> LayerStats:
    """Measure a compressed matrix: structure, bytes, errors and bounds (and, for a matrix built
    for its calibration inputs, the data-aware figures its budget was on)."""
    matrix = as_matrix(original)
    bounds = compute_bounds(matrix, stored, error, sigma)
    distortion = bounds.fro_error ** 2 / max(1, matrix.numel())
    rates = rate_figures(matrix, distortion)
    segments = hm.segments.tolist()
    dense_blocks = {s[0] for s in segments if s[1] == DENSE}
    rows_blocks = {s[0] for s in segments if s[1] == ROWS}
    lowrank_blocks = hm.blocks.shape[0] - len(dense_blocks) - len(rows_blocks)  # zero blocks too
    ranks: dict[int, int] = {}
    codec_bytes: dict[str, int] = {}
    for block, kind, _codec, rank, _off, _soff in segments:
        if kind == LOWRANK:
            ranks[block] = ranks.get(block, 0) + rank
    for codec in hm.pools:
        codec_bytes[codec] = hm.pool_bytes(codec)
        if codec in hm.scales:
            codec_bytes[codec] += hm.scales[codec].numel() * hm.scales[codec].element_size()
    return LayerStats(
        name=name, shape=list(original.shape), dtype=str(original.dtype).removeprefix("torch."),
        bytes_before=dense_nbytes(tuple(original.shape), original.dtype), bytes_after=hm.nbytes,
        compressed=True, blocks_lowrank=lowrank_blocks, blocks_rows=len(rows_blocks),
        blocks_dense=len(dense_blocks), max_rank=max(ranks.values(), default=0),
        mean_rank=round(sum(ranks.values()) / max(lowrank_blocks, 1), 3),
        codecs=dict(sorted(codec_bytes.items())), tol=options.tol, budget=budget,
        fro_error=bounds.fro_error, rel_error=bounds.rel_fro_error,
        spectral_error=bounds.spectral_error, spectral_method=bounds.spectral_method,
        sigma_max_upper=bounds.sigma_max_upper, sigma_min_lower=bounds.sigma_min_lower, kappa_w=bounds.kappa_w,
        kappa_h_bound=bounds.kappa_h_bound, kappa_h_paper=bounds.kappa_h_paper, strategy=strategy,
        rd_gaussian_bits=rates[0], rd_lower_bits=rates[1], **activation_fields(activation),
    )


def activation_fields(activation: ActivationFigures | None) -> dict:
    """The data-aware fields of `LayerStats` (none for a matrix built for the weights' norm)."""
    if activation is None:
        return {}
    rel = (activation.error / activation.norm * (1 + 4 * UNIT64) if activation.norm > 0
           else (0.0 if activation.error == 0 else math.inf))
    return {"norm": "activations", "act_error": activation.error, "act_rel_error": rel,
            "act_budget": activation.budget, "act_samples": activation.samples}
