"""``attnzoo bench --task detect``: YOLOv4-tiny with an attention neck, Faster / Cascade R-CNN
with an attention backbone, or Ultralytics YOLO models with attention, compared by mAP.

The plug-in gives the bench engine what is particular to detection:

* **models**: ``--model yolov4_tiny`` (:class:`attnzoo.detection.YoloV4Tiny`, the default), or
  the R-CNNs ``faster_rcnn_small``, ``cascade_rcnn_small``, ``faster_rcnn_resnet50_fpn``,
  ``cascade_rcnn_resnet50_fpn`` (:mod:`attnzoo.detection.rcnn`; training and evaluation in
  :mod:`attnzoo.bench.tasks.detect_rcnn`, with their own defaults when every ``--model`` is an
  R-CNN: 4 epochs, batch 8, lr 0.02, weight decay 1e-4, 240 train scenes). Several models
  (``--model faster_rcnn_small,cascade_rcnn_small``) make one arm per model and attention.
  ``yolov8n``, ``yolov8s``, ``yolo11n``, ``yolo11s`` are Ultralytics models with attention after
  the three neck outputs (needs ``attnzoo[ultralytics]``; Ultralytics' own loss, this task's
  optimiser, data and metric: :mod:`attnzoo.bench.tasks.detect_ultralytics`).
  For YOLOv4-tiny: The attentions
  ``se``, ``cbam``, ``eca`` and ``ca`` are the reference's ``phi`` variants
  (bubbliiiing/yolov4-tiny-pytorch; the ``"yolov4-tiny"`` presets in the three neck positions,
  exactly ``YoloV4Tiny(phi=k)``); keyword arguments override the preset's values
  (``cbam:reduction=4`` is the reference's CBAM with reduction 4). Any other registry module is
  inserted in the same three positions with its official defaults and the keywords given.
* **data**: ``scenes:digit`` (the default: the built-in scenes of
  :func:`attnzoo.datasets.make_digit_scenes` on ``--image-size`` canvases, every digit one class,
  among digit fragments: "find the whole digits"), ``scenes`` (the same scenes, 10 digit classes;
  harder, it needs far longer training), ``voc:/root[:split]`` (a VOC-layout folder) and
  ``coco:/ann.json:/images`` (a COCO-JSON file and its image folder); see
  :func:`load_detection_data`.
* **defaults** (chosen so that the default bench, 5 attentions x 3 seeds, runs in about 15
  minutes on 2 CPU cores and the baseline lands mid-range, mAP50 about 0.4, where modules can
  differ): 64 x 64 px, 800 train / 200 test scenes, 5 epochs, batch 16, peak lr 0.05.
* **networks** start from the reference's initialisation for training from scratch
  (``YoloV4Tiny(init="scratch")``).
* **training** (:class:`DetectModule`, a LightningModule): the YOLOv4-tiny loss
  (:class:`attnzoo.detection.loss.YoloV4TinyLoss`; its parts are logged), SGD as the reference
  trains (momentum 0.937 Nesterov, weight decay 5e-4 on conv/linear weights only) with the
  reference's warm-up + cosine schedule stepped per batch (:class:`WarmCosine`, defined for every
  step count).
* **evaluation** every ``eval_every`` epochs and after the last: ``postprocess`` with the
  reference's mAP settings (confidence 0.001, NMS IoU 0.5) and the detection metric object: VOC
  mAP@0.5 (``map50``), COCO AP (``map``) and AP75 (``map75``), all fractions; the per-class AP50 of
  the last evaluation is kept for the report.
* **report**: a panel of test images with predicted and true boxes per attention, a per-class AP
  table and EigenCAM panels per attention (:mod:`attnzoo.bench.tasks.detect_report`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnzoo.bench.tasks.base import ImageSplits, Task, TaskReport, broadcast_buffers, call_builder
from attnzoo.integrations.ultralytics import YOLO_MODELS

__all__ = [
    "DEFAULT_DETECT_ATTENTIONS",
    "DETECT_MODELS",
    "TASK",
    "DetectConfig",
    "DetectTask",
    "DetectionSplits",
    "WarmCosine",
    "build_detect_module",
    "build_detect_optimizer",
    "detect_config",
    "detect_loaders",
    "load_detection_data",
    "parse_detect_data",
    "yolov4_tiny",
]

DETECT_MODELS = (
    "yolov4_tiny",
    "faster_rcnn_small",
    "cascade_rcnn_small",
    "faster_rcnn_resnet50_fpn",
    "cascade_rcnn_resnet50_fpn",
    *YOLO_MODELS,
)
DEFAULT_DETECT_ATTENTIONS = ("none", "se", "cbam", "eca", "ca")
#: the task's defaults (chosen so that the demo's baseline lands mid-range in ~15 min on 2 cores)
DEFAULT_EPOCHS, DEFAULT_BATCH, DEFAULT_LR, DEFAULT_IMAGE_SIZE = 5, 16, 0.05, 64
DEFAULT_DATA = "scenes:digit"
PROG = "bench --task detect"


# ---------------------------------------------------------------------------------------------
# configuration
@dataclass(frozen=True)
class DetectConfig:
    """Hyperparameters of one detection run (everything that changes the numbers).

    ``lr`` is the peak learning rate actually used; the schedule decays to ``lr * min_lr_ratio``.
    The reference scales its ``Init_lr`` 1e-2 by ``batch / 64`` and clamps it to [5e-4, 5e-2]
    (2.5e-3 at batch 16, for 300 epochs from COCO weights); the default here, 0.05, is that
    clamp's upper end, for short trainings from scratch.
    """

    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH
    lr: float = DEFAULT_LR
    momentum: float = 0.937
    weight_decay: float = 5e-4
    min_lr_ratio: float = 0.01
    warmup_lr_ratio: float = 0.1
    eval_every: int = 1
    conf_threshold: float = 0.001
    nms_iou: float = 0.5
    eval_batch_size: int = 32


# ---------------------------------------------------------------------------------------------
# optimiser and schedule
class WarmCosine:
    """The reference's ``yolox_warm_cos_lr`` as a multiplier of the peak LR, per optimiser step.

    Over ``total`` steps: a quadratic warm-up from ``warmup_ratio`` to 1 over ``warmup`` steps,
    a cosine from 1 to ``min_ratio``, then ``flat`` steps at ``min_ratio``. The reference's
    lengths, in epochs, are ``min(max(0.05 E, 1), 3)`` for the warm-up and
    ``min(max(0.05 E, 1), 15)`` for the flat end (:meth:`for_epochs`). Each is cut to at most a
    third of ``total`` so that the cosine always has a span: defined for every ``total >= 1``.
    """

    def __init__(
        self,
        total: int,
        *,
        warmup: int = 0,
        flat: int = 0,
        min_ratio: float = 0.01,
        warmup_ratio: float = 0.1,
    ) -> None:
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise ValueError(f"{PROG}: the LR schedule needs total steps >= 1; got {total!r}")
        self.total = total
        self.warmup = max(0, min(int(warmup), total // 3))
        self.flat = max(0, min(int(flat), total // 3))
        self.min_ratio = float(min_ratio)
        self.warmup_ratio = float(warmup_ratio)

    @classmethod
    def for_epochs(
        cls,
        epochs: int,
        steps_per_epoch: int,
        *,
        min_ratio: float = 0.01,
        warmup_ratio: float = 0.1,
    ) -> WarmCosine:
        """The reference's warm-up and flat lengths for ``epochs`` epochs."""
        warm = min(max(0.05 * epochs, 1.0), 3.0)
        flat = min(max(0.05 * epochs, 1.0), 15.0)
        return cls(
            epochs * steps_per_epoch,
            warmup=round(warm * steps_per_epoch),
            flat=round(flat * steps_per_epoch),
            min_ratio=min_ratio,
            warmup_ratio=warmup_ratio,
        )

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.warmup_ratio + (1 - self.warmup_ratio) * (step / self.warmup) ** 2
        if step >= self.total - self.flat:
            return self.min_ratio
        span = self.total - self.warmup - self.flat
        t = (step - self.warmup) / span
        return self.min_ratio + 0.5 * (1 - self.min_ratio) * (1 + math.cos(math.pi * t))


