"""Localisation scores of saliency maps against object boxes (pure functions on tensors).

* :func:`pointing_game`: Zhang, Bargal, Lin, Brandt, Shen, Sclaroff, "Top-down Neural Attention
  by Excitation Backprop", ECCV 2016 (IJCV 2018): a hit when the map's maximum lies on the
  object.
* :func:`energy_in_box`: the "energy-based pointing game" of Wang, Wang, Du, Yang, Zhang, Ding,
  Mardziel, Hu, "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural
  Networks", CVPR Workshops 2020: the share of the map's mass inside the box.
* :func:`box_area_fraction`: the chance level of both for a map without information.

Boxes are ``(x0, y0, x1, y1)`` integer pixel coordinates with **exclusive** ends: the box covers
rows ``y0 .. y1 - 1`` and columns ``x0 .. x1 - 1`` (``maps[b, y0:y1, x0:x1]``), with
``0 <= x0 < x1 <= W`` and ``0 <= y0 < y1 <= H``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["box_area_fraction", "energy_in_box", "pointing_game"]


def _check_maps(fn: str, maps: Any) -> Tensor:
    if not isinstance(maps, Tensor) or maps.dim() != 3:
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"{fn}: cams must be a (B, H, W) tensor; got {got}")
    if not maps.is_floating_point():
        maps = maps.float()
    if not bool(torch.isfinite(maps).all()):
        raise ValueError(f"{fn}: cams must be finite (no NaN or inf)")
    return maps


def _check_boxes(fn: str, boxes: Any, batch: int | None, h: int, w: int) -> Tensor:
    boxes = torch.as_tensor(boxes)
    if boxes.is_floating_point() or boxes.is_complex() or boxes.dtype == torch.bool:
        raise ValueError(
            f"{fn}: boxes must hold integers (x0, y0, x1, y1); got dtype {boxes.dtype}"
        )
    if boxes.dim() != 2 or boxes.shape[1] != 4 or (batch is not None and boxes.shape[0] != batch):
        want = f"({batch}, 4)" if batch is not None else "(B, 4)"
        raise ValueError(
            f"{fn}: boxes must have shape {want} (x0, y0, x1, y1); got {tuple(boxes.shape)}"
        )
    boxes = boxes.to(torch.int64)
    x0, y0, x1, y1 = boxes.unbind(1)
    bad = (x0 < 0) | (y0 < 0) | (x1 > w) | (y1 > h) | (x1 <= x0) | (y1 <= y0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{fn}: boxes[{i}] = {boxes[i].tolist()} must satisfy "
            f"0 <= x0 < x1 <= W={w} and 0 <= y0 < y1 <= H={h} (exclusive ends)"
        )
    return boxes.cpu()


def _inside(boxes: Tensor, h: int, w: int, tolerance: float = 0.0) -> Tensor:
    """``(B, H, W)`` bool: pixels within Euclidean distance ``tolerance`` of the box's pixels."""
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    x0, y0, x1, y1 = (c.view(-1, 1, 1) for c in boxes.unbind(1))
    dy = (y0 - ys).clamp(min=0) + (ys - (y1 - 1)).clamp(min=0)  # 0 inside the rows
    dx = (x0 - xs).clamp(min=0) + (xs - (x1 - 1)).clamp(min=0)
    return (dy * dy + dx * dx) <= tolerance * tolerance


def pointing_game(cams: Tensor, boxes: Any, *, tolerance: float = 0) -> Tensor:
    """Pointing-game hits: does each map's maximum lie in its box?

    Args:
        cams: ``(B, H, W)`` saliency maps (any real values).
        boxes: ``(B, 4)`` integer ``(x0, y0, x1, y1)``, exclusive ends, in pixels of ``cams``.
        tolerance: a pixel counts as inside when its Euclidean distance to the nearest box pixel
            is at most ``tolerance`` pixels. Zhang et al. use 15 px on ImageNet/VOC/COCO-size
            images; the default here is 0 because our images are 32 px wide, where 15 px would
            cover most of the image.

    Returns:
        ``(B,)`` bool tensor.

    Ties: ``argmax`` would pick the first maximal pixel in memory order, which is biased to the
    top-left and lets a flat map score whenever the box holds the first pixel. Here all maximal
    pixels (equal to the map's maximum) are used: a hit needs **at least half of them** inside
    the box (with tolerance), and a constant map (including an all-zero map) is always a miss:
    it points nowhere. Plateaus of exact ties are common in practice: grad-cam resizes with
    OpenCV's bilinear resize, which replicates the border, so a peak in a border cell of a 4x4
    CAM becomes a run of 4 (or 4x4) equal pixels on a 32-pixel image; the rule scores such a
    plateau by where most of it lies, symmetrically in every direction.
    """
    fn = "attnzoo.viz.pointing_game"
    cams = _check_maps(fn, cams).detach().cpu()
    b, h, w = cams.shape
    boxes = _check_boxes(fn, boxes, b, h, w)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ValueError(f"{fn}: tolerance must be a number >= 0 (pixels); got {tolerance!r}")
    peak = cams.amax((1, 2), keepdim=True)
    is_max = (cams == peak).flatten(1)
    inside = _inside(boxes, h, w, float(tolerance)).flatten(1)
    n_max = is_max.sum(1)
    n_in = (is_max & inside).sum(1)
    constant = n_max == h * w
    return (2 * n_in >= n_max) & ~constant


def energy_in_box(cams: Tensor, boxes: Any) -> Tensor:
    """Share of each map's total mass inside its box: ``sum_box(cam) / sum(cam)``.

    Args:
        cams: ``(B, H, W)`` non-negative maps (CAMs after the ReLU, as grad-cam returns them).
        boxes: ``(B, 4)`` integer ``(x0, y0, x1, y1)``, exclusive ends.

    Returns:
        ``(B,)`` float tensor in ``[0, 1]`` (float64 for float64 maps, else float32); an
        all-zero map gives 0 (not NaN). A constant map gives the box's area fraction
        (:func:`box_area_fraction`).

    Raises:
        ValueError: negative values (the ratio is not a share then), bad shapes or boxes.
    """
    fn = "attnzoo.viz.energy_in_box"
    cams = _check_maps(fn, cams).detach().cpu()
    b, h, w = cams.shape
    boxes = _check_boxes(fn, boxes, b, h, w)
    if bool((cams < 0).any()):
        raise ValueError(
            f"{fn}: cams must be non-negative (apply the ReLU / min-max scaling "
            "first); got a minimum of "
            f"{float(cams.min()):.4g}"
        )
    acc = torch.float64 if cams.dtype == torch.float64 else torch.float32
    cams = cams.to(acc)
    inside = _inside(boxes, h, w)
    total = cams.sum((1, 2))
    in_box = (cams * inside).sum((1, 2))
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, in_box / safe, torch.zeros_like(total))


def box_area_fraction(boxes: Any, H: int, W: int) -> Tensor:
    """``(B,)`` float32: each box's area divided by ``H * W``.

    The chance level of both scores: a constant map's energy in the box equals this, and a map
    whose single maximum falls on a uniformly random pixel hits the box with this probability.
    """
    fn = "attnzoo.viz.box_area_fraction"
    for name, value in (("H", H), ("W", W)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{fn}: {name} must be a positive int; got {value!r}")
    boxes = _check_boxes(fn, boxes, None, H, W)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return area.to(torch.float32) / float(H * W)
