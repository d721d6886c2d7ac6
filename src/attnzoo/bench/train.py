"""One (attention, seed) training run of ``attnzoo bench``, with PyTorch Lightning + torchmetrics.

What Lightning gives here: the loop, progress bars, mixed precision on GPUs, DDP over devices and
nodes, checkpoint/resume of the whole training state (model, optimiser, LR schedule, loop
counters), and loggers (a CSV log per run).

What this file adds:

* :class:`BenchModule` — cross-entropy training with SGD (Nesterov momentum 0.9, weight decay
  5e-4 on weights, none on BN/bias) and a one-cycle LR schedule stepped per batch
  (:func:`build_optimizer`, defined for every step count); test
  accuracy/loss after every epoch with torchmetrics, summed over DDP ranks; the per-epoch history
  is kept *in the checkpoint* so that a resumed run reports the full curves, with the confusion
  matrix of the last evaluation (per-class accuracy in the report).
* :class:`AtomicCheckpoint` — Lightning's ``ModelCheckpoint`` that writes ``last.ckpt`` at the end
  of every training epoch through a temporary file and ``os.replace`` (a kill never leaves a
  half-written checkpoint).
* :func:`train_one` — builds everything for one run, resumes from ``last.ckpt`` when present
  (``weights_only=True``), and returns the final numbers.

Determinism: ``seed_everything(seed)`` before the model is built, ``Trainer(deterministic=True)``
on CPU, and a :class:`~attnzoo.bench.data.SeededSampler` whose order is a pure function of
``(seed, epoch)``: for a given seed every attention sees the same batches in the same order, and a
resumed run sees exactly the batches the uninterrupted run would have seen.

The reported accuracy is the test accuracy after the *last* epoch (never the best epoch: picking
the best epoch on the test set would be a selection on the test data).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from attnzoo.bench.data import SeededSampler, TensorImageSet
from attnzoo.bench.quiet import quiet_lightning

__all__ = [
    "TrainConfig",
    "build_optimizer",
    "check_lr_schedule",
    "evaluate",
    "make_loaders",
    "train_one",
]

CHECKPOINT_NAME = "last.ckpt"


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one run (everything that changes the numbers)."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    eval_batch_size: int = 500


def _is_decay_param(name: str, p: torch.Tensor) -> bool:
    return p.ndim > 1 and not name.endswith(".bias")


def build_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int
                    ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.OneCycleLR]:
    """SGD (Nesterov, weight decay on weights only) and its one-cycle schedule over
    ``total_steps`` optimiser steps (``total_steps >= 1``).

    The schedule is torch's ``OneCycleLR`` (``pct_start=0.25``, ``div_factor=10``,
    ``final_div_factor=100``, cosine annealing, momentum cycled 0.85–0.95). When the warm-up would
    end exactly on the first step (``0.25 * total_steps == 1``, i.e. 4 steps), ``OneCycleLR``
    divides by its zero-length warm-up; the warm-up is then dropped (``pct_start=0``), so the
    schedule is defined for every step count.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"bench: the LR schedule needs total_steps >= 1; got {total_steps!r}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if _is_decay_param(name, p) else no_decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    pct_start = 0.25 if 0.25 * total_steps != 1 else 0.0
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start, div_factor=10.0,
        final_div_factor=100.0)
    return opt, sched


def check_lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> None:
    """Build the schedule of ``cfg.epochs`` epochs of ``steps_per_epoch`` steps and step it to
    the end, as training will; any failure becomes a ``ValueError`` that says what to change."""
    total = cfg.epochs * steps_per_epoch
    try:
        opt, sched = build_optimizer(nn.Linear(1, 1), cfg, total)
        with warnings.catch_warnings():  # no optimiser step here: only the schedule is checked
            warnings.simplefilter("ignore")
            for _ in range(total):
                sched.step()
        lrs = [g["lr"] for g in opt.param_groups]
    except (ArithmeticError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"bench: the learning-rate schedule fails for {cfg.epochs} epochs x "
            f"{steps_per_epoch} batches per epoch ({total} steps): {type(err).__name__}: {err}. "
            "Change --epochs, --batch-size or --n-train to get another number of steps") from None
    if not all(math.isfinite(lr) and lr >= 0 for lr in lrs):
        raise ValueError(f"bench: the learning-rate schedule ends with LR {lrs} after {total} "
                         "steps; check --lr")


def _lightning():
    import lightning.pytorch as pl

    return pl


def build_module(model: nn.Module, num_classes: int, cfg: TrainConfig) -> Any:
    """A :class:`BenchModule` (defined lazily so importing this file does not need Lightning)."""
    return _module_class()(model, num_classes, cfg)


