"""LayerStats -> a rich table for people, JSON for machines, Markdown for pull requests."""
from __future__ import annotations

import json
import math

from rich.console import Console
from rich.table import Table

from hmcompress.core.stats import LayerStats, totals
from hmcompress.report.text import print_line

COLUMNS = ("layer", "shape", "blocks lr/rows/dense", "rank max/mean", "codecs", "bytes before",
           "bytes after", "ratio", "tol", "rel err", "out err", "||W-H||_2 <=", "kappa(W)", "kappa(H) <=", "bits/entry",
           "R(D) gauss/lower")
# On a narrow terminal the table keeps the columns that fit, in this order of importance (shown
# in COLUMNS order); `--wide` keeps them all. A number is never split across lines.
PRIORITY = ("layer", "ratio", "rel err", "out err", "tol", "bytes after", "shape", "kappa(H) <=", "||W-H||_2 <=", "bytes before",
            "codecs", "bits/entry", "R(D) gauss/lower", "blocks lr/rows/dense", "rank max/mean", "kappa(W)")
NAME_MIN_WIDTH = 16  # the layer column folds its names at this width, at the least
ESSENTIAL = 4  # layer, ratio, rel err, out err: shown at any width
LEGEND = ("H is the matrix as loaded (rounded once to the source dtype); every figure also holds for its float64 "
          "form. rel err = ||W-H||_F / ||W||_F (measured in float64, widened by its rounding). out err = "
          "||(W-H)X||_F / ||WX||_F on the calibration inputs X (compress --activations: the figure --tol bounds "
          "there; -: built for the weights' norm). tol: the layer's own tolerance (--model-tol chooses them). ||W-H||_2 <=: SVD of "
          "each residual, widened by its rounding margin; (F): the Frobenius bound, used above 1024 a side. "
          "kappa(W): a computed estimate. kappa(H) <= (s_max+e2)/(s_min-e2) (Weyl; s_max, s_min are bounds on "
          "sigma_max(W), sigma_min(W)). blocks: low-rank / rows / dense leaves. bits/entry: stored bits per matrix "
          "entry, everything included. R(D): the rate-distortion limit at the measured mean squared error for the "
          "entries as one memoryless source: a Gaussian of their variance needs the first (an upper bound on "
          "R(D)), the second is Shannon's lower bound for their histogram.")


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "unbounded"
    if not math.isfinite(value):
        return "inf"
    return f"{value:.{digits}g}"


