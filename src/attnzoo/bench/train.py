"""One (attention, seed) training run of ``attnzoo bench``, for every task, with PyTorch Lightning.

What Lightning gives here: the loop, progress bars, mixed precision on GPUs, DDP over devices and
nodes, checkpoint/resume of the whole training state (model, optimiser, LR schedule, loop
counters), and loggers (a CSV log per run). The task supplies the ``LightningModule`` and the
loaders (:class:`attnzoo.bench.tasks.base.Task`).

What this file adds:

* :class:`AtomicCheckpoint` — Lightning's ``ModelCheckpoint`` that writes ``last.ckpt`` at the end
  of every training epoch through a temporary file and ``os.replace`` (a kill never leaves a
  half-written checkpoint);
* :class:`RunHistory` — keeps the module's per-epoch ``history`` (and ``run_extras``) in the
  checkpoint, so a resumed run reports the full curves;
* :func:`train_one` — builds everything for one run, resumes from ``last.ckpt`` when present
  (``weights_only=True``), and returns the history;
* the SGD + one-cycle schedule the classification task uses (:func:`build_optimizer`, defined
  for every step count, and :func:`check_lr_schedule`, run before any training).

Determinism: ``seed_everything(seed)`` before the model is built, ``Trainer(deterministic=True)``
on CPU, and loaders whose order is a pure function of ``(seed, epoch)``
(:class:`~attnzoo.bench.data.SeededSampler`): for a given seed every attention sees the same
batches in the same order, and a resumed run sees exactly the batches the uninterrupted run would
have seen.

The reported metric is the one after the *last* epoch (never the best epoch: picking the best
epoch on the test set would be a selection on the test data).
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

from attnzoo.bench.quiet import quiet_lightning

__all__ = [
    "CHECKPOINT_NAME",
    "RunOutcome",
    "TrainConfig",
    "build_optimizer",
    "check_lr_schedule",
    "steps_per_epoch",
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


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, total_steps: int
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
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        (decay if _is_decay_param(name, p) else no_decay).append(p)
    opt = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    pct_start = 0.25 if 0.25 * total_steps != 1 else 0.0
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=cfg.lr,
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=10.0,
        final_div_factor=100.0,
    )
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
            "Change --epochs, --batch-size or --n-train to get another number of steps"
        ) from None
    if not all(math.isfinite(lr) and lr >= 0 for lr in lrs):
        raise ValueError(
            f"bench: the learning-rate schedule ends with LR {lrs} after {total} steps; check --lr"
        )


def _lightning():
    import lightning.pytorch as pl

    return pl


_CLASS_CACHE: dict[str, type] = {}


def _checkpoint_class() -> type:
    if "ckpt" in _CLASS_CACHE:
        return _CLASS_CACHE["ckpt"]
    from lightning.pytorch.callbacks import ModelCheckpoint

    class AtomicCheckpoint(ModelCheckpoint):
        """``ModelCheckpoint`` saving ``last.ckpt`` every epoch via a temp file + ``os.replace``."""

        def __init__(self, dirpath: str | os.PathLike) -> None:
            super().__init__(
                dirpath=str(dirpath),
                filename=CHECKPOINT_NAME[:-5],
                monitor=None,
                save_top_k=1,
                every_n_epochs=1,
                save_on_train_epoch_end=True,
                enable_version_counter=False,
            )

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


def _history_class() -> type:
    if "history" in _CLASS_CACHE:
        return _CLASS_CACHE["history"]
    from lightning.pytorch.callbacks import Callback

    class RunHistory(Callback):
        """Keeps the module's ``history`` (per-epoch rows) and ``run_extras`` (a dict) in every
        checkpoint and restores them on resume, so a resumed run reports its full curves."""

        def on_save_checkpoint(
            self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]
        ) -> None:
            checkpoint["bench_history"] = [dict(r) for r in pl_module.history]
            checkpoint["bench_extras"] = dict(getattr(pl_module, "run_extras", {}) or {})

        def on_load_checkpoint(
            self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]
        ) -> None:
            pl_module.history = [dict(r) for r in checkpoint.get("bench_history", [])]
            pl_module.run_extras = dict(checkpoint.get("bench_extras", {}))

    _CLASS_CACHE["history"] = RunHistory
    return RunHistory


# public names resolved lazily (``from attnzoo.bench.train import AtomicCheckpoint``)
def __getattr__(name: str) -> Any:
    if name == "AtomicCheckpoint":
        return _checkpoint_class()
    if name == "RunHistory":
        return _history_class()
    raise AttributeError(name)


@dataclass
class RunOutcome:
    """What one run returns (on every rank; only rank 0 writes files)."""

    history: list[dict[str, float]]
    resumed_from_epoch: int
    train_seconds: float
    is_global_zero: bool
    module: Any


def _trainer_kwargs(
    *, accelerator: str, devices: Any, num_nodes: int, strategy: str, precision: str | None
) -> dict[str, Any]:
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision is None:
        precision = "32-true" if on_cpu else "16-mixed"
    return dict(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        deterministic=True if on_cpu else "warn",
    )


def train_one(
    make_module: Callable[[], Any],
    make_loaders: Callable[[], tuple[DataLoader, DataLoader]],
    *,
    epochs: int,
    seed: int,
    run_dir: str | os.PathLike,
    accelerator: str = "cpu",
    devices: Any = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str | None = None,
    progress: bool = True,
    logger: bool = True,
    verbose: bool = False,
) -> RunOutcome:
    """Train one (attention, seed) run for ``epochs``, resuming from ``run_dir/last.ckpt`` if it
    exists.

    ``make_module`` (the task's LightningModule with a freshly built network) is called after
    ``seed_everything(seed)``, so the initial weights depend on the seed only; ``make_loaders``
    gives the (train, evaluation) loaders. The module's ``history`` rows are returned. The
    progress bars go to ``stderr``; Lightning's informational messages are shown only when
    ``verbose`` (:func:`attnzoo.bench.quiet.quiet_lightning`).
    """
    with quiet_lightning(verbose):
        return _train_one(
            make_module,
            make_loaders,
            epochs=epochs,
            seed=seed,
            run_dir=run_dir,
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=strategy,
            precision=precision,
            progress=progress,
            logger=logger,
        )


def _train_one(
    make_module: Callable[[], Any],
    make_loaders: Callable[[], tuple[DataLoader, DataLoader]],
    *,
    epochs: int,
    seed: int,
    run_dir: str | os.PathLike,
    accelerator: str,
    devices: Any,
    num_nodes: int,
    strategy: str,
    precision: str | None,
    progress: bool,
    logger: bool,
) -> RunOutcome:
    pl = _lightning()
    from lightning.pytorch.loggers import CSVLogger

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, workers=True, verbose=False)
    module = make_module()
    module.history = []
    module.run_extras = {}
    ckpt = run_dir / CHECKPOINT_NAME
    kwargs = _trainer_kwargs(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[_checkpoint_class()(run_dir), _history_class()(), *_progress_bar(progress)],
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
    train_loader, eval_loader = make_loaders()
    resumed = 0
    if ckpt.is_file():
        resumed = int(torch.load(ckpt, map_location="cpu", weights_only=True).get("epoch", -1)) + 1
    start = time.perf_counter()
    trainer.fit(
        module,
        train_loader,
        eval_loader,
        ckpt_path=str(ckpt) if ckpt.is_file() else None,
        weights_only=True,
    )
    if trainer.world_size > 1:
        # the launcher may have started the other ranks: make sure all are done before writing
        trainer.strategy.barrier("attnzoo.train_one")
    return RunOutcome(
        history=list(module.history),
        resumed_from_epoch=resumed,
        train_seconds=time.perf_counter() - start,
        is_global_zero=trainer.is_global_zero,
        module=module,
    )


def _progress_bar(enabled: bool) -> list[Any]:
    """Lightning's tqdm bar, redrawn every 10 steps (every step costs a few % on tiny models)."""
    if not enabled:
        return []
    from lightning.pytorch.callbacks import TQDMProgressBar

    return [TQDMProgressBar(refresh_rate=10)]


def steps_per_epoch(n_train: int, batch_size: int, world_size: int = 1) -> int:
    return math.ceil(math.ceil(n_train / world_size) / batch_size)
