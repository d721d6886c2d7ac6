"""The bench's ``report.html`` opened in a real browser: headless Chromium through Playwright.

Runs a tiny bench (``none,se``, one seed, one epoch, a few hundred images), opens its report and
checks what a reader sees: every ``<img>`` decoded (``naturalWidth > 0``), the results tables
present with a row per attention, and no console error or uncaught exception.

Chromium is Debian's ``chromium`` (``/usr/bin/chromium``, or ``$ATTNZOO_CHROMIUM``); Playwright
drives it and downloads no browser. Without Chromium or Playwright the test skips, saying so;
with ``CI=true`` it fails instead (CI installs both). ``ATTNZOO_SCREENSHOT=1`` runs a somewhat
larger bench (two seeds, three epochs) and saves a screenshot of the top of the report to
``docs/images/report.png`` for the documentation.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "docs" / "images" / "report.png"
CHROMIUM = os.environ.get("ATTNZOO_CHROMIUM", "/usr/bin/chromium")
ATTENTIONS = ("none", "se")


def _unavailable(reason: str) -> None:
    """Skip, except in CI, where a missing browser is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the browser test must run; .ci/run installs it)")
    pytest.skip(reason)


def _sync_playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        _unavailable(
            f"no Chromium at {CHROMIUM} (apt-get install chromium, or set ATTNZOO_CHROMIUM)"
        )
    return sync_playwright


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``report.html`` of a tiny bench."""
    from attnzoo.cli import main

    out = tmp_path_factory.mktemp("bench")
    # for the documentation's screenshot, a bench whose numbers say something (two seeds: CIs)
    size = (
        ["--seeds", "2", "--epochs", "3", "--n-train", "1000", "--n-test", "500"]
        if os.environ.get("ATTNZOO_SCREENSHOT")
        else ["--seeds", "1", "--epochs", "1", "--n-train", "200", "--n-test", "100"]
    )
    code = main(
        [
            "bench",
            "--attention",
            ",".join(ATTENTIONS),
            *size,
            "--panel-images",
            "4",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out / "report.html"


@pytest.mark.slow
def test_report_renders_in_chromium(report: Path) -> None:
    sync_playwright = _sync_playwright()
    errors: list[str] = []
    with sync_playwright() as p:
        # --no-sandbox: Chromium refuses to start as root (CI runs as root) with its sandbox
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(report.as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => "
                "({alt: i.alt.slice(0, 60), ok: i.complete && i.naturalWidth > 0}))"
            )
            tables = page.evaluate(
                "Array.from(document.querySelectorAll('table')).map(t => t.innerText)"
            )
            title = page.title()
            if os.environ.get("ATTNZOO_SCREENSHOT"):
                page.screenshot(path=str(SCREENSHOT), full_page=False)
        finally:
            browser.close()

    assert "attnzoo" in title.lower()
    assert len(images) >= 3, images  # forest plot, confusion matrices, Grad-CAM panels at least
    assert [i["alt"] for i in images if not i["ok"]] == []
    assert len(tables) >= 2, tables
    results = next(t for t in tables if "top-1" in t)
    rows = [line.split("\t")[0].strip() for line in results.splitlines()]
    assert all(a in rows for a in ATTENTIONS), results
    assert errors == []
