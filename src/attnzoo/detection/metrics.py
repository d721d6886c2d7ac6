"""Detection metrics: PASCAL VOC average precision and COCO AP, as torchmetrics ``Metric`` objects.

**VOC AP** (Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 2010; the
VOC2010+ devkit, as in the YOLOv4-tiny reference bubbliiiing/yolov4-tiny-pytorch
``utils/utils_map.py``, itself from Cartucho/mAP). Per class, detections are taken by decreasing
score (ties keep their input order). Each detection is compared with the ground-truth boxes of its
class in its image and goes to the one of **maximal IoU** (the first one on ties):

* IoU below ``iou_threshold`` -> false positive;
* that box is "difficult" -> ignored (neither true nor false positive);
* that box was already taken by a higher-scored detection -> false positive (a duplicate), even if
  another free box of the class overlaps enough (the devkit rule; COCO instead matches the best
  *free* box);
* otherwise -> true positive, and the box is taken.

Recall counts the non-difficult boxes only. AP is the all-point interpolated area under the
precision/recall curve (the precision envelope, made non-increasing from the right, summed over the
recall steps). mAP is the mean over the classes that have at least one non-difficult box: classes
without one get AP ``NaN`` and are left out of the mean, as in the reference (which lists only
classes present in the ground truth). ``plus_one_pixel=True`` uses the devkit's inclusive pixel
convention for IoU (widths ``x2 - x1 + 1``); the reference also truncates its boxes to integers
(``int()``) before writing them, which is left to the caller.

**COCO AP** (Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014) through
``torchmetrics.detection.MeanAveragePrecision`` (pycocotools or faster-coco-eval backend): AP
averaged over IoU 0.50:0.05:0.95, AP50, AP75, 101-point interpolated, up to 100 detections per
image. Difficult
boxes are passed as COCO "crowd" regions (detections on them are not counted as false positives),
as the reference does when it converts VOC annotations for pycocotools.

The VOC matching is done in ``update`` (it only involves one image), so a metric keeps one score,
one true-positive flag and one label per detection, plus per-class box counts: small states that
torchmetrics gathers across processes (``cat`` / ``sum``), so the metrics are DDP-safe.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.wrappers.abstract import WrapperMetric
from torchvision.ops import box_iou

__all__ = [
    "COCOMeanAP",
    "DetectionMetrics",
    "VOCMeanAP",
    "average_precision",
    "detection_metrics",
    "match_detections",
    "voc_map",
]


def _box_iou(a: Tensor, b: Tensor, plus_one_pixel: bool) -> Tensor:
    """Pairwise IoU ``(N, M)`` of xyxy boxes (inclusive ``+1`` pixel convention if asked)."""
    if not plus_one_pixel:
        return box_iou(a, b)
    iw = (
        torch.minimum(a[:, None, 2], b[None, :, 2])
        - torch.maximum(a[:, None, 0], b[None, :, 0])
        + 1
    ).clamp(min=0)
    ih = (
        torch.minimum(a[:, None, 3], b[None, :, 3])
        - torch.maximum(a[:, None, 1], b[None, :, 1])
        + 1
    ).clamp(min=0)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def match_detections(
    pred: dict[str, Tensor],
    target: dict[str, Tensor],
    *,
    iou_threshold: float = 0.5,
    plus_one_pixel: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """VOC matching of one image's detections (the module docstring gives the rule).

    Args:
        pred: ``{"boxes": (M, 4) xyxy, "scores": (M,), "labels": (M,)}``.
        target: ``{"boxes": (N, 4) xyxy, "labels": (N,)}``, optionally ``"difficult": (N,) bool``.

    Returns:
        ``(scores, labels, tp)`` of the detections that count (those matched to a difficult box
        are dropped), by decreasing score; ``tp`` is a bool tensor.
    """
    scores = pred["scores"].detach().reshape(-1).float().cpu()
    order = torch.sort(scores, descending=True, stable=True).indices
    scores = scores[order]
    labels = pred["labels"].detach().reshape(-1).long().cpu()[order]
    boxes = pred["boxes"].detach().reshape(-1, 4).double().cpu()[order]
    gt_boxes = target["boxes"].detach().reshape(-1, 4).double().cpu()
    gt_labels = target["labels"].detach().reshape(-1).long().cpu()
    difficult = target.get("difficult")
    difficult = (
        torch.zeros(len(gt_labels), dtype=torch.bool)
        if difficult is None
        else difficult.detach().reshape(-1).bool().cpu()
    )
    tp = torch.zeros(len(scores), dtype=torch.bool)
    if len(gt_labels) == 0 or len(scores) == 0:
        return scores, labels, tp
    iou = _box_iou(boxes, gt_boxes, plus_one_pixel)
    iou[labels[:, None] != gt_labels[None, :]] = -1.0
    best_iou, best_gt = iou.amax(dim=1), iou.argmax(dim=1)  # first maximum on ties, as the devkit
    hit = best_iou >= iou_threshold
    ignored = hit & difficult[best_gt]
    claim = (hit & ~ignored).nonzero().squeeze(1)  # detections that reach a free-or-taken box
    first = torch.full((len(gt_labels),), len(scores), dtype=torch.long)
    first.scatter_reduce_(0, best_gt[claim], claim, reduce="amin")
    tp[claim] = first[best_gt[claim]] == claim  # only the best-scored claim of a box is a TP
    keep = ~ignored
    return scores[keep], labels[keep], tp[keep]


def _count_positives(target: dict[str, Tensor], num_classes: int) -> Tensor:
    """Non-difficult ground-truth boxes per class, ``(num_classes,)`` long."""
    labels = target["labels"].detach().reshape(-1).long().cpu()
    difficult = target.get("difficult")
    if difficult is not None:
        labels = labels[~difficult.detach().reshape(-1).bool().cpu()]
    return torch.bincount(labels, minlength=num_classes)


def average_precision(scores: Tensor, tp: Tensor, n_positives: int) -> float:
    """All-point interpolated AP of one class (VOC2010+); ``NaN`` when ``n_positives == 0``.

    ``scores`` and ``tp`` list the counted detections of the class over the whole dataset;
    they are ranked by decreasing score (stable, so ties keep their order).
    """
    if n_positives <= 0:
        return math.nan
    if len(scores) == 0:
        return 0.0
    order = torch.sort(scores, descending=True, stable=True).indices
    hits = tp[order].double()
    cum_tp = torch.cumsum(hits, 0)
    recall = cum_tp / n_positives
    precision = cum_tp / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    envelope = precision.flip(0).cummax(0).values.flip(0)
    steps = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((steps * envelope).sum())


def _check_batch(
    preds: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    num_classes: int | None,
    where: str,
) -> None:
    """Validate lists of prediction and target dicts (the torchmetrics detection format)."""
    if not isinstance(preds, Sequence) or not isinstance(targets, Sequence):
        raise TypeError(
            f"{where}: preds and targets must be lists of dicts, got "
            f"{type(preds).__name__} and {type(targets).__name__}"
        )
    if len(preds) != len(targets):
        raise ValueError(
            f"{where}: preds and targets must have one dict per image, got "
            f"{len(preds)} and {len(targets)}"
        )
    for kind, items, keys in (
        ("preds", preds, ("boxes", "scores", "labels")),
        ("targets", targets, ("boxes", "labels")),
    ):
        for i, item in enumerate(items):
            if not isinstance(item, dict) or any(k not in item for k in keys):
                raise ValueError(f"{where}: {kind}[{i}] must be a dict with keys {keys}")
            n = item["labels"].numel()
            if item["boxes"].reshape(-1).numel() != 4 * n or (
                item["boxes"].numel() and item["boxes"].shape[-1] != 4
            ):
                raise ValueError(
                    f"{where}: {kind}[{i}]['boxes'] must be ({n}, 4) xyxy, got "
                    f"{tuple(item['boxes'].shape)}"
                )
            extra = [k for k in ("scores", "difficult") if k in item and item[k].numel() != n]
            if extra:
                raise ValueError(
                    f"{where}: {kind}[{i}]['{extra[0]}'] must have {n} entries "
                    f"(one per box), got {item[extra[0]].numel()}"
                )
            if (
                num_classes is not None
                and n
                and not (0 <= int(item["labels"].min()) and int(item["labels"].max()) < num_classes)
            ):
                raise ValueError(
                    f"{where}: {kind}[{i}]['labels'] must be in [0, {num_classes}), "
                    f"got range [{int(item['labels'].min())}, "
                    f"{int(item['labels'].max())}]"
                )


def _per_class_ap(scores: Tensor, labels: Tensor, tp: Tensor, n_pos: Tensor) -> list[float]:
    """AP of each class from the gathered detections and the positives per class."""
    order = torch.sort(labels.double(), stable=True).indices  # by class, input order kept
    sizes = torch.bincount(labels, minlength=len(n_pos)).tolist()
    return [
        average_precision(s, t, int(n))
        for s, t, n in zip(scores[order].split(sizes), tp[order].split(sizes), n_pos)
    ]


def _mean(values: Sequence[float]) -> float:
    """Mean of the non-NaN values; NaN if there are none."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def voc_map(
    preds: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    num_classes: int,
    *,
    iou_threshold: float = 0.5,
    plus_one_pixel: bool = False,
) -> dict[str, Any]:
    """VOC AP of a whole dataset at once: ``{"map50": float, "per_class": list[float]}``.

    ``map50`` is the mean over classes with at least one non-difficult box (others are ``NaN`` in
    ``per_class``). The same computation as :class:`VOCMeanAP`, without torchmetrics' states.
    """
    _check_batch(preds, targets, num_classes, "voc_map")
    parts = [
        match_detections(p, t, iou_threshold=iou_threshold, plus_one_pixel=plus_one_pixel)
        for p, t in zip(preds, targets)
    ]
    n_pos = sum(
        (_count_positives(t, num_classes) for t in targets),
        torch.zeros(num_classes, dtype=torch.long),
    )
    scores, labels, tp = (
        torch.cat([p[i] for p in parts]) if parts else torch.zeros(0) for i in range(3)
    )
    per_class = _per_class_ap(scores, labels.long(), tp.bool(), n_pos)
    return {"map50": _mean(per_class), "per_class": per_class}


