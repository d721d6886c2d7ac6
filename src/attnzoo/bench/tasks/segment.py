"""``attnzoo bench --task segment``: DANet heads compared by mIoU on the bench engine.

The plug-in gives the bench engine what is particular to semantic segmentation:

* **models**: ``--model danet_small`` (the default: a CPU-sized dilated ResNet-18-style DANet),
  ``danet_resnet50`` or ``danet_resnet101`` (:data:`attnzoo.segmentation.SEGMENTATION_MODELS`,
  with ``:key=value`` builder arguments). The arms are the heads: ``none`` is the FCN head (the
  baseline), ``pam`` / ``cam`` one attention branch (the paper's ablation), ``dual_attention``
  the official DANet head, and any other registry module (``nonlocal2d``, ``cbam:reduction=8``)
  sits in the attention slot of a single branch, with its keyword arguments.
* **data** (:func:`load_segmentation_data`): ``scenes:digit`` (the default) is the built-in
  digit scenes' semantic masks with every digit one class (background + ``digit``: "find the
  whole digits among digit fragments"), ``scenes`` the same scenes with the 10 digit classes
  (11 classes; harder, it needs far longer training), as for the detect task;
  ``masks:IMAGES_DIR:MASKS_DIR`` or ``masks:ROOT`` (``ROOT/images`` + ``ROOT/masks``) is a mask
  folder pair (masks matched to images by file stem; PNGs of class indices or VOC palette PNGs;
  255 = ignore) with a seeded 30 % held out; ``voc:ROOT`` is a VOC2012-style folder
  (``JPEGImages``, ``SegmentationClass``, ``ImageSets/Segmentation/{train,val}.txt``) and
  ``cityscapes:ROOT`` a Cityscapes folder (``leftImg8bit/{train,val}``,
  ``gtFine/{train,val}/*_labelTrainIds.png``). Everything is resized to ``--image-size``.
* **training** (:class:`SegmentModule`): :class:`attnzoo.segmentation.SegmentationLoss` with the
  network's preset (official: cross-entropy on the fused, PAM and CAM outputs, weights 1/1/1;
  ``ignore_index=255``) and the official code's poly schedule (``lr * (1 - step / total) **
  0.9``, per step). Optimiser (task option ``optimizer``): ``adamw`` (the default: on the
  built-in scenes, trained from scratch for a few epochs, it reaches a clearly higher mIoU than
  SGD) or ``sgd``, the official recipe (momentum 0.9; use it with ``--lr 0.01 --weight-decay
  1e-4`` as the official code).
* **metric**: ``miou`` (primary), the dataset mIoU from ONE confusion matrix accumulated over
  the whole test set (:class:`attnzoo.segmentation.SegmentationMetrics`), and ``pixel_acc``;
  fractions, after the last epoch. Classes absent from both the truth and the predictions of
  the test set are left out of the mean.
* **report** (:mod:`attnzoo.bench.tasks.segment_report`): per-class IoU per head, prediction
  panels (image | truth | prediction of each head) and the position-attention map of a query
  pixel (task option ``query="fy,fx"``, fractions of the image height and width) for every head
  with a pixel-pair module (PAM, DANet, non-local ...).

Task options (``options={...}`` of :func:`attnzoo.bench.run`): ``query`` (default
``"0.5,0.5"``), ``optimizer`` (``"adamw"``, the default, or ``"sgd"``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attnzoo.bench.tasks.base import ImageSplits, Task, TaskReport, broadcast_buffers
from attnzoo.specs import BASELINE

__all__ = [
    "DEFAULT_SEGMENT_ATTENTIONS",
    "TASK",
    "SegmentConfig",
    "SegmentTask",
    "SegmentationSplits",
    "build_segment_module",
    "build_segment_optimizer",
    "load_segmentation_data",
    "parse_query",
    "parse_segment_data",
    "poly_lambda",
    "segment_config",
    "segment_loaders",
    "segment_model",
]

PROG = "bench --task segment"
DEFAULT_SEGMENT_ATTENTIONS = ("none", "pam", "cam", "dual_attention")
DEFAULT_MODEL = "danet_small"
DEFAULT_DATA = "scenes:digit"
#: the task's defaults (the FCN baseline lands mid-range and ``make demo-segment``, 4 heads x
#: 3 seeds, runs in about 15 minutes on 2 CPU cores): AdamW, which learns these short CPU
#: trainings from scratch clearly faster than the official SGD (see docs/segmentation.md)
DEFAULT_EPOCHS, DEFAULT_BATCH, DEFAULT_LR, DEFAULT_IMAGE_SIZE = 5, 16, 3e-3, 64
DEFAULT_WEIGHT_DECAY, DEFAULT_OPTIMIZER = 0.01, "adamw"
#: built-in scenes per split when --n-train / --n-test are not given
SCENES_N_TRAIN, SCENES_N_TEST = 500, 200
#: the built-in scenes' generator settings (``make_digit_scenes`` keywords): 24-40 px digits
SCENES: dict[str, Any] = {"objects": (1, 3), "scales": (3, 5), "clutter": (4, 8)}
TEST_FRACTION = 0.3
OPTIMIZERS = ("sgd", "adamw")
IGNORE_INDEX = 255


# ---------------------------------------------------------------------------------------------
# configuration
@dataclass(frozen=True)
class SegmentConfig:
    """Hyperparameters of one segmentation run (everything that changes the numbers).

    SGD with momentum 0.9 and the poly schedule of power 0.9 are the official DANet code's
    (junfu1115/DANet, ``encoding/utils/lr_scheduler.py``; lr 0.01, weight decay 1e-4 there);
    the bench defaults to AdamW with the same schedule (see the module docstring).
    """

    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH
    lr: float = DEFAULT_LR
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    optimizer: str = DEFAULT_OPTIMIZER
    momentum: float = 0.9
    power: float = 0.9
    eval_batch_size: int = 32


def segment_config(config: Any) -> SegmentConfig:
    """The :class:`SegmentConfig` of a validated ``BenchConfig``."""
    return SegmentConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=float(config.lr),
        weight_decay=float(config.weight_decay),
        optimizer=str(config.options.get("optimizer", DEFAULT_OPTIMIZER)).lower(),
    )


def parse_query(query: Any) -> tuple[float, float]:
    """``"0.5,0.25"`` or ``(0.5, 0.25)`` -> ``(fy, fx)``: the query pixel of the attention-map
    figure as fractions of the image height and width, each in ``[0, 1]``."""
    parts: Any = query.split(",") if isinstance(query, str) else query
    try:
        if isinstance(query, bool) or len(parts) != 2:
            raise ValueError
        fy, fx = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(
            f"{PROG}: option query must be 'fy,fx', the query pixel as fractions of the image "
            f"height and width (e.g. '0.5,0.5'); got {query!r}"
        ) from None
    if not (0.0 <= fy <= 1.0 and 0.0 <= fx <= 1.0):
        raise ValueError(
            f"{PROG}: option query must hold fractions in [0, 1] (fy,fx); got {query!r}"
        )
    return fy, fx


# ---------------------------------------------------------------------------------------------
# optimiser and schedule
def poly_lambda(total: int, power: float = 0.9) -> Any:
    """The poly schedule as a multiplier of the base LR at step ``i``:
    ``(1 - i / total) ** power``, defined for every ``total >= 1``."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"{PROG}: the LR schedule needs total steps >= 1; got {total!r}")

    def shape(step: int) -> float:
        return max(0.0, 1.0 - min(step, total) / total) ** power

    return shape


