"""YOLOv4-tiny target assignment and loss, vectorised over the batch and the boxes.

Faithful to the training loss of the reference implementation bubbliiiing/yolov4-tiny-pytorch
(``nets/yolo_training.py``, ``YOLOLoss``), which follows YOLOv3/v4 (Redmon & Farhadi, "YOLOv3: An
Incremental Improvement", arXiv 2018; Bochkovskiy, Wang, Liao, "YOLOv4", arXiv 2020) with the CIoU
box loss of Zheng et al., "Distance-IoU Loss", AAAI 2020:

* **Assignment.** Each ground-truth box takes the anchor (of all of them) whose shape ``(w, h)``
  overlaps its own best (IoU of boxes sharing a centre). An anchor used by no head (anchor 0 with
  the default masks) is replaced by the best-overlapping anchor that some head uses. In every head
  whose mask holds that anchor, the box is positive in exactly one cell, the one containing its
  centre; with the default masks a box whose best anchor is 3 is therefore positive in both heads.
  When several boxes of an image land on the same cell and anchor, the one listed last gives the
  box target and the class targets of all of them stay set (the reference writes the one-hot
  entries without clearing the previous ones).
* **Ignore rule.** Every prediction of a head is decoded; those whose IoU with some ground-truth
  box of their image exceeds ``ignore_threshold`` leave the no-object set (they get no objectness
  loss unless they are positives).
* **Loss per head** ``level``: ``box_ratio * mean(1 - CIoU)`` over the positives,
  ``cls_ratio * nc / 80 * mean(BCE)`` over the positives' class scores, both only when the head
  has positives, plus ``obj_ratio * H * W / 416**2 * balance[level] * mean(BCE)`` of the
  objectness over positives and no-object predictions. The BCE terms take sigmoid probabilities
  clipped to ``[1e-7, 1 - 1e-7]``. The heads are summed; nothing is divided by the batch size.

Boxes come as the torchvision convention: ``{"boxes": (N, 4) xyxy in input pixels, "labels": (N,)}``
per image; they are normalised by the input size and turned into centre/size form exactly as the
reference's data loader does before the loss sees them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from attnzoo.detection.yolov4_tiny import ANCHOR_MASKS, ANCHORS
from attnzoo.ops.validation import check_positive_int

__all__ = ["HeadTargets", "YoloV4TinyLoss", "assign_targets", "box_ciou"]

_CLIP = 1e-7  # probabilities are clipped to [_CLIP, 1 - _CLIP] before the BCE (the reference's)
_EPS = 1e-6  # the reference's clamps in the CIoU


@dataclass(frozen=True)
class HeadTargets:
    """The targets of one head, for a batch.

    Attributes:
        index: ``(P, 4)`` long, one row per positive ``(image, anchor slot, row, column)``; the
            anchor slot is the position in the head's anchor mask; rows sorted by cell.
        box: ``(P, 4)`` box targets ``(cx, cy, w, h)`` in grid cells of this head.
        cls: ``(P, num_classes)`` class targets in {0, 1} (before label smoothing).
        obj: ``(B, A, h, w)`` bool, True at the positives.
    """

    index: Tensor
    box: Tensor
    cls: Tensor
    obj: Tensor


class _Boxes(NamedTuple):
    """All ground-truth boxes of a batch, concatenated image by image (list order kept)."""

    cxcywh: Tensor  # (G, 4) normalised by the input size, computed as the reference's loader
    labels: Tensor  # (G,) long
    image: Tensor  # (G,) long, the image of each box
    counts: list[int]  # boxes per image


def _gather_boxes(
    targets: Any,
    input_size: tuple[int, int],
    num_classes: int,
    dtype: torch.dtype,
    device: torch.device,
    where: str,
) -> _Boxes:
    """Validate ``targets`` and concatenate them into normalised centre/size boxes."""
    if not isinstance(targets, (list, tuple)):
        raise TypeError(
            f"{where}: targets must be a list of dicts with 'boxes' and 'labels', "
            f"got {type(targets).__name__}"
        )
    boxes, labels = [], []
    for n, target in enumerate(targets):
        if not isinstance(target, dict) or "boxes" not in target or "labels" not in target:
            raise TypeError(f"{where}: targets[{n}] must be a dict with 'boxes' and 'labels'")
        b, c = target["boxes"], target["labels"]
        if not isinstance(b, Tensor) or not isinstance(c, Tensor):
            raise TypeError(f"{where}: targets[{n}] 'boxes' and 'labels' must be tensors")
        if b.numel() == 0 and c.numel() == 0:
            b, c = b.reshape(0, 4), c.reshape(0)
        if b.dim() != 2 or b.shape[1] != 4 or c.shape != (b.shape[0],):
            raise ValueError(
                f"{where}: targets[{n}] must have boxes (N, 4) and labels (N,), got "
                f"{tuple(b.shape)} and {tuple(c.shape)}"
            )
        if not b.is_floating_point() or c.is_floating_point() or c.is_complex():
            raise TypeError(
                f"{where}: targets[{n}] boxes must be floating point and labels "
                f"integers, got {b.dtype} and {c.dtype}"
            )
        boxes.append(b.to(device=device, dtype=dtype))
        labels.append(c.to(device=device, dtype=torch.long))
    counts = [len(c) for c in labels]
    if not boxes:
        boxes, labels = (
            [torch.zeros(0, 4, dtype=dtype, device=device)],
            [torch.zeros(0, dtype=torch.long, device=device)],
        )
    xyxy, labels_all = torch.cat(boxes), torch.cat(labels)
    height, width = input_size
    if len(labels_all):
        if not bool(torch.isfinite(xyxy).all()):
            raise ValueError(f"{where}: target boxes must be finite")
        if bool(((xyxy[:, 2] <= xyxy[:, 0]) | (xyxy[:, 3] <= xyxy[:, 1])).any()):
            raise ValueError(
                f"{where}: target boxes must be xyxy with x1 < x2 and y1 < y2 (pixels of the input)"
            )
        if bool(((labels_all < 0) | (labels_all >= num_classes)).any()):
            raise ValueError(
                f"{where}: target labels must be in [0, {num_classes}), got values "
                f"from {int(labels_all.min())} to {int(labels_all.max())}"
            )
    # the reference's loader: normalise x by the width and y by the height, then centre/size
    x1, x2 = xyxy[:, 0] / width, xyxy[:, 2] / width
    y1, y2 = xyxy[:, 1] / height, xyxy[:, 3] / height
    w, h = x2 - x1, y2 - y1
    cxcywh = torch.stack([x1 + w / 2, y1 + h / 2, w, h], dim=1)
    if len(labels_all) and bool(((cxcywh[:, :2] < 0) | (cxcywh[:, :2] >= 1)).any()):
        raise ValueError(
            f"{where}: target box centres must lie inside the input image "
            f"(0 <= cx < {width}, 0 <= cy < {height} pixels)"
        )
    image = torch.repeat_interleave(
        torch.arange(len(counts), device=device),
        torch.tensor(counts, device=device, dtype=torch.long),
    )
    return _Boxes(cxcywh, labels_all, image, counts)


def _best_anchors(
    gt: _Boxes, anchors: Tensor, anchor_masks: Sequence[Sequence[int]], input_size: tuple[int, int]
) -> Tensor:
    """Index of the anchor each box is assigned to (best shape IoU among the used anchors)."""
    height, width = input_size
    aw, ah = anchors[:, 0] / width, anchors[:, 1] / height  # normalised like the boxes
    w, h = gt.cxcywh[:, 2:3], gt.cxcywh[:, 3:4]
    inter = torch.minimum(w, aw) * torch.minimum(h, ah)
    iou = inter / (w * h + aw * ah - inter)  # (G, n_anchors)
    used = torch.zeros(len(anchors), dtype=torch.bool, device=iou.device)
    used[[a for mask in anchor_masks for a in mask]] = True
    return iou.masked_fill(~used, -1.0).argmax(dim=1)


def _assign_head(
    gt: _Boxes,
    best: Tensor,
    mask: Sequence[int],
    grid: tuple[int, int],
    num_classes: int,
    n_anchors: int,
) -> HeadTargets:
    """Positives of one head: one cell per box whose anchor is in ``mask``; later boxes win."""
    rows, cols = grid
    batch, slots = len(gt.counts), len(mask)
    device = best.device
    slot_of = torch.full((n_anchors,), -1, dtype=torch.long, device=device)
    slot_of[list(mask)] = torch.arange(slots, device=device)
    slot = slot_of[best]
    sel = torch.nonzero(slot >= 0).squeeze(1)  # boxes of this head, in list order
    cxcywh = gt.cxcywh[sel]
    grid_box = torch.stack(
        [cxcywh[:, 0] * cols, cxcywh[:, 1] * rows, cxcywh[:, 2] * cols, cxcywh[:, 3] * rows], dim=1
    )
    i = grid_box[:, 0].floor().long().clamp_(0, cols - 1)
    j = grid_box[:, 1].floor().long().clamp_(0, rows - 1)
    cell = ((gt.image[sel] * slots + slot[sel]) * rows + j) * cols + i
    n_cells = batch * slots * rows * cols
    # the last box (largest list position) of each cell gives the box target
    order = torch.arange(len(sel), device=device)
    winner = torch.full((n_cells,), -1, dtype=torch.long, device=device)
    winner.scatter_reduce_(0, cell, order, reduce="amax")
    pos_cells = torch.nonzero(winner >= 0).squeeze(1)
    win = winner[pos_cells]
    # class targets: every box of the cell sets its class (multi-hot on collisions)
    position = torch.full((n_cells,), -1, dtype=torch.long, device=device)
    position[pos_cells] = torch.arange(len(pos_cells), device=device)
    cls = torch.zeros(len(pos_cells), num_classes, dtype=grid_box.dtype, device=device)
    cls[position[cell], gt.labels[sel]] = 1.0
    obj = torch.zeros(n_cells, dtype=torch.bool, device=device)
    obj[pos_cells] = True
    index = torch.stack(
        [
            pos_cells // (slots * rows * cols),
            pos_cells // (rows * cols) % slots,
            pos_cells // cols % rows,
            pos_cells % cols,
        ],
        dim=1,
    )
    return HeadTargets(index, grid_box[win], cls, obj.view(batch, slots, rows, cols))


def _check_anchors(anchors: Any, anchor_masks: Any, where: str) -> tuple[Tensor, tuple]:
    a = torch.as_tensor(anchors, dtype=torch.float64)
    if a.dim() != 2 or a.shape[1] != 2 or len(a) == 0 or not bool((a > 0).all()):
        raise ValueError(
            f"{where}: anchors must be a non-empty sequence of positive (w, h) "
            f"pairs, got shape {tuple(a.shape)}"
        )
    try:
        masks = tuple(tuple(int(k) for k in mask) for mask in anchor_masks)
    except TypeError:
        raise TypeError(
            f"{where}: anchor_masks must be a sequence of sequences of anchor "
            f"indices, got {anchor_masks!r}"
        ) from None
    flat = [k for mask in masks for k in mask]
    if not masks or any(not m for m in masks) or any(not 0 <= k < len(a) for k in flat):
        raise ValueError(
            f"{where}: anchor_masks must list anchor indices in [0, {len(a)}) for "
            f"every head, got {anchor_masks!r}"
        )
    return a, masks


def assign_targets(
    targets: list[dict],
    grid_sizes: Sequence[tuple[int, int]],
    input_size: tuple[int, int],
    num_classes: int,
    *,
    anchors: Sequence[Sequence[float]] = ANCHORS,
    anchor_masks: Sequence[Sequence[int]] = ANCHOR_MASKS,
) -> list[HeadTargets]:
    """Assign ground-truth boxes to head cells and anchors as the YOLOv4-tiny reference does.

    Args:
        targets: one dict per image, ``{"boxes": (N, 4) xyxy input pixels, "labels": (N,)}``.
        grid_sizes: ``(rows, columns)`` of each head, in the order of ``anchor_masks``
            (``[(H/32, W/32), (H/16, W/16)]`` for YOLOv4-tiny).
        input_size: ``(H, W)`` of the input images in pixels.
        num_classes: number of classes.
        anchors: anchor ``(w, h)`` in input pixels.
        anchor_masks: the anchors of each head.

    Returns:
        One :class:`HeadTargets` per head, on the device and in the dtype of the boxes.
    """
    where = "assign_targets"
    num_classes = check_positive_int(where, "num_classes", num_classes)
    anchor_t, masks = _check_anchors(anchors, anchor_masks, where)
    if len(grid_sizes) != len(masks):
        raise ValueError(
            f"{where}: grid_sizes must give one (rows, columns) per head "
            f"({len(masks)}), got {len(grid_sizes)}"
        )
    ref = next(
        (
            t["boxes"]
            for t in targets
            if isinstance(t, dict)
            and isinstance(t.get("boxes"), Tensor)
            and t["boxes"].is_floating_point()
        ),
        torch.zeros(0),
    )
    size = (int(input_size[0]), int(input_size[1]))
    gt = _gather_boxes(targets, size, num_classes, ref.dtype, ref.device, where)
    best = _best_anchors(gt, anchor_t.to(ref.device, ref.dtype), masks, size)
    return [
        _assign_head(gt, best, mask, (int(grid[0]), int(grid[1])), num_classes, len(anchor_t))
        for mask, grid in zip(masks, grid_sizes)
    ]


def box_ciou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Complete IoU of paired boxes in ``(cx, cy, w, h)`` form (Zheng et al., AAAI 2020).

    ``CIoU = IoU - rho^2 / c^2 - alpha * v`` with ``rho`` the centre distance, ``c`` the diagonal
    of the smallest enclosing box, ``v = 4 / pi^2 (atan(w2 / h2) - atan(w1 / h1))^2`` and ``alpha =
    v / (1 - IoU + v)``. The clamps are the YOLOv4-tiny reference's (union, ``c^2``, heights and
    ``1 - IoU + v`` at least 1e-6). ``1 - box_ciou`` equals
    ``torchvision.ops.complete_box_iou_loss`` on the same boxes in xyxy form up to those clamps
    (torchvision adds 1e-7 instead), but its gradient differs: torchvision holds ``alpha`` constant
    in the backward pass, the reference (and this function) differentiates through it.

    Args:
        boxes1, boxes2: ``(..., 4)`` tensors of the same shape.

    Returns:
        ``(...)`` CIoU values in ``[-1.5, 1]``.
    """
    xy1, wh1 = boxes1[..., :2], boxes1[..., 2:4]
    xy2, wh2 = boxes2[..., :2], boxes2[..., 2:4]
    lo1, hi1 = xy1 - wh1 / 2, xy1 + wh1 / 2
    lo2, hi2 = xy2 - wh2 / 2, xy2 + wh2 / 2
    inter_wh = (torch.minimum(hi1, hi2) - torch.maximum(lo1, lo2)).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = wh1[..., 0] * wh1[..., 1] + wh2[..., 0] * wh2[..., 1] - inter
    iou = inter / union.clamp(min=_EPS)
    rho2 = (xy1 - xy2).pow(2).sum(-1)
    enclose_wh = (torch.maximum(hi1, hi2) - torch.minimum(lo1, lo2)).clamp(min=0)
    c2 = enclose_wh.pow(2).sum(-1)
    v = (4 / math.pi**2) * (
        torch.atan(wh1[..., 0] / wh1[..., 1].clamp(min=_EPS))
        - torch.atan(wh2[..., 0] / wh2[..., 1].clamp(min=_EPS))
    ).pow(2)
    alpha = v / (1 - iou + v).clamp(min=_EPS)
    return iou - rho2 / c2.clamp(min=_EPS) - alpha * v


