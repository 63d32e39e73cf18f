"""Pictures of compressed matrices and comparisons, as deterministic PNG bytes.

matplotlib is optional (the ``plot`` extra); `require_matplotlib` turns
its absence into a user error that says so. Figures use matplotlib's object API with the Agg
canvas (no pyplot, so no global backend is touched), matplotlib's default style whatever the
user's rc files say, and no Software stamp in the PNG, so the same figures are the same bytes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import pathlib
from collections.abc import Callable

import numpy as np

from hmcompress.compare.baselines import REFERENCE
from hmcompress.compare.comparison import Comparison, LayerComparison
from hmcompress.core.codecs import row_bytes
from hmcompress.errors import UserError
from hmcompress.runtime import CODEC, CODECS, DENSE, LOWRANK, HMatrix

INSTALL_HINT = "matplotlib is needed for pictures (--plot, --html): pip install matplotlib (the [plot] extra)"
DPI = 100
# One fixed colour per codec id (tab10, then its light shades), so a codec looks the same in every
# picture; ids beyond the palette reuse it rather than fail.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
           "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")


HATCH = {"dense": "xx", "rows": "//"}
LOG_MIN_SPAN = 20  # data spanning less than this factor get a linear axis: a log one would repeat labels
MAX_NAMED_TICKS = 40  # a summary chart names every layer up to this many, else every k-th


def codec_colour(codec: str) -> str:
    """The colour every picture gives ``codec``."""
    return PALETTE[CODEC[codec].id % len(PALETTE)]


def require_matplotlib() -> None:
    """Raise a `UserError` with the install hint unless matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None


def _png(layout: str | None = "constrained") -> Callable[[Callable[..., object]], Callable[..., bytes]]:
    """Make ``draw(figure, ...)`` return PNG bytes of a fresh figure in matplotlib's default style.

    Pictures drawn once per layer pass ``layout=None`` and place their axes themselves: the
    constrained layout engine costs about a third of their drawing time. ``render.drawn(...)``
    gives the drawn `Figure` itself (rendered, so its tick labels are set), for tests to read.
    """
    def decorate(draw: Callable[..., object]) -> Callable[..., bytes]:
        @contextlib.contextmanager
        def figure_of(*args, size: tuple[float, float] = (10.0, 4.5), **kwargs):
            import matplotlib
            from matplotlib.figure import Figure

            with matplotlib.rc_context():
                matplotlib.rcdefaults()
                matplotlib.rcParams["text.parse_math"] = False  # names with "$" are text, not TeX
                figure = Figure(figsize=size, dpi=DPI, layout=layout)
                draw(figure, *args, **kwargs)
                yield figure

        @functools.wraps(draw)
        def render(*args, **kwargs) -> bytes:
            with figure_of(*args, **kwargs) as figure:
                out = io.BytesIO()
                figure.savefig(out, format="png", metadata={"Software": None})
            return out.getvalue()

        @contextlib.contextmanager
        def drawn(*args, **kwargs):
            with figure_of(*args, **kwargs) as figure:
                figure.canvas.draw()
                yield figure
        render.drawn = drawn
        return render
    return decorate


def _value_scale(ax, values, which: str = "y") -> None:
    """A log axis where the values span LOG_MIN_SPAN or more, else a linear one, labelled in plain
    text (mathtext labels cost more than the rest of a picture) with every label distinct."""
    from matplotlib.ticker import LogFormatter, NullFormatter, ScalarFormatter

    positive = [float(v) for v in values if v is not None and np.isfinite(v) and v > 0]
    axis = getattr(ax, f"{which}axis")
    if positive and max(positive) >= LOG_MIN_SPAN * min(positive):
        getattr(ax, f"set_{which}scale")("log")
        axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        axis.set_minor_formatter(NullFormatter())
        return
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_powerlimits((-3, 4))
    axis.set_major_formatter(formatter)


