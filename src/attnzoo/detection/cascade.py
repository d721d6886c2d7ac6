"""Cascade R-CNN RoI heads for torchvision's two-stage detectors.

Cai and Vasconcelos, "Cascade R-CNN: Delving into High Quality Object Detection", CVPR 2018
(official code: github.com/zhaoweicai/cascade-rcnn; re-implementations: open-mmlab/mmdetection
``CascadeRoIHead``, facebookresearch/detectron2 ``CascadeROIHeads``).

:class:`CascadeRoIHeads` replaces torchvision's ``RoIHeads`` inside
``torchvision.models.detection.FasterRCNN`` (``model.roi_heads = CascadeRoIHeads(...)``): the same
``forward(features, proposals, image_shapes, targets=None) -> (detections, losses)`` contract, so
``GeneralizedRCNNTransform`` rescales the returned boxes as usual.

A cascade of ``S`` stages trained at rising IoU thresholds ``u_t`` (0.5, 0.6, 0.7), each with its
own head, predictor and box coder (weights (10,10,5,5), (20,20,10,10), (30,30,15,15), i.e. target
stds 0.1/0.2, 0.05/0.1, 0.033/0.067). The proposals of stage ``t+1`` are the boxes regressed by
stage ``t`` (detached, clipped to the image). Two training conventions:

* ``"mmdet"`` (default): every stage re-adds the ground truth to its proposals, matches them at
  ``u_t`` and re-samples ``batch_size_per_image`` RoIs (``positive_fraction`` positive); between
  stages the RoIs that were ground-truth boxes are dropped; stage loss weights (1, 0.5, 0.25);
  smooth-L1 with ``beta = 1``.
* ``"detectron2"``: stage 1 samples as above; later stages match *all* refined boxes at ``u_t``
  (no re-sampling, no ground truth re-added; empty boxes dropped); equal stage loss weights, and
  the gradient flowing from each stage's head into the pooled features is scaled by
  ``1 / S``; L1 box loss (``beta = 0``).

At test time every stage classifies its own input boxes; class scores are averaged over stages
(``score_average="prob"``: mean of softmax probabilities, as detectron2; ``"logit"``: softmax of
the mean logits, as mmdetection) and the boxes are the last stage's regression of its input. Then
torchvision's post-processing: clip, drop background and scores <= ``score_thresh``, drop boxes
smaller than 0.01, per-class NMS at ``nms_thresh``, keep ``detections_per_img``.

The paper's ablations are two more ``mode`` values:

* ``"iterative"`` (iterative BBox): one head and predictor (one-element sequences), trained once
  like Faster R-CNN at ``u_1`` with stage 1's coder and loss weight, applied ``S`` times at test
  time with stage 1's coder (scores averaged as above);
* ``"integral"`` (integral loss): one head and ``S`` predictors on the same RoIs (sampled at
  ``u_1``); predictor ``t``'s classifier is trained at ``u_t`` (background below it), only
  predictor 1's box regression is used (trained at ``u_1``, stage 1's coder); no refinement; at
  test time the ``S`` classifiers' scores are averaged.

Losses: the returned dict holds ``loss_classifier`` and ``loss_box_reg``, each the sum over
stages of ``stage_loss_weights[t]`` times the stage's loss (cross-entropy averaged over the
stage's RoIs; smooth-L1 of positives summed and divided by the stage's RoI count, torchvision's
and mmdetection's normalisation). The unweighted per-stage values (``loss_classifier_stage{t}``,
``loss_box_reg_stage{t}``, ``t`` from 1, detached) are kept in :attr:`CascadeRoIHeads.
last_stage_losses` so that training loops summing the loss dict do not count them twice.

With ``return_stages = True`` (evaluation), every detection dict also carries ``"stages"``: one
dict per stage with that stage's own ``boxes`` / ``scores`` / ``labels`` and the
``image_size`` they refer to (the network's input size: ``GeneralizedRCNNTransform`` rescales
only the top-level boxes); :func:`rescale_stage_detections` maps them to the original images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

from attnzoo.detection.weights import LoadReport

__all__ = [
    "CascadePredictor",
    "CascadeRoIHeads",
    "cascade_box_heads",
    "load_faster_rcnn_weights",
    "rescale_stage_detections",
]

_NAME = "CascadeRoIHeads"
#: the paper's stage settings (mmdetection's cascade-rcnn_r50_fpn, detectron2's cascade configs)
PAPER_IOU_THRESHOLDS = (0.5, 0.6, 0.7)
PAPER_BBOX_REG_WEIGHTS = (
    (10.0, 10.0, 5.0, 5.0),
    (20.0, 20.0, 10.0, 10.0),
    (30.0, 30.0, 15.0, 15.0),
)
PAPER_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
_MODES = ("cascade", "iterative", "integral")
_CONVENTIONS = ("mmdet", "detectron2")
_AVERAGES = ("prob", "logit")


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale`` (detectron2's trick)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


@dataclass
class StageSamples:
    """The RoIs one training stage sees, per image.

    Attributes:
        proposals: RoI boxes ``(n_i, 4)``.
        labels: class per RoI (0 = background).
        matched_gt: the matched ground-truth box per RoI (zeros for images without boxes).
        is_gt: which RoIs are ground-truth boxes added as proposals.
    """

    proposals: list[Tensor]
    labels: list[Tensor]
    matched_gt: list[Tensor]
    is_gt: list[Tensor]


class CascadePredictor(FastRCNNPredictor):
    """torchvision's ``FastRCNNPredictor`` (``cls_score``, ``bbox_pred``) with optionally
    class-agnostic regression (4 outputs) and Detectron/mmdetection's initialisation:
    classifier weights N(0, 0.01), regressor weights N(0, 0.001), biases 0.
    """

    def __init__(self, in_channels: int, num_classes: int, *, class_agnostic: bool = True) -> None:
        if num_classes < 2:
            raise ValueError(
                f"CascadePredictor: num_classes must be >= 2 (with background), got {num_classes}"
            )
        super().__init__(in_channels, num_classes)
        if class_agnostic:
            self.bbox_pred = nn.Linear(in_channels, 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)


def cascade_box_heads(
    in_channels: int,
    resolution: int,
    representation_size: int,
    num_classes: int,
    num_stages: int = 3,
    class_agnostic: bool = True,
) -> tuple[list[nn.Module], list[nn.Module]]:
    """``num_stages`` torchvision ``TwoMLPHead`` heads (2 FC layers, mmdetection's
    ``Shared2FCBBoxHead``) on ``in_channels x resolution x resolution`` pooled features, and as
    many :class:`CascadePredictor` s (``num_classes`` includes background)."""
    for name, value in (
        ("in_channels", in_channels),
        ("resolution", resolution),
        ("representation_size", representation_size),
        ("num_stages", num_stages),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"cascade_box_heads: {name} must be a positive int, got {value!r}")
    heads: list[nn.Module] = [
        TwoMLPHead(in_channels * resolution**2, representation_size) for _ in range(num_stages)
    ]
    predictors: list[nn.Module] = [
        CascadePredictor(representation_size, num_classes, class_agnostic=class_agnostic)
        for _ in range(num_stages)
    ]
    return heads, predictors


def _first(values: Sequence, count: int, name: str) -> tuple:
    if count > len(values):
        raise ValueError(
            f"{_NAME}: {name} has paper defaults for at most {len(values)} stages; "
            f"pass {count} values"
        )
    return tuple(values[:count])


class CascadeRoIHeads(nn.Module):
    """Cascade R-CNN box heads, a drop-in for torchvision's ``RoIHeads`` (see the module doc).

    Args:
        box_roi_pool: RoI feature extractor shared by the stages (``MultiScaleRoIAlign``), called
            as ``box_roi_pool(features, boxes, image_shapes)``.
        box_heads: one head per stage (``"cascade"``), or a single one (``"iterative"``,
            ``"integral"``), mapping pooled features to a representation.
        box_predictors: one per stage (``"cascade"``, ``"integral"``) or a single one
            (``"iterative"``), returning ``(class_logits (N, K), box_deltas (N, 4 or 4K))``.
        stage_iou_thresholds: IoU threshold ``u_t`` of each stage, in (0, 1); its length is the
            number of stages ``S``. Default: the first ``S`` of (0.5, 0.6, 0.7), ``S`` being the
            number of predictors (3 for ``"iterative"``).
        stage_bbox_reg_weights: torchvision ``BoxCoder`` weights of each stage; default the
            first ``S`` of (10,10,5,5), (20,20,10,10), (30,30,15,15).
        stage_loss_weights: per-stage loss weights; default (1, 0.5, 0.25)[:S] (``"mmdet"``) or
            all ones (``"detectron2"``).
        class_agnostic: the predictors regress 4 deltas per RoI (else ``4 * K``).
        batch_size_per_image, positive_fraction: RoI sampling (512, 0.25).
        score_thresh, nms_thresh, detections_per_img: torchvision's post-processing.
        convention: ``"mmdet"`` or ``"detectron2"`` training (see the module doc).
        score_average: ``"prob"`` or ``"logit"`` test-time ensemble.
        mode: ``"cascade"``, ``"iterative"`` or ``"integral"``.
        box_loss_beta: smooth-L1 ``beta``; default 1.0 (``"mmdet"``) or 0.0, an L1 loss
            (``"detectron2"``); torchvision's ``RoIHeads`` uses 1/9.
        feature_grad_scale: factor on the gradient each stage's head sends to the pooled
            features in ``"cascade"`` training; default ``1 / S`` (``"detectron2"``) or 1.

    Attributes:
        return_stages: in evaluation, add per-stage detections under ``"stages"``.
        last_stage_losses: unweighted, detached per-stage losses of the last training forward.
    """

    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_heads: Sequence[nn.Module],
        box_predictors: Sequence[nn.Module],
        *,
        stage_iou_thresholds: Sequence[float] | None = None,
        stage_bbox_reg_weights: Sequence[Sequence[float]] | None = None,
        stage_loss_weights: Sequence[float] | None = None,
        class_agnostic: bool = True,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        convention: str = "mmdet",
        score_average: str = "prob",
        mode: str = "cascade",
        box_loss_beta: float | None = None,
        feature_grad_scale: float | None = None,
    ) -> None:
        super().__init__()
        choices = (
            ("mode", mode, _MODES),
            ("convention", convention, _CONVENTIONS),
            ("score_average", score_average, _AVERAGES),
        )
        for name, value, allowed in choices:
            if value not in allowed:
                raise ValueError(f"{_NAME}: {name} must be one of {allowed}, got {value!r}")
        if not isinstance(box_roi_pool, nn.Module):
            raise TypeError(f"{_NAME}: box_roi_pool must be an nn.Module, got {type(box_roi_pool)}")
        box_heads, box_predictors = list(box_heads), list(box_predictors)
        for name, mods in (("box_heads", box_heads), ("box_predictors", box_predictors)):
            if not mods or not all(isinstance(m, nn.Module) for m in mods):
                raise TypeError(f"{_NAME}: {name} must be a non-empty sequence of nn.Module")
        if stage_iou_thresholds is not None:
            num_stages = len(stage_iou_thresholds)
        else:
            num_stages = 3 if mode == "iterative" else len(box_predictors)
        expected = {
            "cascade": (num_stages, num_stages),
            "iterative": (1, 1),
            "integral": (1, num_stages),
        }[mode]
        if (len(box_heads), len(box_predictors)) != expected:
            raise ValueError(
                f"{_NAME}: mode={mode!r} with {num_stages} stages needs "
                f"{expected[0]} box_heads and {expected[1]} box_predictors, got "
                f"{len(box_heads)} and {len(box_predictors)}"
            )
        ious = tuple(
            float(u)
            for u in (
                stage_iou_thresholds
                or _first(PAPER_IOU_THRESHOLDS, num_stages, "stage_iou_thresholds")
            )
        )
        if stage_bbox_reg_weights is None:
            stage_bbox_reg_weights = _first(
                PAPER_BBOX_REG_WEIGHTS, num_stages, "stage_bbox_reg_weights"
            )
        if stage_loss_weights is None:
            stage_loss_weights = (
                (1.0,) * num_stages
                if convention == "detectron2"
                else _first(PAPER_LOSS_WEIGHTS, num_stages, "stage_loss_weights")
            )
        reg_weights = tuple(tuple(float(w) for w in ws) for ws in stage_bbox_reg_weights)
        loss_weights = tuple(float(w) for w in stage_loss_weights)
        if not all(0.0 < u < 1.0 for u in ious):
            raise ValueError(f"{_NAME}: stage_iou_thresholds must lie in (0, 1), got {ious}")
        for name, seq in (
            ("stage_bbox_reg_weights", reg_weights),
            ("stage_loss_weights", loss_weights),
        ):
            if len(seq) != num_stages:
                raise ValueError(
                    f"{_NAME}: {name} must have one entry per stage ({num_stages}), got {len(seq)}"
                )
        if not all(len(ws) == 4 and all(w > 0 for w in ws) for ws in reg_weights):
            raise ValueError(
                f"{_NAME}: stage_bbox_reg_weights must be 4 positive numbers per "
                f"stage, got {reg_weights}"
            )
        if not all(w >= 0 and math.isfinite(w) for w in loss_weights):
            raise ValueError(
                f"{_NAME}: stage_loss_weights must be finite and >= 0, got {loss_weights}"
            )
        if not isinstance(batch_size_per_image, int) or batch_size_per_image < 1:
            raise ValueError(
                f"{_NAME}: batch_size_per_image must be a positive int, "
                f"got {batch_size_per_image!r}"
            )
        if not 0.0 < positive_fraction <= 1.0:
            raise ValueError(
                f"{_NAME}: positive_fraction must lie in (0, 1], got {positive_fraction}"
            )
        if not 0.0 <= score_thresh < 1.0:
            raise ValueError(f"{_NAME}: score_thresh must lie in [0, 1), got {score_thresh}")
        if not 0.0 <= nms_thresh <= 1.0:
            raise ValueError(f"{_NAME}: nms_thresh must lie in [0, 1], got {nms_thresh}")
        if not isinstance(detections_per_img, int) or detections_per_img < 1:
            raise ValueError(
                f"{_NAME}: detections_per_img must be a positive int, got {detections_per_img!r}"
            )
        if box_loss_beta is None:
            box_loss_beta = 0.0 if convention == "detectron2" else 1.0
        if box_loss_beta < 0:
            raise ValueError(f"{_NAME}: box_loss_beta must be >= 0, got {box_loss_beta}")
        if feature_grad_scale is None:
            feature_grad_scale = 1.0 / num_stages if convention == "detectron2" else 1.0
        if not feature_grad_scale > 0:
            raise ValueError(f"{_NAME}: feature_grad_scale must be > 0, got {feature_grad_scale}")

        self.box_roi_pool = box_roi_pool
        self.box_heads = nn.ModuleList(box_heads)
        self.box_predictors = nn.ModuleList(box_predictors)
        self.num_stages = num_stages
        self.mode, self.convention, self.score_average = mode, convention, score_average
        self.stage_iou_thresholds = ious
        self.stage_bbox_reg_weights = reg_weights
        self.stage_loss_weights = loss_weights
        self.class_agnostic = bool(class_agnostic)
        self.box_coders = [det_utils.BoxCoder(ws) for ws in reg_weights]
        self.proposal_matchers = [
            det_utils.Matcher(u, u, allow_low_quality_matches=False) for u in ious
        ]
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(
            batch_size_per_image, positive_fraction
        )
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img = detections_per_img
        self.box_loss_beta = float(box_loss_beta)
        self.feature_grad_scale = float(feature_grad_scale)
        self.return_stages = False
        self.last_stage_losses: dict[str, Tensor] = {}

    # ---------------------------------------------------------------- matching and sampling
    def _assign(
        self, stage: int, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Matched gt index (clamped) and label (0 = background) of each box at ``u_stage``."""
        n = boxes.shape[0]
        if gt_boxes.numel() == 0 or n == 0:
            zeros = torch.zeros(n, dtype=torch.int64, device=boxes.device)
            return zeros, zeros.clone()
        matched = self.proposal_matchers[stage](box_ops.box_iou(gt_boxes, boxes))
        idx = matched.clamp(min=0)
        labels = gt_labels[idx].to(torch.int64)
        labels[matched < 0] = 0  # Matcher(u, u): below u is background, nothing ignored
        return idx, labels

    def _samples(
        self,
        stage: int,
        proposals: list[Tensor],
        gt_boxes: list[Tensor],
        gt_labels: list[Tensor],
        *,
        sample: bool,
    ) -> StageSamples:
        """Match ``proposals`` at ``u_stage``; with ``sample``, ground truth is added first and
        ``batch_size_per_image`` RoIs are sampled (torchvision's ``select_training_samples``)."""
        is_gt = [torch.zeros(p.shape[0], dtype=torch.bool, device=p.device) for p in proposals]
        if sample:
            is_gt = [
                torch.cat([m, torch.ones(g.shape[0], dtype=torch.bool, device=m.device)])
                for m, g in zip(is_gt, gt_boxes)
            ]
            proposals = [torch.cat([p, g]) for p, g in zip(proposals, gt_boxes)]
        assigned = [
            self._assign(stage, p, g, lab) for p, g, lab in zip(proposals, gt_boxes, gt_labels)
        ]
        labels = [lab for _, lab in assigned]
        matched_gt = [
            g[i] if g.numel() else torch.zeros_like(p)
            for (i, _), g, p in zip(assigned, gt_boxes, proposals)
        ]
        if sample:
            pos, neg = self.fg_bg_sampler(labels)
            keep = [torch.where(p | n)[0] for p, n in zip(pos, neg)]
            proposals, labels, matched_gt, is_gt = (
                [x[k] for x, k in zip(seq, keep)] for seq in (proposals, labels, matched_gt, is_gt)
            )
        return StageSamples(list(proposals), list(labels), list(matched_gt), list(is_gt))

    # ---------------------------------------------------------------- one stage
    def _head(self, stage: int) -> tuple[nn.Module, nn.Module]:
        if self.mode == "cascade":
            return self.box_heads[stage], self.box_predictors[stage]
        if self.mode == "iterative":
            return self.box_heads[0], self.box_predictors[0]
        return self.box_heads[0], self.box_predictors[stage]

    def _coder(self, stage: int) -> det_utils.BoxCoder:
        return self.box_coders[stage if self.mode == "cascade" else 0]

    def _predict(self, predictor: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, deltas = predictor(x)
        expected = 4 if self.class_agnostic else 4 * logits.shape[1]
        if deltas.dim() != 2 or deltas.shape[1] != expected:
            raise ValueError(
                f"{_NAME}: class_agnostic={self.class_agnostic} expects box deltas "
                f"of shape (N, {expected}) from the predictor, got "
                f"{tuple(deltas.shape)}"
            )
        return logits, deltas

    def _run_stage(
        self,
        stage: int,
        features: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> tuple[Tensor, Tensor]:
        x = self.box_roi_pool(features, boxes, image_shapes)
        if self.training and self.mode == "cascade" and self.feature_grad_scale != 1.0:
            x = _ScaleGradient.apply(x, self.feature_grad_scale)
        head, predictor = self._head(stage)
        return self._predict(predictor, head(x))

    def _class_deltas(self, deltas: Tensor, classes: Tensor) -> Tensor:
        """(N, 4) deltas: the agnostic ones, or those of ``classes`` (class-specific)."""
        if self.class_agnostic:
            return deltas
        per_class = deltas.reshape(deltas.shape[0], deltas.shape[1] // 4, 4)
        return per_class[torch.arange(deltas.shape[0]), classes]

    def _decode(self, stage: int, deltas: Tensor, boxes: list[Tensor]) -> Tensor:
        """(N, 4) or (N, K, 4) boxes decoded with the stage's coder."""
        pred = self._coder(stage).decode_single(deltas, torch.cat(boxes))
        return pred.reshape(pred.shape[0], deltas.shape[1] // 4, 4)

    def _refine(
        self,
        stage: int,
        logits: Tensor,
        deltas: Tensor,
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
        labels: Tensor | None = None,
    ) -> list[Tensor]:
        """The next stage's input: the stage's regressed boxes (class-specific: the assigned
        class of positives, else the best foreground class), detached and clipped."""
        classes = logits[:, 1:].argmax(dim=1) + 1
        if labels is not None:
            classes = torch.where(labels > 0, labels, classes)
        new = self._decode(stage, self._class_deltas(deltas.detach(), classes), boxes)[:, 0]
        out = new.split([b.shape[0] for b in boxes])
        return [box_ops.clip_boxes_to_image(b, s) for b, s in zip(out, image_shapes)]

    def _regression_targets(self, stage: int, s: StageSamples) -> Tensor:
        """Targets ``(P, 4)`` of the positive RoIs (in order), encoded with the stage's coder."""
        pos = torch.where(torch.cat(s.labels) > 0)[0]
        return self._coder(stage).encode_single(
            torch.cat(s.matched_gt)[pos], torch.cat(s.proposals)[pos]
        )

    def _losses(
        self, stage: int, logits: Tensor, deltas: Tensor, s: StageSamples
    ) -> tuple[Tensor, Tensor]:
        """Cross-entropy over the RoIs; smooth-L1 of positives summed / number of RoIs."""
        labels = torch.cat(s.labels)
        if labels.numel() == 0:
            zero = logits.sum() * 0.0 + deltas.sum() * 0.0
            return zero, zero
        cls_loss = F.cross_entropy(logits, labels)
        pos = torch.where(labels > 0)[0]
        targets = self._regression_targets(stage, s)
        pred = self._class_deltas(deltas[pos], labels[pos])
        box_loss = F.smooth_l1_loss(pred, targets, beta=self.box_loss_beta, reduction="sum")
        return cls_loss, box_loss / labels.numel()

    # ---------------------------------------------------------------- training
    def _forward_train(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        stage_losses: list[tuple[int, str, Tensor]] = []  # (stage, kind, loss)
        if self.mode == "integral":
            s = self._samples(0, proposals, gt_boxes, gt_labels, sample=True)
            x = self.box_heads[0](self.box_roi_pool(features, s.proposals, image_shapes))
            for t, predictor in enumerate(self.box_predictors):
                logits, deltas = self._predict(predictor, x)
                labels = [
                    self._assign(t, p, g, lab)[1]
                    for p, g, lab in zip(s.proposals, gt_boxes, gt_labels)
                ]
                st = StageSamples(s.proposals, labels, s.matched_gt, s.is_gt)
                cls_loss, box_loss = self._losses(t, logits, deltas, st)
                stage_losses.append((t, "classifier", cls_loss))
                if t == 0:
                    stage_losses.append((0, "box_reg", box_loss))
        else:
            stages = self.num_stages if self.mode == "cascade" else 1
            for t in range(stages):
                sample = t == 0 or self.convention == "mmdet"
                s = self._samples(t, proposals, gt_boxes, gt_labels, sample=sample)
                logits, deltas = self._run_stage(t, features, s.proposals, image_shapes)
                cls_loss, box_loss = self._losses(t, logits, deltas, s)
                stage_losses += [(t, "classifier", cls_loss), (t, "box_reg", box_loss)]
                if t + 1 < stages:
                    refined = self._refine(
                        t, logits, deltas, s.proposals, image_shapes, torch.cat(s.labels)
                    )
                    if self.convention == "mmdet":
                        proposals = [b[~g] for b, g in zip(refined, s.is_gt)]
                    else:
                        proposals = [b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])] for b in refined]
        losses: dict[str, Tensor] = {}
        for t, kind, value in stage_losses:
            key = f"loss_{kind}"
            weighted = self.stage_loss_weights[t] * value
            losses[key] = losses[key] + weighted if key in losses else weighted
        self.last_stage_losses = {
            f"loss_{kind}_stage{t + 1}": value.detach() for t, kind, value in stage_losses
        }
        return losses

    # ---------------------------------------------------------------- inference
    def _ensemble(self, logits: list[Tensor]) -> Tensor:
        if self.score_average == "logit":
            return F.softmax(torch.stack(logits).mean(0), dim=-1)
        return torch.stack([F.softmax(x, dim=-1) for x in logits]).mean(0)

    def _postprocess(
        self, boxes: Tensor, scores: Tensor, counts: list[int], image_shapes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """torchvision's ``postprocess_detections`` for (N, 1 or K, 4) boxes, (N, K) scores."""
        num_classes = scores.shape[-1]
        boxes = boxes.expand(-1, num_classes, -1)
        out = []
        for b, sc, shape in zip(boxes.split(counts), scores.split(counts), image_shapes):
            b = box_ops.clip_boxes_to_image(b, shape)
            labels = torch.arange(num_classes, device=sc.device).view(1, -1).expand_as(sc)
            # drop the background column; every (RoI, class) pair is a candidate
            b, sc = b[:, 1:].reshape(-1, 4), sc[:, 1:].reshape(-1)
            labels = labels[:, 1:].reshape(-1)
            keep = torch.where(sc > self.score_thresh)[0]
            b, sc, labels = b[keep], sc[keep], labels[keep]
            keep = box_ops.remove_small_boxes(b, min_size=1e-2)
            b, sc, labels = b[keep], sc[keep], labels[keep]
            keep = box_ops.batched_nms(b, sc, labels, self.nms_thresh)[: self.detections_per_img]
            out.append({"boxes": b[keep], "labels": labels[keep], "scores": sc[keep]})
        return out

    def _forward_eval(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        counts = [p.shape[0] for p in proposals]
        all_logits: list[Tensor] = []
        stage_boxes: list[Tensor] = []  # each stage's own regression of its input boxes
        if self.mode == "integral":
            x = self.box_heads[0](self.box_roi_pool(features, proposals, image_shapes))
            outputs = [self._predict(p, x) for p in self.box_predictors]
            all_logits = [lg for lg, _ in outputs]
            boxes = self._decode(0, outputs[0][1], proposals)
            stage_boxes = [boxes] * self.num_stages
        else:
            boxes_in = proposals
            for t in range(self.num_stages):
                logits, deltas = self._run_stage(t, features, boxes_in, image_shapes)
                all_logits.append(logits)
                stage_boxes.append(self._decode(t, deltas, boxes_in))
                if t + 1 < self.num_stages:
                    boxes_in = self._refine(t, logits, deltas, boxes_in, image_shapes)
        result = self._postprocess(
            stage_boxes[-1], self._ensemble(all_logits), counts, image_shapes
        )
        if self.return_stages:
            per_stage = [
                self._postprocess(b, F.softmax(lg, dim=-1), counts, image_shapes)
                for b, lg in zip(stage_boxes, all_logits)
            ]
            for i, (res, shape) in enumerate(zip(result, image_shapes)):
                size = torch.tensor(shape, device=res["boxes"].device)
                res["stages"] = [  # type: ignore[assignment]  # nested dicts, not a tensor
                    {**stage[i], "image_size": size} for stage in per_stage
                ]
        return result

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """torchvision ``RoIHeads.forward``: ``(detections, {})`` in evaluation,
        ``([], losses)`` in training (``targets`` required: ``boxes`` float, ``labels`` int64)."""
        if not self.training:
            return self._forward_eval(features, proposals, image_shapes), {}
        if targets is None or len(targets) != len(proposals):
            raise ValueError(f"{_NAME}: training needs one target dict per image")
        for t in targets:
            if "boxes" not in t or "labels" not in t:
                raise ValueError(f"{_NAME}: every target needs 'boxes' and 'labels'")
            if not t["boxes"].is_floating_point():
                raise TypeError(
                    f"{_NAME}: target boxes must be floating point, got {t['boxes'].dtype}"
                )
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"{_NAME}: target labels must be int64, got {t['labels'].dtype}")
        return [], self._forward_train(features, proposals, image_shapes, targets)


def rescale_stage_detections(
    detections: list[dict], original_image_sizes: list[tuple[int, int]]
) -> list[dict]:
    """Rescale, in place, the per-stage boxes of ``return_stages`` detections from the network's
    input size to ``original_image_sizes`` (as ``GeneralizedRCNNTransform`` does for the final
    boxes); the ``image_size`` entries are updated. Returns ``detections``."""
    if len(detections) != len(original_image_sizes):
        raise ValueError(
            "rescale_stage_detections: need one original size per detection dict, "
            f"got {len(original_image_sizes)} for {len(detections)}"
        )
    for det, size in zip(detections, original_image_sizes):
        if "stages" not in det:
            raise ValueError(
                "rescale_stage_detections: detections carry no 'stages'; set "
                "roi_heads.return_stages = True before evaluating"
            )
        for stage in det["stages"]:
            current = tuple(int(v) for v in stage["image_size"])
            stage["boxes"] = resize_boxes(stage["boxes"], current, tuple(size))
            stage["image_size"] = torch.tensor(tuple(size), device=stage["boxes"].device)
    return detections


#: torchvision Faster R-CNN key prefix -> the cascade's stage-1 one
_FASTER_TO_CASCADE = (
    ("roi_heads.box_head.", "roi_heads.box_heads.0."),
    ("roi_heads.box_predictor.", "roi_heads.box_predictors.0."),
)


def load_faster_rcnn_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> LoadReport:
    """Copy a torchvision Faster R-CNN state dict into a model whose ``roi_heads`` is a
    :class:`CascadeRoIHeads`: backbone, FPN and RPN by name, the box head and predictor into
    stage 1 where shapes fit (a class-specific ``bbox_pred`` does not fit an agnostic one).

    Returns a :class:`~attnzoo.detection.LoadReport`: ``mapped`` (source -> model key),
    ``missing`` (model keys left as they were: the new stages), ``unexpected`` (source keys with
    no place) and ``mismatched`` (shape differences, skipped). A ``module.`` prefix is removed.
    """
    if not isinstance(getattr(model, "roi_heads", None), CascadeRoIHeads):
        raise TypeError(
            "load_faster_rcnn_weights: model.roi_heads must be a CascadeRoIHeads, "
            f"got {type(getattr(model, 'roi_heads', None)).__name__}"
        )
    own = model.state_dict()
    report = LoadReport()
    with torch.no_grad():
        for key, value in state_dict.items():
            name = key.removeprefix("module.")
            for src, dst in _FASTER_TO_CASCADE:
                if name.startswith(src):
                    name = dst + name[len(src) :]
            if name not in own:
                report.unexpected.append(key)
            elif own[name].shape != value.shape:
                report.mismatched.append((name, tuple(value.shape), tuple(own[name].shape)))
            else:
                own[name].copy_(value)
                report.mapped[key] = name
    loaded = set(report.mapped.values())
    report.missing = [k for k in own if k not in loaded]
    return report