def byte_size(n: int) -> str:
    """Bytes for people: 1.5 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def rows(layers: list[LayerStats]) -> list[list[str]]:
    """One list of cells per compressed layer, in COLUMNS order."""
    out = []
    for s in layers:
        if not s.compressed:
            continue
        shape = "x".join(map(str, s.shape))
        spectral = _num(s.spectral_error) + ("" if s.spectral_method == "svd" else " (F)")
        out.append([
            s.name, shape, f"{s.blocks_lowrank}/{s.blocks_rows}/{s.blocks_dense}", f"{s.max_rank}/{s.mean_rank:.1f}",
            ",".join(s.codecs) or "-", byte_size(s.bytes_before), byte_size(s.bytes_after),
            _num(s.ratio), f"{s.tol:.3g}", f"{s.rel_error:.2e}", "-" if s.act_rel_error is None else f"{s.act_rel_error:.2e}", spectral, _num(s.kappa_w), _num(s.kappa_h_bound),
            f"{s.bits_per_weight:.2f}", rate_cell(s.rd_gaussian_bits, s.rd_lower_bits),
        ])
    return out


def rate_cell(gaussian: float | None, lower: float | None) -> str:
    """The two rate-distortion figures, "-" where a file has none (exact storage, older files)."""
    if gaussian is None or lower is None:
        return "-"
    return f"{gaussian:.2f}/{lower:.2f}"


def passthrough_line(layers: list[LayerStats]) -> str:
    """Tensors left as they were, counted by reason (the JSON lists each one)."""
    reasons: dict[str, list[LayerStats]] = {}
    for s in layers:
        if not s.compressed:
            reasons.setdefault(s.reason, []).append(s)
    if not reasons:
        return "passthrough: none"
    parts = [f"{len(group)} {reason} ({byte_size(sum(s.bytes_before for s in group))})"
             for reason, group in sorted(reasons.items())]
    return "passthrough: " + "; ".join(parts)


# Passthrough reasons an option changes, and the option: the report suggests it where it matters.
REMEDIES = {"conv kernel (--no-conv)": "--conv compresses conv kernels",
            "too small": "a smaller --min-size compresses smaller matrices",
            "optimizer state": "--model-only (or --drop-optimizer) leaves optimizer state out of the file",
            "excluded by pattern": "--exclude left these out", "not included by pattern": "--include left these out"}
HINT_SHARE = 0.25  # a reason holding at least this share of the checkpoint's bytes gets a suggestion


def hint_line(layers: list[LayerStats]) -> str | None:
    """One suggestion when a large share of the checkpoint passed through for a reason an option
    changes (the largest such share), else None."""
    total = sum(s.bytes_before for s in layers)
    shares: dict[str, int] = {}
    for s in layers:
        remedy = next((r for reason, r in REMEDIES.items() if not s.compressed and s.reason.startswith(reason)), None)
        if remedy:
            shares[remedy] = shares.get(remedy, 0) + s.bytes_before
    if not shares or not total:
        return None
    remedy, size = max(shares.items(), key=lambda item: (item[1], item[0]))
    if size < HINT_SHARE * total:
        return None
    return f"hint: {size / total:.0%} of the checkpoint passed through uncompressed; {remedy}"


def total_line(layers: list[LayerStats]) -> str:
    t = totals(layers)
    return (f"{t['compressed']} of {t['tensors']} tensors compressed; checkpoint "
            f"{byte_size(t['bytes_before'])} -> {byte_size(t['bytes_after'])} (ratio {_num(t['ratio'])}); "
            f"compressed matrices {byte_size(t['matrix_bytes_before'])} -> "
            f"{byte_size(t['matrix_bytes_after'])} (ratio {_num(t['matrix_ratio'])}); "
            f"max relative error {t['max_rel_error']:.2e}" + rate_summary(t))


def rate_summary(t: dict) -> str:
    """Bits per entry against the rate-distortion figures, over the matrices that carry them."""
    if t["rd_gaussian_bits"] is None:
        return ""
    return (f"; {t['rated_bits_per_weight']:.2f} bits/entry stored, R(D) {t['rd_gaussian_bits']:.2f} (Gaussian) / "
            f"{t['rd_lower_bits']:.2f} (lower bound)")


def print_table(layers: list[LayerStats], console: Console, title: str = "", wide: bool = False) -> None:
    """The per-layer table, the passthrough and totals lines, and the legend.

    Columns that do not fit the console's width are left out, least important first (see
    PRIORITY), unless ``wide``; the JSON and ``--wide`` carry them all.
    """
    cells = rows(layers)
    shown = list(COLUMNS) if wide else _fitting_columns(cells, console.width)
    unused = _unused_columns(layers)
    shown = [col for col in shown if col not in unused]
    table = Table(show_lines=False)  # the title goes on its own line: a table title folds long paths
    for col in shown:
        table.add_column(col, overflow="fold", no_wrap=col != "layer",
                         min_width=min(NAME_MIN_WIDTH, _widest(cells, 0)) if col == "layer" else None)
    for row in cells:
        table.add_row(*(row[COLUMNS.index(col)] for col in shown))
    if wide:
        console = Console(file=console.file, width=max(console.width, _natural_width(cells, COLUMNS)), markup=False,
                          force_terminal=console.is_terminal)
    if title:
        print_line(console, title)
    console.print(table)
    left_out = [col for col in COLUMNS if col not in shown and col not in _unused_columns(layers)]
    if left_out:
        print_line(console, f"({len(left_out)} columns left out for the terminal's width: {', '.join(left_out)}; "
                            "--wide or --json show them)")
    for line in (passthrough_line(layers), total_line(layers), LEGEND, hint_line(layers)):
        if line:
            print_line(console, line)


def _unused_columns(layers: list[LayerStats]) -> list[str]:
    """Columns that would say nothing: "out err" where no layer was built for its inputs, "tol"
    where every layer had the same tolerance (the totals line and options say it)."""
    compressed = [s for s in layers if s.compressed]
    unused = [] if any(s.act_rel_error is not None for s in compressed) else ["out err"]
    return unused + ([] if len({s.tol for s in compressed}) > 1 else ["tol"])


def _widest(cells: list[list[str]], column: int) -> int:
    return max([len(COLUMNS[column]), *(len(row[column]) for row in cells)])


def _natural_width(cells: list[list[str]], columns: tuple[str, ...] | list[str]) -> int:
    """Characters a table needs to show ``columns`` unwrapped (rich: a border and two spaces of
    padding per column, one closing border)."""
    return sum(_widest(cells, COLUMNS.index(col)) + 3 for col in columns) + 1


def _fitting_columns(cells: list[list[str]], width: int) -> list[str]:
    """The most important columns that fit ``width`` unwrapped, in COLUMNS order: the first
    ESSENTIAL of PRIORITY always (their layer names fold if even they do not fit), then each
    next one while the whole table still fits with its layer names on one line."""
    chosen = list(PRIORITY[:ESSENTIAL])
    for col in PRIORITY[ESSENTIAL:]:
        if _natural_width(cells, [*chosen, col]) <= width:
            chosen.append(col)
    return [col for col in COLUMNS if col in chosen]


def markdown(layers: list[LayerStats], title: str = "") -> str:
    """The table for a pull request or job summary: totals first, then every column, a legend."""
    lines = [f"### {title}", ""] if title else []
    lines += [total_line(layers), "", passthrough_line(layers), ""]
    # "|" is escaped in every cell, the header too ("||W-H||_2" would split it into columns).
    for cells in [list(COLUMNS), ["---"] * len(COLUMNS), *rows(layers)]:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", LEGEND.replace("|", "\\|"), ""]
    return "\n".join(lines)


def to_json(payload: dict) -> str:
    """Deterministic JSON (sorted keys); infinities become null."""
    return json.dumps(_finite(payload), sort_keys=True, indent=2)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
