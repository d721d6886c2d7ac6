"""Detectors with attention: YOLOv4-tiny with an attention neck (bubbliiiing/yolov4-tiny-pytorch's
``phi``)."""

from __future__ import annotations

from attnzoo.detection.yolov4_tiny import (
    ANCHOR_MASKS,
    ANCHORS,
    PHI_ATTENTION,
    CSPDarknet53Tiny,
    YoloV4Tiny,
)

__all__ = ["ANCHORS", "ANCHOR_MASKS", "PHI_ATTENTION", "CSPDarknet53Tiny", "YoloV4Tiny"]
