"""The R-CNN side of ``attnzoo bench --task detect``: Faster / Cascade R-CNN training, evaluation.

* **models** (:data:`attnzoo.detection.rcnn.RCNN_BUILDERS`): ``faster_rcnn_small``,
  ``cascade_rcnn_small`` (CPU-sized, for the built-in scenes), ``faster_rcnn_resnet50_fpn`` and
  ``cascade_rcnn_resnet50_fpn``; built with ``num_classes = 1 + classes`` (torchvision's
  background convention; the task's labels are shifted by one on the way in and out) and
  ``keep_size=True`` (the data loader already resized the images).
* **training** (:class:`RCNNModule`): the sum of the model's loss dict (torchvision's RPN and box
  losses; the cascade's stage-weighted ones), SGD as torchvision's detection reference (momentum
  0.9, weight decay 1e-4, ``lr = 0.02 x batch / 16``), a linear warm-up from ``lr / 1000`` over
  the first ``min(1000, total / 10)`` steps, and steps x0.1 at 16/26 and 22/26 of the steps
  (the reference's 26-epoch schedule, scaled to any length).
* **evaluation**: the detections (score > 0.05 from ``box_score_thresh``, reduced to 0.001 here as
  the YOLO path, NMS 0.5, up to ``box_detections_per_img``) scored with
  :class:`attnzoo.detection.metrics.DetectionMetrics` (VOC AP50, COCO AP, AP75) plus VOC AP at IoU
  0.9 (``map90``); for a cascade, the same metrics for each stage's own detections
  (``return_stages``), kept as ``run_extras["stages"]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "RCNN_DEFAULTS",
    "RCNN_MODELS",
    "build_rcnn_module",
    "build_rcnn_optimizer",
    "is_rcnn",
    "rcnn_builder",
    "rcnn_predict",
    "rcnn_targets",
    "warmup_multistep",
]

#: the R-CNN names of ``--model``
RCNN_MODELS = (
    "faster_rcnn_small",
    "cascade_rcnn_small",
    "faster_rcnn_resnet50_fpn",
    "cascade_rcnn_resnet50_fpn",
)
#: the task's defaults when every ``--model`` is an R-CNN (demo: 2 models x 2 attentions x 2 seeds
#: in about 15 minutes on 2 CPU cores)
RCNN_DEFAULTS = {"epochs": 4, "batch_size": 8, "lr": 0.02, "weight_decay": 1e-4, "n_train": 240}
MOMENTUM = 0.9
#: the reference's 26-epoch schedule: decays at epochs 16 and 22
MILESTONES = (16 / 26, 22 / 26)
#: score threshold of the evaluation (as low as the YOLO path's, for AP)
EVAL_SCORE = 0.001
PARTS = ("loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")


def rcnn_builder(name: str) -> Any:
    from attnzoo.detection.rcnn import RCNN_BUILDERS

    return RCNN_BUILDERS[name]


def is_rcnn(obj: Any) -> bool:
    """Whether ``obj`` (a builder or a network) is one of torchvision's two-stage detectors."""
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    if isinstance(obj, nn.Module):
        return isinstance(obj, GeneralizedRCNN)
    from attnzoo.detection.rcnn import RCNN_BUILDERS

    base = getattr(obj, "func", obj)  # functools.partial
    return base in RCNN_BUILDERS.values()


