"""Detection and segmentation data: built-in digit scenes, VOC and COCO readers and writers.

Everything is numpy (plus Pillow and scikit-learn, imported inside the functions that need them);
:class:`DetectionDataset` and :func:`collate_detection` serve it to PyTorch::

    train, test = make_digit_scenes(2000, 500, canvas=128)        # built in, nothing downloaded
    voc = read_voc("VOCdevkit/VOC2007", "trainval")               # or read_coco(json, images)
    loader = DataLoader(DetectionDataset(train, 128, hflip=0.5), batch_size=16,
                        collate_fn=collate_detection)
"""

from attnzoo.datasets.coco import read_coco, write_coco
from attnzoo.datasets.data import REASONS, DetectionData, ImageFiles, Skipped
from attnzoo.datasets.dataset import DetectionDataset, collate_detection
from attnzoo.datasets.masks import (
    MaskFiles,
    SegmentationData,
    SegmentationDataset,
    read_mask_folder,
    scenes_segmentation,
)
from attnzoo.datasets.scenes import INK, make_digit_scenes
from attnzoo.datasets.voc import read_voc, write_voc

__all__ = [
    "INK",
    "REASONS",
    "DetectionData",
    "DetectionDataset",
    "ImageFiles",
    "MaskFiles",
    "SegmentationData",
    "SegmentationDataset",
    "Skipped",
    "collate_detection",
    "make_digit_scenes",
    "read_coco",
    "read_mask_folder",
    "read_voc",
    "scenes_segmentation",
    "write_coco",
    "write_voc",
]
