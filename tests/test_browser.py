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


def checkpoint_of(tmp_path: pathlib.Path, layers: int) -> pathlib.Path:
    """``layers`` random 64x64 matrices (quantized rows at 1e-2)."""
    gen = torch.Generator().manual_seed(layers)
    path = tmp_path / f"model{layers}.safetensors"
    save_file({f"blocks.{i}.mlp.weight": torch.randn(64, 64, generator=gen) for i in range(layers)}, str(path))
    return path


def assert_page_renders(page: pathlib.Path, pictures: int, screenshot: str, tmp_path: pathlib.Path) -> None:
    """``pictures`` embedded PNGs, none blank; Chromium loads them all; a screenshot, not blank,
    is kept (in $HMCOMPRESS_ARTEFACTS, else ``tmp_path``)."""
    chromium = chromium_or_skip(CHROMIUM)
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page.read_text(encoding="utf-8"))
    assert len(embedded) == pictures
    for data in embedded:
        assert not blank(png_pixels(base64.b64decode(data)))
    assert chromium_images(chromium, page, tmp_path) == (pictures, pictures)
    artefacts = pathlib.Path(os.environ.get("HMCOMPRESS_ARTEFACTS", tmp_path))
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = chromium_screenshot(chromium, page, artefacts / screenshot, tmp_path)
    assert not blank(png_pixels(shot.read_bytes()))


@pytest.mark.slow
@pytest.mark.parametrize("layers", [1, 3, 61])
def test_report_page_of_many_layers_renders_with_no_blank_picture(cli, tmp_path, layers):
    chromium_or_skip(CHROMIUM)
    compressed = tmp_path / "model.hm.safetensors"
    assert cli("compress", checkpoint_of(tmp_path, layers), "-o", compressed, "-q", "--leaf", "16").code == 0
    page = tmp_path / "report.html"
    run = cli("report", compressed, "--html", page)
    assert run.code == 0, run.stderr
    # the summary chart and one picture per layer
    assert_page_renders(page, layers + 1, f"report-{layers}-layers.png", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("layers", [1, 3, 61])
def test_compare_page_of_many_layers_renders_with_no_blank_picture(cli, tmp_path, layers):
    chromium_or_skip(CHROMIUM)
    page = tmp_path / "compare.html"
    run = cli("compare", checkpoint_of(tmp_path, layers), "--methods", "svd", "--leaf", "16", "--html", page, "-q")
    assert run.code == 0, run.stderr
    # ratio against tolerance, the per-layer chart, one picture per layer
    assert_page_renders(page, layers + 2, f"compare-{layers}-layers.png", tmp_path)
