"""``attnzoo bench --task classify``: image classification, the bench's first plug-in.

* data: the built-in cluttered digits (``digits``), an ImageFolder-style folder, or local CIFAR
  (:mod:`attnzoo.bench.data`);
* networks: any builder of :data:`attnzoo.models.BUILDERS` (default ``cifar_resnet8``);
* training (:class:`ClassifyModule`): cross-entropy, SGD (Nesterov momentum 0.9, weight decay on
  weights only) with a one-cycle LR schedule stepped per batch
  (:func:`attnzoo.bench.train.build_optimizer`); after every epoch, test accuracy and loss with
  torchmetrics, summed over DDP ranks, and the confusion matrix of the last evaluation;
* metric: ``test_acc`` (top-1, a fraction), after the last epoch;
* localisation (data with boxes): Grad-CAM pointing game and energy in the box per run, and
  Grad-CAM / attention-map panels in the report (:mod:`attnzoo.bench.localisation`);
* report: the chance level (and "near chance" flags), per-class accuracy with confusion
  matrices, the data with sample images.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from attnzoo.bench import localisation as loc
from attnzoo.bench import report as rep
from attnzoo.bench.data import (
    BenchData,
    TensorImageSet,
    check_data_spec,
    load_data,
    seeded_loaders,
)
from attnzoo.bench.report import Block, Figure, Section, Table, Text
from attnzoo.bench.tasks.base import Task, TaskReport, broadcast_buffers, call_builder
from attnzoo.bench.train import TrainConfig, build_optimizer, check_lr_schedule
from attnzoo.specs import DEFAULT_ATTENTIONS, DEFAULT_MODEL, AttentionSpec

__all__ = ["TASK", "ClassifyTask", "evaluate", "make_loaders"]


def _train_config(config: Any) -> TrainConfig:
    return TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=float(config.lr),
        weight_decay=float(config.weight_decay),
    )


# ---------------------------------------------------------------------------------------------
# training
_CLASS_CACHE: dict[str, type] = {}


def _module_class() -> type:
    """:class:`ClassifyModule`, defined on first use so importing this file needs no Lightning."""
    if "module" in _CLASS_CACHE:
        return _CLASS_CACHE["module"]
    import lightning.pytorch as pl
    from torchmetrics import MeanMetric, SumMetric
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

    class ClassifyModule(pl.LightningModule):
        """Classification training of ``model``; one history row per epoch, the confusion
        matrix of the last evaluation in ``run_extras["confusion"]``."""

        def __init__(self, model: nn.Module, num_classes: int, cfg: TrainConfig) -> None:
            super().__init__()
            self.model = model
            self.cfg = cfg
            self.train_loss = MeanMetric()
            self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
            self.val_loss = MeanMetric()
            self.val_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
            self.val_count = SumMetric()
            self.val_confusion = MulticlassConfusionMatrix(num_classes, validate_args=False)
            self.history: list[dict[str, float]] = []
            self.run_extras: dict[str, Any] = {}
            self._pending_val: dict[str, float] = {}
            self._epoch_start = 0.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def on_train_epoch_start(self) -> None:
            self._epoch_start = time.perf_counter()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self.model(x)
            loss = nn.functional.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
            self.train_loss.update(loss.detach(), weight=y.shape[0])
            self.train_acc.update(logits.detach(), y)
            return loss

        def on_validation_epoch_start(self) -> None:
            broadcast_buffers(self.model)  # evaluate what the checkpoint stores

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            logits = self.model(x)
            loss = nn.functional.cross_entropy(logits, y)
            self.val_loss.update(loss, weight=y.shape[0])
            self.val_acc.update(logits, y)
            self.val_count.update(torch.tensor(float(y.shape[0]), device=y.device))
            self.val_confusion.update(logits, y)

        def on_validation_epoch_end(self) -> None:
            # compute() sums the states over all DDP ranks (torchmetrics' dist sync)
            vals = {
                "test_loss": float(self.val_loss.compute()),
                "test_acc": float(self.val_acc.compute()),
                "test_n": int(self.val_count.compute()),
            }
            self.run_extras["confusion"] = self.val_confusion.compute().long().tolist()
            for m in (self.val_loss, self.val_acc, self.val_count, self.val_confusion):
                m.reset()
            self._pending_val = vals
            self.log("test_acc", vals["test_acc"], prog_bar=True, rank_zero_only=True)

        def on_train_epoch_end(self) -> None:
            row = {
                "epoch": int(self.current_epoch) + 1,
                "train_loss": float(self.train_loss.compute()),
                "train_acc": float(self.train_acc.compute()),
                "lr": float(self.trainer.optimizers[0].param_groups[0]["lr"]),
                "seconds": time.perf_counter() - self._epoch_start,
            }
            self.train_loss.reset()
            self.train_acc.reset()
            row.update(self._pending_val)
            self._pending_val = {}
            self.history.append(row)
            self.log("train_acc", row["train_acc"], prog_bar=True, rank_zero_only=True)

        def configure_optimizers(self) -> Any:
            steps = int(self.trainer.estimated_stepping_batches)
            opt, sched = build_optimizer(self.model, self.cfg, max(steps, 1))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    _CLASS_CACHE["module"] = ClassifyModule
    return ClassifyModule


def __getattr__(name: str) -> Any:  # ``from attnzoo.bench.tasks.classify import ClassifyModule``
    if name == "ClassifyModule":
        return _module_class()
    raise AttributeError(name)


def make_loaders(
    train: TensorImageSet,
    test: TensorImageSet,
    cfg: TrainConfig,
    *,
    seed: int,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """Train loader (seeded order, sharded) and test loader (every image once over the ranks):
    :func:`attnzoo.bench.data.seeded_loaders` with the config's batch sizes."""
    return seeded_loaders(
        train,
        test,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.eval_batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorImageSet, batch_size: int = 500) -> tuple[int, int]:
    """``(correct, total)`` of ``model`` (eval mode) on the whole set in one process."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        x, y = data.images[i : i + batch_size], data.labels[i : i + batch_size]
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was)
    return correct, len(data)


# ---------------------------------------------------------------------------------------------
# report parts
def _chance_notes(
    result: Any, data: BenchData, per_seed: Mapping[str, list[float]]
) -> tuple[float, list[Block], dict[str, str]]:
    """The chance level, its text (and the "near chance" warning), the flagged attentions."""
    ch = rep.chance_level(data.test.labels, data.num_classes)
    chance = ch["chance"]
    text = (
        f"**Chance level: {100 * chance:.1f} %** (1 of {data.num_classes} classes at random"
        f": {100 * ch['uniform']:.1f} %"
    )
    if ch["majority"] > ch["uniform"] + 1e-9:
        name = data.classes[ch["majority_class"]]
        text += (
            f"; always answering the most frequent test class, `{name}`: "
            f"{100 * ch['majority']:.1f} %"
        )
    blocks: list[Block] = [Text(text + ").")]
    ci = {lab: rep.mean_ci(v) for lab, v in per_seed.items()}
    flagged = [
        s["attention"] for s in result.summary if rep.near_chance(*ci[s["attention"]][:2], chance)
    ]
    if flagged:
        shown = ", ".join(f"`{lab}` ({100 * ci[lab][0]:.1f} %)" for lab in flagged)
        blocks.append(
            Text(
                f"**Near chance**: {shown} — within {100 * rep.NEAR_CHANCE_POINTS:.0f} points of "
                "the "
                "chance level, or the 95 % CI reaches it. These networks learned little, so their "
                "differences say nothing about the modules: train longer (`--epochs`), on more "
                "images, or check the data.",
                note=True,
            )
        )
    return chance, blocks, {lab: "near chance" for lab in flagged}


def _per_class_sections(result: Any, data: BenchData) -> list[Section]:
    conf = rep.pooled_confusions(result.runs, data.num_classes)
    if not conf:
        return [
            Section(
                "Per-class accuracy",
                [Text("Not available: these runs were recorded without their confusion matrices.")],
            )
        ]
    baseline = result.baseline
    acc = {lab: m.double().diagonal() / m.double().sum(1).clamp_min(1) for lab, m in conf.items()}
    test_counts = data.class_counts["test"]
    rows = []
    for k, name in enumerate(data.classes):
        cells = []
        for lab in conf:
            cell = f"{100 * float(acc[lab][k]):.1f}"
            if baseline in acc and lab != baseline:
                cell += f" ({100 * float(acc[lab][k] - acc[baseline][k]):+.1f})"
            cells.append(cell)
        rows.append([name, test_counts[name], *cells])
    table = Table(
        ["class", "test images", *conf],
        rows,
        "Top-1 per class (%), pooled over seeds"
        + (
            f"; in parentheses the difference to `{baseline}` (points)." if baseline in acc else "."
        ),
    )
    many = data.num_classes > 20
    return [
        Section(
            "Per-class accuracy",
            [
                Figure(
                    "confusion.png",
                    rep.plot_confusion(conf, data.classes),
                    "Confusion matrices on the test set, summed over the seeds (row: true class, "
                    "column: predicted class; each row in % of the class's test images). Title: "
                    "the "
                    "attention and its pooled top-1.",
                ),
                *([] if many else [table]),
            ],
        ),
        *([Section("Per-class accuracy: table", [table], collapsed=True)] if many else []),
    ]


def _data_section(data: BenchData) -> Section:
    blocks: list[Block] = [Text(data.description + ".")]
    if data.name == "digits":
        blocks.append(
            Text(
                "Each image is a 32×32 canvas holding one handwritten digit (8×8 from "
                "scikit-learn's "
                "`load_digits`, upscaled to 16×16) at a random position, among fragments cut from "
                "other digits of the same split. The class is the digit; the red box (shown here, "
                "never given to the network) is the digit's bounding box. Train and test use "
                "disjoint source digits. Generator: `attnzoo.bench.data.make_cluttered_digits`."
            )
        )
    counts = data.class_counts
    if data.num_classes <= 20:
        blocks.append(
            Table(
                ["class", "train images", "test images"],
                [[c, counts["train"][c], counts["test"][c]] for c in data.classes],
                "Images per class used:",
            )
        )
    else:
        lo = {s: min(counts[s].values()) for s in counts}
        hi = {s: max(counts[s].values()) for s in counts}
        blocks.append(
            Text(
                f"Images per class used: {lo['train']}–{hi['train']} train, "
                f"{lo['test']}–{hi['test']} test."
            )
        )
    idx = rep.sample_per_class(data.test.labels, 16)
    boxes = None if data.test.boxes is None else data.test.boxes[idx]
    blocks.append(
        Figure(
            "samples.png",
            rep.plot_samples(
                data.denormalise(data.test.images[idx]),
                data.test.labels[idx].tolist(),
                data.classes,
                boxes,
            ),
            "Test images drawn from every class in turn, with their labels"
            + (" (red box: the digit)." if boxes is not None else "."),
        )
    )
    return Section("Data", blocks)


HOW_TO_READ = (
    "- **chance level**: what guessing scores, the larger of 1 / classes and the share of "
    "the most frequent test class. A top-1 within "
    f"{100 * rep.NEAR_CHANCE_POINTS:.0f} points of it (or whose 95 % CI reaches it) is flagged "
    "**near chance**: such a network has learned little, and its differences say nothing "
    "about the modules."
)


# ---------------------------------------------------------------------------------------------
class ClassifyTask(Task):
    """Image classification (see the module docstring)."""

    name = "classify"
    metric = "test_acc"
    metric_label = "top-1 %"
    secondary = ("train_acc",)
    defaults = {
        "attention": DEFAULT_ATTENTIONS,
        "model": DEFAULT_MODEL,
        "data": "digits",
        "epochs": 8,
        "batch_size": 64,
        "lr": 0.1,
        "weight_decay": 5e-4,
        "image_size": 32,
    }
    columns = (("pointing game %", "pointing_game"), ("energy in box %", "energy_in_box"))
    csv_columns = ("test_n", "train_acc")

    # ---- validation
    def check_config(self, config: Any) -> None:
        if config.localise:
            from attnzoo.viz import CAM_METHODS

            loc.check_localisation_available()
            if str(config.cam_method).lower() not in CAM_METHODS:
                raise ValueError(
                    f"bench: unknown --cam-method {config.cam_method!r}; choose "
                    f"from {', '.join(CAM_METHODS)}"
                )

    def check_data(self, config: Any) -> None:
        check_data_spec(config.data)

    def check_schedule(self, config: Any, steps_per_epoch: int) -> None:
        check_lr_schedule(_train_config(config), steps_per_epoch)

    # ---- data and models
    def load_data(self, config: Any) -> BenchData:
        return load_data(
            config.data,
            image_size=config.image_size,
            seed=config.data_seed,
            n_train=config.n_train,
            n_test=config.n_test,
        )

    def build_model(self, builder: Any, spec: AttentionSpec, data: Any, config: Any) -> nn.Module:
        model = call_builder(builder, spec, num_classes=data.num_classes)
        probe = data.test.images[:2]
        with torch.no_grad():
            y = model.eval()(probe)
        if tuple(y.shape) != (probe.shape[0], data.num_classes):
            raise ValueError(f"it returns shape {tuple(y.shape)}, expected (B, {data.num_classes})")
        return model.train()

    def input_shape(self, data: Any, config: Any) -> tuple[int, ...]:
        return data.input_shape

    def run_settings(self, config: Any) -> dict[str, Any]:
        return {"momentum": _train_config(config).momentum}

    def run_meta(self, data: Any) -> dict[str, Any]:
        return {
            "num_classes": data.num_classes,
            "classes": list(data.classes),
            "mean": list(data.mean),
            "std": list(data.std),
        }

    # ---- training
    def make_module(self, model: nn.Module, data: Any, config: Any) -> Any:
        return _module_class()(model, data.num_classes, _train_config(config))

    def make_loaders(self, data: Any, config: Any, *, seed: int) -> tuple[DataLoader, DataLoader]:
        return make_loaders(
            data.train, data.test, _train_config(config), seed=seed, num_workers=config.num_workers
        )

    def final_row(self, history: Sequence[dict[str, Any]], module: Any) -> dict[str, Any]:
        last = history[-1]
        return {
            "test_acc": last["test_acc"],
            "test_n": last["test_n"],
            "test_loss": last["test_loss"],
            "train_acc": last["train_acc"],
            "train_loss": last["train_loss"],
            "confusion": module.run_extras.get("confusion"),
        }

    # ---- after training
    def localise(
        self, plan: Sequence[Any], data: Any, config: Any
    ) -> dict[tuple[str, int], dict[str, Any]]:
        if not config.localise or data.test.boxes is None:
            return {}
        scores = {}
        for run in plan:
            if config.progress:
                import sys

                print(
                    f"[attnzoo bench] localisation ({config.cam_method}) {run.spec.label} "
                    f"seed {run.seed}",
                    file=sys.stderr,
                    flush=True,
                )
            s = loc.localise_run(run.run_dir, data, method=config.cam_method)
            scores[(run.spec.label, run.seed)] = {
                "pointing_game": s["pointing_game"],
                "energy_in_box": s["energy_in_box"],
                "cam_method": s["method"],
            }
        return scores

    def summarize_extra(
        self,
        labels: Sequence[str],
        seeds: Sequence[int],
        per_run: Mapping[tuple[str, int], dict[str, Any]],
        baseline: str | None,
        data: Any,
    ) -> list[dict[str, Any]]:
        chance = loc.chance_of_boxes(data.test.boxes, *data.input_shape[-2:])
        runs = {k: {**v, "method": v["cam_method"], "chance": chance} for k, v in per_run.items()}
        return loc.summarize_localisation(labels, seeds, runs, baseline=baseline)

    def report(self, result: Any, data: Any, config: Any, plan: Sequence[Any]) -> TaskReport:
        per_seed: dict[str, list[float]] = {}
        for r in result.runs:
            per_seed.setdefault(r["attention"], []).append(r["test_acc"])
        chance, notes, flagged = _chance_notes(result, data, per_seed)
        c = result.config
        seeds = sorted({r["seed"] for r in result.runs})
        epochs = rep.count(c["epochs"], "epoch")
        setup = (
            f"{c['model']} on {data.description}. {epochs}, batch "
            f"{c['batch_size']}, SGD (Nesterov 0.9) with a one-cycle schedule peaking at lr "
            f"{c['lr']}, weight decay {c['weight_decay']}; seeds "
            f"{', '.join(map(str, seeds))}."
        )
        looks: list[Section] = []
        if config.localise and config.panel_images and plan:
            looks = loc.report_sections(
                result,
                data,
                plan,
                [run.seed for run in plan],
                config.cam_method,
                config.panel_images,
            )
        return TaskReport(
            setup=setup,
            notes=notes,
            flagged=flagged,
            reference=chance,
            reference_label="the chance level",
            forest_note="; orange: near chance",
            diffs=[("pointing", "the pointing game"), ("energy", "the energy in the box")],
            run_columns=[("test images", "test_n"), ("train top-1 %", "train_acc")],
            how_to_read=HOW_TO_READ,
            sections=[*_per_class_sections(result, data), *looks, _data_section(data)],
        )


TASK = ClassifyTask()
