"""Dataset mIoU from one accumulated confusion matrix (the Cityscapes / mmsegmentation metric).

Interface::

    metric = SegmentationMetrics(num_classes=19, ignore_index=255)
    metric.update(logits_or_preds, target)     # (B, K, H, W) logits or (B, H, W) labels
    r = metric.compute()   # {"miou", "pixel_acc", "mean_acc", "per_class_iou", "confusion"}
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["SegmentationMetrics", "confusion_matrix", "scores_from_confusion"]


def confusion_matrix(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """``(K, K)`` int64 counts, row = true class, column = predicted class; pixels whose target
    is ``ignore_index`` are left out. Raises ``ValueError`` for other labels outside ``[0, K)``."""
    if ignore_index is not None:
        keep = target != ignore_index
        target, preds = target[keep], preds[keep]
    t, p = target.reshape(-1).long(), preds.reshape(-1).long()
    for name, v in (("target", t), ("preds", p)):
        if v.numel() and (v.min() < 0 or v.max() >= num_classes):
            bad = v[(v < 0) | (v >= num_classes)][0].item()
            raise ValueError(
                f"SegmentationMetrics: {name} holds the label {bad}, outside [0, {num_classes}) "
                f"and not ignore_index ({ignore_index})"
            )
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).view(
        num_classes, num_classes
    )


def scores_from_confusion(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """mIoU, pixel accuracy, mean class accuracy and per-class IoU from a confusion matrix.

    ``IoU_k = TP_k / (TP_k + FP_k + FN_k)``; a class absent from both truth and prediction (union
    0) has IoU ``nan`` and is left out of the mean (as mmsegmentation's ``nanmean``); a class
    predicted but never true counts with IoU 0. ``mean_acc`` averages ``TP_k / (TP_k + FN_k)``
    over the classes present in the truth.
    """
    cm = confusion.double()
    tp = cm.diag()
    truth, predicted = cm.sum(1), cm.sum(0)
    union = truth + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.nan)
    acc = torch.where(truth > 0, tp / truth.clamp_min(1), torch.nan)
    total = cm.sum()
    return {
        "miou": iou.nanmean(),
        "pixel_acc": tp.sum() / total if total > 0 else torch.tensor(torch.nan, dtype=cm.dtype),
        "mean_acc": acc.nanmean(),
        "per_class_iou": iou,
        "confusion": confusion,
    }


class SegmentationMetrics(Metric):
    """Dataset-level segmentation scores from ONE confusion matrix accumulated over all updates.

    This is the mIoU of Cityscapes, PASCAL VOC, DANet and mmsegmentation: the confusion matrix is
    summed over every pixel of the data set first, and per-class IoUs are taken from the totals.
    It equals torchmetrics' ``MulticlassJaccardIndex(num_classes, average="macro",
    ignore_index=...)`` when every class occurs; it is NOT torchmetrics'
    ``segmentation.MeanIoU``, which averages per-image IoUs. Classes absent from both truth and
    prediction are excluded from the mean (their IoU is ``nan``). A torchmetrics ``Metric``:
    under DDP the matrix is summed over processes.

    ``compute()`` returns ``miou``, ``pixel_acc``, ``mean_acc`` (float64 scalars in [0, 1]),
    ``per_class_iou`` ``(K,)`` and ``confusion`` ``(K, K)`` (rows truth, columns prediction).

    Args:
        num_classes: ``K``.
        ignore_index: target value left out of every count (``None``: none).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    confusion: torch.Tensor  # a metric state (``add_state``), summed over DDP ranks

    def __init__(self, num_classes: int, ignore_index: int | None = 255, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(
                f"SegmentationMetrics: num_classes must be an integer >= 1; got {num_classes!r}"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.add_state(
            "confusion",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``preds`` labels ``(B, H, W)`` or logits ``(B, K, H, W)``; ``target``
        ``(B, H, W)``."""
        if preds.dim() == target.dim() + 1:
            if preds.shape[1] != self.num_classes:
                raise ValueError(
                    f"SegmentationMetrics: logits have {preds.shape[1]} classes, expected "
                    f"num_classes={self.num_classes}"
                )
            preds = preds.argmax(1)
        if preds.shape != target.shape:
            raise ValueError(
                "SegmentationMetrics: preds (B, H, W) or logits (B, K, H, W) must match the "
                f"target (B, H, W); got {tuple(preds.shape)} and {tuple(target.shape)}"
            )
        self.confusion += confusion_matrix(preds, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, torch.Tensor]:
        return scores_from_confusion(self.confusion)
