"""The report and compare pages of 1, 3 and 61 layers, as a browser shows them: every picture loads and none is
blank; a screenshot of each page is kept (in $HMCOMPRESS_ARTEFACTS, else the test's tmp dir)."""
from __future__ import annotations

import base64
import io
import os
import pathlib
import re

import numpy as np
import pytest
import torch
from browser import CHROMIUM, chromium_images, chromium_or_skip, chromium_screenshot
from safetensors.torch import save_file

pytest.importorskip("matplotlib")


def png_pixels(data: bytes) -> np.ndarray:
    from matplotlib.image import imread

    return imread(io.BytesIO(data), format="png")


def blank(pixels: np.ndarray) -> bool:
    """One colour everywhere (an empty picture)."""
    return bool(np.all(pixels == pixels[0, 0]))


@pytest.mark.slow
@pytest.mark.parametrize("layers", [1, 3, 61])
def test_report_page_of_many_layers_renders_with_no_blank_picture(cli, tmp_path, layers):
    chromium = chromium_or_skip(CHROMIUM)
    gen = torch.Generator().manual_seed(layers)
    checkpoint = tmp_path / f"model{layers}.safetensors"
    save_file({f"blocks.{i}.mlp.weight": torch.randn(64, 64, generator=gen) for i in range(layers)}, str(checkpoint))
    compressed = tmp_path / "model.hm.safetensors"
    assert cli("compress", checkpoint, "-o", compressed, "-q", "--leaf", "16").code == 0
    page = tmp_path / "report.html"
    run = cli("report", compressed, "--html", page)
    assert run.code == 0, run.stderr
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page.read_text(encoding="utf-8"))
    assert len(embedded) == layers + 1  # the summary chart and one picture per layer
    for data in embedded:
        assert not blank(png_pixels(base64.b64decode(data)))
    assert chromium_images(chromium, page, tmp_path) == (layers + 1, layers + 1)
    artefacts = pathlib.Path(os.environ.get("HMCOMPRESS_ARTEFACTS", tmp_path))
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = chromium_screenshot(chromium, page, artefacts / f"report-{layers}-layers.png", tmp_path)
    assert not blank(png_pixels(shot.read_bytes()))


@pytest.mark.slow
@pytest.mark.parametrize("layers", [1, 3, 61])
def test_compare_page_of_many_layers_renders_with_no_blank_picture(cli, tmp_path, layers):
    chromium = chromium_or_skip(CHROMIUM)
    gen = torch.Generator().manual_seed(layers)
    checkpoint = tmp_path / f"model{layers}.safetensors"
    save_file({f"blocks.{i}.mlp.weight": torch.randn(64, 64, generator=gen) for i in range(layers)}, str(checkpoint))
    page = tmp_path / "compare.html"
    run = cli("compare", checkpoint, "--methods", "svd", "--leaf", "16", "--html", page, "-q")
    assert run.code == 0, run.stderr
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page.read_text(encoding="utf-8"))
    assert len(embedded) == layers + 2  # ratio against tolerance, the per-layer chart, one per layer
    for data in embedded:
        assert not blank(png_pixels(base64.b64decode(data)))
    assert chromium_images(chromium, page, tmp_path) == (layers + 2, layers + 2)
    artefacts = pathlib.Path(os.environ.get("HMCOMPRESS_ARTEFACTS", tmp_path))
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = chromium_screenshot(chromium, page, artefacts / f"compare-{layers}-layers.png", tmp_path)
    assert not blank(png_pixels(shot.read_bytes()))
