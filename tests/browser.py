"""Headless Chromium for the page tests: the browser or a skip (a failure under CI=true), what a
page's images did, and a screenshot."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import tempfile

import pytest

CHROMIUM = pathlib.Path("/usr/bin/chromium")
# Flags for root in a container without network: no sandbox, no GPU, no background, component-update,
# sync or QUIC traffic, and (per run) a fresh empty profile.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def chromium_or_skip(path: pathlib.Path) -> pathlib.Path:
    """The browser, or a skip naming how to install it; under CI=true a missing browser fails the test."""
    if path.is_file() and os.access(path, os.X_OK):
        return path
    message = f"{path} not found: install Debian's chromium (apt-get install --no-install-recommends chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true, so the browser test fails instead of skipping")
    pytest.skip(message)


def _run(chromium: pathlib.Path, tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    return subprocess.run([str(chromium), *FLAGS, f"--user-data-dir={profile}", *args],  # a real process: the browser
                          capture_output=True, text=True, timeout=120)


def chromium_images(chromium: pathlib.Path, page: pathlib.Path, tmp_path: pathlib.Path) -> tuple[int, int]:
    """(images, images loaded with naturalWidth > 0) of a page rendered by headless Chromium."""
    probe = tmp_path / "probe.html"
    script = ('<script>window.addEventListener("load", () => { const imgs = [...document.images]; '
              'document.body.setAttribute("data-images", imgs.length + ":" + '
              'imgs.filter(i => i.complete && i.naturalWidth > 0).length); });</script>')
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    done = _run(chromium, tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'data-images="(\d+):(\d+)"', done.stdout)
    assert found, f"chromium exited {done.returncode}:\n{done.stderr[-2000:]}"
    return int(found.group(1)), int(found.group(2))


def chromium_screenshot(chromium: pathlib.Path, page: pathlib.Path, out: pathlib.Path, tmp_path: pathlib.Path,
                       size: tuple[int, int] = (1280, 2400)) -> pathlib.Path:
    """A PNG screenshot of ``page`` (the window's size) written to ``out``."""
    done = _run(chromium, tmp_path, f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=10000",
                f"--screenshot={out}", page.as_uri())
    assert out.exists(), f"chromium exited {done.returncode}:\n{done.stderr[-2000:]}"
    return out
