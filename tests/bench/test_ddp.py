"""A tiny bench on 2 CPU processes (gloo, Lightning's DDP): the test accuracy covers the whole test
set and equals a single-process evaluation of the saved checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnzoo.bench.data import load_data
from attnzoo.bench.tasks.classify import evaluate
from attnzoo.models import cifar_resnet8

N_TEST = 41  # odd: a padded DistributedSampler would count one image twice


@pytest.mark.slow
def test_two_process_ddp_accuracy_is_over_the_whole_test_set(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "attnzoo.cli",
        "bench",
        "--attention",
        "none,se",
        "--seeds",
        "1",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--n-train",
        "96",
        "--n-test",
        str(N_TEST),
        "--out",
        str(out),
        "--no-progress",
        "--no-profile",
        "--threads",
        "1",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategy",
        "ddp",
        "--verbose",
    ]  # Lightning's own messages show the second process
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONHASHSEED": "0"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stderr  # really two processes
    assert done.stdout.count("attnzoo bench: top-1") == 1  # the table, from rank 0 only
    payload = json.loads((out / "results.json").read_text())
    data = load_data("digits", n_train=96, n_test=N_TEST)
    for run in payload["runs"]:
        assert run["test_n"] == N_TEST
        for row in run["history"]:
            assert row["test_n"] == N_TEST
        ckpt = torch.load(
            out / "runs" / run["attention"] / "seed0" / "last.ckpt", weights_only=True
        )
        attention = None if run["attention"] == "none" else run["attention"]
        model = cifar_resnet8(attention, 10)
        state = {
            k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
        }
        model.load_state_dict(state)
        correct, total = evaluate(model, data.test)
        assert total == N_TEST
        assert round(run["test_acc"] * N_TEST) == correct
        assert run["test_acc"] == pytest.approx(correct / N_TEST, abs=1e-6)
