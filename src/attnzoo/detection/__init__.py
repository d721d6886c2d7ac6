"""Detectors with attention: YOLOv4-tiny with an attention neck (bubbliiiing/yolov4-tiny-pytorch's
``phi``)."""

from __future__ import annotations

from attnzoo.detection.anchors import kmeans_anchors
from attnzoo.detection.decode import decode_outputs, postprocess
from attnzoo.detection.loss import HeadTargets, YoloV4TinyLoss, assign_targets, box_ciou
from attnzoo.detection.weights import LoadReport, load_reference_weights
from attnzoo.detection.yolov4_tiny import (
    ANCHOR_MASKS,
    ANCHORS,
    PHI_ATTENTION,
    CSPDarknet53Tiny,
    YoloV4Tiny,
)

# attnzoo.detection.metrics needs torchmetrics and pycocotools (the ``det`` extra): loaded lazily
_METRICS = ("VOCMeanAP", "COCOMeanAP", "DetectionMetrics", "detection_metrics", "voc_map")

__all__ = [
    "ANCHORS",
    "ANCHOR_MASKS",
    "PHI_ATTENTION",
    "CSPDarknet53Tiny",
    "YoloV4Tiny",
    "HeadTargets",
    "YoloV4TinyLoss",
    "assign_targets",
    "box_ciou",
    "decode_outputs",
    "postprocess",
    "kmeans_anchors",
    "LoadReport",
    "load_reference_weights",
    *_METRICS,
]


def __getattr__(name: str) -> object:
    """The metrics need torchmetrics (``attnzoo[det]``): imported on first use."""
    if name in _METRICS:
        from attnzoo.detection import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module 'attnzoo.detection' has no attribute {name!r}")