def build_segment_optimizer(
    model: nn.Module, cfg: SegmentConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD (momentum 0.9, weight decay on every parameter, as the official code) or AdamW,
    and the poly schedule over ``total_steps`` optimiser steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, poly_lambda(total_steps, cfg.power))


# ---------------------------------------------------------------------------------------------
# models
def _builders() -> dict[str, Any]:
    from attnzoo.segmentation import SEGMENTATION_MODELS

    return SEGMENTATION_MODELS


def segment_model(builder: Any, spec: Any, num_classes: int) -> nn.Module:
    """``builder(num_classes, attention=...)`` for the arm ``spec``: ``none`` is the FCN head
    (``attention=None``); a registry name's keyword arguments go to the module
    (``attention_kwargs``)."""
    if spec.name == BASELINE:
        return builder(num_classes=num_classes, attention=None)
    kwargs = dict(spec.kwargs)
    if kwargs:
        return builder(num_classes=num_classes, attention=spec.name, attention_kwargs=kwargs)
    return builder(num_classes=num_classes, attention=spec.name)


# ---------------------------------------------------------------------------------------------
# data
class SegmentationSplits(ImageSplits):
    """The segment task's data (:class:`~attnzoo.bench.tasks.base.TaskData`): train and test
    :class:`~attnzoo.datasets.masks.SegmentationDataset` at ``image_size``."""