_CLASS_CACHE: dict[str, type] = {}


def _module_class() -> type:
    if "module" in _CLASS_CACHE:
        return _CLASS_CACHE["module"]
    pl = _lightning()
    from torchmetrics import MeanMetric, SumMetric
    from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

    class BenchModule(pl.LightningModule):
        """Classification training of ``model``; history of per-epoch metrics in checkpoints."""

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
            self.confusion: list[list[int]] | None = None  # of the last evaluation
            self._pending_val: dict[str, float] = {}
            self._epoch_start = 0.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def on_train_epoch_start(self) -> None:
            self._epoch_start = time.perf_counter()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self.model(x)
            loss = nn.functional.cross_entropy(logits, y,
                                               label_smoothing=self.cfg.label_smoothing)
            self.train_loss.update(loss.detach(), weight=y.shape[0])
            self.train_acc.update(logits.detach(), y)
            return loss

        def on_validation_epoch_start(self) -> None:
            # DDP keeps rank 0's BN statistics (it broadcasts buffers before each training
            # forward), but each rank's last batch updated its own copy: evaluate every rank with
            # rank 0's buffers, i.e. with exactly the model that the checkpoint stores.
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                for buf in self.model.buffers():
                    dist.broadcast(buf, src=0)

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
            vals = {"test_loss": float(self.val_loss.compute()),
                    "test_acc": float(self.val_acc.compute()),
                    "test_n": int(self.val_count.compute())}
            self.confusion = self.val_confusion.compute().long().tolist()
            for m in (self.val_loss, self.val_acc, self.val_count, self.val_confusion):
                m.reset()
            self._pending_val = vals
            self.log("test_acc", vals["test_acc"], prog_bar=True, rank_zero_only=True)

        def on_train_epoch_end(self) -> None:
            row = {"epoch": int(self.current_epoch) + 1,
                   "train_loss": float(self.train_loss.compute()),
                   "train_acc": float(self.train_acc.compute()),
                   "lr": float(self.trainer.optimizers[0].param_groups[0]["lr"]),
                   "seconds": time.perf_counter() - self._epoch_start}
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

        def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            checkpoint["bench_history"] = [dict(r) for r in self.history]
            checkpoint["bench_confusion"] = self.confusion

        def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
            self.history = [dict(r) for r in checkpoint.get("bench_history", [])]
            self.confusion = checkpoint.get("bench_confusion")

    _CLASS_CACHE["module"] = BenchModule
    return BenchModule


def _checkpoint_class() -> type:
    if "ckpt" in _CLASS_CACHE:
        return _CLASS_CACHE["ckpt"]
    from lightning.pytorch.callbacks import ModelCheckpoint

    class AtomicCheckpoint(ModelCheckpoint):
        """``ModelCheckpoint`` saving ``last.ckpt`` every epoch via a temp file + ``os.replace``."""

        def __init__(self, dirpath: str | os.PathLike) -> None:
            super().__init__(dirpath=str(dirpath), filename=CHECKPOINT_NAME[:-5], monitor=None,
                             save_top_k=1, every_n_epochs=1, save_on_train_epoch_end=True,
                             enable_version_counter=False)

        def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
            tmp = f"{filepath}.tmp"
            trainer.save_checkpoint(tmp, self.save_weights_only)  # all ranks; rank 0 writes
            if trainer.is_global_zero:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, filepath)
            trainer.strategy.barrier("attnzoo.AtomicCheckpoint")
            self._last_global_step_saved = trainer.global_step
            self._last_checkpoint_saved = filepath

    _CLASS_CACHE["ckpt"] = AtomicCheckpoint
    return AtomicCheckpoint


# public names resolved lazily (``from attnzoo.bench.train import BenchModule``)
def __getattr__(name: str) -> Any:
    if name == "BenchModule":
        return _module_class()
    if name == "AtomicCheckpoint":
        return _checkpoint_class()
    raise AttributeError(name)


