"""``attnzoo list`` and ``attnzoo info``."""

from __future__ import annotations

import subprocess
import sys

import attnzoo
from attnzoo.cli import main


def test_list_prints_every_module(capsys) -> None:
    assert main(["list", "--channels", "128"]) == 0
    out = capsys.readouterr().out
    for name in attnzoo.available():
        assert name in out
    assert "params@C=128" in out
    se_params = attnzoo.info("se").count_params(128)
    assert f"{se_params:,}" in out


def test_list_family_filter(capsys) -> None:
    assert main(["list", "--family", "channel"]) == 0
    out = capsys.readouterr().out
    assert "se" in out.split() and "cbam" not in out.split()


def test_info_prints_metadata(capsys) -> None:
    assert main(["info", "cbam"]) == 0
    out = capsys.readouterr().out
    meta = attnzoo.info("cbam")
    assert meta.paper in out and str(meta.year) in out and meta.code in out
    assert "yolov4-tiny" in out and "reduction=16" in out


def test_info_unknown_name_fails_cleanly(capsys) -> None:
    assert main(["info", "cbma"]) == 2
    assert "Did you mean 'cbam'" in capsys.readouterr().err


def test_console_script_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "attnzoo.cli", "list"], capture_output=True, text=True, check=True
    )
    assert "se" in result.stdout