_DATA_HELP = (
    "scenes:digit or scenes (built in), masks:IMAGES_DIR:MASKS_DIR, masks:ROOT (ROOT/images + "
    "ROOT/masks), voc:ROOT (VOC2012 layout) or cityscapes:ROOT"
)


def _folder(spec: str, path: str, what: str) -> str:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"{PROG}: --data {spec!r}: {what} {p} is not a folder")
    return str(p)


def parse_segment_data(spec: Any) -> tuple[str, list[str]]:
    """``--data`` -> ``(kind, paths)`` with the folders checked: ``("scenes", [])``,
    ``("masks", [images, masks])``, ``("voc", [root])``, ``("cityscapes", [root])``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{PROG}: --data must be {_DATA_HELP}; got {spec!r}")
    kind, _, rest = spec.strip().partition(":")
    kind, parts = kind.lower(), (rest.split(":") if rest else [])
    if kind == "scenes":
        if parts not in ([], ["digit"]):
            raise ValueError(
                f"{PROG}: --data scenes takes no path (built-in data): scenes:digit (background "
                f"+ digit) or scenes (background + 10 digit classes); got {spec!r}"
            )
        return kind, parts
    if kind == "masks":
        if len(parts) == 1 and parts[0]:
            root = Path(_folder(spec, parts[0], "folder"))
            parts = [str(root / "images"), str(root / "masks")]
            for p, what in zip(parts, ("image folder", "mask folder")):
                if not Path(p).is_dir():
                    raise ValueError(
                        f"{PROG}: --data {spec!r}: {root} has no {Path(p).name}/ sub-folder "
                        f"({what}); give masks:ROOT with ROOT/images and ROOT/masks, or "
                        "masks:IMAGES_DIR:MASKS_DIR"
                    )
            return kind, parts
        if len(parts) != 2 or not all(parts):
            raise ValueError(
                f"{PROG}: --data masks needs masks:IMAGES_DIR:MASKS_DIR or masks:ROOT; got {spec!r}"
            )
        return kind, [
            _folder(spec, parts[0], "image folder"),
            _folder(spec, parts[1], "mask folder"),
        ]
    if kind in ("voc", "cityscapes"):
        if len(parts) != 1 or not parts[0]:
            raise ValueError(f"{PROG}: --data {kind} needs one folder: {kind}:ROOT; got {spec!r}")
        root = Path(_folder(spec, parts[0], "folder"))
        need = (
            ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")
            if kind == "voc"
            else ("leftImg8bit", "gtFine")
        )
        missing = [n for n in need if not (root / n).is_dir()]
        if missing:
            raise ValueError(
                f"{PROG}: --data {spec!r}: {root} is not a {kind} folder "
                f"(missing {', '.join(m + '/' for m in missing)})"
            )
        return kind, [str(root)]
    raise ValueError(f"{PROG}: unknown --data {spec!r}; give {_DATA_HELP}")


def _check_size(image_size: Any) -> int:
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or image_size < 32
        or image_size % 8
    ):
        raise ValueError(
            f"{PROG}: --image-size must be a multiple of 8 (>= 32; output stride 8); "
            f"got {image_size!r}"
        )
    return image_size


def _seeded_split(keys: list[str], n_test: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded ``(rest, chosen)`` partition of ``keys`` with ``n_test`` chosen, order kept."""
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = set(order[:n_test])
    return (
        [k for i, k in enumerate(keys) if i not in chosen],
        [k for i, k in enumerate(keys) if i in chosen],
    )