def _check_options(num_classes: int, iou_threshold: float, where: str) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{where}: num_classes must be a positive int, got {num_classes!r}")
    if not 0.0 < float(iou_threshold) <= 1.0:
        raise ValueError(f"{where}: iou_threshold must be in (0, 1], got {iou_threshold!r}")


class VOCMeanAP(Metric):
    """PASCAL VOC all-point AP per class and its mean (see the module docstring for the rules).

    ``update(preds, targets)`` takes lists of prediction / target dicts (torchvision format;
    targets may carry ``"difficult"``). ``compute()`` returns ``{"map50": float, "per_class":
    list[float]}`` (fractions; ``NaN`` for classes without a non-difficult box, which are left out
    of the mean). The key is ``map50`` whatever ``iou_threshold`` is.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False
    scores: list[Tensor] | Tensor  # states: lists until torchmetrics gathers them
    labels: list[Tensor] | Tensor
    tp: list[Tensor] | Tensor
    n_pos: Tensor

    def __init__(
        self,
        num_classes: int,
        *,
        iou_threshold: float = 0.5,
        plus_one_pixel: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_options(num_classes, iou_threshold, "VOCMeanAP")
        self.num_classes = num_classes
        self.iou_threshold = float(iou_threshold)
        self.plus_one_pixel = bool(plus_one_pixel)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("tp", default=[], dist_reduce_fx="cat")
        self.add_state(
            "n_pos", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum"
        )

    def update(
        self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]
    ) -> None:
        """Match each image's detections and accumulate scores, labels, TP flags and counts."""
        _check_batch(preds, targets, self.num_classes, "VOCMeanAP.update")
        parts = [
            match_detections(
                p, t, iou_threshold=self.iou_threshold, plus_one_pixel=self.plus_one_pixel
            )
            for p, t in zip(preds, targets)
        ]
        # float32 states (a process that saw no data sends float32), one entry per update
        for name, i in (("scores", 0), ("labels", 1), ("tp", 2)):
            getattr(self, name).append(
                torch.cat([p[i].float() for p in parts] + [torch.zeros(0)]).to(self.device)
            )
        for t in targets:
            self.n_pos += _count_positives(t, self.num_classes).to(self.device)

    def compute(self) -> dict[str, Any]:
        """``{"map50": float, "per_class": list[float]}``."""
        if isinstance(self.scores, list) and not self.scores:
            scores, labels, tp = (
                torch.zeros(0),
                torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.bool),
            )
        else:
            scores = dim_zero_cat(self.scores).cpu()
            labels = dim_zero_cat(self.labels).cpu().long()
            tp = dim_zero_cat(self.tp).cpu().bool()
        per_class = _per_class_ap(scores, labels, tp, self.n_pos.cpu())
        return {"map50": _mean(per_class), "per_class": per_class}


