"""``attnzoo bench --task segment``: the DANet plug-in end to end (results, report, figures), its
mIoU against the metric computed directly, resume after an interruption, its schedule, data
options and errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attnzoo.bench.run import run
from attnzoo.bench.tasks import get_task, segment
from attnzoo.bench.tasks.segment import (
    load_segmentation_data,
    parse_query,
    parse_segment_data,
    poly_lambda,
)
from attnzoo.bench.tasks.segment_report import per_class_table

pytest.importorskip("lightning")

TINY = dict(
    task="segment",
    attention="none,pam",
    epochs=1,
    seeds=[0],
    batch_size=8,
    n_train=24,
    n_test=8,
    image_size=32,
    progress=False,
    panel_images=2,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory, _one_thread):
    out = tmp_path_factory.mktemp("segment")
    return out, run(out=out, options={"query": "0.25,0.75"}, **TINY)


# ---------------------------------------------------------------------------------------------
# end to end
@pytest.mark.slow  # trains (the shared tiny bench: ~20 s on 2 cores)
def test_tiny_segment_bench_writes_results_and_report(tiny_bench) -> None:
    out, result = tiny_bench
    payload = json.loads((out / "results.json").read_text())
    assert payload["task"] == "segment" and payload["metric"] == "miou" and payload["complete"]
    assert [s["attention"] for s in payload["summary"]] == ["none", "pam"]
    for r in payload["runs"]:
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["pixel_acc"] <= 1.0  # fractions
        assert r["pixel_acc"] > r["miou"] > 0.0  # background dominates the pixels
        assert len(r["per_class_iou"]) == 2 and len(r["confusion"]) == 2  # background, digit
        assert r["test_n"] == 8
        assert int(np.asarray(r["confusion"]).sum()) == 8 * 32 * 32
    pam = payload["summary"][1]
    assert pam["diff_vs_baseline"] == pytest.approx(pam["miou"] - payload["summary"][0]["miou"])
    assert pam["params"] > payload["summary"][0]["params"] > 0 and pam["flops"] > 0
    assert payload["config"]["query"] == [0.25, 0.75]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"miou", "pixel_acc"} <= set(rows[0]) and len(rows) == 2 + 2
    md = (out / "report.md").read_text()
    for text in ("mIoU %", "Per-class IoU", "none IoU %", "pam IoU %", "| digit |", "Predictions"):
        assert text in md
    for fig in ("segmentation.png", "position_attention.png"):
        assert f"figures/{fig}" in md
        assert (out / "figures" / fig).stat().st_size > 1000
    assert "segmentation.png" in (out / "report.html").read_text() or (
        "data:image/png" in (out / "report.html").read_text()
    )


@pytest.mark.slow  # trains (the shared tiny bench: ~20 s on 2 cores)
def test_reported_miou_equals_the_metric_on_the_saved_model(tiny_bench) -> None:
    from attnzoo.bench.checkpoints import load_run_model
    from attnzoo.segmentation import SegmentationMetrics

    out, result = tiny_bench
    data = load_segmentation_data("scenes:digit", image_size=32, n_train=24, n_test=8, seed=0)
    for r in result.runs:
        model, cfg = load_run_model(out / "runs" / r["attention"] / "seed0")
        assert cfg["task"] == "segment"
        metric = SegmentationMetrics(data.num_classes)
        with torch.no_grad():
            for i in range(len(data.test)):
                image, mask = data.test[i]
                metric.update(model(image[None])["out"].argmax(1), mask[None])
        got = metric.compute()
        assert float(got["miou"]) == pytest.approx(r["miou"], abs=1e-6)
        assert float(got["pixel_acc"]) == pytest.approx(r["pixel_acc"], abs=1e-6)


def test_resume_does_not_retrain_a_finished_run(tmp_path: Path, monkeypatch) -> None:
    cls = segment._module_class()
    original = cls.training_step

    class Killed(Exception):
        pass

    def pam_dies_in_epoch_two(self, batch, batch_idx):
        if self.current_epoch == 1 and self.model.head.attention != "fcn":
            raise Killed
        return original(self, batch, batch_idx)

    args = {**TINY, "epochs": 2, "panel_images": 0, "profile": False, "report": False}
    monkeypatch.setattr(cls, "training_step", pam_dies_in_epoch_two)
    with pytest.raises(Killed):
        run(out=tmp_path, **args)
    done = tmp_path / "runs" / "none" / "seed0" / "result.json"
    cut = tmp_path / "runs" / "pam" / "seed0"
    assert done.is_file() and not (cut / "result.json").exists()
    assert (cut / "last.ckpt").is_file()
    before = done.stat().st_mtime_ns, done.read_text()
    monkeypatch.setattr(cls, "training_step", original)
    result = run(out=tmp_path, **args)
    assert result.skipped == ["none/seed0"]
    assert (done.stat().st_mtime_ns, done.read_text()) == before
    resumed = json.loads((cut / "result.json").read_text())
    assert resumed["resumed_from_epoch"] == 1 and len(resumed["history"]) == 2


# ---------------------------------------------------------------------------------------------
# options and errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"options": {"colour": 1}}, "takes no option 'colour'"),
        ({"options": {"query": "0.5"}}, "query must be 'fy,fx'"),
        ({"options": {"query": "1.5,0.5"}}, r"fractions in \[0, 1\]"),
        ({"options": {"query": "a,b"}}, "query must be 'fy,fx'"),
        ({"options": {"optimizer": "adam"}}, "optimizer must be one of sgd, adamw"),
        ({"model": "danet_tiny"}, "unknown --model 'danet_tiny'"),
        ({"model": "resnet18"}, "segmentation models: danet_small"),
        ({"image_size": 36}, "multiple of 8"),
        ({"data": "scenes:cats"}, "scenes takes no path"),
        ({"data": "masks:/no/such/folder"}, "is not a folder"),
        ({"data": "masks:a:b:c"}, "masks:IMAGES_DIR:MASKS_DIR"),
        ({"data": "ade20k:/x"}, "unknown --data"),
        ({"data": "voc:/no/such"}, "is not a folder"),
    ],
)
def test_bad_options_are_clear_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run(out=tmp_path, **{**TINY, **kwargs})
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_mask_folder_errors_name_the_layout(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="no masks/ sub-folder"):
        parse_segment_data(f"masks:{tmp_path}")
    with pytest.raises(ValueError, match=r"not a voc folder \(missing JPEGImages/"):
        parse_segment_data(f"voc:{tmp_path}")
    (tmp_path / "masks").mkdir()
    assert parse_segment_data(f"masks:{tmp_path}") == (
        "masks",
        [str(tmp_path / "images"), str(tmp_path / "masks")],
    )


def test_a_mask_folder_loads_and_splits(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for d in ("images", "masks"):
        (tmp_path / d).mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"im{i}.jpg"
        )
        mask = rng.integers(0, 3, (20, 24), dtype=np.uint8)
        mask[0, 0] = 255  # ignored
        Image.fromarray(mask).save(tmp_path / "masks" / f"im{i}.png")
    data = load_segmentation_data(f"masks:{tmp_path}", image_size=32, seed=0)
    assert (len(data.train), len(data.test)) == (7, 3)
    image, mask = data.test[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= {0, 1, 2, 255}


def test_built_in_scenes_one_class_or_ten_digits() -> None:
    digit = load_segmentation_data("scenes:digit", image_size=32, n_train=3, n_test=2)
    digits = load_segmentation_data("scenes", image_size=32, n_train=3, n_test=2)
    assert digit.classes == ["background", "digit"]
    assert digits.classes == ["background", *"0123456789"]
    for i in range(3):  # the same scenes: every digit pixel of one is "digit" in the other
        assert torch.equal(digit.train[i][1], (digits.train[i][1] > 0).long())
        assert torch.equal(digit.train[i][0], digits.train[i][0])


def test_default_arms_and_task_lookup() -> None:
    task = get_task("segment")
    assert task.defaults["attention"] == ("none", "pam", "cam", "dual_attention")
    assert task.defaults["model"] == "danet_small" and task.metric == "miou"


# ---------------------------------------------------------------------------------------------
# pieces
def test_poly_schedule_is_the_official_shape() -> None:
    shape = poly_lambda(10, 0.9)
    assert shape(0) == 1.0
    assert shape(5) == pytest.approx(0.5**0.9)
    assert shape(10) == 0.0 and shape(12) == 0.0
    with pytest.raises(ValueError, match="total steps >= 1"):
        poly_lambda(0)


def test_query_parsing() -> None:
    assert parse_query("0.5,0.25") == (0.5, 0.25)
    assert parse_query((1, 0)) == (1.0, 0.0)
    for bad in ("0.5", "0.5,0.5,0.5", None, True, "-0.1,0.5"):
        with pytest.raises(ValueError, match="query"):
            parse_query(bad)


def test_per_class_table_means_over_seeds_and_differences() -> None:
    per_class = {"none": [[0.5, 0.2, None], [0.7, 0.4, None]], "pam": [[0.9, None, 0.1]]}
    headers, rows = per_class_table(per_class, ["bg", "a", "b"], "none")
    assert headers == ["class", "none IoU %", "pam IoU %"]
    assert rows == [["bg", "60.0", "90.0 (+30.0)"], ["a", "30.0", ""], ["b", "", "10.0"]]


def test_command_line_passes_task_options(tmp_path: Path, capsys) -> None:
    from attnzoo.cli import main

    args = ["bench", "--task", "segment", "--out", str(tmp_path)]
    assert main([*args, "--option", "query=2,0.5"]) == 2
    assert "option query must hold fractions in [0, 1]" in capsys.readouterr().err
    assert main([*args, "--option", "optimizer=adam"]) == 2
    assert "optimizer must be one of sgd, adamw" in capsys.readouterr().err
