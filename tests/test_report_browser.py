"""The report in a real browser (headless Chromium): it loads without console errors, its
script runs, hostile label names stay text, and it renders as a page (not blank).

Skipped with the reason when no Chromium is installed (Debian: apt-get install chromium).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retdmctl.report.page import render_page

from test_report import sample_data

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ["--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


def browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip(f"no headless browser: none of {', '.join(BROWSERS)} is on PATH (apt-get install chromium)")


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(render_page(sample_data()), encoding="utf-8")
    return path


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([browser(), *FLAGS, *args], capture_output=True, text=True, timeout=180)


def console_messages(stderr: str) -> list[str]:
    """Chromium logs every console message and uncaught exception as ``INFO:CONSOLE``."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_loads_without_console_errors_and_the_script_runs(page):
    result = run(["--dump-dom", page.as_uri()])
    assert result.returncode == 0, result.stderr[-2000:]
    assert console_messages(result.stderr) == []
    dom = result.stdout
    assert 'data-report-ready="1"' in dom  # the page's script ran to its end
    assert len(re.findall(r"<script\b", dom)) == 1  # a label named <script>... stayed text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


def test_screenshot_is_not_blank(page, tmp_path):
    shot = tmp_path / "report.png"
    result = run([f"--screenshot={shot}", "--window-size=1280,4000", page.as_uri()])
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    assert console_messages(result.stderr) == []
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (4000, 1280)
    colours = len(np.unique(img.reshape(-1, 3), axis=0))
    not_background = (np.abs(img.astype(int) - img[5, 5].astype(int)).sum(-1) > 30).mean()
    assert colours > 200, colours  # text, charts, thumbnails: far more than a blank page
    assert not_background > 0.05, not_background
