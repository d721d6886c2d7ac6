"""Faster / Cascade R-CNN in ``attnzoo bench --task detect``: models, defaults, schedule, and a
cascade bench end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnzoo.bench.engine import BenchConfig, validate
from attnzoo.bench.run import run
from attnzoo.bench.tasks.detect import TASK
from attnzoo.bench.tasks.detect_rcnn import (
    RCNN_DEFAULTS,
    is_rcnn,
    rcnn_targets,
    warmup_multistep,
)
from attnzoo.bench.tasks.detect_report import paired_ap_table, stage_table
from attnzoo.detection.rcnn import cascade_rcnn_small, faster_rcnn_small


def test_bad_model_names_list_the_choices(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown --model 'cascade_rcnn'.*yolov4_tiny, "
        r"faster_rcnn_small, cascade_rcnn_small, faster_rcnn_resnet50_fpn, "
        r"cascade_rcnn_resnet50_fpn",
    ):
        validate(BenchConfig(task="detect", model="faster_rcnn_small,cascade_rcnn", out=tmp_path))


def test_rcnn_models_take_their_own_defaults_and_arms(tmp_path: Path) -> None:
    bench = validate(
        BenchConfig(
            "none,se", task="detect", model="faster_rcnn_small,cascade_rcnn_small", out=tmp_path
        )
    )
    c = bench.config
    assert (c.epochs, c.batch_size, c.lr, c.weight_decay, c.n_train) == tuple(
        RCNN_DEFAULTS[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "n_train")
    )
    assert bench.baseline == "faster_rcnn_small/none"
    labels = [s.label for s in bench.specs]
    assert labels[2:] == ["cascade_rcnn_small/none", "cascade_rcnn_small/se"]
    assert bench.builders["cascade_rcnn_small"] is cascade_rcnn_small
    assert TASK.run_settings(c)["momentum"] == 0.9
    yolo = validate(BenchConfig("none", task="detect", out=tmp_path)).config
    assert (yolo.lr, yolo.batch_size, yolo.n_train) == (0.05, 16, None)  # unchanged
    assert TASK.run_settings(yolo)["momentum"] == 0.937
    assert is_rcnn(faster_rcnn_small) and not is_rcnn(TASK.resolve_model("yolov4_tiny")[1])


def test_labels_shift_past_the_background_and_the_schedule_warms_then_steps() -> None:
    t = [{"boxes": torch.zeros(2, 4), "labels": torch.tensor([0, 3]), "difficult": torch.ones(2)}]
    assert rcnn_targets(t)[0]["labels"].tolist() == [1, 4]
    f = warmup_multistep(260)  # warm-up 26 steps; steps at 160 and 220
    assert f(0) == pytest.approx(1e-3) and f(13) == pytest.approx(1e-3 * 0.5 + 0.5)
    assert [f(s) for s in (26, 159, 160, 219, 220, 259)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    assert warmup_multistep(1)(0) == pytest.approx(1e-3)  # defined for one step


def test_report_tables_pair_every_ap_and_list_the_cascade_stages() -> None:
    stages = [{"map50": 0.5, "map": 0.2, "map75": 0.1, "map90": 0.0}] * 3
    runs = [
        {
            "attention": "f/none",
            "seed": s,
            "map50": 0.5 + s / 10,
            "map": 0.2,
            "map75": 0.1,
            "map90": 0.0,
        }
        for s in (0, 1)
    ] + [
        {
            "attention": "c/none",
            "seed": s,
            "map50": 0.6 + s / 10,
            "map": 0.3,
            "map75": 0.3,
            "map90": 0.1,
            "stages": stages,
        }
        for s in (0, 1)
    ]
    headers, rows = paired_ap_table(runs, ["f/none", "c/none"], "f/none")
    assert headers[:3] == ["arm", "AP50 %", "ΔAP50 vs f/none [95% CI]"]
    assert rows[0][2] == "baseline" and rows[1][2].startswith("+10.00 [+10.00, +10.00]")
    assert rows[1][6].startswith("+20.00")  # AP75: 0.3 - 0.1
    headers, rows = stage_table(runs)
    assert [r[1] for r in rows] == ["stage 1", "stage 2", "stage 3", "ensemble (output)"]
    assert rows[-1][2] == "65.00 ± 7.07"


def test_a_cascade_bench_runs_end_to_end(tmp_path: Path) -> None:
    result = run(
        "none",
        task="detect",
        model="cascade_rcnn_small",
        seeds=[0],
        epochs=1,
        n_train=8,
        n_test=4,
        batch_size=8,
        out=tmp_path,
        progress=False,
        profile=False,
        localise=False,
        panel_images=2,
    )
    payload = json.loads((tmp_path / "results.json").read_text())
    run0 = payload["runs"][0]
    for key in ("map50", "map", "map75", "map90"):
        assert 0.0 <= run0[key] <= 1.0
    assert len(run0["stages"]) == 3 and set(run0["stages"][0]) == {"map50", "map", "map75", "map90"}
    assert run0["test_n"] == 4 and "train_loss_classifier" in run0
    md = result.report_md.read_text()
    assert "## Cascade stages" in md and "| none | stage 3 |" in md
    assert "## AP at every IoU, with paired differences" in md and "## Detections" in md
    from attnzoo.bench.checkpoints import load_run_model

    model, cfg = load_run_model(tmp_path / "runs" / "none" / "seed0")
    assert cfg["model"] == "cascade_rcnn_small" and is_rcnn(model)
