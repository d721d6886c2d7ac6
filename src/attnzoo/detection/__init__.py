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
# Cascade R-CNN heads (attnzoo.detection.cascade, torchvision's detection stack): loaded lazily
_CASCADE = (
    "CascadePredictor",
    "CascadeRoIHeads",
    "cascade_box_heads",
    "load_faster_rcnn_weights",
    "rescale_stage_detections",
)
# Faster / Cascade R-CNN builders (attnzoo.detection.rcnn): loaded lazily
_RCNN = (
    "RCNN_BUILDERS",
    "cascade_rcnn_resnet50_fpn",
    "cascade_rcnn_small",
    "faster_rcnn_resnet50_fpn",
    "faster_rcnn_small",
)

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
    *_CASCADE,
    *_RCNN,
]


def __getattr__(name: str) -> object:
    """The metrics (torchmetrics, ``attnzoo[det]``) and the Cascade R-CNN heads: imported on
    first use."""
    if name in _METRICS:
        from attnzoo.detection import metrics

        return getattr(metrics, name)
    if name in _CASCADE:
        from attnzoo.detection import cascade

        return getattr(cascade, name)
    if name in _RCNN:
        from attnzoo.detection import rcnn

        return getattr(rcnn, name)
    raise AttributeError(f"module 'attnzoo.detection' has no attribute {name!r}")
