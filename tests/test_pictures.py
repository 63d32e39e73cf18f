"""Pictures that read at a glance: every axis labelled with distinct ticks, layers named, rows
leaves shown by bits (not a rank they do not have), at 1, 3 and 61 layers."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("matplotlib")

from benchmarks.weighted_picture import weighted_sigma  # noqa: E402
from hmcompress.core.build import CompressionOptions, compress_matrix  # noqa: E402
from hmcompress.core.stats import layer_stats  # noqa: E402
from hmcompress.core.weighted import InputWeights  # noqa: E402
from hmcompress.report import plots  # noqa: E402


def _visible_labels(axis) -> list[str]:
    """The texts of the major tick labels inside the axis's view (after the figure was drawn)."""
    low, high = sorted(axis.get_view_interval())
    return [label.get_text() for loc, label in zip(axis.get_ticklocs(), axis.get_ticklabels())
            if label.get_text() and label.get_visible() and low <= loc <= high]


def assert_readable(figure) -> None:
    """No axis repeats a tick label, and every data axis has at least two labels."""
    for ax in figure.axes:
        for name in ("xaxis", "yaxis"):
            labels = _visible_labels(getattr(ax, name))
            assert len(labels) == len(set(labels)), (ax.get_title(), name, labels)
        if ax.get_ylabel() in ("bytes ratio", "relative Frobenius error", "relative error"):
            assert len(_visible_labels(ax.yaxis)) >= 2, (ax.get_ylabel(), _visible_labels(ax.yaxis))


def compressed_layers(count: int, tol: float = 1e-2) -> tuple[dict, dict]:
    """``count`` trained-like matrices (a flat spectrum: rows leaves) and their stats."""
    gen = torch.Generator().manual_seed(count)
    matrices, stats = {}, {}
    options = CompressionOptions(tol=tol, leaf=16)
    for i in range(count):
        w = torch.randn(64, 48, generator=gen) * (1 + i % 3)
        built = compress_matrix(w, options)
        name = f"encoder.layers.{i}.self_attention.output.weight"
        matrices[name] = built.hmatrix
        stats[name] = layer_stats(name, w, built.hmatrix, built.dense, built.error, built.budget,
                                  built.root_sigma, options, built.strategy).to_json()
    return matrices, stats


@pytest.mark.parametrize("count", [1, 3, 61])
def test_summary_chart_names_layers_and_repeats_no_label(count):
    matrices, stats = compressed_layers(count)
    names = sorted(matrices)
    ratios = [stats[n]["bytes_before"] / stats[n]["bytes_after"] for n in names]
    errors = [stats[n]["rel_error"] for n in names]
    with plots.stored_layers_png.drawn(names, ratios, errors, [1e-2] * count,
                                       size=(plots._summary_width(count), 6.0)) as figure:
        assert_readable(figure)
        ticks = _visible_labels(figure.axes[-1].xaxis)
        assert ticks and all(t in names for t in ticks)  # names, not numbers
        assert len(ticks) == min(count, plots.MAX_NAMED_TICKS) or count > plots.MAX_NAMED_TICKS


def test_rows_leaves_are_labelled_by_bits_not_by_rank():
    matrices, _stats = compressed_layers(1)
    (hm,) = matrices.values()
    leaves = plots.leaves(hm)
    assert {leaf.kind for leaf in leaves} <= {"rows", "dense", "zero", "lowrank"}
    assert any(leaf.kind in ("rows", "dense") for leaf in leaves)  # trained-like: quantized rows or one quantized block
    with plots.blocks_png.drawn(hm, "title", size=(11.0, 4.5)) as figure:
        texts = [t.get_text() for t in figure.axes[0].texts]
        assert texts and all(t.endswith(" bit") or t.startswith("r ") for t in texts), texts
        assert not any(t == str(leaf.rows) for t in texts for leaf in leaves if leaf.kind in ("rows", "dense"))
        assert_readable(figure)


def test_leaf_bits_count_coded_pools_at_their_coded_size():
    """A uniform build (one block, entropy-coded int8 codes) is labelled with the bits the file
    stores for it, not its codes' width."""
    w = torch.randn(256, 192, generator=torch.Generator().manual_seed(5))
    hm = compress_matrix(w, CompressionOptions(tol=1e-2)).hmatrix
    (leaf,) = plots.leaves(hm)
    assert leaf.bits < 7.5 and abs(leaf.bits - 8 * hm.nbytes / w.numel()) < 0.05


def test_weighted_picture_shows_both_builds_and_both_spectra():
    """`benchmarks.weighted_picture`'s figure: inputs of rank 6 make W·G^½ of rank 6, and the
    data-aware build takes low-rank blocks where the plain one cannot."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(96, 64, generator=gen)
    x = torch.randn(6, 64, generator=gen, dtype=torch.float64)
    gram = x.T @ x / 6
    options = CompressionOptions(tol=1e-2)
    plain = compress_matrix(w, options).hmatrix
    aware = compress_matrix(w, options, weights=InputWeights(gram, 6)).hmatrix
    assert aware.nbytes < plain.nbytes / 4 and 1 in aware.segments[:, 1].tolist()
    weighted = weighted_sigma(w, gram).numpy()
    assert (weighted[6:] <= 1e-6 * weighted[0]).all()  # G^½ of a rank-6 G: its zero eigenvalues to rounding
    with plots.weighted_png.drawn(plain, aware, torch.linalg.svdvals(w.double()).numpy(), weighted, "title",
                                  size=(13.0, 4.2)) as figure:
        titles = [ax.get_title() for ax in figure.axes]
        assert any(t.startswith("weights' norm") for t in titles) and any(t.startswith("inputs' norm") for t in titles)
        assert_readable(figure)


def test_file_pictures_are_distinct_pngs():
    matrices, stats = compressed_layers(3)
    pictures = plots.file_pictures(matrices, stats, relative=True)
    assert len(pictures) == 4 and all(png.startswith(b"\x89PNG") for png in pictures.values())
    assert len(set(pictures.values())) == 4