def _nan_if_missing(value: Tensor) -> float:
    """torchmetrics reports -1 when there is nothing to evaluate; we report NaN."""
    number = float(value)
    return math.nan if number < 0 else number


class COCOMeanAP(Metric):
    """COCO AP (IoU 0.50:0.95), AP50 and AP75 through ``torchmetrics``' ``MeanAveragePrecision``.

    Needs ``pycocotools`` or ``faster-coco-eval`` (both in ``pip install attnzoo[det]``).
    ``backend="auto"`` (the default) uses faster-coco-eval when it is installed (the same numbers
    as pycocotools, several times faster), else pycocotools; ``"pycocotools"`` forces the
    official COCO API. ``update(preds, targets)`` as :class:`VOCMeanAP` (``"difficult"`` boxes
    become COCO crowd regions); ``compute()`` returns ``{"map": float, "map50": float, "map75":
    float}`` (fractions; NaN without ground truth). Other keyword arguments go to
    ``MeanAveragePrecision``.

    The boxes are kept as flat ``cat`` states with per-image counts, and ``MeanAveragePrecision``
    is run once in ``compute``: its own per-image list states cannot be gathered when processes
    hold different numbers of images (an unpadded distributed sampler).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False
    _STATES = (
        "det_boxes",
        "det_scores",
        "det_labels",
        "det_counts",
        "gt_boxes",
        "gt_labels",
        "gt_crowd",
        "gt_counts",
    )

    def __init__(self, **kwargs: Any) -> None:
        metric_keys = {
            "dist_sync_on_step",
            "process_group",
            "dist_sync_fn",
            "sync_on_compute",
            "compute_with_cache",
            "compute_on_cpu",
            "distributed_available_fn",
        }
        super().__init__(**{k: kwargs.pop(k) for k in list(kwargs) if k in metric_keys})
        from torchmetrics.detection import MeanAveragePrecision

        if kwargs.get("backend", "auto") == "auto":
            kwargs["backend"] = (
                "faster_coco_eval"
                if importlib.util.find_spec("faster_coco_eval")
                else "pycocotools"
            )
        self.backend: str = kwargs["backend"]
        self._map_kwargs = {
            "box_format": "xyxy",
            "iou_type": "bbox",
            **kwargs,
            "sync_on_compute": False,
        }
        MeanAveragePrecision(**self._map_kwargs)  # fail now, not at compute, if pycocotools is
        # missing or an argument is wrong
        for name in self._STATES:  # float32 throughout: a process without data sends float32
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]
    ) -> None:
        """Store the batch's boxes flat, with the number of boxes of each image."""
        _check_batch(preds, targets, None, "COCOMeanAP.update")

        def flat(items: Sequence[dict[str, Tensor]], key: str) -> Tensor:
            parts = [item[key].detach().reshape(-1).float().to(self.device) for item in items]
            return torch.cat(parts + [torch.zeros(0, device=self.device)])

        def counts(items: Sequence[dict[str, Tensor]]) -> Tensor:
            return torch.tensor(
                [float(item["labels"].numel()) for item in items], device=self.device
            )

        crowd = [
            {"c": t["difficult"] if "difficult" in t else torch.zeros(t["labels"].numel())}
            for t in targets
        ]
        for name, value in (
            ("det_boxes", flat(preds, "boxes")),
            ("det_scores", flat(preds, "scores")),
            ("det_labels", flat(preds, "labels")),
            ("det_counts", counts(preds)),
            ("gt_boxes", flat(targets, "boxes")),
            ("gt_labels", flat(targets, "labels")),
            ("gt_crowd", flat(crowd, "c")),
            ("gt_counts", counts(targets)),
        ):
            getattr(self, name).append(value)

    def compute(self) -> dict[str, float]:
        """``{"map": float, "map50": float, "map75": float}``."""
        state = {
            name: dim_zero_cat(getattr(self, name)).cpu()
            if len(getattr(self, name))
            else torch.zeros(0)
            for name in self._STATES
        }
        if len(state["gt_counts"]) == 0:
            return {"map": math.nan, "map50": math.nan, "map75": math.nan}
        n_det, n_gt = state["det_counts"].long().tolist(), state["gt_counts"].long().tolist()
        preds = [
            {"boxes": b.reshape(-1, 4), "scores": s, "labels": lab.long()}
            for b, s, lab in zip(
                state["det_boxes"].split([4 * n for n in n_det]),
                state["det_scores"].split(n_det),
                state["det_labels"].split(n_det),
            )
        ]
        targets = [
            {"boxes": b.reshape(-1, 4), "labels": lab.long(), "iscrowd": c.long()}
            for b, lab, c in zip(
                state["gt_boxes"].split([4 * n for n in n_gt]),
                state["gt_labels"].split(n_gt),
                state["gt_crowd"].split(n_gt),
            )
        ]
        from torchmetrics.detection import MeanAveragePrecision

        coco = MeanAveragePrecision(**self._map_kwargs)
        coco.update(preds, targets)
        result = coco.compute()
        return {
            "map": _nan_if_missing(result["map"]),
            "map50": _nan_if_missing(result["map_50"]),
            "map75": _nan_if_missing(result["map_75"]),
        }


