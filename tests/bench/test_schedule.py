"""The bench's learning-rate schedule: defined for every step count, checked before training."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from attnzoo.bench import train as train_mod
from attnzoo.bench.run import run
from attnzoo.bench.train import TrainConfig, build_optimizer, check_lr_schedule, steps_per_epoch


def _lrs(total: int, cfg: TrainConfig) -> list[float]:
    """The LR of every optimiser step, stepping optimiser and schedule as training does."""
    opt, sched = build_optimizer(nn.Linear(3, 2), cfg, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: only the order of the calls matters here
        sched.step()
    return lrs


@pytest.mark.parametrize("epochs", range(1, 13))
def test_schedule_is_defined_for_every_step_count(epochs: int) -> None:
    cfg = TrainConfig(epochs=epochs, lr=0.1)
    for batches in range(1, 13):
        total = epochs * batches
        lrs = _lrs(total, cfg)
        assert len(lrs) == total
        assert all(math.isfinite(lr) and 0 < lr <= cfg.lr * (1 + 1e-9) for lr in lrs), (total, lrs)
        if total >= 2:  # the cycle ends at max_lr / (div_factor * final_div_factor)
            assert lrs[-1] == pytest.approx(cfg.lr / 1000)
        check_lr_schedule(cfg, batches)


def test_schedule_keeps_one_cycle_where_torch_works() -> None:
    cfg = TrainConfig(lr=0.2)
    for total in (5, 8, 47, 376):
        model = nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        ref = torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=cfg.lr,
            total_steps=total,
            pct_start=0.25,
            div_factor=10.0,
            final_div_factor=100.0,
        )
        expected = []
        for _ in range(total):
            expected.append(opt.param_groups[0]["lr"])
            opt.step()
            ref.step()
        assert _lrs(total, cfg) == pytest.approx(expected)
    four = _lrs(4, cfg)  # torch's warm-up would have length 0 here: no warm-up, then annealing
    assert four[0] < cfg.lr and four == sorted(four, reverse=True)


def test_pre_run_check_says_what_to_change(monkeypatch) -> None:
    real = train_mod.build_optimizer

    def broken(model, cfg, total_steps):
        opt, sched = real(model, cfg, total_steps)
        if total_steps == 6:
            raise ZeroDivisionError("float division by zero")
        return opt, sched

    monkeypatch.setattr(train_mod, "build_optimizer", broken)
    check_lr_schedule(TrainConfig(epochs=2), 2)
    with pytest.raises(
        ValueError,
        match=r"schedule fails for 2 epochs x 3 batches per epoch "
        r"\(6 steps\): ZeroDivisionError.*Change --epochs, "
        r"--batch-size or --n-train",
    ):
        check_lr_schedule(TrainConfig(epochs=2), 3)


def test_run_checks_the_schedule_before_any_training(tmp_path: Path, monkeypatch) -> None:
    def broken(cfg, steps):
        raise ValueError(f"bench: the learning-rate schedule fails for {cfg.epochs} x {steps}")

    classify = importlib.import_module("attnzoo.bench.tasks.classify")
    monkeypatch.setattr(classify, "check_lr_schedule", broken)
    with pytest.raises(ValueError, match="fails for 2 x 2"):
        run(
            "none",
            out=tmp_path,
            epochs=2,
            batch_size=64,
            n_train=90,
            n_test=20,
            progress=False,
            profile=False,
            localise=False,
        )
    assert not (tmp_path / "runs").exists()
    assert steps_per_epoch(90, 64) == 2 and steps_per_epoch(90, 32, world_size=2) == 2


@pytest.mark.slow
def test_four_steps_train_end_to_end(tmp_path: Path) -> None:
    """2 epochs of 90 images at batch 64: 4 optimiser steps (a ZeroDivisionError in torch's
    OneCycleLR with pct_start=0.25)."""
    result = run(
        "none",
        out=tmp_path,
        epochs=2,
        batch_size=64,
        n_train=90,
        n_test=20,
        seeds=[0],
        progress=False,
        profile=False,
        localise=False,
        report=False,
    )
    (row,) = result.runs
    assert row["epochs"] == 2 and 0.0 <= row["test_acc"] <= 1.0
    assert all(math.isfinite(h["lr"]) and h["lr"] > 0 for h in row["history"])
