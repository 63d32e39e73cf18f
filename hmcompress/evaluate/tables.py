"""An `analysis.Evaluation` as tables: rich for people, Markdown for the README (same cells)."""
from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from hmcompress.evaluate.analysis import Evaluation

SUMMARY_COLUMNS = ("quantity", "original", "H-matrix", "truncated SVD")
LAYER_COLUMNS = ("layer", "shape", "weight err H", "weight err SVD (rank)", "activation err H",
                 "activation err SVD")
SWEEP_COLUMNS = ("tol", "ratio (file)", "ratio (matrices)", "max weight err", "metric H",
                 "ratio SVD (matrices)", "metric SVD")


def _g(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def _e(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2e}"


def summary_rows(ev: Evaluation) -> list[list[str]]:
    """Task metrics, sizes, output error and NTK of the original, H-matrix and SVD models."""
    rows = [[key, _g(ev.metrics[key]), _g(ev.metrics_compressed.get(key)), _g(ev.metrics_svd.get(key))]
            for key in ev.metrics]
    sizes = (ev.matrix_bytes, ev.matrix_bytes_compressed, ev.matrix_bytes_svd)
    rows.append(["matrix bytes", *map(str, sizes)])
    rows.append(["matrix ratio", *(_g(ev.matrix_bytes / size, 3) for size in sizes)])
    rows.append([f"output error ({ev.samples} inputs)", "0", _e(ev.output_error), _e(ev.output_error_svd)])
    ntk, ntk_svd = ev.ntk, ev.ntk_svd
    rows.append([f"NTK rel. distance ({ntk.inputs} inputs, {ntk.size}x{ntk.size})", "0",
                 _e(ntk.rel_fro), _e(ntk_svd.rel_fro)])
    for label, exact, compressed, svd in (
            ("NTK λ_max", ntk.eig_max, ntk.eig_max_compressed, ntk_svd.eig_max_compressed),
            ("NTK λ_min", ntk.eig_min, ntk.eig_min_compressed, ntk_svd.eig_min_compressed)):
        rows.append([label, _g(exact, 6), _g(compressed, 6), _g(svd, 6)])
    return rows


def layer_rows(ev: Evaluation) -> list[list[str]]:
    """Relative weight and activation errors after each compressed layer, in execution order."""
    return [[layer.name, "x".join(map(str, layer.shape)), _e(layer.weight_error),
             "-" if layer.svd_rank is None else f"{layer.weight_error_svd:.2e} ({layer.svd_rank})",
             _e(layer.activation_error), _e(layer.activation_error_svd)] for layer in ev.layers]


def sweep_rows(ev: Evaluation) -> list[list[str]]:
    return [[f"{row.tol:g}", _g(row.ratio, 3), _g(row.matrix_ratio, 3), _e(row.max_weight_error),
             _g(row.metric), _g(row.svd_matrix_ratio, 3), _g(row.svd_metric)] for row in ev.sweep]


def _title(ev: Evaluation) -> str:
    kind = "absolute" if ev.absolute else "relative"
    goal = "higher" if ev.higher_is_better else "lower"
    return f"{ev.model}: {ev.compressed} ({kind} tol {ev.tol:g}); metric {ev.metric} ({goal} is better)"


def print_evaluation(ev: Evaluation, console: Console) -> None:
    sections = [(_title(ev), SUMMARY_COLUMNS, summary_rows(ev)),
                ("error propagation (relative errors, after each layer)", LAYER_COLUMNS, layer_rows(ev))]
    if ev.sweep:
        sections.append((f"tolerance sweep (metric: {ev.metric})", SWEEP_COLUMNS, sweep_rows(ev)))
    for title, columns, rows in sections:
        table = Table(title=title)
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def _markdown_table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines + [""]


def markdown(ev: Evaluation, title: str) -> str:
    """Summary, error propagation and sweep of one model as Markdown, under a ``####`` title."""
    lines = [f"#### {title}", "", f"Metric: `{ev.metric}` ({'higher' if ev.higher_is_better else 'lower'} "
             f"is better); compressed at {'absolute' if ev.absolute else 'relative'} tol {ev.tol:g}.", ""]
    lines += _markdown_table(SUMMARY_COLUMNS, summary_rows(ev))
    lines += ["Error propagation (relative errors after each compressed layer, then the output):", ""]
    lines += _markdown_table(LAYER_COLUMNS, layer_rows(ev))
    if ev.sweep:
        lines += ["Tolerance sweep:", ""]
        lines += _markdown_table(SWEEP_COLUMNS, sweep_rows(ev))
    return "\n".join(lines)
