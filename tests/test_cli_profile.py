"""``attnzoo profile``: formats and errors (thin wrapper over attnzoo.bench.profiling)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

from attnzoo.cli import main

ARGS = [
    "profile",
    "--model",
    "resnet18",
    "--input-size",
    "32",
    "--min-run-time",
    "0.01",
    "--no-memory",
]


def test_json_and_csv(capsys) -> None:
    assert main([*ARGS, "--attention", "none,eca", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["attention"] for d in data] == ["none", "eca"]
    assert data[0]["params"] == 11_689_512 and data[0]["input_size"] == 32
    assert data[1]["latency_ms"] > 0 and data[1]["peak_mb"] is None
    assert main([*ARGS, "--attention", "se", "--format", "csv", "--no-latency"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 1 and rows[0]["attention"] == "se" and rows[0]["latency_ms"] == ""


def test_table_and_md(capsys) -> None:
    assert main([*ARGS, "--attention", "none,cbam", "--no-latency"]) == 0
    out = capsys.readouterr().out
    assert "attnzoo profile: resnet18 at 1x3x32x32" in out
    assert "cbam" in out and "11,689,512" in out
    assert main([*ARGS, "--attention", "none", "--format", "md", "--no-latency"]) == 0
    assert capsys.readouterr().out.startswith("| model | attention |")


def test_errors(capsys) -> None:
    assert main(["profile", "--model", "resnet5", "--attention", "none"]) == 2
    assert "Did you mean 'resnet50'" in capsys.readouterr().err
    assert main([*ARGS, "--attention", "nope"]) == 2
    assert "unknown attention 'nope'" in capsys.readouterr().err


def test_profile_stderr_has_no_profiler_traces() -> None:
    """The profiler's C++ lines (USDT, gpuGetDeviceCount, No CUDA runtime) stay hidden."""
    cmd = [
        sys.executable,
        "-m",
        "attnzoo",
        "profile",
        "--model",
        "cifar_resnet8",
        "--input-size",
        "32",
        "--min-run-time",
        "0.01",
        "--attention",
        "none,se",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for text in ("USDT", "STAGE:", "gpuGetDeviceCount", "No CUDA runtime"):
        assert text not in proc.stderr and text not in proc.stdout, (text, proc.stderr)
    assert "cifar_resnet8" in proc.stdout
