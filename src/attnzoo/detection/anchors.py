"""Anchor sizes for a dataset: k-means on box (width, height) with the ``1 - IoU`` distance.

YOLOv2 (Redmon and Farhadi, "YOLO9000: Better, Faster, Stronger", CVPR 2017, section 2) clusters
the training boxes' sizes with ``d(box, centre) = 1 - IoU(box, centre)``, both boxes placed at the
same centre, so that large boxes do not dominate as they would under a Euclidean distance. The
YOLOv4-tiny reference (bubbliiiing/yolov4-tiny-pytorch, ``kmeans_for_anchors.py``) does the same
with k = 6, updates each centre with the **median** of its boxes and sorts the result by area; so
do we. Two deliberate differences, both for reproducibility: the first centres are chosen by
k-means++ seeding (Arthur and Vassilvitskii, SODA 2007) with the ``1 - IoU`` distance instead of k
uniformly random boxes, and ``n_init`` seeded restarts keep the solution with the highest mean
IoU between each box and its centre.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["kmeans_anchors", "shape_iou"]


def shape_iou(wh: Tensor, centres: Tensor) -> Tensor:
    """IoU of boxes ``(N, 2)`` and ``(K, 2)`` (width, height) sharing one centre: ``(N, K)``."""
    inter = torch.minimum(wh[:, None, 0], centres[None, :, 0]) * torch.minimum(
        wh[:, None, 1], centres[None, :, 1]
    )
    area = wh[:, 0] * wh[:, 1]
    return inter / (area[:, None] + (centres[:, 0] * centres[:, 1])[None, :] - inter)


def _seed_centres(wh: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++: each next centre drawn with probability proportional to its squared distance."""
    idx = [int(torch.randint(len(wh), (1,), generator=gen))]
    dist = 1 - shape_iou(wh, wh[idx]).squeeze(1)
    for _ in range(1, k):
        weight = dist.clamp(min=0) ** 2
        idx.append(int(torch.multinomial(weight, 1, generator=gen)))
        dist = torch.minimum(dist, 1 - shape_iou(wh, wh[idx[-1:]]).squeeze(1))
    return wh[idx].clone()


def _lloyd(wh: Tensor, centres: Tensor, max_iter: int) -> tuple[Tensor, float]:
    """Median-update k-means until the assignment stops changing; returns centres, mean IoU."""
    assign = None
    for _ in range(max_iter):
        new_assign = shape_iou(wh, centres).argmax(dim=1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        for j in range(len(centres)):
            members = wh[assign == j]
            if len(members):  # an empty cluster keeps its centre
                centres[j] = members.median(dim=0).values
    return centres, float(shape_iou(wh, centres).amax(dim=1).mean())


def kmeans_anchors(
    wh: Tensor | np.ndarray, k: int = 6, *, seed: int = 0, n_init: int = 3, max_iter: int = 300
) -> Tensor:
    """Cluster box sizes into ``k`` anchors with the ``1 - IoU`` distance.

    Args:
        wh: ``(N, 2)`` box (width, height) in pixels of the input size the detector will use
            (e.g. ``boxes[:, 2:] - boxes[:, :2]`` of all training boxes after resizing).
        k: number of anchors (6 for YOLOv4-tiny).
        seed: seed of the k-means++ seeding; the result is a deterministic function of the inputs.
        n_init: seeded restarts; the one with the highest mean best-IoU is returned.
        max_iter: at most this many assignment/update rounds per restart.

    Returns:
        ``(k, 2)`` float tensor of anchor (width, height), sorted by increasing area, ready to pass
        as ``anchors=`` to :class:`~attnzoo.detection.YoloV4TinyLoss` and
        :func:`~attnzoo.detection.postprocess`.

    Raises:
        ValueError: ``wh`` is not ``(N, 2)``, has non-finite or non-positive sizes, or has fewer
            distinct sizes than ``k``; or ``k``, ``n_init``, ``max_iter`` are not positive ints.
    """
    where = "kmeans_anchors"
    for name, value in (("k", k), ("n_init", n_init), ("max_iter", max_iter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    if not isinstance(wh, (Tensor, np.ndarray)):
        raise TypeError(
            f"{where}: wh must be a Tensor or numpy array (N, 2), got {type(wh).__name__}"
        )
    data = torch.as_tensor(
        np.asarray(wh) if isinstance(wh, np.ndarray) else wh.detach().cpu(), dtype=torch.float64
    )
    if data.ndim != 2 or data.shape[1] != 2:
        raise ValueError(
            f"{where}: wh must have shape (N, 2) (width, height), got {tuple(data.shape)}"
        )
    if not bool(torch.isfinite(data).all()) or not bool((data > 0).all()):
        raise ValueError(
            f"{where}: wh must hold finite, positive widths and heights "
            f"(drop empty boxes first); got min {float(data.min())}"
        )
    n_distinct = len(torch.unique(data, dim=0))
    if n_distinct < k:
        raise ValueError(
            f"{where}: need at least k={k} distinct box sizes, got {n_distinct} ({len(data)} boxes)"
        )
    gen = torch.Generator().manual_seed(seed)
    best, best_iou = None, -1.0
    for _ in range(n_init):
        centres, mean_iou = _lloyd(data, _seed_centres(data, k, gen), max_iter)
        if mean_iou > best_iou:
            best, best_iou = centres, mean_iou
    assert best is not None  # n_init >= 1
    order = (best[:, 0] * best[:, 1]).argsort(stable=True)
    return best[order].float()
