"""A quiet ``attnzoo bench`` terminal: results on stdout, progress on stderr, no framework noise."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnzoo.bench.quiet import filtered_native_stderr, quiet_lightning

NOISE = (
    "GPU available",
    "TPU available",
    "litlogger",
    "Tip:",
    "USDT",
    "gpuGetDeviceCount",
    "No CUDA runtime",
    "Loading `train_dataloader`",
    "`Trainer.fit` stopped",
)

KINETO = (
    b"USDT:2026-01-01 10:00:00 1:1 SyncActivityProfilerHandler.cpp:39] profiler_start\n"
    b"ERROR:2026-01-01 10:00:00 1:1 DeviceProperties.cpp:56] gpuGetDeviceCount failed "
    b"with code 35\n"
)


def test_native_noise_is_dropped_and_everything_else_kept(capfd) -> None:
    with filtered_native_stderr():
        os.write(2, KINETO + b"a real C++ message\n")
        os.write(2, b"W1203 cpp_extension.py:183] No CUDA runtime is found, using CUDA_HOME\n")
    err = capfd.readouterr().err
    assert err == "a real C++ message\n"
    assert "USDT" not in err and "gpuGetDeviceCount" not in err and "No CUDA" not in err


def test_native_output_is_written_back_when_the_block_fails(capfd) -> None:
    with pytest.raises(RuntimeError, match="boom"), filtered_native_stderr():
        os.write(2, KINETO + b"terminate called: what the profiler says before failing\n")
        raise RuntimeError("boom")
    err = capfd.readouterr().err
    assert "what the profiler says before failing" in err and "USDT" not in err
    os.write(2, b"after\n")  # descriptor 2 is restored
    assert capfd.readouterr().err == "after\n"


def test_verbose_keeps_the_native_output(capfd) -> None:
    with filtered_native_stderr(verbose=True):
        os.write(2, KINETO)
    assert capfd.readouterr().err == KINETO.decode()


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_lightning_sends_stdout_to_stderr(capsys, verbose: bool) -> None:
    with quiet_lightning(verbose):
        print("progress bar")
        info = logging.getLogger("lightning.pytorch.utilities.rank_zero").isEnabledFor(logging.INFO)
    out, err = capsys.readouterr()
    assert out == "" and err == "progress bar\n"
    # importing Lightning inside the block must not bring its INFO messages back
    assert info is verbose


def test_cli_passes_verbose(monkeypatch, tmp_path: Path) -> None:
    import importlib

    from attnzoo.cli import main

    seen = {}

    def fake_run(*args, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(importlib.import_module("attnzoo.bench.run"), "run", fake_run)
    for argv, expected in (([], False), (["--verbose"], True)):
        assert main(["bench", "--out", str(tmp_path), *argv]) == 2
        assert seen["verbose"] is expected


def _folder(root: Path) -> Path:
    """A class-sorted folder: train/ and test/, 3 classes of PNG and JPEG images."""
    from PIL import Image

    for split, n in (("train", 10), ("test", 4)):
        for c, name in enumerate(("circle", "square", "triangle")):
            (root / split / name).mkdir(parents=True)
            for k in range(n):
                colour = tuple(220 if i == c else 10 * k for i in range(3))
                Image.new("RGB", (12, 12), colour).save(
                    root / split / name / f"{k}.{'png' if k % 2 else 'jpg'}"
                )
    return root


@pytest.mark.slow
def test_bench_cli_stdout_is_the_table_and_stderr_has_no_framework_noise(tmp_path: Path) -> None:
    data, out = _folder(tmp_path / "shapes"), tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "attnzoo.cli",
        "bench",
        "--data",
        str(data),
        "--attention",
        "none,se",
        "--epochs",
        "1",
        "--seeds",
        "1",
        "--batch-size",
        "8",
        "--n-train",
        "12",
        "--n-test",
        "6",
        "--image-size",
        "16",
        "--no-localise",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for text in NOISE:
        assert text not in proc.stdout and text not in proc.stderr, text
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("attnzoo bench: top-1 on")
    assert lines[1].split()[:2] == ["attention", "top-1"] and set(lines[2]) <= {"-", " "}
    assert [ln.split()[0] for ln in lines[3:]] == ["none", "se"]
    # progress bars and our status lines are on stderr
    assert "[attnzoo bench] none seed 0" in proc.stderr and "Epoch 0" in proc.stderr
    assert "report: " in proc.stderr and "report.html" not in proc.stdout
    # every class was used, with the same share each
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["class_counts"] == {
        "train": {"circle": 4, "square": 4, "triangle": 4},
        "test": {"circle": 2, "square": 2, "triangle": 2},
    }
