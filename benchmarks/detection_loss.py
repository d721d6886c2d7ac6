"""YOLOv4-tiny target assignment + loss: vectorised vs a literal per-box port vs the network.

Times, per batch of 16 images at 416 x 416 with 20 boxes each and 20 classes (float32, CPU, 2
torch threads):

- ``vectorised``: :class:`attnzoo.detection.YoloV4TinyLoss` (assignment, ignore rule and loss
  terms), forward and backward to the head maps;
- ``literal port``: the same maths written as the reference bubbliiiing/yolov4-tiny-pytorch
  writes it, with Python loops over images and boxes (``tests/detection/literal_yolo_loss.py``,
  the oracle of the unit tests), forward and backward;
- ``YOLOv4-tiny fwd+bwd``: the network's forward and backward (train mode) on the same batch.

The loss forward alone is reported as well. Variants are interleaved round by round in a rotated
order; every time is the median over rounds. Targets: the vectorised loss + assignment (forward and
backward) at most 1/5 of the literal port's time and at most 10 % of the network's forward and
backward.

Usage::

    python benchmarks/detection_loss.py            # 7 rounds
    python benchmarks/detection_loss.py --quick    # 2 rounds: a smoke run, noisy

Writes the section "Loss and assignment" of ``benchmarks/results/detection.md`` (atomically,
other sections kept) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "detection.md"
SECTION = "## Loss and assignment"
sys.path.insert(0, str(ROOT.parent / "tests" / "detection"))

from literal_yolo_loss import literal_yolo_loss  # noqa: E402

from attnzoo.detection import ANCHOR_MASKS, ANCHORS, YoloV4Tiny, YoloV4TinyLoss  # noqa: E402

BATCH, BOXES, SIZE, CLASSES = 16, 20, 416, 20


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_batch(seed: int = 0) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], list[dict]]:
    """Images, random head maps and targets (anchor-like boxes with centres in the image)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(BATCH, 3, SIZE, SIZE, generator=gen)
    anchors = torch.tensor(ANCHORS, dtype=torch.float32)
    targets = []
    for _ in range(BATCH):
        centre = torch.rand(BOXES, 2, generator=gen) * SIZE
        wh = anchors[torch.randint(0, 6, (BOXES,), generator=gen)] * (
            0.5 + 1.5 * torch.rand(BOXES, 2, generator=gen)
        )
        boxes = torch.cat([(centre - wh / 2).clamp(min=0), (centre + wh / 2).clamp(max=SIZE)], 1)
        targets.append(
            {"boxes": boxes, "labels": torch.randint(0, CLASSES, (BOXES,), generator=gen)}
        )
    outputs = tuple(
        0.7 * torch.randn(BATCH, 3 * (5 + CLASSES), SIZE // s, SIZE // s, generator=gen)
        for s in (32, 16)
    )
    return images, outputs, targets


def time_once(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(rounds: int) -> dict[str, list[float]]:
    images, outputs, targets = make_batch()
    loss = YoloV4TinyLoss(CLASSES)
    model = YoloV4Tiny(CLASSES).train()

    def heads() -> tuple[torch.Tensor, ...]:
        return tuple(o.clone().requires_grad_() for o in outputs)

    def vectorised(backward: bool) -> Callable[[], None]:
        def run() -> None:
            value = loss(heads(), targets)["loss"]
            if backward:
                value.backward()

        return run

    def literal(backward: bool) -> Callable[[], None]:
        def run() -> None:
            value = literal_yolo_loss(
                heads(), targets, CLASSES, anchors=ANCHORS, anchor_masks=ANCHOR_MASKS
            )["loss"]
            if backward:
                value.backward()

        return run

    def network() -> None:
        model.zero_grad(set_to_none=True)
        p5, p4 = model(images)
        (p5.sum() + p4.sum()).backward()

    variants = {
        "vectorised fwd": vectorised(False),
        "vectorised fwd+bwd": vectorised(True),
        "literal fwd": literal(False),
        "literal fwd+bwd": literal(True),
        "YOLOv4-tiny fwd+bwd": network,
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(time_once(variants[name]))
    return times


def render(times: dict[str, list[float]], rounds: int, wall: float) -> str:
    med = {name: statistics.median(values) for name, values in times.items()}
    vec, lit, net = med["vectorised fwd+bwd"], med["literal fwd+bwd"], med["YOLOv4-tiny fwd+bwd"]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    speedup, share = lit / vec, vec / net

    def met(ok: bool) -> str:
        return "met" if ok else "not met"

    lines = [
        SECTION,
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; wall time "
        f"{wall / 60:.1f} min; rounds: {rounds}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- CPU: {_cpu_name()} ({os.cpu_count()} logical cores), torch threads: "
        f"{torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        f"- batch {BATCH} images, {BOXES} boxes each, {SIZE}x{SIZE}, {CLASSES} classes, float32; "
        "loss = assignment + ignore rule + CIoU/objectness/class terms of both heads; fwd+bwd = "
        "loss forward and backward to the head maps; network = YOLOv4-tiny forward + backward "
        "(train mode) on the same batch",
        "- literal port: `tests/detection/literal_yolo_loss.py` (the reference's steps with Python "
        "loops over images and boxes; the unit tests' oracle)",
        "- variants interleaved round by round (rotated order); times are medians over rounds",
        f"- note: measured while other jobs were running on the machine (load average {load} on "
        f"{os.cpu_count()} cores); absolute times are inflated and noisy, the ratios less so; "
        "re-run on a quiet machine for reference numbers. On an oversubscribed machine the "
        "OpenMP workers' spin-waiting slows every multi-threaded op many-fold; "
        "`OMP_WAIT_POLICY=PASSIVE` avoids that",
        "",
        "| variant | median time (ms) |",
        "|---|---:|",
        *(f"| {name} | {1000 * value:.1f} |" for name, value in med.items()),
        "",
        "| target | measured | met |",
        "|---|---:|:---:|",
        f"| vectorised fwd+bwd <= 1/5 of the literal port | 1/{speedup:.1f} "
        f"({100 / speedup:.1f} %) | {met(speedup >= 5)} |",
        f"| vectorised fwd+bwd <= 10 % of YOLOv4-tiny fwd+bwd | {100 * share:.2f} % | "
        f"{met(share <= 0.10)} |",
        f"| (forward only) vectorised vs literal port | "
        f"1/{med['literal fwd'] / med['vectorised fwd']:.1f} | |",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace (or append) this script's section, keeping the file's other sections."""
    text = path.read_text() if path.exists() else "# Detection benchmarks\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 rounds: a noisy smoke run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else args.rounds
    start = time.perf_counter()
    section = render(measure(rounds), rounds, time.perf_counter() - start)
    print(section)
    if not args.no_write:
        write_section(RESULTS, section)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