def _bce(prob: Tensor, target: Tensor) -> Tensor:
    """Element-wise BCE on probabilities clipped to ``[1e-7, 1 - 1e-7]`` (the reference's)."""
    p = prob.clamp(_CLIP, 1 - _CLIP)
    return -target * torch.log(p) - (1 - target) * torch.log(1 - p)


def _ignored(
    pred: Tensor, anchors_grid: Tensor, gt: _Boxes, grid: tuple[int, int], threshold: float
) -> Tensor:
    """``(B, A, h, w)`` bool: decoded predictions with IoU > ``threshold`` to a box of their image.

    ``pred`` is the head map viewed as ``(B, A, 5 + nc, h, w)``; boxes are compared in grid cells.
    """
    batch, slots, _, rows, cols = pred.shape
    if not len(gt.labels):
        return torch.zeros(batch, slots, rows, cols, dtype=torch.bool, device=pred.device)
    with torch.no_grad():
        # corners of the decoded predictions, (B, 1, N) each
        cx = torch.sigmoid(pred[:, :, 0]) + torch.arange(cols, dtype=pred.dtype, device=pred.device)
        cy = torch.sigmoid(pred[:, :, 1]) + torch.arange(
            rows, dtype=pred.dtype, device=pred.device
        ).unsqueeze(1)
        w = torch.exp(pred[:, :, 2]) * anchors_grid[:, 0].view(1, slots, 1, 1)
        h = torch.exp(pred[:, :, 3]) * anchors_grid[:, 1].view(1, slots, 1, 1)
        px1, px2, py1, py2, parea = (
            t.reshape(batch, 1, -1) for t in (cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2, w * h)
        )
        # corners of the ground truth padded to (B, Gmax, 1); padding has zero size (IoU 0)
        offsets = torch.tensor([0, *gt.counts[:-1]], device=pred.device).cumsum(0)
        slot = torch.arange(len(gt.labels), device=pred.device) - offsets[gt.image]
        scale = torch.tensor([cols, rows, cols, rows], dtype=pred.dtype, device=pred.device)
        padded = torch.zeros(4, batch, max(gt.counts), 1, dtype=pred.dtype, device=pred.device)
        padded[:, gt.image, slot, 0] = (gt.cxcywh * scale).T
        gcx, gcy, gw, gh = padded.unbind(0)
        gx1, gx2, gy1, gy2 = gcx - gw / 2, gcx + gw / 2, gcy - gh / 2, gcy + gh / 2
        inter = (torch.minimum(px2, gx2) - torch.maximum(px1, gx1)).clamp_(min=0)
        inter *= (torch.minimum(py2, gy2) - torch.maximum(py1, gy1)).clamp_(min=0)
        iou = inter / (parea + gw * gh - inter)  # (B, Gmax, N)
        return (iou > threshold).any(dim=1).view(batch, slots, rows, cols)


