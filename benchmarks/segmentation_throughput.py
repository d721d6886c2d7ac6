"""Training throughput of ``attnzoo bench --task segment`` vs a bare PyTorch loop.

Same DANet (``danet_small`` with the head ``--attention``), same loss (``SegmentationLoss`` of the
network's preset), same data (the built-in scenes' semantic masks at the given size, the task's
``SegmentationDataset`` and seeded loader), same optimiser and poly schedule. The engine side is
the task's ``SegmentModule`` run by a Lightning ``Trainer`` configured as the bench configures it
(CSV logger, no validation here); the bare side is a plain loop. The two alternate round by round
(one epoch each) and each epoch is timed from its first to its last training step (Lightning:
``on_train_epoch_start`` -> ``on_train_epoch_end``), so the comparison is of steady-state step
throughput. Reported: images/s (median), the time ratio per round, and the process-CPU-time ratio
(robust to other jobs on a shared machine).

Writes the part of ``benchmarks/results/segmentation.md`` between ``<!-- throughput:start -->``
and ``<!-- throughput:end -->`` (other parts of the file are kept). Target: the engine within
10 % of the bare loop.

    python benchmarks/segmentation_throughput.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from attnzoo.bench.quiet import quiet_lightning
from attnzoo.bench.tasks.segment import (
    SegmentConfig,
    build_segment_module,
    build_segment_optimizer,
    load_segmentation_data,
    segment_loaders,
)
from attnzoo.segmentation import SEGMENTATION_MODELS, SegmentationLoss

START, END = "<!-- throughput:start -->", "<!-- throughput:end -->"


def bare_epoch(model: nn.Module, loss_fn: nn.Module, loader, cfg: SegmentConfig, epoch: int):
    """One epoch of a plain loop (same optimiser and schedule); (wall, CPU) seconds."""
    opt, sched = build_segment_optimizer(model, cfg, len(loader))
    model.train()
    loader.sampler.set_epoch(epoch)
    start, cpu = time.perf_counter(), time.process_time()
    for images, masks in loader:
        loss = loss_fn(model(images), masks)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - start, time.process_time() - cpu


def engine_epoch(model: nn.Module, num_classes: int, loader, cfg: SegmentConfig, log_dir: str):
    """One epoch of the task's LightningModule through a Trainer; (wall, CPU) seconds."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    marks: dict[str, float] = {}

    class Clock(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            marks["w0"], marks["c0"] = time.perf_counter(), time.process_time()

        def on_train_epoch_end(self, trainer, module):
            marks["w1"], marks["c1"] = time.perf_counter(), time.process_time()

    module = build_segment_module(model, num_classes, cfg)
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


def measure(size: int, n: int, batch: int, rounds: int, attention: str) -> dict[str, float]:
    splits = load_segmentation_data("scenes:digit", image_size=size, n_train=n, n_test=1)
    cfg = SegmentConfig(epochs=1, batch_size=batch)
    loader, _ = segment_loaders(splits, cfg, seed=0)
    attn = None if attention == "none" else attention
    k = splits.num_classes
    torch.manual_seed(0)
    build = SEGMENTATION_MODELS["danet_small"]
    bare_model, engine_model = build(k, attention=attn), build(k, attention=attn)
    loss_fn = SegmentationLoss(preset=bare_model.preset)
    with tempfile.TemporaryDirectory() as logs:
        bare_epoch(bare_model, loss_fn, loader, cfg, 0)  # warm-up both
        engine_epoch(engine_model, k, loader, cfg, logs)
        bare, eng, bare_cpu, eng_cpu = [], [], [], []
        for r in range(rounds):
            w, c = bare_epoch(bare_model, loss_fn, loader, cfg, r + 1)
            bare.append(w)
            bare_cpu.append(c)
            w, c = engine_epoch(engine_model, k, loader, cfg, logs)
            eng.append(w)
            eng_cpu.append(c)
            print(
                f"{size}px round {r + 1}: bare {n / bare[-1]:.1f} img/s, engine "
                f"{n / eng[-1]:.1f} img/s; CPU ratio {eng_cpu[-1] / bare_cpu[-1]:.3f}",
                flush=True,
            )
    ratios = sorted(e / b for b, e in zip(bare, eng))
    cpu_ratios = sorted(e / b for b, e in zip(bare_cpu, eng_cpu))
    return {
        "size": size,
        "n": n,
        "bare": n / statistics.median(bare),
        "engine": n / statistics.median(eng),
        "ratio": statistics.median(ratios),
        "ratio_min": ratios[0],
        "ratio_max": ratios[-1],
        "cpu_ratio": statistics.median(cpu_ratios),
        "cpu_min": cpu_ratios[0],
        "cpu_max": cpu_ratios[-1],
    }


def write_part(path: Path, text: str) -> None:
    """Replace the text between this benchmark's markers in ``path`` (or append the markers),
    keeping everything else."""
    old = path.read_text() if path.is_file() else "# Segmentation benchmarks\n"
    block = f"{START}\n{text.strip()}\n{END}"
    if START in old and END in old:
        head, rest = old.split(START, 1)
        new = head + block + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new.rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--attention", default="dual_attention")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--sizes", default="64:192", help="size:images per epoch, comma-separated")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "segmentation.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for item in args.sizes.split(","):
        size, n = (int(v) for v in item.split(":"))
        rows.append(measure(size, n, args.batch_size, args.rounds, args.attention))
    try:
        load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        load = "n/a"
    lines = [
        "## Training throughput",
        "",
        "The segment task's training step (`SegmentModule` through a Lightning `Trainer`, as the "
        "bench runs it) vs a bare PyTorch loop on the same `danet_small` (head "
        f"`{args.attention}`), loss, data loader, optimiser and poly schedule; built-in scenes, "
        f"batch {args.batch_size}, {args.threads} thread(s), {args.rounds} interleaved rounds "
        "of one epoch each (median). Target: within 10 %.",
        "",
        "| input | images / epoch | bare images/s | engine images/s | engine / bare time "
        "(min–max) | engine / bare CPU time (min–max) |",
        "|---|---:|---:|---:|---:|---:|",
        *[
            f"| {r['size']}² | {r['n']} | {r['bare']:.1f} | {r['engine']:.1f} | "
            f"**{r['ratio']:.3f}** ({r['ratio_min']:.3f}–{r['ratio_max']:.3f}) | "
            f"{r['cpu_ratio']:.3f} ({r['cpu_min']:.3f}–{r['cpu_max']:.3f}) |"
            for r in rows
        ],
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"average {load} (1/5/15 min) at the end; torch {torch.__version__}.",
        "",
        "Command: `python benchmarks/segmentation_throughput.py --threads "
        f"{args.threads} --rounds {args.rounds} --attention {args.attention} --batch-size "
        f"{args.batch_size} --sizes {args.sizes}`",
    ]
    write_part(Path(args.out), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
