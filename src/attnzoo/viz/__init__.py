"""Visualisation: Grad-CAM, the maps attention modules compute, localisation scores, PNG panels.

* :func:`cam`: class activation maps (Grad-CAM and relatives) through the optional ``grad-cam``
  package, with a default target layer for the project's networks (:func:`default_target_layer`).
* :func:`detector_cam`: EigenCAM / Grad-CAM maps of a YOLOv4-tiny detector, with its detections
  as the Grad-CAM target.
* :func:`attention_maps`: what every attention module of a network computed in one forward pass
  (:class:`AttentionRecord` per module), captured with hooks, no forward changed;
  :func:`upsample_map` resizes maps to the image for overlays.
* :func:`pointing_game`, :func:`energy_in_box`, :func:`box_area_fraction`: localisation scores
  against boxes and their chance level.
* :func:`save_panel`, :func:`panel_columns_for`: PNG panels with matplotlib (Agg, no display).

Importing this package imports neither ``pytorch_grad_cam`` nor matplotlib; both are imported
inside the functions that need them (``pip install "attnzoo[viz]"``).
"""

from __future__ import annotations

from attnzoo.viz.detection_cam import DETECTOR_CAM_METHODS, detector_cam
from attnzoo.viz.gradcam import CAM_METHODS, cam, default_target_layer
from attnzoo.viz.localisation import box_area_fraction, energy_in_box, pointing_game
from attnzoo.viz.maps import AttentionRecord, attention_maps, upsample_map
from attnzoo.viz.panels import panel_columns_for, save_panel

__all__ = [
    "CAM_METHODS",
    "DETECTOR_CAM_METHODS",
    "AttentionRecord",
    "attention_maps",
    "box_area_fraction",
    "cam",
    "default_target_layer",
    "detector_cam",
    "energy_in_box",
    "panel_columns_for",
    "pointing_game",
    "save_panel",
    "upsample_map",
]
