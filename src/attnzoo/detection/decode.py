"""Decoding of YOLOv4-tiny head maps into boxes, and non-maximum suppression.

Follows the reference implementation (bubbliiiing/yolov4-tiny-pytorch, ``utils/utils_bbox.py``,
``DecodeBox``), vectorised over the batch and the heads. Per anchor ``[tx, ty, tw, th, obj,
cls...]`` on a ``(gh, gw)`` grid with strides ``(H / gh, W / gw)``:

* centre ``cx = (sigmoid(tx) + col) * stride_w``, ``cy = (sigmoid(ty) + row) * stride_h``;
* size ``w = exp(tw) * anchor_w``, ``h = exp(th) * anchor_h`` (anchors in input pixels);
* ``obj = sigmoid(obj)``, class probabilities ``sigmoid(cls)`` (independent, not a softmax).

:func:`postprocess` scores each box by ``obj * max_c p_c`` with the arg-max class as its label,
keeps scores ``>= conf_threshold``, runs :func:`torchvision.ops.nms` for each image and class
(as the reference's loop over classes; what :func:`torchvision.ops.batched_nms` computes),
keeps the ``max_detections`` best boxes of each image and clips them to the image. The reference
runs NMS on the unclipped boxes and clips only when it draws them; so do we (clipping after NMS).
Its mAP script uses ``conf_threshold=0.001, nms_iou=0.5``; its ``predict.py`` uses ``0.5, 0.3``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import nms

from attnzoo.detection.yolov4_tiny import ANCHOR_MASKS, ANCHORS

__all__ = ["decode_outputs", "postprocess"]

AnchorsLike = Sequence[Sequence[float]] | Tensor


def _input_hw(input_size: int | Sequence[int], where: str) -> tuple[int, int]:
    """``input_size`` as ``(height, width)``; an int means a square input."""
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        input_size = (input_size, input_size)
    if (
        not isinstance(input_size, Sequence)
        or len(input_size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_size)
    ):
        raise ValueError(
            f"{where}: input_size must be a positive int or a (height, width) pair of"
            f" positive ints, got {input_size!r}"
        )
    return int(input_size[0]), int(input_size[1])


def _anchor_table(
    anchors: AnchorsLike, anchor_masks: Sequence[Sequence[int]], n_heads: int, where: str
) -> Tensor:
    """Check anchors ``(n, 2)`` and masks (one per head) and return the anchors as a tensor."""
    table = torch.as_tensor(anchors, dtype=torch.float64)
    if table.ndim != 2 or table.shape[1] != 2 or not bool((table > 0).all()):
        raise ValueError(
            f"{where}: anchors must be (n, 2) positive (width, height) pixel sizes, "
            f"got shape {tuple(table.shape)}"
        )
    if len(anchor_masks) != n_heads:
        raise ValueError(
            f"{where}: anchor_masks must have one entry per head output "
            f"({n_heads}), got {len(anchor_masks)}"
        )
    for mask in anchor_masks:
        if len(mask) == 0 or any(not 0 <= int(i) < len(table) for i in mask):
            raise ValueError(
                f"{where}: anchor_masks entries must be non-empty indices into the "
                f"{len(table)} anchors, got {tuple(anchor_masks)!r}"
            )
    return table


def _by_group_then_score(groups: Tensor, scores: Tensor) -> Tensor:
    """Order by increasing group, then decreasing score (scores in [0, 1]): one float sort.

    (Faster than two stable sorts; float64 keeps scores apart for thousands of groups; MPS has
    no float64, where near-equal scores of one group may swap.)
    """
    dtype = torch.float32 if groups.device.type == "mps" else torch.float64
    return torch.argsort(groups.to(dtype) * 2 + (1 - scores.to(dtype)))


def _grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou: float) -> Tensor:
    """Indices kept by NMS run separately in each group, ordered by group, then decreasing score.

    The boxes :func:`torchvision.ops.batched_nms` keeps; it finds each group with a pass over all
    boxes (``O(groups * boxes)``, slow for a batch at ``conf_threshold=0.001``); one sort here.
    """
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = _by_group_then_score(groups, scores)
    counts = torch.unique_consecutive(groups[order], return_counts=True)[1]
    return torch.cat(
        [chunk[nms(boxes[chunk], scores[chunk], iou)] for chunk in order.split(counts.tolist())]
    )


def decode_outputs(
    outputs: Sequence[Tensor],
    input_size: int | Sequence[int],
    *,
    anchors: AnchorsLike = ANCHORS,
    anchor_masks: Sequence[Sequence[int]] = ANCHOR_MASKS,
) -> Tensor:
    """Decode the raw head maps of :class:`~attnzoo.detection.YoloV4Tiny` into boxes.

    Args:
        outputs: the head maps ``(B, A * (5 + nc), gh, gw)``, one per entry of ``anchor_masks``
            (``(p5, p4)`` for YOLOv4-tiny), ``A = len(anchor_masks[i])``, anchor-major channels.
        input_size: the network input ``(height, width)`` in pixels (an int for a square input).
        anchors: ``(n, 2)`` anchor ``(width, height)`` in input pixels.
        anchor_masks: the anchors each head uses.

    Returns:
        ``(B, N, 5 + nc)``: per box ``[x1, y1, x2, y2, obj, p_0, ..., p_{nc-1}]``, corners in input
        pixels, ``N = sum_i A_i * gh_i * gw_i`` ordered head by head, then anchor, row, column (the
        reference's order). Differentiable; dtype and device of ``outputs``.
    """
    where = "decode_outputs"
    if isinstance(outputs, Tensor) or not isinstance(outputs, Sequence) or not outputs:
        raise TypeError(
            f"{where}: outputs must be a non-empty tuple or list of head tensors "
            f"(B, A*(5+nc), h, w), got {type(outputs).__name__}"
        )
    height, width = _input_hw(input_size, where)
    table = _anchor_table(anchors, anchor_masks, len(outputs), where)
    attrs = None
    decoded = []
    for i, (out, mask) in enumerate(zip(outputs, anchor_masks)):
        if not isinstance(out, Tensor) or out.ndim != 4:
            raise ValueError(
                f"{where}: outputs[{i}] must be a 4-D tensor (B, A*(5+nc), h, w), "
                f"got {getattr(out, 'shape', type(out).__name__)}"
            )
        batch, channels, gh, gw = out.shape
        n_anchors = len(mask)
        if channels % n_anchors or channels // n_anchors < 6:
            raise ValueError(
                f"{where}: outputs[{i}] has {channels} channels; expected "
                f"{n_anchors} * (5 + num_classes) with num_classes >= 1"
            )
        if attrs is not None and channels // n_anchors != attrs:
            raise ValueError(
                f"{where}: outputs[{i}] has {channels // n_anchors - 5} classes per "
                f"anchor, outputs[0] has {attrs - 5}"
            )
        attrs = channels // n_anchors
        p = out.view(batch, n_anchors, attrs, gh, gw).permute(0, 1, 3, 4, 2)
        stride_h, stride_w = height / gh, width / gw
        rows = torch.arange(gh, device=out.device, dtype=out.dtype).view(1, 1, gh, 1)
        cols = torch.arange(gw, device=out.device, dtype=out.dtype).view(1, 1, 1, gw)
        wh = table[list(mask)].to(device=out.device, dtype=out.dtype).view(1, n_anchors, 1, 1, 2)
        cx = (p[..., 0].sigmoid() + cols) * stride_w
        cy = (p[..., 1].sigmoid() + rows) * stride_h
        half = p[..., 2:4].exp() * wh / 2
        boxes = torch.stack(
            (cx - half[..., 0], cy - half[..., 1], cx + half[..., 0], cy + half[..., 1]), dim=-1
        )
        decoded.append(torch.cat((boxes, p[..., 4:].sigmoid()), dim=-1).reshape(batch, -1, attrs))
    if len({d.shape[0] for d in decoded}) != 1:
        raise ValueError(
            f"{where}: all head outputs must have the same batch size, got "
            f"{[d.shape[0] for d in decoded]}"
        )
    return torch.cat(decoded, dim=1)


def postprocess(
    outputs: Sequence[Tensor],
    input_size: int | Sequence[int],
    *,
    conf_threshold: float = 0.001,
    nms_iou: float = 0.5,
    max_detections: int | None = 100,
    anchors: AnchorsLike = ANCHORS,
    anchor_masks: Sequence[Sequence[int]] = ANCHOR_MASKS,
) -> list[dict[str, Tensor]]:
    """Detections of a batch: decode, score, threshold, per-class NMS, cap, clip.

    Args:
        outputs, input_size, anchors, anchor_masks: as in :func:`decode_outputs`.
        conf_threshold: keep boxes with ``obj * max_c p_c >= conf_threshold``.
        nms_iou: IoU above which the lower-scored box of the same image and class is removed.
        max_detections: at most this many boxes per image (the best scores); ``None`` keeps all.

    Returns:
        One dict per image, ``{"boxes": (M, 4) xyxy input pixels clipped to the image, "scores":
        (M,), "labels": (M,) long}``, sorted by decreasing score (the torchvision / torchmetrics
        prediction format). Scores keep the autograd graph if ``outputs`` require grad.
    """
    where = "postprocess"
    if not 0.0 <= float(conf_threshold) <= 1.0:
        raise ValueError(f"{where}: conf_threshold must be in [0, 1], got {conf_threshold!r}")
    if not 0.0 <= float(nms_iou) <= 1.0:
        raise ValueError(f"{where}: nms_iou must be in [0, 1], got {nms_iou!r}")
    if max_detections is not None and (
        isinstance(max_detections, bool)
        or not isinstance(max_detections, int)
        or max_detections < 1
    ):
        raise ValueError(
            f"{where}: max_detections must be a positive int or None, got {max_detections!r}"
        )
    height, width = _input_hw(input_size, where)
    det = decode_outputs(outputs, (height, width), anchors=anchors, anchor_masks=anchor_masks)
    batch, n_boxes, attrs = det.shape
    num_classes = attrs - 5
    class_prob, labels = det[..., 5:].amax(dim=-1), det[..., 5:].argmax(dim=-1)
    scores = det[..., 4] * class_prob
    image, index = (scores >= conf_threshold).nonzero(as_tuple=True)
    boxes = det[image, index, :4]
    scores, labels = scores[image, index], labels[image, index]
    # boxes only suppress boxes of the same image and class
    keep = _grouped_nms(
        boxes.detach().float(),
        scores.detach().float(),
        image * num_classes + labels,
        float(nms_iou),
    )
    keep = keep[_by_group_then_score(image[keep], scores[keep].detach())]  # image, then score
    counts = torch.bincount(image[keep], minlength=batch)
    if max_detections is not None:
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(keep), device=keep.device) - starts.repeat_interleave(counts)
        keep = keep[rank < max_detections]
        counts = counts.clamp(max=max_detections)
    boxes = boxes[keep]
    boxes = torch.stack(
        (
            boxes[:, 0].clamp(0, width),
            boxes[:, 1].clamp(0, height),
            boxes[:, 2].clamp(0, width),
            boxes[:, 3].clamp(0, height),
        ),
        dim=1,
    )
    sizes = counts.tolist()
    return [
        {"boxes": b, "scores": s, "labels": lab}
        for b, s, lab in zip(
            boxes.split(sizes), scores[keep].split(sizes), labels[keep].split(sizes)
        )
    ]