def make_loaders(train: TensorImageSet, test: TensorImageSet, cfg: TrainConfig, *, seed: int,
                 rank: int | None = None, world_size: int | None = None,
                 num_workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """Train loader (seeded order, sharded) and test loader (every image once over the ranks).

    ``rank``/``world_size`` default to ``torch.distributed``'s, read when the loaders are iterated
    (Lightning starts the process group inside ``fit``).
    """
    train_loader = DataLoader(
        train, batch_size=cfg.batch_size, drop_last=False, num_workers=num_workers,
        sampler=SeededSampler(len(train), seed=seed, shuffle=True, rank=rank,
                              world_size=world_size))
    test_loader = DataLoader(
        test, batch_size=cfg.eval_batch_size, num_workers=num_workers,
        sampler=SeededSampler(len(test), shuffle=False, rank=rank, world_size=world_size))
    return train_loader, test_loader


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorImageSet, batch_size: int = 500) -> tuple[int, int]:
    """``(correct, total)`` of ``model`` (eval mode) on the whole set in one process."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        x, y = data.images[i:i + batch_size], data.labels[i:i + batch_size]
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was)
    return correct, len(data)


@dataclass
class RunOutcome:
    """What one run returns (on every rank; only rank 0 writes files)."""

    history: list[dict[str, float]]
    resumed_from_epoch: int
    train_seconds: float
    is_global_zero: bool
    module: Any
    #: ``confusion[true][predicted]`` test counts after the last epoch (None: not recorded)
    confusion: list[list[int]] | None = None


def _trainer_kwargs(*, accelerator: str, devices: Any, num_nodes: int, strategy: str,
                    precision: str | None) -> dict[str, Any]:
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision is None:
        precision = "32-true" if on_cpu else "16-mixed"
    return dict(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                precision=precision, deterministic=True if on_cpu else "warn")


def train_one(
    build_model: Callable[[], nn.Module],
    train: TensorImageSet,
    test: TensorImageSet,
    num_classes: int,
    cfg: TrainConfig,
    *,
    seed: int,
    run_dir: str | os.PathLike,
    accelerator: str = "cpu",
    devices: Any = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str | None = None,
    progress: bool = True,
    num_workers: int = 0,
    logger: bool = True,
    verbose: bool = False,
) -> RunOutcome:
    """Train one (attention, seed) run, resuming from ``run_dir/last.ckpt`` if it exists.

    ``build_model`` is called after ``seed_everything(seed)``, so the initial weights depend on the
    seed only. Returns the per-epoch history (see :class:`BenchModule`). The progress bars go to
    ``stderr``; Lightning's informational messages are shown only when ``verbose``
    (:func:`attnzoo.bench.quiet.quiet_lightning`).
    """
    with quiet_lightning(verbose):
        return _train_one(build_model, train, test, num_classes, cfg, seed=seed, run_dir=run_dir,
                          accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                          strategy=strategy, precision=precision, progress=progress,
                          num_workers=num_workers, logger=logger)


def _train_one(build_model: Callable[[], nn.Module], train: TensorImageSet, test: TensorImageSet,
               num_classes: int, cfg: TrainConfig, *, seed: int, run_dir: str | os.PathLike,
               accelerator: str, devices: Any, num_nodes: int, strategy: str,
               precision: str | None, progress: bool, num_workers: int,
               logger: bool) -> RunOutcome:
    pl = _lightning()
    from lightning.pytorch.loggers import CSVLogger

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, workers=True, verbose=False)
    module = build_module(build_model(), num_classes, cfg)
    ckpt = run_dir / CHECKPOINT_NAME
    kwargs = _trainer_kwargs(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                             strategy=strategy, precision=precision)
    trainer = pl.Trainer(
        max_epochs=cfg.epochs,
        callbacks=[_checkpoint_class()(run_dir), *_progress_bar(progress)],
        logger=CSVLogger(str(run_dir), name="", version="logs") if logger else False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        check_val_every_n_epoch=1,
        log_every_n_steps=10,
        default_root_dir=str(run_dir),
        **kwargs,
    )
    train_loader, test_loader = make_loaders(train, test, cfg, seed=seed, num_workers=num_workers)
    resumed = 0
    if ckpt.is_file():
        resumed = int(torch.load(ckpt, map_location="cpu", weights_only=True).get("epoch", -1)) + 1
    start = time.perf_counter()
    trainer.fit(module, train_loader, test_loader,
                ckpt_path=str(ckpt) if ckpt.is_file() else None, weights_only=True)
    if trainer.world_size > 1:
        # the launcher may have started the other ranks: make sure all are done before writing
        trainer.strategy.barrier("attnzoo.train_one")
    return RunOutcome(history=list(module.history), resumed_from_epoch=resumed,
                      train_seconds=time.perf_counter() - start,
                      is_global_zero=trainer.is_global_zero, module=module,
                      confusion=module.confusion)


def _progress_bar(enabled: bool) -> list[Any]:
    """Lightning's tqdm bar, redrawn every 10 steps (every step costs a few % on tiny models)."""
    if not enabled:
        return []
    from lightning.pytorch.callbacks import TQDMProgressBar

    return [TQDMProgressBar(refresh_rate=10)]


def steps_per_epoch(n_train: int, batch_size: int, world_size: int = 1) -> int:
    return math.ceil(math.ceil(n_train / world_size) / batch_size)
