"""LayerStats -> a rich table for people, JSON for machines, Markdown for pull requests."""
from __future__ import annotations

import json
import math

from rich.console import Console
from rich.table import Table

from hmcompress.core.stats import LayerStats, totals

COLUMNS = ("layer", "shape", "blocks lr/rows/dense", "rank max/mean", "codecs", "bytes before",
           "bytes after", "ratio", "rel err", "||W-H||_2", "kappa(W)", "kappa(H) <=")


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "unbounded"
    if not math.isfinite(value):
        return "inf"
    return f"{value:.{digits}g}"


def _bytes(n: int) -> str:
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
            ",".join(s.codecs) or "-", _bytes(s.bytes_before), _bytes(s.bytes_after),
            _num(s.ratio), f"{s.rel_error:.2e}", spectral, _num(s.kappa_w), _num(s.kappa_h_bound),
        ])
    return out


def passthrough_line(layers: list[LayerStats]) -> str:
    """Tensors left as they were, counted by reason (the JSON lists each one)."""
    reasons: dict[str, list[LayerStats]] = {}
    for s in layers:
        if not s.compressed:
            reasons.setdefault(s.reason, []).append(s)
    if not reasons:
        return "passthrough: none"
    parts = [f"{len(group)} {reason} ({_bytes(sum(s.bytes_before for s in group))})"
             for reason, group in sorted(reasons.items())]
    return "passthrough: " + "; ".join(parts)


def total_line(layers: list[LayerStats]) -> str:
    t = totals(layers)
    return (f"{t['compressed']} of {t['tensors']} tensors compressed; checkpoint "
            f"{_bytes(t['bytes_before'])} -> {_bytes(t['bytes_after'])} (ratio {_num(t['ratio'])}); "
            f"compressed matrices {_bytes(t['matrix_bytes_before'])} -> "
            f"{_bytes(t['matrix_bytes_after'])} (ratio {_num(t['matrix_ratio'])}); "
            f"max relative error {t['max_rel_error']:.2e}")


def print_table(layers: list[LayerStats], console: Console, title: str = "") -> None:
    table = Table(title=title or None, show_lines=False)
    for col in COLUMNS:
        table.add_column(col, overflow="fold")
    for cells in rows(layers):
        table.add_row(*cells)
    console.print(table)
    console.print(passthrough_line(layers), markup=False, highlight=False)
    console.print(total_line(layers), markup=False, highlight=False)
    console.print("||W-H||_2 is exact (SVD of the residual, rounding margin included); (F) marks "
                  "the Frobenius error used as an upper bound. kappa(H) <= (s_max+e2)/(s_min-e2) (Weyl).")


def markdown(layers: list[LayerStats], title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    # "|" is escaped in every cell, the header too ("||W-H||_2" would split it into columns).
    for cells in [list(COLUMNS), ["---"] * len(COLUMNS), *rows(layers)]:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", passthrough_line(layers), "", total_line(layers), ""]
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