def _take(keys: list[str], n: int | None, seed: int) -> list[str]:
    """A seeded random subset of ``n`` keys (all of them when ``n`` is None or too large)."""
    return keys if n is None or n >= len(keys) else _seeded_split(keys, n, seed)[1]


def _folder_splits(
    kind: str, args: list[str], n_train: int | None, n_test: int | None, seed: int
) -> tuple[Any, Any, str]:
    """Train and test :class:`~attnzoo.datasets.masks.SegmentationData` of a folder spec."""
    from attnzoo.datasets.masks import read_mask_folder

    kw: dict[str, Any] = {}
    if kind == "masks":
        full = read_mask_folder(args[0], args[1])  # checks every pair and label once
        keys = list(full.names)
        n_held = max(1, round(len(keys) * TEST_FRACTION))
        if len(keys) - n_held < 1:
            raise ValueError(f"{PROG}: {len(keys)} image(s) cannot be split into train and test")
        train_keys, test_keys = _seeded_split(keys, n_held, seed)
        train_dirs = test_dirs = (Path(args[0]), Path(args[1]))
        kw = {"classes": full.classes, "check_labels": False}
        note = f"{round(100 * TEST_FRACTION)} % held out (seed {seed})"
    elif kind == "voc":
        root = Path(args[0])
        lists = root / "ImageSets" / "Segmentation"
        train_dirs = test_dirs = (root / "JPEGImages", root / "SegmentationClass")
        train_keys, test_keys = _names_file(lists / "train.txt"), _names_file(lists / "val.txt")
        kw, note = {"palette": "voc"}, "train / val"
    else:  # cityscapes: the file listing gives the keys (labels are checked when read below)
        root = Path(args[0])
        train_dirs, test_dirs = (
            (root / "leftImg8bit" / split, root / "gtFine" / split) for split in ("train", "val")
        )
        train_keys, test_keys = (
            list(read_mask_folder(*dirs, check_labels=False).names)
            for dirs in (train_dirs, test_dirs)
        )
        note = "train / val"
    train = read_mask_folder(*train_dirs, names=_take(train_keys, n_train, seed), **kw)
    test = read_mask_folder(*test_dirs, names=_take(test_keys, n_test, seed + 1), **kw)
    return train, test, note


def _names_file(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"{PROG}: --data voc: the split list {path} does not exist")
    return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]


def _one_class(data: Any) -> Any:
    """The scenes with every digit pixel labelled 1, the class ``digit``."""
    import dataclasses

    masks = (np.asarray(data.masks) > 0).astype(np.uint8)
    return dataclasses.replace(data, masks=masks, classes=("background", "digit"))


def load_segmentation_data(
    spec: str = DEFAULT_DATA,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
) -> SegmentationSplits:
    """Train/test sets for ``--data`` (see the module docstring), resized to ``image_size``;
    for folders ``n_train`` / ``n_test`` take seeded random subsets. Training images of real
    data are flipped horizontally at random (p = 0.5, the official code's); the digit scenes are
    not (a mirrored digit is another shape)."""
    from attnzoo.datasets import masks

    image_size = _check_size(image_size)
    kind, args = parse_segment_data(spec)
    if kind == "scenes":
        nt, ne = n_train or SCENES_N_TRAIN, n_test or SCENES_N_TEST
        cap = image_size // 8  # digits of 8·scale px must fit the canvas
        scenes = {**SCENES, "scales": tuple(min(v, cap) for v in SCENES["scales"])}
        train, test = masks.scenes_segmentation(nt, ne, canvas=image_size, seed=seed, **scenes)
        note, hflip = "built-in", 0.0
        kinds = "11 classes (background + the 10 digits)"
        if args:  # scenes:digit: every digit is one class, "digit"
            train, test = _one_class(train), _one_class(test)
            note, kinds = "built-in, one class", "2 classes (background, digit)"
        lo, hi = scenes["objects"]
        s_lo, s_hi = scenes["scales"]
        c_lo, c_hi = scenes["clutter"]
        what = (
            f"built-in digit scenes' semantic masks (`attnzoo.datasets.make_digit_scenes`): "
            f"{nt} train / {ne} test canvases of {image_size}×{image_size} px, {lo}–{hi} "
            f"digits of {8 * s_lo}–{8 * s_hi} px each among {c_lo}–{c_hi} digit fragments "
            f"(background); {kinds}, disjoint train/test source digits"
        )
    else:
        train, test, note = _folder_splits(kind, args, n_train, n_test, seed)
        hflip = 0.5
        what = (
            f"{kind} folder{'s' if kind == 'masks' else ''} {' + '.join(args)} ({note}): "
            f"{len(train)} train / {len(test)} test images, resized to "
            f"{image_size}×{image_size}, {train.num_classes} classes"
        )
    return SegmentationSplits(
        name=spec,
        description=what,
        classes=list(train.classes),
        train=masks.SegmentationDataset(train, train=True, image_size=image_size, hflip=hflip),
        test=masks.SegmentationDataset(test, train=False, image_size=image_size),
        image_size=image_size,
        note=note,
    )