class DetectionMetrics(WrapperMetric):
    """VOC and COCO metrics in one object, for one evaluation pass.

    ``compute()`` returns ``{"map50": VOC all-point mAP@0.5, "map": COCO AP, "map75": COCO AP75,
    "per_class_ap50": list of VOC AP@0.5 per class}`` (fractions). Each part synchronises its own
    states across processes, so it can be used under DDP like any torchmetrics metric.
    """

    def __init__(
        self, num_classes: int, *, plus_one_pixel: bool = False, **coco_kwargs: Any
    ) -> None:
        super().__init__()
        self.voc = VOCMeanAP(num_classes, plus_one_pixel=plus_one_pixel)
        self.coco = COCOMeanAP(**coco_kwargs)

    def update(
        self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]
    ) -> None:
        """Update both parts."""
        self.voc.update(preds, targets)
        self.coco.update(preds, targets)

    def compute(self) -> dict[str, Any]:
        """``{"map50", "map", "map75", "per_class_ap50"}``."""
        voc, coco = self.voc.compute(), self.coco.compute()
        return {
            "map50": voc["map50"],
            "map": coco["map"],
            "map75": coco["map75"],
            "per_class_ap50": voc["per_class"],
        }

    def reset(self) -> None:
        """Reset both parts."""
        self.voc.reset()
        self.coco.reset()


def detection_metrics(
    num_classes: int, *, plus_one_pixel: bool = False, **coco_kwargs: Any
) -> DetectionMetrics:
    """The bench's evaluation metric: :class:`DetectionMetrics` for ``num_classes`` classes
    (``coco_kwargs``, e.g. ``backend="pycocotools"``, go to :class:`COCOMeanAP`)."""
    return DetectionMetrics(num_classes, plus_one_pixel=plus_one_pixel, **coco_kwargs)