def _decays(name: str, p: torch.Tensor) -> bool:
    # conv / linear weights; BN and other norm weights, biases and scalars have no weight decay
    return p.ndim > 1 and not name.endswith(".bias")


def build_detect_optimizer(
    model: nn.Module, cfg: DetectConfig, steps_per_epoch: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD (momentum 0.937, Nesterov, weight decay on conv/linear weights) and the
    :class:`WarmCosine` schedule of ``cfg.epochs`` epochs of ``steps_per_epoch`` steps."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if _decays(name, p) else rest).append(p)
    opt = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    shape = WarmCosine.for_epochs(
        cfg.epochs,
        max(1, steps_per_epoch),
        min_ratio=cfg.min_lr_ratio,
        warmup_ratio=cfg.warmup_lr_ratio,
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, shape)


# ---------------------------------------------------------------------------------------------
# models
def yolov4_tiny(attention: str | None = None, num_classes: int = 20, **kwargs: Any) -> nn.Module:
    """The detect task's builder: :class:`~attnzoo.detection.YoloV4Tiny` with ``attention``,
    initialised for training from scratch as the reference does (``init="scratch"``).

    ``se``/``cbam``/``eca``/``ca`` are the reference's ``phi`` variants (``YoloV4Tiny(phi=k)``;
    keywords override the preset's values); any other registry name is inserted in the same three
    neck positions with its own defaults and ``kwargs``; ``None`` is the plain detector.
    """
    from attnzoo.detection import PHI_ATTENTION, YoloV4Tiny

    phi = {c[0]: k for k, c in PHI_ATTENTION.items() if c is not None}.get(attention)
    kwargs.setdefault("init", "scratch")
    if attention is None:
        model = YoloV4Tiny(num_classes, **kwargs)
    elif phi is not None:
        model = YoloV4Tiny(num_classes, phi=phi, **kwargs)
    else:
        model = YoloV4Tiny(num_classes, attention=attention, **kwargs)
    return model


# ---------------------------------------------------------------------------------------------
# data
class DetectionSplits(ImageSplits):
    """The detect task's data (:class:`~attnzoo.bench.tasks.base.TaskData`): train and test
    :class:`~attnzoo.datasets.DetectionDataset` at ``image_size``."""

    def describe(self) -> dict[str, Any]:
        def objects(ds: Any) -> int:
            return int(sum(len(b) for b in ds.data.boxes))

        return {
            **super().describe(),
            "objects_train": objects(self.train),
            "objects_test": objects(self.test),
        }


def parse_detect_data(spec: str) -> tuple[str, list[str]]:
    """``"scenes"`` -> ``("scenes", [])``; ``"voc:/root:test"`` -> ``("voc", ["/root", "test"])``;
    ``"coco:/a.json:/images"`` -> ``("coco", ["/a.json", "/images"])``. Paths are checked."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"{PROG}: --data must be scenes, voc:/root[:split] or "
            f"coco:/annotations.json:/images; got {spec!r}"
        )
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    parts = rest.split(":") if rest else []
    if kind == "scenes":
        if parts not in ([], ["digit"]):
            raise ValueError(
                f"{PROG}: --data scenes takes no path (built-in data): scenes (10 "
                f"digit classes) or scenes:digit (one class); got {spec!r}"
            )
        return kind, parts
    if kind == "voc":
        if not 1 <= len(parts) <= 2 or not all(parts):
            raise ValueError(
                f"{PROG}: --data voc needs a folder: voc:/root or voc:/root:split; got {spec!r}"
            )
        root = Path(parts[0]).expanduser()
        if not (root / "Annotations").is_dir() or not (root / "JPEGImages").is_dir():
            raise ValueError(
                f"{PROG}: --data {spec!r}: {root} is not a VOC-layout folder "
                "(expected Annotations/ and JPEGImages/ in it)"
            )
        return kind, [str(root), *parts[1:]]
    if kind == "coco":
        if len(parts) != 2 or not all(parts):
            raise ValueError(
                f"{PROG}: --data coco needs an annotation file and an image folder: "
                f"coco:/annotations.json:/images; got {spec!r}"
            )
        ann, images = Path(parts[0]).expanduser(), Path(parts[1]).expanduser()
        if not ann.is_file():
            raise ValueError(f"{PROG}: --data {spec!r}: annotation file {ann} does not exist")
        if not images.is_dir():
            raise ValueError(f"{PROG}: --data {spec!r}: image folder {images} does not exist")
        return kind, [str(ann), str(images)]
    raise ValueError(
        f"{PROG}: unknown --data {spec!r}; give scenes (built in), voc:/root[:split] "
        "or coco:/annotations.json:/images"
    )


def _check_size(image_size: Any) -> int:
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or image_size < 32
        or (image_size % 32)
    ):
        raise ValueError(
            f"{PROG}: --image-size must be a multiple of 32 (>= 32) for the detectors; "
            f"got {image_size!r}"
        )
    return image_size


def _held_out(data: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """A seeded ``(train, test)`` partition of one split, ``fraction`` of it to test."""
    n = len(data)
    n_test = max(1, round(n * fraction))
    if n - n_test < 1:
        raise ValueError(f"{PROG}: {n} image(s) cannot be split into a train and a test set")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return data.subset(sorted(order[n_test:])), data.subset(sorted(order[:n_test]))


def _one_class(data: Any, name: str) -> Any:
    """``data`` with every object's label set to 0, the single class ``name``."""
    import dataclasses

    return dataclasses.replace(data, labels=[lab * 0 for lab in data.labels], classes=(name,))


def _take(data: Any, n: int | None, seed: int) -> Any:
    """A seeded random subset of ``n`` images (all of them when ``n`` is None or too large)."""
    if n is None or n >= len(data):
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(sorted(order[:n].tolist()))


def _voc_splits(root: Path, spec: str) -> tuple[str, str]:
    lists = root / "ImageSets" / "Main"
    train = next((s for s in ("trainval", "train") if (lists / f"{s}.txt").is_file()), None)
    test = next((s for s in ("test", "val") if (lists / f"{s}.txt").is_file()), None)
    if train is None or test is None:
        raise ValueError(
            f"{PROG}: --data {spec!r}: {lists} needs a train list (trainval.txt or "
            "train.txt) and a test list (test.txt or val.txt); or name one split "
            "(voc:/root:split) to hold out part of it"
        )
    return train, test


#: built-in scenes per split when --n-train / --n-test are not given
SCENES_N_TRAIN, SCENES_N_TEST = 800, 200
#: the built-in scenes' generator settings (``make_digit_scenes`` keywords)
SCENES: dict[str, Any] = {"objects": (1, 4), "clutter": (4, 8)}
TEST_FRACTION = 0.3


def load_detection_data(
    spec: str = "scenes",
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
) -> DetectionSplits:
    """Train/test sets for ``--data``.

    * ``scenes``: :func:`attnzoo.datasets.make_digit_scenes` on ``image_size`` canvases
      (``n_train``/``n_test`` scenes, default 600/200), disjoint source digits.
    * ``voc:/root``: train on ``trainval`` (else ``train``), test on ``test`` (else ``val``), from
      ``ImageSets/Main``; ``voc:/root:split`` reads one split and holds out a seeded 30 % of it.
    * ``coco:/ann.json:/images``: one annotation file, a seeded 30 % held out.

    Images are resized to ``image_size`` (boxes scaled alike); for real data ``n_train`` /
    ``n_test`` take seeded random subsets.
    """
    from attnzoo import datasets as ds

    image_size = _check_size(image_size)
    kind, args = parse_detect_data(spec)
    if kind == "scenes":
        nt, ne = n_train or SCENES_N_TRAIN, n_test or SCENES_N_TEST
        train, test = ds.make_digit_scenes(nt, ne, canvas=image_size, seed=seed, **SCENES)
        note = "built-in"
        if args:  # scenes:digit: every digit is one class, "digit"
            train, test = _one_class(train, "digit"), _one_class(test, "digit")
            note = "built-in, one class"
        lo, hi = SCENES["objects"]
        c_lo, c_hi = SCENES["clutter"]
        kinds = "one class, `digit`" if args else "10 classes"
        what = (
            f"built-in digit scenes (`attnzoo.datasets.make_digit_scenes`): {nt} train / "
            f"{ne} test canvases of {image_size}×{image_size} px, {lo}–{hi} digits each "
            f"({kinds}) among {c_lo}–{c_hi} digit fragments, disjoint train/test source "
            "digits"
        )
    elif kind == "voc":
        root = Path(args[0])
        if len(args) == 2:
            train, test = _held_out(ds.read_voc(root, args[1]), TEST_FRACTION, seed)
            note = f"split {args[1]}, {round(100 * TEST_FRACTION)} % held out (seed {seed})"
        else:
            tr_name, te_name = _voc_splits(root, spec)
            train = ds.read_voc(root, tr_name)
            test = ds.read_voc(root, te_name, classes=train.classes)
            note = f"train {tr_name}, test {te_name}"
        train, test = _take(train, n_train, seed), _take(test, n_test, seed + 1)
        what = f"VOC folder {root} ({note}): {len(train)} train / {len(test)} test images"
    else:
        train, test = _held_out(ds.read_coco(args[0], args[1]), TEST_FRACTION, seed)
        train, test = _take(train, n_train, seed), _take(test, n_test, seed + 1)
        note = f"{round(100 * TEST_FRACTION)} % held out (seed {seed})"
        what = f"COCO file {args[0]} ({note}): {len(train)} train / {len(test)} test images"
    if kind != "scenes":
        what += f", resized to {image_size}×{image_size}, {train.num_classes} classes"
    return DetectionSplits(
        name=spec,
        description=what,
        classes=list(train.classes),
        train=ds.DetectionDataset(train, image_size),
        test=ds.DetectionDataset(test, image_size),
        image_size=image_size,
        note=note,
    )


def detect_loaders(
    splits: DetectionSplits,
    cfg: DetectConfig,
    *,
    seed: int,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> tuple[Any, Any]:
    """Train loader (order a pure function of ``(seed, epoch)``, sharded over DDP ranks) and the
    test loader (every image once over the ranks), batches of images and box lists."""
    from attnzoo.bench.data import seeded_loaders
    from attnzoo.datasets import collate_detection

    return seeded_loaders(
        splits.train,
        splits.test,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        collate_fn=collate_detection,
    )


# ---------------------------------------------------------------------------------------------
# the LightningModule
_CACHE: dict[str, type] = {}

PARTS = ("loss", "box", "obj", "cls")


def is_eval_epoch(epoch: int, cfg: DetectConfig) -> bool:
    """Whether epoch ``epoch`` (from 1) ends with an evaluation: every ``eval_every`` epochs
    and always the last."""
    return epoch % cfg.eval_every == 0 or epoch == cfg.epochs


def _module_class() -> type:
    """:class:`DetectModule`, defined on first use so importing this file needs no Lightning."""
    if "module" in _CACHE:
        return _CACHE["module"]
    import lightning.pytorch as pl
    from torchmetrics import MeanMetric, SumMetric

    from attnzoo.detection.decode import postprocess
    from attnzoo.detection.loss import YoloV4TinyLoss
    from attnzoo.detection.metrics import detection_metrics

    class DetectModule(pl.LightningModule):
        """YOLOv4-tiny training and mAP evaluation of ``model``.

        One history row per epoch: ``epoch``, ``train_loss`` and its parts ``train_box``,
        ``train_obj``, ``train_cls`` (means over the epoch's batches), ``lr``, ``seconds`` and,
        after an evaluation, ``test_loss``, ``map50``, ``map``, ``map75`` (fractions) and
        ``test_n``. ``run_extras["per_class_ap50"]``: the last evaluation's AP50 per class.
        """

        def __init__(self, model: nn.Module, num_classes: int, cfg: DetectConfig) -> None:
            super().__init__()
            self.model = model
            self.cfg = cfg
            self.criterion = YoloV4TinyLoss(num_classes)
            self.metric = detection_metrics(num_classes)
            self.train_parts = nn.ModuleDict({k: MeanMetric() for k in self.parts})
            self.val_loss = MeanMetric()
            self.val_count = SumMetric()
            self.history: list[dict[str, Any]] = []
            self.run_extras: dict[str, Any] = {}
            self._pending: dict[str, Any] = {}
            self._t0 = 0.0

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.model(x)

        #: the loss parts logged per epoch (``train_<part>``)
        parts: tuple[str, ...] = PARTS

        def losses(self, images: torch.Tensor, targets: Any, outputs: Any = None) -> Any:
            """The loss and its :attr:`parts` (``outputs``: the model's, if already computed)."""
            return self.criterion(self.model(images) if outputs is None else outputs, targets)

        def detections(self, images: torch.Tensor, outputs: Any) -> list[dict[str, torch.Tensor]]:
            """Detections of the eval-mode ``outputs`` at the evaluation's thresholds."""
            return postprocess(
                outputs,
                tuple(images.shape[-2:]),
                conf_threshold=self.cfg.conf_threshold,
                nms_iou=self.cfg.nms_iou,
            )

        def on_train_epoch_start(self) -> None:
            self._t0 = time.perf_counter()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            images, targets = batch
            out = self.losses(images, targets)
            n = images.shape[0]
            for k in self.parts:
                self.train_parts[k].update(out[k].detach(), weight=n)
            self.log_dict(
                {f"train_{k}": out[k].detach() for k in self.parts},
                on_step=True,
                on_epoch=False,
                batch_size=n,
            )
            return out["loss"]

        def _evaluating(self) -> bool:
            return is_eval_epoch(int(self.current_epoch) + 1, self.cfg)

        def on_validation_epoch_start(self) -> None:
            broadcast_buffers(self.model)  # evaluate what the checkpoint stores

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if not self._evaluating():
                return
            images, targets = batch
            outputs = self.model(images)
            n = images.shape[0]
            self.val_loss.update(self.losses(images, targets, outputs)["loss"], weight=n)
            self.val_count.update(torch.tensor(float(n), device=images.device))
            self.metric.update(self.detections(images, outputs), targets)

        def on_validation_epoch_end(self) -> None:
            if not self._evaluating():
                return
            res = self.metric.compute()  # torchmetrics gathers the states of all DDP ranks
            vals = {
                "test_loss": float(self.val_loss.compute()),
                "map50": float(res["map50"]),
                "map": float(res["map"]),
                "map75": float(res["map75"]),
                "test_n": int(self.val_count.compute()),
            }
            self.run_extras["per_class_ap50"] = [float(v) for v in res["per_class_ap50"]]
            for m in (self.metric, self.val_loss, self.val_count):
                m.reset()
            self._pending = vals
            self.log("map50", vals["map50"], prog_bar=True, rank_zero_only=True)

        def on_train_epoch_end(self) -> None:
            row: dict[str, Any] = {"epoch": int(self.current_epoch) + 1}
            for k in self.parts:
                row[f"train_{k}"] = float(self.train_parts[k].compute())
                self.train_parts[k].reset()
            row["lr"] = float(self.trainer.optimizers[0].param_groups[0]["lr"])
            row["seconds"] = time.perf_counter() - self._t0
            row.update(self._pending)
            self._pending = {}
            self.history.append(row)

        def configure_optimizers(self) -> Any:
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            opt, sched = build_detect_optimizer(
                self.model, self.cfg, max(1, total // self.cfg.epochs)
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    _CACHE["module"] = DetectModule
    return DetectModule


def _ultralytics_module_class() -> type:
    """:class:`UltralyticsModule`, defined on first use (as :class:`DetectModule`)."""
    if "ultralytics" in _CACHE:
        return _CACHE["ultralytics"]
    from attnzoo.bench.tasks.detect_ultralytics import PARTS as ULTRALYTICS_PARTS

    class UltralyticsModule(_module_class()):  # type: ignore[misc]
        """:class:`DetectModule` for an Ultralytics model
        (:class:`attnzoo.integrations.ultralytics.UltralyticsDetector`): its own loss, per
        image (parts ``box``, ``cls``, ``dfl``), and its own detections."""

        parts = ULTRALYTICS_PARTS

        def losses(self, images: torch.Tensor, targets: Any, outputs: Any = None) -> Any:
            return self.model.loss(images, targets, outputs)

        def detections(self, images: torch.Tensor, outputs: Any) -> list[dict[str, torch.Tensor]]:
            return self.model.predict(
                images,
                conf_threshold=self.cfg.conf_threshold,
                nms_iou=self.cfg.nms_iou,
                output=outputs,
            )

    _CACHE["ultralytics"] = UltralyticsModule
    return UltralyticsModule


def build_ultralytics_module(model: nn.Module, num_classes: int, cfg: DetectConfig) -> Any:
    """An :class:`UltralyticsModule` (LightningModule) training the Ultralytics ``model``."""
    return _ultralytics_module_class()(model, num_classes, cfg)


def build_detect_module(model: nn.Module, num_classes: int, cfg: DetectConfig) -> Any:
    """A :class:`DetectModule` (LightningModule) training ``model``."""
    return _module_class()(model, num_classes, cfg)


def __getattr__(name: str) -> Any:  # ``from attnzoo.bench.tasks.detect import DetectModule``
    if name == "DetectModule":
        return _module_class()
    if name == "UltralyticsModule":
        return _ultralytics_module_class()
    raise AttributeError(name)


# ---------------------------------------------------------------------------------------------
# report
def _panel_models(plan: Sequence[Any]) -> dict[str, nn.Module]:
    """label -> the trained network of its first seed's run."""
    from attnzoo.bench.checkpoints import load_run_model

    first = min(run.seed for run in plan)
    return {run.spec.label: load_run_model(run.run_dir)[0] for run in plan if run.seed == first}


def _per_class_section(result: Any, data: DetectionSplits) -> Any:
    from attnzoo.bench.report import Section, Table, Text
    from attnzoo.bench.tasks.detect_report import per_class_table

    per_class: dict[str, list[list[float]]] = {}
    for r in result.runs:
        if r.get("per_class_ap50") is not None:
            per_class.setdefault(r["attention"], []).append(r["per_class_ap50"])
    if not per_class:
        return Section("Per-class AP50", [Text("Not available: no run recorded its per-class AP.")])
    headers, rows = per_class_table(per_class, data.classes)
    return Section(
        "Per-class AP50",
        [
            Table(
                headers,
                rows,
                (
                    "VOC all-point AP@0.5 per class (%), mean over the seeds, after the last "
                    "epoch. A class "
                    "without test objects has no AP (nan)."
                ),
            )
        ],
        collapsed=data.num_classes > 20,
    )


def _panel_sections(data: DetectionSplits, config: Any, plan: Sequence[Any]) -> list[Any]:
    from attnzoo.bench.report import Figure, Section, Text
    from attnzoo.bench.tasks.detect_report import plot_box_panel, plot_cam_panel
    from attnzoo.datasets import collate_detection
    from attnzoo.detection.decode import postprocess

    n = min(int(config.panel_images), len(data.test))
    if not n or not plan:
        return []
    images, targets = collate_detection([data.test[i] for i in range(n)])
    models = _panel_models(plan)
    seed = min(run.seed for run in plan)
    from attnzoo.bench.tasks.detect_rcnn import is_rcnn, rcnn_predict
    from attnzoo.bench.tasks.detect_ultralytics import is_ultralytics

    preds = {}
    with torch.no_grad():
        for label, model in models.items():
            if is_rcnn(model):  # its own NMS (0.5) and score threshold
                preds[label] = rcnn_predict(model, images)[0]
                continue
            if is_ultralytics(model):
                preds[label] = model.predict(
                    images, conf_threshold=PANEL_CONFIDENCE, nms_iou=PANEL_NMS
                )
                continue
            preds[label] = postprocess(
                model(images),
                tuple(images.shape[-2:]),
                conf_threshold=PANEL_CONFIDENCE,
                nms_iou=PANEL_NMS,
            )
    sections = [
        Section(
            "Detections",
            [
                Figure(
                    "detections.png",
                    plot_box_panel(
                        images, targets, preds, data.classes, score_threshold=PANEL_CONFIDENCE
                    ),
                    (
                        f"The first {n} test images; one row per attention (seed {seed}). Green "
                        "dashed: the "
                        f"true boxes; red: the detections with score >= {PANEL_CONFIDENCE} after "
                        "NMS at IoU "
                        f"{PANEL_NMS}, with class and score"
                        + (
                            " (R-CNN rows: after the model's own per-class NMS at IoU 0.5)."
                            if any(is_rcnn(m) for m in models.values())
                            else "."
                        )
                    ),
                )
            ],
        )
    ]
    if not config.localise:
        return sections
    try:
        from attnzoo.viz import detector_cam
    except ImportError:
        sections.append(
            Section(
                "Class activation maps",
                [Text("Not available: this installation has no `attnzoo.viz.detector_cam`.")],
            )
        )
        return sections
    models = {label: m for label, m in models.items() if not (is_rcnn(m) or is_ultralytics(m))}
    if not models:  # EigenCAM panels are for the YOLOv4-tiny detectors
        return sections
    try:
        cams = {
            label: detector_cam(model, images, method="eigencam") for label, model in models.items()
        }
    except (ImportError, ModuleNotFoundError) as err:
        sections.append(
            Section(
                "Class activation maps",
                [Text(f'Not available: {err} (`pip install "attnzoo[viz]"`).')],
            )
        )
        return sections
    sections.append(
        Section(
            "Class activation maps",
            [
                Figure(
                    "detection_cams.png",
                    plot_cam_panel(images, cams),
                    f"EigenCAM of each attention's detector (seed {seed}) on the same images: "
                    "the first principal component of the activations of the last neck layers, "
                    "gradient-"
                    "free; where the network's features respond, not a per-box explanation.",
                )
            ],
        )
    )
    return sections


#: score threshold and NMS IoU of the report's detection panel (NMS IoU as the reference's
#: predict.py; a lower score threshold than its 0.5, so that short trainings show their boxes)
PANEL_CONFIDENCE, PANEL_NMS = 0.3, 0.3

HOW_TO_READ = (
    "- **mAP50** (the primary metric): PASCAL VOC all-point AP at IoU 0.5, averaged over the "
    "classes (the reference's `get_map.py` numbers); **COCO AP** averages AP over IoU "
    "0.50:0.95 and **AP75** takes IoU 0.75: both reward tighter boxes. All are computed on the "
    "test images after the last epoch, from detections at confidence >= 0.001 after NMS at "
    "IoU 0.5.\n"
    "- A detector that has not converged (mAP50 near 0) says nothing about the modules: train "
    "longer (`--epochs`) or on more images (`--n-train`)."
)


# ---------------------------------------------------------------------------------------------
def _families(model: Any) -> set[str]:
    """The model families of ``--model`` (one model or several): ``"yolo"`` (YOLOv4-tiny or a
    custom builder), ``"rcnn"``, ``"ultralytics"``."""
    from attnzoo.bench.engine import split_models
    from attnzoo.bench.tasks.detect_rcnn import RCNN_MODELS, is_rcnn
    from attnzoo.bench.tasks.detect_ultralytics import is_ultralytics

    def family(m: Any) -> str:
        name = m.strip().lower() if isinstance(m, str) else None
        if name in RCNN_MODELS or (callable(m) and is_rcnn(m)):
            return "rcnn"
        if name in YOLO_MODELS or (callable(m) and is_ultralytics(m)):
            return "ultralytics"
        return "yolo"

    return {family(m) for m in split_models(model)}


RCNN_HOW_TO_READ = (
    "- **R-CNN arms**: detections at score >= 0.001 after the model's own per-class NMS "
    "(IoU 0.5), up to `box_detections_per_img`; **AP90** is the VOC all-point AP at IoU 0.9, the "
    "strictest localisation score. Cascade R-CNN's claim (Cai & Vasconcelos, CVPR 2018) is "
    "higher AP75/AP90 at a similar AP50 than Faster R-CNN on the same backbone; the per-stage "
    "table shows whether later stages (trained at IoU 0.6 and 0.7) localise better."
)


def _rcnn_sections(result: Any) -> list[Any]:
    from attnzoo.bench.report import Section, Table
    from attnzoo.bench.tasks.detect_report import paired_ap_table, stage_table

    labels = [s["attention"] for s in result.summary]
    headers, rows = paired_ap_table(result.runs, labels, result.baseline)
    sections = [
        Section(
            "AP at every IoU, with paired differences",
            [
                Table(
                    headers,
                    rows,
                    "Mean ± std over the seeds (%); Δ: the mean per-seed difference to the "
                    "baseline in points with its 95 % CI (t over the shared seeds). AP50, AP90: "
                    "VOC all-point; AP, AP75: COCO.",
                )
            ],
        )
    ]
    headers, rows = stage_table(result.runs)
    if rows:
        sections.append(
            Section(
                "Cascade stages",
                [
                    Table(
                        headers,
                        rows,
                        "Each stage's own detections (its classifier's scores on its input boxes, "
                        "its regressed boxes) vs the cascade's output (scores averaged over the "
                        "stages, last stage's boxes); mean ± std over the seeds (%).",
                    )
                ],
            )
        )
    return sections


def detect_config(config: Any) -> DetectConfig:
    """The :class:`DetectConfig` of a validated ``BenchConfig``."""
    return DetectConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=float(config.lr),
        weight_decay=float(config.weight_decay),
        eval_every=int(config.options.get("eval_every", 1)),
    )


class DetectTask(Task):
    """Object detection with YOLOv4-tiny (see the module docstring)."""

    name = "detect"
    metric = "map50"
    metric_label = "mAP50 %"
    secondary = ("map", "map75", "map90")
    defaults = {
        "attention": DEFAULT_DETECT_ATTENTIONS,
        "model": "yolov4_tiny",
        "data": DEFAULT_DATA,
        "epochs": DEFAULT_EPOCHS,
        "batch_size": DEFAULT_BATCH,
        "lr": DEFAULT_LR,
        "weight_decay": 5e-4,
        "image_size": DEFAULT_IMAGE_SIZE,
    }
    options = {"eval_every": 1}
    columns = (("COCO AP %", "map"), ("AP75 %", "map75"), ("AP90 (VOC) %", "map90"))
    csv_columns = ("map", "map75", "test_n")

    # ---- validation
    def check_config(self, config: Any) -> None:
        _check_size(config.image_size)
        k = config.options.get("eval_every")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(
                f"{PROG}: option eval_every must be an integer >= 1 (evaluate every "
                f"k epochs and after the last); got {k!r}"
            )

    def check_data(self, config: Any) -> None:
        parse_detect_data(config.data)

    def check_schedule(self, config: Any, steps_per_epoch: int) -> None:
        cfg = detect_config(config)
        shape = WarmCosine.for_epochs(
            cfg.epochs,
            max(1, steps_per_epoch),
            min_ratio=cfg.min_lr_ratio,
            warmup_ratio=cfg.warmup_lr_ratio,
        )
        bad = [i for i in range(shape.total) if not 0 <= shape(i) <= 1 or math.isnan(shape(i))]
        if bad:
            raise ValueError(
                f"{PROG}: the LR schedule is not defined at step {bad[0]} of "
                f"{shape.total}; change --epochs or --batch-size"
            )

    # ---- data and models
    def defaults_for(self, model: Any) -> dict[str, Any]:
        """The YOLOv4-tiny defaults, or the R-CNN ones when every model listed is an R-CNN."""
        from attnzoo.bench.engine import split_models
        from attnzoo.bench.tasks.detect_rcnn import RCNN_DEFAULTS, RCNN_MODELS

        names = [] if model is None else split_models(model)
        rcnn = bool(names) and all(
            isinstance(n, str) and n.strip().lower() in RCNN_MODELS for n in names
        )
        return {**self.defaults, **RCNN_DEFAULTS} if rcnn else dict(self.defaults)

    def resolve_model(self, model: Any) -> tuple[str, Any]:
        if callable(model):
            return getattr(model, "__name__", "custom"), model
        name = model.strip().lower() if isinstance(model, str) else model
        if name not in DETECT_MODELS:
            raise ValueError(
                f"{PROG}: unknown --model {model!r}; detection models: {', '.join(DETECT_MODELS)}"
            )
        if name == "yolov4_tiny":
            return name, yolov4_tiny
        if name in YOLO_MODELS:
            from attnzoo.bench.tasks.detect_ultralytics import ultralytics_builder

            return name, ultralytics_builder(name)
        from attnzoo.bench.tasks.detect_rcnn import rcnn_builder

        return name, rcnn_builder(name)

    def load_data(self, config: Any) -> DetectionSplits:
        return load_detection_data(
            config.data,
            image_size=config.image_size,
            n_train=config.n_train,
            n_test=config.n_test,
            seed=config.data_seed,
        )

    def build_model(self, builder: Any, spec: Any, data: Any, config: Any) -> nn.Module:
        from attnzoo.bench.tasks.detect_rcnn import is_rcnn, rcnn_predict
        from attnzoo.bench.tasks.detect_ultralytics import is_ultralytics

        if is_rcnn(builder):
            model = call_builder(builder, spec, num_classes=data.num_classes + 1, keep_size=True)
            with torch.no_grad():
                dets, _ = rcnn_predict(model.eval(), data.test[0][0][None])
            if len(dets) != 1 or set(dets[0]) != {"boxes", "scores", "labels"}:
                raise ValueError("its evaluation forward does not return detection dicts")
            return model.train()
        model = call_builder(builder, spec, num_classes=data.num_classes)
        if is_ultralytics(model):
            with torch.no_grad():
                dets = model.eval().predict(data.test[0][0][None])
            if len(dets) != 1 or set(dets[0]) != {"boxes", "scores", "labels"}:
                raise ValueError("its predict() does not return detection dicts")
            return model.train()
        images, _ = data.test[0]
        with torch.no_grad():
            out = model.eval()(images[None])
        want = 3 * (5 + data.num_classes)
        size = data.image_size
        shapes = [tuple(o.shape) for o in out] if isinstance(out, (tuple, list)) else None
        if shapes != [(1, want, size // 32, size // 32), (1, want, size // 16, size // 16)]:
            raise ValueError(
                f"it returns {shapes or type(out).__name__}, expected two head maps "
                f"(1, {want}, {size // 32}, {size // 32}) and "
                f"(1, {want}, {size // 16}, {size // 16})"
            )
        return model.train()

    def input_shape(self, data: Any, config: Any) -> tuple[int, ...]:
        return (3, data.image_size, data.image_size)

    def model_for_run(self, builder: Any, spec: Any, meta: Any) -> nn.Module:
        from attnzoo.bench.tasks.detect_rcnn import is_rcnn

        if is_rcnn(builder):
            return call_builder(builder, spec, num_classes=meta["num_classes"] + 1, keep_size=True)
        return call_builder(builder, spec, num_classes=meta["num_classes"])

    def run_settings(self, config: Any) -> dict[str, Any]:
        cfg = detect_config(config)
        if _families(config.model) == {"rcnn"}:
            from attnzoo.bench.tasks.detect_rcnn import EVAL_SCORE, MOMENTUM

            return {
                "momentum": MOMENTUM,
                "schedule": "linear warm-up + steps x0.1 at 16/26, 22/26 (torchvision reference)",
                "eval_every": cfg.eval_every,
                "conf_threshold": EVAL_SCORE,
                "nms_iou": 0.5,
            }
        return {
            "momentum": cfg.momentum,
            "schedule": "warm-up + cosine (YOLOX warm cos)",
            "eval_every": cfg.eval_every,
            "conf_threshold": cfg.conf_threshold,
            "nms_iou": cfg.nms_iou,
        }

    # ---- training
    def make_module(self, model: nn.Module, data: Any, config: Any) -> Any:
        from attnzoo.bench.tasks.detect_rcnn import build_rcnn_module, is_rcnn
        from attnzoo.bench.tasks.detect_ultralytics import is_ultralytics

        if is_rcnn(model):
            return build_rcnn_module(model, data.num_classes, detect_config(config), is_eval_epoch)
        if is_ultralytics(model):
            return build_ultralytics_module(model, data.num_classes, detect_config(config))
        return build_detect_module(model, data.num_classes, detect_config(config))

    def make_loaders(self, data: Any, config: Any, *, seed: int) -> tuple[Any, Any]:
        return detect_loaders(
            data, detect_config(config), seed=seed, num_workers=config.num_workers
        )

    def final_row(self, history: Sequence[dict[str, Any]], module: Any) -> dict[str, Any]:
        last = history[-1]
        if "map90" in last:  # an R-CNN
            keep = ("map50", "map", "map75", "map90", "test_n")
            row = {k: last[k] for k in (*keep, *(k for k in last if k.startswith("train_")))}
            row["per_class_ap50"] = module.run_extras.get("per_class_ap50")
            if "stages" in module.run_extras:
                row["stages"] = module.run_extras["stages"]
            return row
        row = {
            k: last[k]
            for k in (
                "map50",
                "map",
                "map75",
                "test_loss",
                "test_n",
                *(k for k in last if k.startswith("train_")),
            )
        }
        row["per_class_ap50"] = module.run_extras.get("per_class_ap50")
        return row

    # ---- report
    def report(self, result: Any, data: Any, config: Any, plan: Sequence[Any]) -> TaskReport:
        c = result.config
        seeds = sorted({r["seed"] for r in result.runs})
        families = _families(config.model)
        if families == {"rcnn"}:
            training = (
                f"SGD (momentum 0.9) with a linear warm-up and steps x0.1 at 16/26 and 22/26 of "
                f"the steps (torchvision's detection reference), lr {c['lr']}, weight decay "
                f"{c['weight_decay']}"
            )
        else:
            training = (
                f"SGD (Nesterov, momentum 0.937) with a warm-up + cosine schedule peaking at lr "
                f"{c['lr']}, weight decay {c['weight_decay']} on conv weights"
                + (
                    "; the R-CNNs with their own optimiser, SGD momentum 0.9, same lr"
                    if "rcnn" in families
                    else ""
                )
                + (
                    "; the Ultralytics models with their own loss (per image) and this optimiser"
                    if "ultralytics" in families
                    else ""
                )
            )
        setup = (
            f"{c['model']} on {data.description}. {c['epochs']} epochs, batch "
            f"{c['batch_size']}, {training}; mAP after the last epoch; seeds "
            f"{', '.join(map(str, seeds))}."
        )
        rcnn = "rcnn" in families
        run_columns = [("COCO AP %", "map"), ("AP75 %", "map75")]
        return TaskReport(
            setup=setup,
            run_columns=run_columns + ([("AP90 %", "map90")] if rcnn else []),
            how_to_read=HOW_TO_READ + ("\n" + RCNN_HOW_TO_READ if rcnn else ""),
            sections=[
                *(_rcnn_sections(result) if rcnn else []),
                *([_per_class_section(result, data)] if data.num_classes > 1 else []),
                *_panel_sections(data, config, plan),
            ],
        )


TASK = DetectTask()
