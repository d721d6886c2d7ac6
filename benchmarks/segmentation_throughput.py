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
import tempfile
import time
from pathlib import Path

import torch
from _shared import compare_epochs, machine, throughput_table, trainer_epoch, write_part
from torch import nn

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
        return compare_epochs(
            lambda epoch: bare_epoch(bare_model, loss_fn, loader, cfg, epoch),
            lambda: trainer_epoch(build_segment_module(engine_model, k, cfg), loader, logs),
            size=size,
            n=n,
            rounds=rounds,
        )


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
    lines = [
        "## Training throughput",
        "",
        "The segment task's training step (`SegmentModule` through a Lightning `Trainer`, as the "
        "bench runs it) vs a bare PyTorch loop on the same `danet_small` (head "
        f"`{args.attention}`), loss, data loader, optimiser and poly schedule; built-in scenes, "
        f"batch {args.batch_size}, {args.threads} thread(s), {args.rounds} interleaved rounds "
        "of one epoch each (median). Target: within 10 %.",
        "",
        *throughput_table(rows),
        "",
        f"Machine: {machine()}.",
        "",
        "Command: `python benchmarks/segmentation_throughput.py --threads "
        f"{args.threads} --rounds {args.rounds} --attention {args.attention} --batch-size "
        f"{args.batch_size} --sizes {args.sizes}`",
    ]
    write_part(Path(args.out), "\n".join(lines), START, END, "Segmentation benchmarks")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
