"""Semantic segmentation with attention: DANet (dilated ResNet + dual attention head), its loss
and the dataset mIoU.

::

    from attnzoo.segmentation import SEGMENTATION_MODELS, SegmentationLoss, SegmentationMetrics
    model = SEGMENTATION_MODELS["danet_small"](11)            # or DANet(19, backbone="resnet50")
    loss = SegmentationLoss("official")(model(x), target)["loss"]
"""

from attnzoo.segmentation.backbones import DilatedResNet, dilated_resnet
from attnzoo.segmentation.danet import (
    HEADS,
    SEGMENTATION_MODELS,
    DANet,
    DANetHead,
    FCNAuxHead,
    danet_head_param_count,
)
from attnzoo.segmentation.loss import LOSS_WEIGHTS, SegmentationLoss
from attnzoo.segmentation.metrics import SegmentationMetrics, scores_from_confusion

__all__ = [
    "DANet",
    "DANetHead",
    "DilatedResNet",
    "FCNAuxHead",
    "HEADS",
    "LOSS_WEIGHTS",
    "SEGMENTATION_MODELS",
    "SegmentationLoss",
    "SegmentationMetrics",
    "danet_head_param_count",
    "dilated_resnet",
    "scores_from_confusion",
]