def segment_loaders(
    splits: SegmentationSplits,
    cfg: SegmentConfig,
    *,
    seed: int,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> tuple[Any, Any]:
    """Train loader (order a pure function of ``(seed, epoch)``, sharded over DDP ranks) and the
    test loader (every image once over the ranks)."""
    from attnzoo.bench.data import SeededSampler, seeded_loaders

    class EpochSampler(SeededSampler):
        """Also selects the training set's random flips of the epoch, from ``(seed, epoch)``."""

        def set_epoch(self, epoch: int) -> None:
            super().set_epoch(epoch)
            splits.train.seed = seed
            splits.train.set_epoch(epoch)

    return seeded_loaders(
        splits.train,
        splits.test,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        train_sampler=EpochSampler(
            len(splits.train), seed=seed, shuffle=True, rank=rank, world_size=world_size
        ),
    )


# ---------------------------------------------------------------------------------------------
# the LightningModule
_CACHE: dict[str, type] = {}


def _finite_or_none(values: Any) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in values]


def _module_class() -> type:
    """:class:`SegmentModule`, defined on first use so importing this file needs no Lightning."""
    if "module" in _CACHE:
        return _CACHE["module"]
    import lightning.pytorch as pl
    from torchmetrics import MeanMetric, SumMetric

    from attnzoo.segmentation import SegmentationLoss, SegmentationMetrics

    class SegmentModule(pl.LightningModule):
        """Segmentation training and mIoU evaluation of ``model``.

        One history row per epoch: ``epoch``, ``train_loss`` (mean over the epoch's batches),
        ``lr``, ``seconds``, ``test_loss`` (cross-entropy of the fused output), ``miou``,
        ``pixel_acc``, ``mean_acc`` (fractions) and ``test_n``. ``run_extras``: the last
        evaluation's ``per_class_iou`` (None for a class absent from truth and prediction) and
        ``confusion`` matrix.
        """

        def __init__(self, model: nn.Module, num_classes: int, cfg: SegmentConfig) -> None:
            super().__init__()
            self.model = model
            self.cfg = cfg
            self.criterion = SegmentationLoss(
                preset=getattr(model, "preset", "official"), ignore_index=IGNORE_INDEX
            )
            self.metric = SegmentationMetrics(num_classes, ignore_index=IGNORE_INDEX)
            self.train_loss = MeanMetric()
            self.val_loss = MeanMetric()
            self.val_count = SumMetric()
            self.history: list[dict[str, Any]] = []
            self.run_extras: dict[str, Any] = {}
            self._pending: dict[str, Any] = {}
            self._t0 = 0.0

        def forward(self, x: torch.Tensor) -> Any:
            return self.model(x)

        def on_train_epoch_start(self) -> None:
            self._t0 = time.perf_counter()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            images, masks = batch
            loss = self.criterion(self.model(images), masks)["loss"]
            self.train_loss.update(loss.detach(), weight=images.shape[0])
            return loss

        def on_validation_epoch_start(self) -> None:
            broadcast_buffers(self.model)  # evaluate what the checkpoint stores

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            images, masks = batch
            logits = self.model(images)["out"]
            n = images.shape[0]
            loss = nn.functional.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
            self.val_loss.update(loss, weight=n)
            self.val_count.update(torch.tensor(float(n), device=images.device))
            self.metric.update(logits.argmax(1), masks)

        def on_validation_epoch_end(self) -> None:
            res = self.metric.compute()  # torchmetrics sums the states of all DDP ranks
            vals = {
                "test_loss": float(self.val_loss.compute()),
                "miou": float(res["miou"]),
                "pixel_acc": float(res["pixel_acc"]),
                "mean_acc": float(res["mean_acc"]),
                "test_n": int(self.val_count.compute()),
            }
            self.run_extras["per_class_iou"] = _finite_or_none(res["per_class_iou"].tolist())
            self.run_extras["confusion"] = res["confusion"].long().tolist()
            for m in (self.metric, self.val_loss, self.val_count):
                m.reset()
            self._pending = vals
            self.log("miou", vals["miou"], prog_bar=True, rank_zero_only=True)

        def on_train_epoch_end(self) -> None:
            row: dict[str, Any] = {
                "epoch": int(self.current_epoch) + 1,
                "train_loss": float(self.train_loss.compute()),
                "lr": float(self.trainer.optimizers[0].param_groups[0]["lr"]),
                "seconds": time.perf_counter() - self._t0,
            }
            self.train_loss.reset()
            row.update(self._pending)
            self._pending = {}
            self.history.append(row)

        def configure_optimizers(self) -> Any:
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            opt, sched = build_segment_optimizer(self.model, self.cfg, total)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    _CACHE["module"] = SegmentModule
    return SegmentModule


