"""Speed of the built-in detection scenes and of the VOC / COCO round trip.

Measures ``make_digit_scenes`` (scenes per second, after a warm-up call that imports
scikit-learn), iterating a ``DetectionDataset`` (items per second, native size and resized), and
``write_voc`` + ``read_voc`` / ``write_coco`` + ``read_coco`` (images per second). Single process,
torch limited to ``--threads`` threads; median of ``--rounds``.

Writes ``benchmarks/results/datasets.md``.

    python benchmarks/datasets.py --n 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from attnzoo.datasets import (
    DetectionDataset,
    make_digit_scenes,
    read_coco,
    read_voc,
    write_coco,
    write_voc,
)


def rate(fn: Callable[[], object], n: int, rounds: int) -> tuple[float, float]:
    """Median items per second of ``fn`` handling ``n`` items: per CPU second of this process
    (robust to other jobs on the machine) and per wall-clock second."""
    cpu, wall = [], []
    for _ in range(rounds):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return n / statistics.median(cpu), n / statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="scenes per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "datasets.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.n
    make_digit_scenes(1, 1)  # imports scikit-learn
    rows = []
    for canvas, background in ((128, "black"), (128, "photo"), (416, "black"), (416, "photo")):
        k = n if canvas == 128 else max(1, n // 8)
        r = rate(
            partial(make_digit_scenes, k, 1, canvas=canvas, background=background), k, args.rounds
        )
        rows.append((f"`make_digit_scenes`, {canvas}², {background}", "scenes", r))
    train, _ = make_digit_scenes(n, 1, canvas=128)
    for size in (None, 416):
        ds = DetectionDataset(train, size)
        r = rate(partial(list, ds), n, args.rounds)
        rows.append((f"`DetectionDataset` item, 128² → {size or 128}²", "items", r))
    small = train.subset(range(min(n, 500)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows.append(
            (
                "`write_voc` (JPEG)",
                "images",
                rate(lambda: write_voc(small, root / "voc"), len(small), args.rounds),
            )
        )
        rows.append(
            (
                "`read_voc` (parse + check headers)",
                "images",
                rate(lambda: read_voc(root / "voc", "train"), len(small), args.rounds),
            )
        )
        rows.append(
            (
                "`write_coco` (JPEG, RLE masks)",
                "images",
                rate(lambda: write_coco(small, root / "coco"), len(small), args.rounds),
            )
        )
        rows.append(
            (
                "`read_coco` (parse + check headers)",
                "images",
                rate(
                    lambda: read_coco(root / "coco" / "annotations.json", root / "coco" / "images"),
                    len(small),
                    args.rounds,
                ),
            )
        )
    lines = [
        "# Built-in scenes and VOC / COCO I/O",
        "",
        f"`python benchmarks/datasets.py --n {n} --rounds {args.rounds} --threads "
        f"{args.threads}`; one process, median of the rounds. Python {platform.python_version()}"
        f", {platform.machine()}, torch {torch.__version__}. Scenes: defaults (1–4 digits, "
        "scales 2–5, 4–8 clutter fragments, colour); 416² rows use n/8 scenes; I/O rows use "
        "min(n, 500) 128² scenes.",
        "",
        f"Load average when it finished: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (the "
        "wall-clock column suffers from other jobs; the CPU column much less).",
        "",
        "| what | per CPU second | per wall-clock second |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {what} | {cpu:,.0f} {unit} | {wall:,.0f} {unit} |" for what, unit, (cpu, wall) in rows
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
