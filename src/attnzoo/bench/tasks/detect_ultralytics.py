"""The Ultralytics side of ``attnzoo bench --task detect``: YOLOv8 / YOLO11 with attention.

Needs the optional extra ``pip install 'attnzoo[ultralytics]'`` (Ultralytics is AGPL-3.0; only
its public entry points are called, through :mod:`attnzoo.integrations.ultralytics`).

* **models** (``--model yolov8n``, ``yolov8s``, ``yolo11n``, ``yolo11s``: ``YOLO_MODELS`` of
  the integration; importing this file does not import Ultralytics):
  :func:`attnzoo.integrations.ultralytics.yolo_detector`, built offline from the model YAML
  Ultralytics ships, randomly initialised (as the bench's other detectors), with the attention
  after every layer the ``Detect`` head reads (the neck's three outputs).
* **training** (:class:`attnzoo.bench.tasks.detect.UltralyticsModule`): Ultralytics' own loss
  (``DetectionModel.loss``, per image), the bench's optimiser and schedule (those of the
  YOLOv4-tiny arms: SGD with Nesterov momentum 0.937, weight decay on conv weights, warm-up +
  cosine), the bench's data and seeds. Ultralytics' trainer is not used: its augmentations,
  schedule and validator would make its rows incomparable with the others.
* **evaluation**: the best class of each anchor at score >= ``conf_threshold``, per-class NMS at
  ``nms_iou``, at most 300 per image (``UltralyticsDetector.predict``), scored by the same
  :func:`attnzoo.detection.metrics.detection_metrics` as every detect arm.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from attnzoo.integrations.ultralytics import UltralyticsDetector, yolo_detector

__all__ = ["PARTS", "is_ultralytics", "ultralytics_builder"]

#: the loss parts logged per epoch (``train_<part>``)
PARTS = ("loss", "box", "cls", "dfl")


def ultralytics_builder(name: str) -> Any:
    """``builder(attention=..., num_classes=..., **kwargs)`` of the model ``name``."""
    return functools.partial(yolo_detector, name)


def is_ultralytics(obj: Any) -> bool:
    """Whether ``obj`` (a builder or a network) is an Ultralytics detector of the bench."""
    if isinstance(obj, nn.Module):
        return isinstance(obj, UltralyticsDetector)
    return getattr(obj, "func", obj) is yolo_detector
