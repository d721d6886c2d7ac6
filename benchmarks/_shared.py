"""Pieces the benchmark scripts share (imported from the same folder; not a benchmark).

- :func:`load_average`: the machine's load for a result's footer;
- :func:`write_part`: replace one benchmark's marked part of a result file, keeping the rest;
- :func:`trainer_epoch`: one training epoch of a LightningModule through a ``Trainer`` set up as
  the bench sets it up, timed from the epoch's start to its end;
- :func:`compare_epochs` and :func:`throughput_table`: the interleaved "engine vs bare loop"
  comparison of the task throughput benchmarks and its table.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def load_average() -> str:
    """``"1.02 / 0.51 / 0.21"`` (1/5/15 min), or ``"n/a"`` where the OS has none."""
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> str:
    """Processor, cores, load average and torch version, for a result's footer."""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{load_average()} (1/5/15 min) at the end; torch {torch.__version__}"
    )


def write_part(path: Path, text: str, start: str, end: str, title: str) -> None:
    """Replace the text between the markers ``start`` and ``end`` in ``path`` (or append them
    with ``text``; a new file starts with the heading ``title``), keeping everything else.
    Written through a temporary file and a rename, so an interrupted run leaves the old file."""
    old = path.read_text() if path.is_file() else f"# {title}\n"
    block = f"{start}\n{text.strip()}\n{end}"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new.rstrip("\n") + "\n")
    tmp.replace(path)


def trainer_epoch(module: Any, loader: Any, log_dir: str) -> tuple[float, float]:
    """One epoch of ``module`` (a LightningModule) through a CPU ``Trainer`` with the bench's
    settings (CSV logger, no checkpoints, no validation); (wall, CPU) seconds of the epoch."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from attnzoo.bench.quiet import quiet_lightning

    marks: dict[str, float] = {}

    class Clock(pl.Callback):
        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            marks["w0"], marks["c0"] = time.perf_counter(), time.process_time()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            marks["w1"], marks["c1"] = time.perf_counter(), time.process_time()

    with quiet_lightning(False):
        trainer = pl.Trainer(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            logger=CSVLogger(log_dir, name="", version="logs"),
            log_every_n_steps=10,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
            deterministic=True,
            callbacks=[Clock()],
        )
        trainer.fit(module, loader)
    return marks["w1"] - marks["w0"], marks["c1"] - marks["c0"]


def compare_epochs(
    bare: Callable[[int], tuple[float, float]],
    engine: Callable[[], tuple[float, float]],
    *,
    size: int,
    n: int,
    rounds: int,
) -> dict[str, float]:
    """Interleave ``rounds`` epochs of the bare loop (``bare(epoch)``) and of the engine
    (``engine()``), after one warm-up epoch of each; medians of images/s and of the per-round
    engine / bare time ratios (wall and CPU), with their ranges."""
    bare(0)
    engine()
    walls: dict[str, list[float]] = {"bare": [], "engine": []}
    cpus: dict[str, list[float]] = {"bare": [], "engine": []}
    for r in range(rounds):
        for name, (w, c) in (("bare", bare(r + 1)), ("engine", engine())):
            walls[name].append(w)
            cpus[name].append(c)
        print(
            f"{size}px round {r + 1}: bare {n / walls['bare'][-1]:.1f} img/s, engine "
            f"{n / walls['engine'][-1]:.1f} img/s; CPU ratio "
            f"{cpus['engine'][-1] / cpus['bare'][-1]:.3f}",
            flush=True,
        )
    ratios = sorted(e / b for b, e in zip(walls["bare"], walls["engine"]))
    cpu_ratios = sorted(e / b for b, e in zip(cpus["bare"], cpus["engine"]))
    return {
        "size": size,
        "n": n,
        "bare": n / statistics.median(walls["bare"]),
        "engine": n / statistics.median(walls["engine"]),
        "ratio": statistics.median(ratios),
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
        "cpu_ratio": statistics.median(cpu_ratios),
        "cpu_min": cpu_ratios[0],
        "cpu_max": cpu_ratios[-1],
    }


def throughput_table(rows: list[dict[str, float]]) -> list[str]:
    """The Markdown table of :func:`compare_epochs` rows."""
    return [
        "| input | images / epoch | bare images/s | engine images/s | engine / bare time "
        "(min–max) | engine / bare CPU time (min–max) |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {r['size']}² | {r['n']} | {r['bare']:.1f} | {r['engine']:.1f} | "
            f"**{r['ratio']:.3f}** ({r['ratio_min']:.3f}–{r['ratio_max']:.3f}) | "
            f"{r['cpu_ratio']:.3f} ({r['cpu_min']:.3f}–{r['cpu_max']:.3f}) |"
            for r in rows
        ],
    ]
