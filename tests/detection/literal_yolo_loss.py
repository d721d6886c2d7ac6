"""A literal, slow port of the YOLOv4-tiny training loss, the oracle for the vectorised one.

Follows, step by step, bubbliiiing/yolov4-tiny-pytorch (``utils/dataloader.py`` for the box
normalisation, ``nets/yolo_training.py`` ``YOLOLoss.get_target``, ``get_ignore``, ``box_ciou``,
``BCELoss`` and ``forward``): Python loops over the images and over the boxes of each image,
written independently of :mod:`attnzoo.detection.loss` (no import from it). Works in the dtype of
the outputs (the tests use float64). One deliberate difference from the reference: the cell index
is clamped into the grid, which only matters when a centre rounds onto the far image border (the
reference would index out of range there); both implementations do the same.

Used by ``tests/detection/test_loss.py`` and ``benchmarks/detection_loss.py``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

BALANCE = (0.4, 1.0, 4)


def normalised_targets(targets: list[dict], input_size: tuple[int, int]) -> list[Tensor]:
    """Per image ``(N, 5)``: ``(cx, cy, w, h, class)`` normalised, as the reference's loader."""
    height, width = input_size
    out = []
    for target in targets:
        rows = []
        for (x1, y1, x2, y2), c in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x1, x2 = x1 / width, x2 / width
            y1, y2 = y1 / height, y2 / height
            w, h = x2 - x1, y2 - y1
            rows.append([x1 + w / 2, y1 + h / 2, w, h, float(c)])
        out.append(torch.tensor(rows, dtype=torch.float64).reshape(-1, 5))
    return out


def centre_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix ``(len(a), len(b))`` of centre-format boxes."""
    a_lo, a_hi = a[:, :2] - a[:, 2:4] / 2, a[:, :2] + a[:, 2:4] / 2
    b_lo, b_hi = b[:, :2] - b[:, 2:4] / 2, b[:, :2] + b[:, 2:4] / 2
    inter_wh = torch.min(a_hi[:, None], b_hi[None]) - torch.max(a_lo[:, None], b_lo[None])
    inter_wh = inter_wh.clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    area_a = ((a_hi - a_lo)[:, 0] * (a_hi - a_lo)[:, 1])[:, None]
    area_b = ((b_hi - b_lo)[:, 0] * (b_hi - b_lo)[:, 1])[None]
    return inter / (area_a + area_b - inter)


def get_target(
    level: int,
    targets: list[Tensor],
    scaled_anchors: list[tuple[float, float]],
    masks: tuple,
    in_h: int,
    in_w: int,
    nc: int,
    dtype: torch.dtype,
):
    """``y_true (B, A, h, w, 5 + nc)`` and ``noobj_mask (B, A, h, w)`` of head ``level``."""
    bs, slots = len(targets), len(masks[level])
    noobj = torch.ones(bs, slots, in_h, in_w, dtype=dtype)
    y_true = torch.zeros(bs, slots, in_h, in_w, 5 + nc, dtype=dtype)
    used = {a for mask in masks for a in mask}
    for b in range(bs):
        if len(targets[b]) == 0:
            continue
        t_grid = targets[b].clone()
        t_grid[:, [0, 2]] = targets[b][:, [0, 2]] * in_w
        t_grid[:, [1, 3]] = targets[b][:, [1, 3]] * in_h
        gt_shapes = torch.cat([torch.zeros(len(t_grid), 2, dtype=torch.float64), t_grid[:, 2:4]], 1)
        anchor_shapes = torch.cat(
            [
                torch.zeros(len(scaled_anchors), 2, dtype=torch.float64),
                torch.tensor(scaled_anchors, dtype=torch.float64),
            ],
            1,
        )
        iou = centre_iou(gt_shapes, anchor_shapes)
        for t in range(len(t_grid)):
            best = int(torch.argmax(iou[t]))
            if best not in used:
                for candidate in torch.argsort(iou[t], descending=True).tolist():
                    if candidate in used:
                        best = candidate
                        break
            if best not in masks[level]:
                continue
            k = masks[level].index(best)
            i = min(int(math.floor(t_grid[t, 0])), in_w - 1)
            j = min(int(math.floor(t_grid[t, 1])), in_h - 1)
            c = int(t_grid[t, 4])
            noobj[b, k, j, i] = 0
            y_true[b, k, j, i, :4] = t_grid[t, :4].to(dtype)
            y_true[b, k, j, i, 4] = 1
            y_true[b, k, j, i, 5 + c] = 1
    return y_true, noobj


def decode(x: Tensor, y: Tensor, w: Tensor, h: Tensor, anchors_l: list[tuple[float, float]]):
    """Predicted boxes ``(B, A, h, w, 4)`` in grid cells, centre format."""
    bs, slots, in_h, in_w = x.shape
    grid_x = torch.arange(in_w, dtype=x.dtype).view(1, 1, 1, in_w)
    grid_y = torch.arange(in_h, dtype=x.dtype).view(1, 1, in_h, 1)
    aw = torch.tensor([a[0] for a in anchors_l], dtype=x.dtype).view(1, slots, 1, 1)
    ah = torch.tensor([a[1] for a in anchors_l], dtype=x.dtype).view(1, slots, 1, 1)
    return torch.stack([x + grid_x, y + grid_y, torch.exp(w) * aw, torch.exp(h) * ah], -1)


def get_ignore(
    pred_boxes: Tensor, targets: list[Tensor], in_h: int, in_w: int, noobj: Tensor, threshold: float
) -> Tensor:
    """Clear ``noobj`` where a prediction's IoU with a box of its image exceeds ``threshold``."""
    noobj = noobj.clone()
    for b in range(len(targets)):
        flat = pred_boxes[b].detach().reshape(-1, 4)
        best = torch.zeros(len(flat), dtype=flat.dtype)
        for t in range(len(targets[b])):
            box = targets[b][t, :4].clone()
            box[[0, 2]] = box[[0, 2]] * in_w
            box[[1, 3]] = box[[1, 3]] * in_h
            best = torch.max(best, centre_iou(box[None].to(flat.dtype), flat)[0])
        if len(targets[b]):
            noobj[b][best.view(noobj[b].shape) > threshold] = 0
    return noobj