def _name_layers(ax, names: list[str]) -> None:
    """Layer names under the x axis: all of them, or every k-th where there are many."""
    step = max(1, -(-len(names) // MAX_NAMED_TICKS))
    ticks = list(range(0, len(names), step))
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=60 if len(ticks) <= 24 else 90, ha="right",
                  fontsize=7 if len(ticks) <= 24 else 6)


# ------------------------------------------------------------------------------------------------
# Block structure of a packed H-matrix


@dataclasses.dataclass(frozen=True)
class Leaf:
    row0: int
    col0: int
    rows: int
    cols: int
    kind: str  # "lowrank", "rows", "dense" or "zero"
    rank: int  # low rank: the rank; rows: rows kept; dense: min(rows, cols); zero: 0
    codec: str  # the codec holding most of the leaf's bytes ("" for a zero block)
    bits: float  # stored bits per entry of the block (scales included; coded pools at their coded share)


def leaves(hm: HMatrix) -> list[Leaf]:
    """Every leaf block of ``hm`` with its stored rank and main codec, from the packed tables; a
    segment of an entropy-coded pool counts its fixed-width bytes times the pool's coded share."""
    share = {codec: hm.pool_bytes(codec) / max(1, pool.numel() * pool.element_size()) for codec, pool in hm.pools.items()}
    blocks = hm.blocks.tolist()
    ranks = [0] * len(blocks)
    kinds = ["zero"] * len(blocks)
    codec_bytes: list[dict[str, float]] = [{} for _ in blocks]
    for block, kind, codec_id, rank, _offset, _scale in hm.segments.tolist():
        _r0, _c0, rows, cols, _level = blocks[block]
        codec = CODECS[codec_id]
        if kind == DENSE:
            kinds[block], ranks[block], size = "dense", min(rows, cols), rows * row_bytes(codec, cols)
        elif kind == LOWRANK:
            kinds[block], size = "lowrank", rank * (row_bytes(codec, rows) + row_bytes(codec, cols))
            ranks[block] += rank
        else:
            kinds[block], size = "rows", rank * row_bytes(codec, cols)
            ranks[block] += rank
        codec_bytes[block][codec] = codec_bytes[block].get(codec, 0) + size * share.get(codec, 1.0)
    return [Leaf(r0, c0, h, w, kinds[i], ranks[i],
                 max(codec_bytes[i], key=lambda c: (codec_bytes[i][c], -CODEC[c].id)) if codec_bytes[i] else "",
                 8 * sum(codec_bytes[i].values()) / (h * w))
            for i, (r0, c0, h, w, _level) in enumerate(blocks)]


def _frame(ax, shape: tuple[int, int], title: str) -> None:
    m, n = shape
    ax.set_xlim(0, n)
    ax.set_ylim(m, 0)  # row 0 at the top, as the matrix is written
    ax.set_aspect("equal" if max(m, n) <= 4 * min(m, n) else "auto")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("column")
    ax.set_ylabel("row")


def _rectangles(ax, cells: list[Leaf], colours: list, hatch: str | None = None) -> None:
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    if not cells:
        return
    patches = [Rectangle((c.col0, c.row0), c.cols, c.rows) for c in cells]
    ax.add_collection(PatchCollection(patches, facecolors=colours, edgecolors="black",
                                      linewidths=0.4, hatch=hatch))


def _by_kind(cells: list[Leaf]):
    """Leaves grouped for drawing: plain ones, then the hatched dense and rows leaves."""
    yield [c for c in cells if c.kind in ("lowrank", "zero")], None
    for kind, hatch in HATCH.items():
        yield [c for c in cells if c.kind == kind], hatch


def draw_ranks(figure, ax, hm: HMatrix) -> None:
    """Low-rank leaves coloured by rank; rows and dense leaves (hatched) grey, labelled with the
    bits they store per entry, not a rank (a rows leaf keeps rows, it has no rank)."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    cells = leaves(hm)
    cmap = matplotlib.colormaps["viridis"].with_extremes(under="white")
    norm = Normalize(vmin=0.5, vmax=max([c.rank for c in cells if c.kind == "lowrank"] + [1]))

    def colour(c: Leaf):
        return cmap(norm(c.rank)) if c.kind in ("lowrank", "zero") else "0.82"
    for group, hatch in _by_kind(cells):
        _rectangles(ax, group, [colour(c) for c in group], hatch)
    m, n = hm.shape
    for c in cells:
        if c.cols * 10 >= n and c.rows * 10 >= m and c.kind != "zero":
            label = f"r {c.rank}" if c.kind == "lowrank" else f"{c.bits:.3g} bit"
            dark = c.kind == "lowrank" and norm(c.rank) < 0.6
            ax.text(c.col0 + c.cols / 2, c.row0 + c.rows / 2, label, ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    kinds = {kind: sum(c.kind == kind for c in cells) for kind in ("lowrank", "rows", "dense", "zero")}
    _frame(ax, hm.shape, "leaves: " + ", ".join(f"{count} {kind}" for kind, count in kinds.items() if count))
    bar = figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, extend="min", shrink=0.8)
    bar.set_label("rank of low-rank leaves (white: zero)\ngrey, hatched: dense ×, rows //\n(bits per entry)",
                  fontsize=8)


def draw_codecs(ax, hm: HMatrix) -> None:
    """Every leaf rectangle coloured by the storage precision holding most of its bytes."""
    from matplotlib.patches import Patch

    cells = leaves(hm)
    for group, hatch in _by_kind(cells):
        _rectangles(ax, group, [codec_colour(c.codec) if c.codec else "white" for c in group], hatch)
    used = sorted({c.codec for c in cells if c.codec}, key=lambda c: CODEC[c].id)
    handles = [Patch(facecolor=codec_colour(c), edgecolor="black", label=c) for c in used]
    if any(c.kind == "zero" for c in cells):
        handles.append(Patch(facecolor="white", edgecolor="black", label="zero"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="codec")
    _frame(ax, hm.shape, "main storage precision per leaf")


def draw_spectrum(ax, sigma: np.ndarray, cuts: dict[float, int]) -> None:
    """Singular values of W (log scale) with the rank of each tolerance's truncated SVD marked."""
    index = np.arange(1, len(sigma) + 1)
    positive = np.where(sigma > 0, sigma, np.nan)
    ax.plot(index, positive, color="black", linewidth=1.2, label="σ_i(W)")
    _value_scale(ax, positive)
    for k, (tol, rank) in enumerate(sorted(cuts.items(), reverse=True)):
        ax.axvline(rank + 0.5, color=f"C{k}", linestyle="--", linewidth=1,
                   label=f"tol {tol:g}: SVD keeps {rank}")
    ax.set_xlabel("i")
    ax.set_ylabel("singular value")
    ax.set_title("spectrum and SVD cuts", fontsize=10)
    ax.legend(fontsize=8)


@_png(layout=None)
def blocks_png(figure, hm: HMatrix, title: str) -> None:
    """Block structure of one compressed matrix: by rank and by precision."""
    ax_rank, ax_codec = figure.subplots(1, 2, gridspec_kw=dict(left=0.06, right=0.9, wspace=0.35, top=0.86))
    draw_ranks(figure, ax_rank, hm)
    draw_codecs(ax_codec, hm)
    figure.suptitle(title, fontsize=11)


@_png(layout=None)
def weighted_png(figure, plain: HMatrix, aware: HMatrix, sigma: np.ndarray, weighted: np.ndarray,
                 title: str) -> None:
    """One matrix built for its weights and for its inputs (``--activations``): both block
    structures, and the singular values of W beside those of W·G^½ (each over its largest): the
    faster the second decays, the more low rank pays in the data-aware norm."""
    ax_plain, ax_aware, ax_sigma = figure.subplots(1, 3, gridspec_kw=dict(left=0.04, right=0.98, wspace=0.5,
                                                                          top=0.82))
    draw_ranks(figure, ax_plain, plain)
    ax_plain.set_title(f"weights' norm: {ax_plain.get_title()}", fontsize=9)
    draw_ranks(figure, ax_aware, aware)
    ax_aware.set_title(f"inputs' norm: {ax_aware.get_title()}", fontsize=9)
    relative = [values / max(values.max(initial=0), 1e-300) for values in (sigma, weighted)]
    for values, label, colour in zip(relative, ("σ_i(W)", "σ_i(W·G^½)"), ("black", "C1")):
        ax_sigma.plot(np.arange(1, len(values) + 1), np.where(values > 0, values, np.nan), color=colour,
                      linewidth=1.2, label=label)
    _value_scale(ax_sigma, np.concatenate(relative))
    ax_sigma.set_xlabel("i")
    ax_sigma.set_ylabel("singular value / largest")
    ax_sigma.set_title("spectrum, plain and weighted by G", fontsize=10)
    ax_sigma.legend(fontsize=8)
    figure.suptitle(title, fontsize=11)


@_png(layout=None)
def layer_png(figure, layer: LayerComparison, tol: float) -> None:
    """One layer of a comparison: hmcompress (auto) blocks at ``tol``, and the spectrum."""
    ax_rank, ax_codec, ax_sigma = figure.subplots(1, 3, gridspec_kw=dict(left=0.04, right=0.98, wspace=0.45,
                                                                        top=0.86))
    out = layer.at_tol[tol][REFERENCE]
    draw_ranks(figure, ax_rank, out.hmatrix)
    draw_codecs(ax_codec, out.hmatrix)
    draw_spectrum(ax_sigma, layer.sigma, {t: layer.svd_cut(t) for t in layer.at_tol})
    figure.suptitle(f"{layer.name} {layer.shape[0]}x{layer.shape[1]}: {REFERENCE} at tol {tol:g}, "
                    f"ratio {layer.bytes_dense / out.nbytes:.3g}, rel error {out.rel_error:.2e}", fontsize=11)


# ------------------------------------------------------------------------------------------------
# Comparison pictures


@_png()
def ratio_vs_tol_png(figure, c: Comparison) -> None:
    """Total bytes ratio of every method against the tolerance (fixed bit widths at their error)."""
    ax = figure.subplots()
    tols = sorted(c.tolerances)
    for k, (name, method) in enumerate(c.methods.items()):
        totals = [c.totals(tol)[name] for tol in tols]
        style = dict(color=f"C{k % 10}", label=name)
        if method.bounded:
            within = [t.layers_within == t.layers for t in totals]
            ax.plot(tols, [t.ratio for t in totals], "-", **style)
            ax.scatter(tols, [t.ratio for t in totals], facecolors=[style["color"] if w else "none" for w in within],
                       edgecolors=style["color"], zorder=3)
        else:
            ax.scatter([totals[0].rel_error], [totals[0].ratio], marker="*", s=120, **style)
    for tol in tols:
        ax.axvline(tol, color="grey", linestyle=":", linewidth=0.8)
    everything = [t for tol in tols for t in c.totals(tol).values()]
    _value_scale(ax, [*tols, *(t.rel_error for t in everything)], "x")
    _value_scale(ax, [t.ratio for t in everything], "y")
    ax.set_xlabel("relative Frobenius tolerance (★ fixed bit width: at its own measured error)")
    ax.set_ylabel("bytes ratio (dense / stored), all matrices")
    ax.set_title(f"{pathlib.PurePath(c.source).name}: compression ratio vs tolerance (hollow: missed on some layer)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


@_png()
def layers_png(figure, c: Comparison) -> None:
    """Per layer at the primary tolerance: bytes ratio of every method, and error at matched size."""
    ax_ratio, ax_error = figure.subplots(2, 1, sharex=True)
    tol, x = c.primary, np.arange(len(c.layers))
    all_ratios, all_errors = [], [tol]
    for k, name in enumerate(c.methods):
        colour = f"C{k % 10}"
        outs = [layer.at_tol[tol][name] for layer in c.layers]
        ratios = [layer.bytes_dense / o.nbytes if o.nbytes else np.nan for layer, o in zip(c.layers, outs)]
        ax_ratio.scatter(x, ratios, edgecolors=colour, label=name,
                         facecolors=[colour if o.within(tol) else "none" for o in outs])
        errors = [layer.matched[tol][name] for layer in c.layers]
        values = [o.rel_error if o is not None and o.rel_error > 0 else np.nan for o in errors]
        ax_error.plot(x, values, "o-", color=colour, markersize=4, linewidth=0.8, label=name)
        all_ratios += ratios
        all_errors += values
    ax_error.axhline(tol, color="grey", linestyle=":", linewidth=1)
    _value_scale(ax_ratio, all_ratios)
    _value_scale(ax_error, all_errors)
    ax_ratio.set_ylabel("bytes ratio")
    ax_ratio.set_title(f"at tol {tol:g} (hollow: not within tol)", fontsize=10)
    ax_error.set_ylabel("relative error")
    ax_error.set_title(f"error at matched size ({REFERENCE} bytes at tol {tol:g}; absent: does not fit "
                       "or error 0)", fontsize=10)
    _name_layers(ax_error, [layer.name for layer in c.layers])
    ax_ratio.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _summary_width(layers: int) -> float:
    """Inches for a per-layer chart: narrow for a few layers (no empty axes), wider for many."""
    return float(min(14.0, max(5.0, 4.0 + 0.3 * layers)))


def _file_name(index: int, name: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
    return f"layer_{index:03d}_{safe}.png"


def comparison_pictures(c: Comparison) -> dict[str, bytes]:
    """Every picture of a comparison, by file name (summary pictures first, then one per layer)."""
    pictures = {"ratio_vs_tol.png": ratio_vs_tol_png(c, size=(9.0, 4.5))}
    if c.layers:
        pictures["layers.png"] = layers_png(c, size=(_summary_width(len(c.layers)) + 2.0, 7.0))
    for index, layer in enumerate(c.layers):
        pictures[_file_name(index, layer.name)] = layer_png(layer, c.primary, size=(15.0, 4.5))
    return pictures


@_png()
def stored_layers_png(figure, names: list[str], ratios: list[float], errors: list[float],
                      tols: list[float] | None) -> None:
    """Per layer of a compressed file: bytes ratio and measured relative error (and tolerance)."""
    ax_ratio, ax_error = figure.subplots(2, 1, sharex=True)
    x = np.arange(len(names))  # points, not bars: a log axis has no baseline for a bar to start from
    ax_ratio.plot(x, ratios, "o", color="C0")
    _value_scale(ax_ratio, ratios)
    ax_ratio.set_ylabel("bytes ratio")
    measured = [e if e > 0 else np.nan for e in errors]
    if tols is not None:  # each tolerance as a bar down to its measured error: their distance, readable
        ax_error.vlines(x, measured, tols, color="0.7", linewidth=1)
        ax_error.scatter(x, tols, marker="_", s=300, color="black", label="tolerance", zorder=3)
    ax_error.plot(x, measured, "o", color="C1", label="measured", zorder=4)
    _value_scale(ax_error, [*measured, *(tols or [])])
    ax_error.set_ylabel("relative Frobenius error")
    ax_error.legend(fontsize=8)
    _name_layers(ax_error, names)


def file_pictures(matrices: dict[str, HMatrix], stats: dict[str, dict], relative: bool) -> dict[str, bytes]:
    """Pictures of a compressed file from its stored tables and stats alone (no original needed).

    ``relative``: whether the stored tolerance is relative (then it is drawn beside the errors).
    """
    names = sorted(matrices)
    if not names:
        return {}
    tols = [stats[n]["tol"] for n in names] if relative else None
    pictures = {"layers.png": stored_layers_png(
        names, [stats[n]["bytes_before"] / stats[n]["bytes_after"] for n in names],
        [stats[n]["rel_error"] for n in names], tols, size=(_summary_width(len(names)), 6.0))}
    for index, name in enumerate(names):
        hm = matrices[name]
        title = f"{name} {hm.shape[0]}x{hm.shape[1]}: rel error {stats[name]['rel_error']:.2e}"
        pictures[_file_name(index, name)] = blocks_png(hm, title, size=(11.0, 4.5))
    return pictures