def rcnn_targets(targets: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The task's targets (labels from 0) for torchvision (labels from 1, 0 = background)."""
    return [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]


def _from_torchvision(det: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"boxes": det["boxes"], "scores": det["scores"], "labels": det["labels"] - 1}


def rcnn_predict(
    model: nn.Module, images: torch.Tensor, *, stages: bool = False
) -> tuple[list[dict[str, torch.Tensor]], list[list[dict[str, torch.Tensor]]]]:
    """Detections of ``model`` (eval mode) on a batch, labels from 0; with ``stages`` and a
    cascade also each stage's own detections (``[stage][image]``; empty otherwise)."""
    heads = model.roi_heads
    has_stages = stages and hasattr(heads, "return_stages")
    if has_stages:
        heads.return_stages = True
    try:
        out = model(list(images))
    finally:
        if has_stages:
            heads.return_stages = False
    dets = [_from_torchvision(d) for d in out]
    per_stage: list[list[dict[str, torch.Tensor]]] = []
    if has_stages:
        n = len(out[0]["stages"]) if out else 0
        per_stage = [[_from_torchvision(d["stages"][t]) for d in out] for t in range(n)]
    return dets, per_stage


def warmup_multistep(total: int, *, warmup_factor: float = 1e-3) -> Any:
    """The LR multiplier per step: linear warm-up from ``warmup_factor`` over
    ``min(1000, total // 10)`` steps (torchvision's reference warms up over 1000 iterations), then
    x0.1 at :data:`MILESTONES` of ``total``."""
    warm = max(1, min(1000, total // 10))
    marks = [round(m * total) for m in MILESTONES]

    def factor(step: int) -> float:
        f = 0.1 ** sum(step >= m for m in marks)
        if step < warm:
            a = step / warm
            f *= warmup_factor * (1 - a) + a
        return f

    return factor


def build_rcnn_optimizer(
    model: nn.Module, lr: float, weight_decay: float, total_steps: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD (momentum 0.9, weight decay on every trainable parameter, as the reference) and
    :func:`warmup_multistep` over ``total_steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_multistep(max(1, total_steps)))


_CACHE: dict[str, type] = {}


def _metrics(num_classes: int) -> nn.Module:
    from attnzoo.detection.metrics import VOCMeanAP, detection_metrics

    return nn.ModuleDict(
        {"all": detection_metrics(num_classes), "ap90": VOCMeanAP(num_classes, iou_threshold=0.9)}
    )


def _scores(metrics: nn.Module) -> dict[str, Any]:
    res, ap90 = metrics["all"].compute(), metrics["ap90"].compute()
    for m in metrics.values():
        m.reset()
    return {
        "map50": float(res["map50"]),
        "map": float(res["map"]),
        "map75": float(res["map75"]),
        "map90": float(ap90["map50"]),  # VOCMeanAP names its score map50 whatever the IoU
        "per_class_ap50": [float(v) for v in res["per_class_ap50"]],
    }


def _module_class() -> type:
    """:class:`RCNNModule`, defined on first use so importing this file needs no Lightning."""
    if "module" in _CACHE:
        return _CACHE["module"]
    import lightning.pytorch as pl
    from torchmetrics import MeanMetric

    class RCNNModule(pl.LightningModule):
        """Faster / Cascade R-CNN training (summed loss dict) and AP evaluation.

        History rows: ``epoch``, ``train_loss`` and its parts (``train_loss_classifier`` ...),
        ``lr``, ``seconds``, and after an evaluation ``map50``, ``map``, ``map75``, ``map90``
        (fractions) and ``test_n``. ``run_extras``: ``per_class_ap50`` and, for a cascade,
        ``stages`` (one dict of the four scores per stage, from that stage's own detections).
        """

        def __init__(
            self, model: nn.Module, num_classes: int, cfg: Any, eval_epoch: Callable[..., bool]
        ) -> None:
            super().__init__()
            self.model = model
            self.cfg = cfg
            self.eval_epoch = eval_epoch
            self.num_classes = num_classes
            self.cascade = hasattr(model.roi_heads, "return_stages")
            self.metric = _metrics(num_classes)
            stages = model.roi_heads.num_stages if self.cascade else 0
            self.stage_metrics = nn.ModuleList(_metrics(num_classes) for _ in range(stages))
            self.train_parts = nn.ModuleDict({k: MeanMetric() for k in PARTS})
            self.history: list[dict[str, Any]] = []
            self.run_extras: dict[str, Any] = {}
            self._pending: dict[str, Any] = {}
            self._t0, self._n_test = 0.0, 0
            model.roi_heads.score_thresh = min(model.roi_heads.score_thresh, EVAL_SCORE)

        def on_train_epoch_start(self) -> None:
            self._t0 = time.perf_counter()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            images, targets = batch
            losses = self.model(list(images), rcnn_targets(targets))
            loss = sum(losses.values())
            n = images.shape[0]
            for k, v in {"loss": loss, **losses}.items():
                if k in self.train_parts:
                    self.train_parts[k].update(v.detach(), weight=n)
            self.log("train_loss", loss.detach(), on_step=True, on_epoch=False, batch_size=n)
            return loss

        def _evaluating(self) -> bool:
            return self.eval_epoch(int(self.current_epoch) + 1, self.cfg)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if not self._evaluating():
                return
            images, targets = batch
            dets, per_stage = rcnn_predict(self.model, images, stages=self.cascade)
            self.metric["all"].update(dets, targets)
            self.metric["ap90"].update(dets, targets)
            for metrics, stage_dets in zip(self.stage_metrics, per_stage):
                metrics["all"].update(stage_dets, targets)
                metrics["ap90"].update(stage_dets, targets)
            self._n_test += images.shape[0]

        def on_validation_epoch_end(self) -> None:
            if not self._evaluating():
                return
            vals = _scores(self.metric)
            self.run_extras["per_class_ap50"] = vals.pop("per_class_ap50")
            if self.cascade:
                stages = [_scores(m) for m in self.stage_metrics]
                for s in stages:
                    s.pop("per_class_ap50")
                self.run_extras["stages"] = stages
            vals["test_n"] = self._n_test
            self._n_test = 0
            self._pending = vals
            self.log("map50", vals["map50"], prog_bar=True, rank_zero_only=True)

        def on_train_epoch_end(self) -> None:
            row: dict[str, Any] = {"epoch": int(self.current_epoch) + 1}
            for k in PARTS:
                row["train_loss" if k == "loss" else f"train_{k}"] = float(
                    self.train_parts[k].compute()
                )
                self.train_parts[k].reset()
            row["lr"] = float(self.trainer.optimizers[0].param_groups[0]["lr"])
            row["seconds"] = time.perf_counter() - self._t0
            row.update(self._pending)
            self._pending = {}
            self.history.append(row)

        def configure_optimizers(self) -> Any:
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            opt, sched = build_rcnn_optimizer(self.model, self.cfg.lr, self.cfg.weight_decay, total)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    _CACHE["module"] = RCNNModule
    return RCNNModule


def build_rcnn_module(
    model: nn.Module, num_classes: int, cfg: Any, eval_epoch: Callable[..., bool]
) -> Any:
    """An :class:`RCNNModule` (LightningModule) training ``model`` (``cfg``: the task's
    ``DetectConfig``; ``num_classes`` without the background; ``eval_epoch(epoch, cfg)``: whether
    epoch ``epoch``, from 1, ends with an evaluation)."""
    return _module_class()(model, num_classes, cfg, eval_epoch)


def __getattr__(name: str) -> Any:  # ``from attnzoo.bench.tasks.detect_rcnn import RCNNModule``
    if name == "RCNNModule":
        return _module_class()
    raise AttributeError(name)