def ciou(b1: Tensor, b2: Tensor) -> Tensor:
    """The reference's ``box_ciou`` on centre-format boxes."""
    b1_lo, b1_hi = b1[..., :2] - b1[..., 2:4] / 2, b1[..., :2] + b1[..., 2:4] / 2
    b2_lo, b2_hi = b2[..., :2] - b2[..., 2:4] / 2, b2[..., :2] + b2[..., 2:4] / 2
    inter_wh = torch.max(torch.min(b1_hi, b2_hi) - torch.max(b1_lo, b2_lo), torch.zeros_like(b1_hi))
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = b1[..., 2] * b1[..., 3] + b2[..., 2] * b2[..., 3] - inter
    iou = inter / torch.clamp(union, min=1e-6)
    centre = torch.sum((b1[..., :2] - b2[..., :2]) ** 2, -1)
    enclose = torch.max(torch.max(b1_hi, b2_hi) - torch.min(b1_lo, b2_lo), torch.zeros_like(b1_hi))
    diagonal = torch.sum(enclose**2, -1)
    out = iou - centre / torch.clamp(diagonal, min=1e-6)
    v = (4 / math.pi**2) * (
        torch.atan(b1[..., 2] / torch.clamp(b1[..., 3], min=1e-6))
        - torch.atan(b2[..., 2] / torch.clamp(b2[..., 3], min=1e-6))
    ) ** 2
    alpha = v / torch.clamp(1.0 - iou + v, min=1e-6)
    return out - alpha * v


def bce(pred: Tensor, target: Tensor) -> Tensor:
    """The reference's clipped BCE on probabilities."""
    lo, hi = 1e-7, 1.0 - 1e-7
    p = (pred >= lo).to(pred.dtype) * pred + (pred < lo).to(pred.dtype) * lo
    p = (p <= hi).to(pred.dtype) * p + (p > hi).to(pred.dtype) * hi
    return -target * torch.log(p) - (1.0 - target) * torch.log(1.0 - p)


def literal_yolo_loss(
    outputs: tuple[Tensor, ...],
    targets: list[dict],
    num_classes: int,
    *,
    anchors,
    anchor_masks,
    label_smoothing: float = 0.0,
    ignore_threshold: float = 0.5,
) -> dict:
    """Loss parts ``{"loss", "box", "obj", "cls"}`` (weighted, summed over heads) and, per head,
    ``"y_true"``, ``"noobj_assigned"`` (before the ignore rule) and ``"noobj"`` (after it)."""
    nc = num_classes
    h5, w5 = outputs[0].shape[2:]
    input_size = (32 * h5, 32 * w5)
    targets_n = normalised_targets(targets, input_size)
    obj_ratio = 5 * input_size[0] * input_size[1] / 416**2
    cls_ratio = nc / 80
    masks = tuple(tuple(m) for m in anchor_masks)
    zero = outputs[0].new_zeros(())
    parts = {"box": zero, "obj": zero, "cls": zero, "y_true": [], "noobj_assigned": [], "noobj": []}
    for level, out in enumerate(outputs):
        bs, _, in_h, in_w = out.shape
        stride_h, stride_w = input_size[0] / in_h, input_size[1] / in_w
        scaled = [(a_w / stride_w, a_h / stride_h) for a_w, a_h in anchors]
        pred = out.view(bs, len(masks[level]), 5 + nc, in_h, in_w).permute(0, 1, 3, 4, 2)
        x, y = torch.sigmoid(pred[..., 0]), torch.sigmoid(pred[..., 1])
        w, h = pred[..., 2], pred[..., 3]
        conf, pred_cls = torch.sigmoid(pred[..., 4]), torch.sigmoid(pred[..., 5:])
        y_true, noobj = get_target(level, targets_n, scaled, masks, in_h, in_w, nc, out.dtype)
        pred_boxes = decode(x, y, w, h, [scaled[a] for a in masks[level]])
        noobj_after = get_ignore(pred_boxes, targets_n, in_h, in_w, noobj, ignore_threshold)
        obj_mask = y_true[..., 4] == 1
        if int(obj_mask.sum()) != 0:
            loss_loc = torch.mean((1 - ciou(pred_boxes, y_true[..., :4]))[obj_mask])
            cls_t = y_true[..., 5:][obj_mask] * (1.0 - label_smoothing) + label_smoothing / nc
            loss_cls = torch.mean(bce(pred_cls[obj_mask], cls_t))
            parts["box"] = parts["box"] + loss_loc * 0.05
            parts["cls"] = parts["cls"] + loss_cls * cls_ratio
        loss_conf = torch.mean(bce(conf, obj_mask.to(conf.dtype))[noobj_after.bool() | obj_mask])
        parts["obj"] = parts["obj"] + loss_conf * BALANCE[level] * obj_ratio
        parts["y_true"].append(y_true)
        parts["noobj_assigned"].append(noobj)
        parts["noobj"].append(noobj_after)
    parts["loss"] = parts["box"] + parts["obj"] + parts["cls"]
    return parts
