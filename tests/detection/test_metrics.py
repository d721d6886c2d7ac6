"""VOC AP (all-point, devkit matching) and COCO AP: hand-computed cases, torchmetrics parity."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision

from attnzoo.detection import (
    COCOMeanAP,
    DetectionMetrics,
    VOCMeanAP,
    detection_metrics,
    voc_map,
)

torch.set_num_threads(2)


def P(boxes, scores, labels) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def T(boxes, labels, difficult=None) -> dict[str, torch.Tensor]:
    t = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
    }
    if difficult is not None:
        t["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    return t


A, B, FAR = [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]


def test_two_boxes_three_detections() -> None:
    # ranked: TP (0.9), FP (0.8), TP (0.7) -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    # envelope: 1 on (0, 1/2], 2/3 on (1/2, 1] -> AP = 1/2 + 1/3 = 5/6 (given out of order)
    preds = [P([B, FAR, A], [0.7, 0.8, 0.9], [0, 0, 0])]
    result = voc_map(preds, [T([A, B], [0, 0])], num_classes=1)
    assert result["map50"] == pytest.approx(5 / 6, abs=1e-12)
    assert result["per_class"] == [pytest.approx(5 / 6, abs=1e-12)]


def test_ranking_is_over_all_images() -> None:
    # image 0: FP 0.95, TP 0.6; image 1: TP 0.9 -> FP, TP, TP: precision 0, 1/2, 2/3 at
    # recall 0, 1/2, 1 -> envelope 2/3 on (0, 1] -> AP = 2/3
    preds = [P([FAR, A], [0.95, 0.6], [0, 0]), P([B], [0.9], [0])]
    targets = [T([A], [0]), T([B], [0])]
    assert voc_map(preds, targets, 1)["map50"] == pytest.approx(2 / 3, abs=1e-12)


def test_duplicate_of_a_taken_box_is_false_positive_even_if_another_box_overlaps() -> None:
    # the second detection's best box (IoU 0.905) is taken; the other box overlaps it with IoU
    # 0.739 >= 0.5, but the devkit rule still calls it a duplicate: precision 1, 1/2 at recall
    # 1/2, 1/2 -> AP = 1/2 (COCO's rule, best *free* box, would give 1)
    gt = T([A, [0, 2, 10, 12]], [0, 0])
    preds = [P([A, [0, 0.5, 10, 10.5]], [0.9, 0.8], [0, 0])]
    assert voc_map(preds, [gt], 1)["map50"] == pytest.approx(0.5, abs=1e-12)


def test_difficult_boxes_are_neither_true_nor_false_positives() -> None:
    preds = [P([B, FAR, A], [0.9, 0.8, 0.7], [0, 0, 0])]
    # B difficult: its detection is ignored -> FP, TP with one positive -> AP = 1/2
    hard = voc_map(preds, [T([A, B], [0, 0], difficult=[False, True])], 1)
    assert hard["map50"] == pytest.approx(0.5, abs=1e-12)
    # the same boxes without the flag: TP, FP, TP with two positives -> AP = 5/6
    assert voc_map(preds, [T([A, B], [0, 0])], 1)["map50"] == pytest.approx(5 / 6, abs=1e-12)
    # a class whose only box is difficult has no AP
    only_hard = voc_map([P([A], [0.9], [1])], [T([A], [1], difficult=[True])], 2)
    assert all(math.isnan(v) for v in only_hard["per_class"]) and math.isnan(only_hard["map50"])


def test_plus_one_pixel_convention() -> None:
    # inclusive pixels: 10 x 5 over 10 x 10 -> IoU 0.5 (TP); exclusive: 9 x 4 / 81 = 0.444 (FP)
    preds, targets = [P([[0, 0, 9, 4]], [0.9], [0])], [T([[0, 0, 9, 9]], [0])]
    assert voc_map(preds, targets, 1)["map50"] == 0.0
    assert voc_map(preds, targets, 1, plus_one_pixel=True)["map50"] == pytest.approx(1.0)


def test_classes_without_ground_truth_are_nan_and_left_out_of_the_mean() -> None:
    preds = [P([A, FAR], [0.9, 0.8], [0, 2])]
    result = voc_map(preds, [T([A, B], [0, 1])], num_classes=3)
    assert result["per_class"][:2] == [1.0, 0.0] and math.isnan(result["per_class"][2])
    assert result["map50"] == pytest.approx(0.5)


def test_wrong_class_does_not_match() -> None:
    result = voc_map([P([A], [0.9], [1])], [T([A], [0])], num_classes=2)
    assert result["per_class"][0] == 0.0 and math.isnan(result["per_class"][1])


def random_dataset(n_images: int, num_classes: int, seed: int):
    """Disjoint ground-truth boxes on a 4 x 4 grid of 40-px cells; detections are jittered copies
    (some with a wrong class, some duplicated) and random false positives, distinct scores."""
    gen = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(n_images):
        cells = torch.randperm(16, generator=gen)[: int(torch.randint(0, 5, (1,), generator=gen))]
        boxes, labels = [], []
        for cell in cells.tolist():
            x0, y0 = 40.0 * (cell % 4), 40.0 * (cell // 4)
            w, h = (8 + 28 * torch.rand(2, generator=gen)).tolist()
            x, y = (
                x0 + (36 - w) * torch.rand(1, generator=gen).item(),
                y0 + (36 - h) * torch.rand(1, generator=gen).item(),
            )
            boxes.append([x, y, x + w, y + h])
            labels.append(int(torch.randint(num_classes, (1,), generator=gen)))
        det_boxes, det_labels = [], []
        for box, label in zip(boxes, labels):
            for _ in range(int(torch.randint(0, 3, (1,), generator=gen))):
                w, h = box[2] - box[0], box[3] - box[1]
                shift = (torch.rand(4, generator=gen) - 0.5) * 0.4 * torch.tensor([w, h, w, h])
                det_boxes.append((torch.tensor(box) + shift).tolist())
                wrong = torch.rand(1, generator=gen).item() < 0.15
                det_labels.append((label + 1) % num_classes if wrong else label)
        for _ in range(int(torch.randint(0, 3, (1,), generator=gen))):
            xy = torch.rand(2, generator=gen) * 130
            det_boxes.append([*xy.tolist(), *(xy + 5 + 25 * torch.rand(2, generator=gen)).tolist()])
            det_labels.append(int(torch.randint(num_classes, (1,), generator=gen)))
        preds.append(
            {
                "boxes": torch.tensor(det_boxes).reshape(-1, 4),
                "scores": torch.rand(len(det_boxes), generator=gen),
                "labels": torch.tensor(det_labels, dtype=torch.long),
            }
        )
        targets.append(
            {
                "boxes": torch.tensor(boxes).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.long),
            }
        )
    return preds, targets


def test_ap50_agrees_with_pycocotools_within_interpolation_tolerance() -> None:
    # COCO samples the same precision envelope at 101 recall points; for a non-increasing
    # envelope f on [0, 1] the 101-point mean differs from its integral (the all-point AP) by at
    # most 1/100, so the tolerance is 0.01 per class. The matching rules agree here because the
    # ground-truth boxes of an image are disjoint (no detection reaches two boxes at IoU >= 0.5).
    num_classes = 3
    preds, targets = random_dataset(40, num_classes, seed=0)
    ours = voc_map(preds, targets, num_classes)
    coco = MeanAveragePrecision(
        iou_type="bbox", iou_thresholds=[0.5], class_metrics=True, backend="pycocotools"
    )
    coco.update(preds, targets)
    result = coco.compute()
    theirs = dict(zip(result["classes"].tolist(), result["map_per_class"].tolist()))
    assert len(theirs) == num_classes
    diffs = [abs(ours["per_class"][c] - theirs[c]) for c in range(num_classes)]
    assert 0.2 < ours["map50"] < 0.9  # a non-trivial case
    assert max(diffs) <= 0.01 and max(diffs) > 0  # sampled, not identical
    assert ours["map50"] == pytest.approx(float(result["map_50"]), abs=0.01)


def test_metric_accumulates_like_one_call_and_merges_states() -> None:
    preds, targets = random_dataset(12, 3, seed=1)
    expected = voc_map(preds, targets, 3)
    metric = VOCMeanAP(3)
    for i in range(0, 12, 5):
        metric.update(preds[i : i + 5], targets[i : i + 5])
    assert metric.compute() == expected
    # what torchmetrics does with the states across processes (cat / sum)
    first, second = VOCMeanAP(3), VOCMeanAP(3)
    first.update(preds[:7], targets[:7])
    second.update(preds[7:], targets[7:])
    first.merge_state(second)
    assert first.compute()["per_class"] == pytest.approx(expected["per_class"], abs=1e-12)
    metric.reset()
    metric.update(preds[:1], targets[:1])
    assert metric.compute() == voc_map(preds[:1], targets[:1], 3)


def test_detection_metrics_bundle() -> None:
    preds, targets = random_dataset(10, 3, seed=2)
    bundle = detection_metrics(3)
    assert isinstance(bundle, DetectionMetrics)
    bundle.update(preds[:5], targets[:5])
    bundle.update(preds[5:], targets[5:])
    out = bundle.compute()
    voc = voc_map(preds, targets, 3)
    coco = COCOMeanAP()
    coco.update(preds, targets)
    coco_out = coco.compute()
    assert set(out) == {"map50", "map", "map75", "per_class_ap50"}
    assert out["map50"] == voc["map50"] and out["per_class_ap50"] == voc["per_class"]
    assert out["map"] == coco_out["map"] and out["map75"] == coco_out["map75"]
    assert 0 < out["map"] < out["map50"] <= 1
    bundle.reset()
    bundle.update(preds[:2], targets[:2])
    assert bundle.compute()["per_class_ap50"] == voc_map(preds[:2], targets[:2], 3)["per_class"]


def test_coco_difficult_boxes_are_crowd_regions() -> None:
    preds = [P([A, B], [0.8, 0.9], [0, 0])]  # the detection on B is ranked first
    plain, hard = COCOMeanAP(), COCOMeanAP()
    plain.update(preds, [T([A], [0])])  # B is a false positive
    hard.update(preds, [T([A, B], [0, 0], difficult=[False, True])])  # B hits a crowd region
    assert plain.compute()["map50"] == pytest.approx(0.5, abs=0.01)
    assert hard.compute()["map50"] == pytest.approx(1.0)


def test_coco_backends_agree() -> None:
    # both backends are in the ``det`` extra (a test requirement through ``bench``)
    preds, targets = random_dataset(30, 3, seed=5)
    results = []
    for backend in ("pycocotools", "faster_coco_eval"):
        metric = COCOMeanAP(backend=backend)
        assert metric.backend == backend
        metric.update(preds, targets)
        results.append(metric.compute())
    assert results[0] == pytest.approx(results[1], abs=1e-9)
    assert COCOMeanAP().backend == "faster_coco_eval"  # "auto" picks the faster one


@pytest.mark.parametrize(
    ("preds", "targets", "match"),
    [
        ([P([A], [0.9], [0])], [], "one dict per image"),
        (
            [{"boxes": torch.zeros(1, 4), "labels": torch.zeros(1, dtype=torch.long)}],
            [T([A], [0])],
            "keys",
        ),
        ([P([A], [0.9], [0])], [T([A], [5])], r"labels'\] must be in \[0, 2\)"),
        (
            [P([A], [0.9], [0])],
            [{"boxes": torch.zeros(2, 4), "labels": torch.zeros(1).long()}],
            r"\(1, 4\)",
        ),
        ([P([A], [0.9], [0])], [T([A], [0], difficult=[True, False])], "difficult"),
    ],
)
def test_bad_input(preds, targets, match: str) -> None:
    with pytest.raises(ValueError, match=f"VOCMeanAP.update: .*{match}"):
        VOCMeanAP(2).update(preds, targets)


def test_bad_options_and_types() -> None:
    with pytest.raises(ValueError, match="VOCMeanAP: num_classes"):
        VOCMeanAP(0)
    with pytest.raises(ValueError, match="VOCMeanAP: iou_threshold"):
        VOCMeanAP(3, iou_threshold=1.5)
    with pytest.raises(TypeError, match="voc_map: preds and targets must be lists"):
        voc_map(P([A], [0.9], [0]), T([A], [0]), 1)


WORKER = """
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, {here!r})
from test_metrics import random_dataset
from attnzoo.detection import detection_metrics
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
preds, targets = random_dataset(13, 3, seed=4)
metric = detection_metrics(3)
metric.update(preds[rank::world], targets[rank::world])   # uneven shares: 7 and 6 images
print(json.dumps(metric.compute()))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_give_the_single_process_result(tmp_path) -> None:
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(here=str(Path(__file__).parent)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**env, "RANK": str(r)},
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    preds, targets = random_dataset(13, 3, seed=4)
    single = detection_metrics(3)
    single.update(preds, targets)
    expected = single.compute()
    for stdout, _ in outs:
        got = json.loads(stdout.strip().splitlines()[-1])
        assert got["per_class_ap50"] == pytest.approx(expected["per_class_ap50"], abs=1e-12)
        assert got["map"] == pytest.approx(expected["map"], abs=1e-12)
        assert got["map75"] == pytest.approx(expected["map75"], abs=1e-12)