def _check_ratio(where: str, name: str, value: Any) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not float(value) >= 0:
        raise ValueError(f"{where}: {name} must be a number >= 0, got {value!r}")
    return float(value)


class YoloV4TinyLoss(nn.Module):
    """The YOLOv4-tiny training loss of bubbliiiing/yolov4-tiny-pytorch, vectorised.

    See the module docstring for the assignment, the ignore rule and the terms. Defaults are the
    reference's (``box_ratio 0.05``, ``obj_ratio 5`` scaled by ``H * W / 416**2``, ``cls_ratio 1``
    scaled by ``num_classes / 80``, ``balance (0.4, 1.0)`` for P5 and P4, ``ignore_threshold 0.5``,
    no label smoothing).

    Args:
        num_classes: number of classes ``nc``; the head maps have ``3 * (5 + nc)`` channels.
        anchors: anchor ``(w, h)`` in input pixels (the reference's, for 416 x 416).
        anchor_masks: the anchors of each head, in the order of the head maps.
        ignore_threshold: predictions with a larger IoU to a box leave the no-object set.
        label_smoothing: ``eps``; class targets become ``y (1 - eps) + eps / nc`` (the formula of
            the reference's ``smooth_labels``, which its default of 0 leaves unused).
        box_ratio, obj_ratio, cls_ratio: weights of the three terms (before the scalings above).
        balance: objectness weight of each head.

    Forward:
        ``outputs``: the raw head maps ``(p5, p4)`` of :class:`~attnzoo.detection.YoloV4Tiny`,
        ``(B, A (5 + nc), H/32, W/32)`` and ``(B, A (5 + nc), H/16, W/16)``; ``targets``: ``B``
        dicts ``{"boxes": (N, 4) xyxy input pixels, "labels": (N,)}``, boxes may be empty. The
        input size is ``(32 h5, 32 w5)``.

    Returns:
        ``{"loss", "box", "obj", "cls"}``: scalars; ``box``, ``obj`` and ``cls`` are the weighted
        terms summed over the heads and ``loss`` their sum (what training backpropagates). They
        are float32 for float16 / bfloat16 head maps, else in the maps' dtype.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        anchors: Sequence[Sequence[float]] = ANCHORS,
        anchor_masks: Sequence[Sequence[int]] = ANCHOR_MASKS,
        ignore_threshold: float = 0.5,
        label_smoothing: float = 0.0,
        box_ratio: float = 0.05,
        obj_ratio: float = 5.0,
        cls_ratio: float = 1.0,
        balance: Sequence[float] = (0.4, 1.0),
    ) -> None:
        super().__init__()
        where = type(self).__name__
        self.num_classes = check_positive_int(where, "num_classes", num_classes)
        anchor_t, self.anchor_masks = _check_anchors(anchors, anchor_masks, where)
        self.anchors = tuple(tuple(float(v) for v in a) for a in anchor_t.tolist())
        self.ignore_threshold = _check_ratio(where, "ignore_threshold", ignore_threshold)
        self.label_smoothing = _check_ratio(where, "label_smoothing", label_smoothing)
        if self.label_smoothing >= 1:
            raise ValueError(f"{where}: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.box_ratio = _check_ratio(where, "box_ratio", box_ratio)
        self.obj_ratio = _check_ratio(where, "obj_ratio", obj_ratio)
        self.cls_ratio = _check_ratio(where, "cls_ratio", cls_ratio)
        self.balance = tuple(_check_ratio(where, "balance", b) for b in balance)
        if len(self.balance) != len(self.anchor_masks):
            raise ValueError(
                f"{where}: balance must give one weight per head "
                f"({len(self.anchor_masks)}), got {len(self.balance)}"
            )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, ignore_threshold={self.ignore_threshold}, "
            f"label_smoothing={self.label_smoothing}"
        )

    def _check_outputs(self, outputs: Any, targets: Any) -> list[tuple[int, int]]:
        where, heads = type(self).__name__, len(self.anchor_masks)
        if not isinstance(outputs, (list, tuple)) or len(outputs) != heads:
            got = len(outputs) if isinstance(outputs, (list, tuple)) else type(outputs).__name__
            raise ValueError(f"{where}: outputs must be the {heads} head maps (p5, p4), got {got}")
        first = outputs[0]
        grids = []
        for level, (out, mask) in enumerate(zip(outputs, self.anchor_masks)):
            if not isinstance(out, Tensor) or out.dim() != 4 or not out.is_floating_point():
                raise ValueError(
                    f"{where}: outputs[{level}] must be a floating-point (B, C, h, w) tensor"
                )
            channels = len(mask) * (5 + self.num_classes)
            if out.shape[1] != channels:
                raise ValueError(
                    f"{where}: outputs[{level}] must have {len(mask)} * (5 + "
                    f"{self.num_classes}) = {channels} channels, got {out.shape[1]}"
                )
            expected = (first.shape[2] * 2**level, first.shape[3] * 2**level)
            if out.shape[0] != first.shape[0] or tuple(out.shape[2:]) != expected:
                raise ValueError(
                    f"{where}: outputs[{level}] must be ({first.shape[0]}, "
                    f"{channels}, {expected[0]}, {expected[1]}) (stride "
                    f"{32 // 2**level}), got {tuple(out.shape)}"
                )
            if out.dtype != first.dtype or out.device != first.device:
                raise ValueError(f"{where}: all head maps must share dtype and device")
            grids.append(expected)
        if not isinstance(targets, (list, tuple)) or len(targets) != first.shape[0]:
            got = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
            raise ValueError(
                f"{where}: targets must be a list of {first.shape[0]} dicts (one per "
                f"image), got {got}"
            )
        return grids

    def forward(self, outputs: tuple[Tensor, ...], targets: list[dict]) -> dict[str, Tensor]:
        """Loss parts of a batch; see the class docstring."""
        grids = self._check_outputs(outputs, targets)
        # half-precision head maps (autocast) are computed in float32
        ref = outputs[0].new_zeros((), dtype=torch.promote_types(outputs[0].dtype, torch.float32))
        input_size = (32 * grids[0][0], 32 * grids[0][1])
        nc = self.num_classes
        gt = _gather_boxes(targets, input_size, nc, ref.dtype, ref.device, type(self).__name__)
        anchors = torch.tensor(self.anchors, dtype=ref.dtype, device=ref.device)
        best = _best_anchors(gt, anchors, self.anchor_masks, input_size)
        obj_ratio = self.obj_ratio * input_size[0] * input_size[1] / 416**2
        cls_ratio = self.cls_ratio * nc / 80
        zero = ref.new_zeros(())
        box_loss, obj_loss, cls_loss = zero, zero, zero
        for level, (out, mask, grid) in enumerate(zip(outputs, self.anchor_masks, grids)):
            batch, slots = out.shape[0], len(mask)
            pred = out.view(batch, slots, 5 + nc, *grid).to(ref.dtype)
            stride = torch.tensor(
                [input_size[1] / grid[1], input_size[0] / grid[0]],
                dtype=ref.dtype,
                device=ref.device,
            )
            anchors_grid = anchors[list(mask)] / stride
            head = _assign_head(gt, best, mask, grid, nc, len(anchors))
            keep = head.obj | ~_ignored(pred, anchors_grid, gt, grid, self.ignore_threshold)
            conf = torch.sigmoid(pred[:, :, 4]).clamp(_CLIP, 1 - _CLIP)
            # BCE with a 0/1 target: -log(p) at positives, -log(1 - p) elsewhere (one log)
            conf_bce = -torch.log(torch.where(head.obj, conf, 1 - conf))
            obj_loss = obj_loss + (conf_bce * keep).sum() / keep.sum().clamp(min=1) * (
                self.balance[level] * obj_ratio
            )
            if len(head.index):
                b, k, j, i = head.index.unbind(1)
                p = pred[b, k, :, j, i]  # (P, 5 + nc)
                xy = torch.sigmoid(p[:, :2]) + torch.stack([i, j], 1).to(ref.dtype)
                wh = torch.exp(p[:, 2:4]) * anchors_grid[k]
                loss_loc = (1 - box_ciou(torch.cat([xy, wh], 1), head.box)).mean()
                cls_target = head.cls * (1 - self.label_smoothing) + self.label_smoothing / nc
                loss_cls = _bce(torch.sigmoid(p[:, 5:]), cls_target).mean()
                box_loss = box_loss + loss_loc * self.box_ratio
                cls_loss = cls_loss + loss_cls * cls_ratio
        return {
            "loss": box_loss + obj_loss + cls_loss,
            "box": box_loss,
            "obj": obj_loss,
            "cls": cls_loss,
        }
