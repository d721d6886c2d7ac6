"""SegmentationMetrics: one accumulated confusion matrix, exact IoUs, torchmetrics parity."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.segmentation import MeanIoU

from attnzoo.segmentation import SegmentationMetrics


def test_hand_built_confusion_matrix_exact_ious():
    # 4 classes; class 3 occurs neither in truth nor prediction; 255 is ignored
    target = torch.tensor([[[0, 0, 0, 1], [1, 2, 255, 255]]])
    preds = torch.tensor([[[0, 0, 1, 1], [2, 2, 3, 0]]])  # the ignored pixels' predictions vanish
    m = SegmentationMetrics(4, ignore_index=255)
    m.update(preds, target)
    r = m.compute()
    expected_cm = torch.tensor([[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(r["confusion"], expected_cm)
    # IoU_k = TP / (TP + FP + FN)
    iou = [2 / 3, 1 / 3, 1 / 2]
    torch.testing.assert_close(r["per_class_iou"][:3], torch.tensor(iou, dtype=torch.float64))
    assert torch.isnan(r["per_class_iou"][3])  # absent class: left out of the mean
    assert r["miou"].item() == pytest.approx(sum(iou) / 3)
    assert r["pixel_acc"].item() == pytest.approx(4 / 6)
    assert r["mean_acc"].item() == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_predicted_but_absent_class_counts_as_zero():
    m = SegmentationMetrics(3, ignore_index=None)
    m.update(torch.tensor([[0, 2]]), torch.tensor([[0, 0]]))
    r = m.compute()
    assert r["per_class_iou"][2].item() == 0.0 and torch.isnan(r["per_class_iou"][1])
    assert r["miou"].item() == pytest.approx((1 / 2 + 0) / 2)


def test_logits_and_accumulation_over_updates():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 6, 7)
    target = torch.randint(0, 5, (3, 6, 7))
    a, b = SegmentationMetrics(5), SegmentationMetrics(5)
    a.update(logits, target)
    for i in range(3):
        b.update(logits[i : i + 1].argmax(1), target[i : i + 1])
    assert torch.equal(a.compute()["confusion"], b.compute()["confusion"])
    assert a.compute()["confusion"].sum() == target.numel()


def test_merge_state_sums_the_matrices():
    """What DDP's sync does: states of several processes are summed."""
    torch.manual_seed(1)
    p, t = torch.randint(0, 4, (4, 8, 8)), torch.randint(0, 4, (4, 8, 8))
    whole, first, second = (SegmentationMetrics(4) for _ in range(3))
    whole.update(p, t)
    first.update(p[:2], t[:2])
    second.update(p[2:], t[2:])
    first.merge_state(second)
    assert torch.equal(first.compute()["confusion"], whole.compute()["confusion"])


@pytest.mark.parametrize("absent", [False, True])
def test_matches_multiclass_jaccard_macro(absent):
    torch.manual_seed(2)
    k = 6
    ours = SegmentationMetrics(k, ignore_index=255)
    ref = MulticlassJaccardIndex(k, average="macro", ignore_index=255)
    for _ in range(3):
        t = torch.randint(0, k - int(absent), (2, 9, 11))
        p = torch.randint(0, k - int(absent), (2, 9, 11))
        t[torch.rand(t.shape) < 0.1] = 255
        ours.update(p, t)
        ref.update(p, t)
    assert ours.compute()["miou"].item() == pytest.approx(ref.compute().item(), abs=1e-6)


def test_mean_iou_of_torchmetrics_is_a_per_image_average():
    """torchmetrics' MeanIoU averages per-image IoUs: not the dataset mIoU."""
    # image 1: 1 pixel of class 1 missed among 3 background pixels; image 2: all class 1, right
    target = torch.tensor([[[0, 0], [0, 1]], [[1, 1], [1, 1]]])
    preds = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [1, 1]]])
    ours = SegmentationMetrics(2, ignore_index=None)
    ours.update(preds, target)
    # dataset confusion [[3, 0], [1, 4]]: IoU_0 = 3/4, IoU_1 = 4/5
    assert ours.compute()["miou"].item() == pytest.approx((3 / 4 + 4 / 5) / 2)
    per_image = MeanIoU(num_classes=2, input_format="index")
    per_image.update(preds, target)
    assert per_image.compute().item() != pytest.approx(ours.compute()["miou"].item(), abs=1e-3)
    # per class: class 1 has IoU 0 in image 1 and 1 in image 2 -> 0.5, not the dataset's 4/5
    per_class = MeanIoU(num_classes=2, input_format="index", per_class=True)
    per_class.update(preds, target)
    torch.testing.assert_close(per_class.compute(), torch.tensor([0.75, 0.5]))
    torch.testing.assert_close(ours.compute()["per_class_iou"].float(), torch.tensor([0.75, 0.8]))


def test_bad_inputs():
    m = SegmentationMetrics(3)
    with pytest.raises(ValueError, match="label 7"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="logits have 4 classes"):
        m.update(torch.randn(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="must match"):
        m.update(torch.zeros(1, 3, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics(0)
