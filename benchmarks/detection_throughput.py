"""Training throughput of ``attnzoo bench --task detect`` vs a bare PyTorch loop.

Same YOLOv4-tiny (attention ``--attention``), same loss (``YoloV4TinyLoss``), same data (the
built-in digit scenes at the given size, the task's ``DetectionDataset`` / ``collate_detection``
loader with its seeded sampler), same SGD and warm-up + cosine schedule. The engine side is the
task's ``DetectModule`` run by a Lightning ``Trainer`` configured as the bench configures it
(CSV logger, per-step loss logging, no validation here); the bare side is a plain loop. The two
alternate round by round (one epoch each) and each epoch is timed from its first to its last
training step (Lightning: ``on_train_epoch_start`` -> ``on_train_epoch_end``), so the comparison
is of steady-state step throughput. Reported: images/s (median), the time ratio per round, and
the process-CPU-time ratio (robust to other jobs on a shared machine).

Writes (replaces) the "Training throughput" section of ``benchmarks/results/detection.md``,
keeping the file's other sections. Target: the engine within 10 % of the bare loop.

    python benchmarks/detection_throughput.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import torch
from _shared import compare_epochs, machine, throughput_table, trainer_epoch
from torch import nn

from attnzoo.bench.tasks.detect import (
    DEFAULT_IMAGE_SIZE,
    DetectConfig,
    DetectionSplits,
    build_detect_module,
    build_detect_optimizer,
    detect_loaders,
    yolov4_tiny,
)
from attnzoo.datasets import DetectionDataset, make_digit_scenes
from attnzoo.detection.loss import YoloV4TinyLoss

SECTION = "## Training throughput"


def scenes(size: int, n: int) -> DetectionSplits:
    train, test = make_digit_scenes(n, 1, canvas=size, scales=(2, min(5, size // 8)), seed=0)
    classes = list(train.classes)
    return DetectionSplits(
        name="scenes",
        description="",
        classes=classes,
        train=DetectionDataset(train, size),
        test=DetectionDataset(test, size),
        image_size=size,
    )


def bare_epoch(
    model: nn.Module, loss_fn: nn.Module, loader, cfg: DetectConfig, epoch: int
) -> tuple[float, float]:
    """One epoch of a plain loop (same optimiser and schedule); (wall, CPU) seconds."""
    opt, sched = build_detect_optimizer(model, cfg, len(loader))
    model.train()
    loader.sampler.set_epoch(epoch)
    start, cpu = time.perf_counter(), time.process_time()
    for images, targets in loader:
        loss = loss_fn(model(images), targets)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - start, time.process_time() - cpu


def measure(size: int, n: int, batch: int, rounds: int, attention: str) -> dict[str, float]:
    splits = scenes(size, n)
    cfg = DetectConfig(epochs=1, batch_size=batch)
    loader, _ = detect_loaders(splits, cfg, seed=0)
    attn = None if attention == "none" else attention
    torch.manual_seed(0)
    bare_model, engine_model = yolov4_tiny(attn, 10), yolov4_tiny(attn, 10)
    loss_fn = YoloV4TinyLoss(10)
    with tempfile.TemporaryDirectory() as logs:
        return compare_epochs(
            lambda epoch: bare_epoch(bare_model, loss_fn, loader, cfg, epoch),
            lambda: trainer_epoch(
                build_detect_module(engine_model, splits.num_classes, cfg), loader, logs
            ),
            size=size,
            n=n,
            rounds=rounds,
        )


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of ``path`` (or append it), keeping the others."""
    old = path.read_text() if path.is_file() else "# Detection benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = (
        pattern.sub(lambda _: text, old)
        if pattern.search(old)
        else (old.rstrip("\n") + "\n\n" + text)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new.rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--attention", default="none")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--sizes",
        default=f"416:32,{DEFAULT_IMAGE_SIZE}:160",
        help="size:images per epoch, comma-separated",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "detection.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for item in args.sizes.split(","):
        size, n = (int(v) for v in item.split(":"))
        rows.append(measure(size, n, args.batch_size, args.rounds, args.attention))
    lines = [
        SECTION,
        "",
        f"The detect task's training step (`DetectModule` through a Lightning `Trainer`, as the "
        f"bench runs it) vs a bare PyTorch loop on the same YOLOv4-tiny (attention "
        f"`{args.attention}`), loss, data loader, optimiser and schedule; built-in scenes, batch "
        f"{args.batch_size}, {args.threads} thread(s), {args.rounds} interleaved rounds of one "
        "epoch each (median). Target: within 10 %.",
        "",
        *throughput_table(rows),
        "",
        f"Machine: {machine()}.",
        "",
        "Command: `python benchmarks/detection_throughput.py --threads "
        f"{args.threads} --rounds {args.rounds} --attention {args.attention} --batch-size "
        f"{args.batch_size} --sizes {args.sizes}`",
        "",
    ]
    write_section(Path(args.out), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