def build_segment_module(model: nn.Module, num_classes: int, cfg: SegmentConfig) -> Any:
    """A :class:`SegmentModule` (LightningModule) training ``model``."""
    return _module_class()(model, num_classes, cfg)


def __getattr__(name: str) -> Any:  # ``from attnzoo.bench.tasks.segment import SegmentModule``
    if name == "SegmentModule":
        return _module_class()
    raise AttributeError(name)


HOW_TO_READ = (
    "- **mIoU** (the primary metric): for each class, intersection over union of the predicted "
    "and true pixels over the whole test set (one confusion matrix, not an average over "
    "images), averaged over the classes present in the truth or the predictions; **pixel "
    "acc** is the share of pixels labelled correctly (dominated by the background). Pixels "
    "labelled 255 are ignored. Both after the last epoch.\n"
    "- A network whose mIoU is close to that of predicting background everywhere has not "
    "learned the classes: train longer (`--epochs`) or on more images (`--n-train`)."
)


# ---------------------------------------------------------------------------------------------
class SegmentTask(Task):
    """Semantic segmentation with DANet heads (see the module docstring)."""

    name = "segment"
    metric = "miou"
    metric_label = "mIoU %"
    secondary = ("pixel_acc", "mean_acc")
    defaults = {
        "attention": DEFAULT_SEGMENT_ATTENTIONS,
        "model": DEFAULT_MODEL,
        "data": DEFAULT_DATA,
        "epochs": DEFAULT_EPOCHS,
        "batch_size": DEFAULT_BATCH,
        "lr": DEFAULT_LR,
        "weight_decay": DEFAULT_WEIGHT_DECAY,
        "image_size": DEFAULT_IMAGE_SIZE,
    }
    options = {"query": "0.5,0.5", "optimizer": DEFAULT_OPTIMIZER}
    columns = (("pixel acc %", "pixel_acc"),)
    csv_columns = ("pixel_acc", "mean_acc", "test_n")

    # ---- validation
    def check_config(self, config: Any) -> None:
        _check_size(config.image_size)
        parse_query(config.options.get("query"))
        opt = config.options.get("optimizer")
        if not isinstance(opt, str) or opt.lower() not in OPTIMIZERS:
            raise ValueError(
                f"{PROG}: option optimizer must be one of {', '.join(OPTIMIZERS)}; got {opt!r}"
            )

    def check_data(self, config: Any) -> None:
        parse_segment_data(config.data)

    def check_schedule(self, config: Any, steps_per_epoch: int) -> None:
        poly_lambda(config.epochs * max(1, steps_per_epoch))

    # ---- data and models
    def resolve_model(self, model: Any) -> tuple[str, Any]:
        if callable(model):
            return getattr(model, "__name__", "custom"), model
        return _resolve_segment(model, _builders())

    def load_data(self, config: Any) -> SegmentationSplits:
        return load_segmentation_data(
            config.data,
            image_size=config.image_size,
            n_train=config.n_train,
            n_test=config.n_test,
            seed=config.data_seed,
        )

    def build_model(self, builder: Any, spec: Any, data: Any, config: Any) -> nn.Module:
        model = segment_model(builder, spec, data.num_classes)
        image, _ = data.test[0]
        with torch.no_grad():
            out = model.eval()(image[None])
        want = (1, data.num_classes, *image.shape[-2:])
        got = tuple(out["out"].shape) if isinstance(out, Mapping) and "out" in out else None
        if got != want:
            raise ValueError(
                f"it returns {got or type(out).__name__}, expected a dict whose 'out' has "
                f"shape {want}"
            )
        return model.train()

    def input_shape(self, data: Any, config: Any) -> tuple[int, ...]:
        return (3, data.image_size, data.image_size)

    def model_for_run(self, builder: Any, spec: Any, meta: Mapping[str, Any]) -> nn.Module:
        return segment_model(builder, spec, meta["num_classes"])

    def run_settings(self, config: Any) -> dict[str, Any]:
        cfg = segment_config(config)
        return {
            "optimizer": cfg.optimizer,
            "momentum": cfg.momentum if cfg.optimizer == "sgd" else None,
            "schedule": f"poly (power {cfg.power})",
            "query": list(parse_query(config.options.get("query"))),
        }

    # ---- training
    def make_module(self, model: nn.Module, data: Any, config: Any) -> Any:
        return build_segment_module(model, data.num_classes, segment_config(config))

    def make_loaders(self, data: Any, config: Any, *, seed: int) -> tuple[Any, Any]:
        return segment_loaders(
            data, segment_config(config), seed=seed, num_workers=config.num_workers
        )

    def final_row(self, history: Sequence[dict[str, Any]], module: Any) -> dict[str, Any]:
        last = history[-1]
        keys = ("miou", "pixel_acc", "mean_acc", "test_loss", "test_n", "train_loss")
        row = {k: last[k] for k in keys if k in last}
        row["per_class_iou"] = module.run_extras.get("per_class_iou")
        row["confusion"] = module.run_extras.get("confusion")
        return row

    # ---- report
    def report(self, result: Any, data: Any, config: Any, plan: Sequence[Any]) -> TaskReport:
        from attnzoo.bench.tasks import segment_report as sr

        c = result.config
        seeds = sorted({r["seed"] for r in result.runs})
        opt = "AdamW" if c.get("optimizer") == "adamw" else "SGD (momentum 0.9)"
        setup = (
            f"{c['model']} on {data.description}. {c['epochs']} epochs, batch "
            f"{c['batch_size']}, {opt} with the poly schedule (power 0.9) from lr {c['lr']}, "
            f"weight decay {c['weight_decay']}; mIoU after the last epoch; seeds "
            f"{', '.join(map(str, seeds))}. `none` is the FCN head."
        )
        return TaskReport(
            setup=setup,
            run_columns=[("pixel acc %", "pixel_acc"), ("mean acc %", "mean_acc")],
            how_to_read=HOW_TO_READ,
            sections=[
                sr.per_class_section(result, data.classes),
                *sr.panel_sections(
                    data, plan, int(config.panel_images), parse_query(config.options["query"])
                ),
            ],
        )


def _resolve_segment(model: Any, builders: Mapping[str, Any]) -> tuple[str, Any]:
    """``(label, builder)`` for a name of ``builders`` with ``:key=value`` builder arguments
    (the syntax of :func:`attnzoo.specs.parse_model`)."""
    import functools

    from attnzoo.specs import parse_model

    name, kwargs = parse_model(model, prog=PROG)
    if name not in builders:
        raise ValueError(
            f"{PROG}: unknown --model {name!r}; segmentation models: {', '.join(builders)}"
        )
    builder = builders[name]
    if not kwargs:
        return name, builder
    if "attention" in kwargs or "num_classes" in kwargs:
        raise ValueError(
            f"{PROG}: --model {model!r}: give the head with --attention; the number of "
            "classes comes from the data"
        )
    return model.strip(), functools.partial(builder, **kwargs)


TASK = SegmentTask()
