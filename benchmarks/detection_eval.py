"""Cost of detection evaluation: post-processing (decode + NMS) and the mAP metrics.

1. ``attnzoo.detection.postprocess`` on a batch of YOLOv4-tiny head maps at the mAP setting
   (``conf_threshold=0.001``, NMS IoU 0.5, 100 boxes per image) with random logits (an untrained
   detector: nearly every box passes the threshold, the worst case), against the same pipeline
   with ``torchvision.ops.batched_nms`` and against the reference's loop (one ``nms`` per image
   and class), and against a forward pass of the model (the yardstick).
2. The metrics on ``--images`` images with 100 detections each: VOC AP (update + compute) and COCO
   AP through torchmetrics with the pycocotools and faster-coco-eval backends.

Rounds alternate between the variants; medians and ratios are reported. Writes
``benchmarks/results/detection_eval.md``.

    python benchmarks/detection_eval.py --rounds 3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.ops import batched_nms, nms

import attnzoo.detection.decode as decode
from attnzoo.detection import COCOMeanAP, VOCMeanAP, YoloV4Tiny, decode_outputs, postprocess


def seconds(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def reference_loop(outputs: tuple[torch.Tensor, ...], size: int) -> list:
    """The reference's post-processing: per image, per class ``nms`` (then our cap)."""
    result = []
    for det in decode_outputs(outputs, size):
        conf, label = det[:, 5:].amax(1), det[:, 5:].argmax(1)
        score = det[:, 4] * conf
        det, score, label = det[score >= 0.001], score[score >= 0.001], label[score >= 0.001]
        kept = [torch.nonzero(label == c).squeeze(1) for c in label.unique()]
        kept = torch.cat([k[nms(det[k, :4], score[k], 0.5)] for k in kept])
        result.append(kept[score[kept].argsort(descending=True)][:100])
    return result


def with_batched_nms(outputs: tuple[torch.Tensor, ...], size: int) -> list:
    """``postprocess`` with torchvision's ``batched_nms`` in place of the one-sort grouping."""
    original = decode._grouped_nms
    decode._grouped_nms = batched_nms
    try:
        return postprocess(outputs, size)
    finally:
        decode._grouped_nms = original


def random_eval_set(n_images: int, num_classes: int) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(0)
    preds, targets = [], []
    for _ in range(n_images):
        xy, wh = torch.rand(100, 2, generator=gen) * 300, torch.rand(100, 2, generator=gen) * 100
        preds.append(
            {
                "boxes": torch.cat([xy, xy + wh + 4], 1),
                "scores": torch.rand(100, generator=gen),
                "labels": torch.randint(num_classes, (100,), generator=gen),
            }
        )
        xy, wh = torch.rand(5, 2, generator=gen) * 300, torch.rand(5, 2, generator=gen) * 100
        targets.append(
            {
                "boxes": torch.cat([xy, xy + wh + 4], 1),
                "labels": torch.randint(num_classes, (5,), generator=gen),
            }
        )
    return preds, targets


def metric_seconds(make: Callable[[], object], preds: list, targets: list) -> float:
    metric = make()
    t = time.perf_counter()
    for i in range(0, len(preds), 16):
        metric.update(preds[i : i + 16], targets[i : i + 16])
    metric.compute()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=416)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "detection_eval.md")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = YoloV4Tiny(args.classes).eval()
    images = torch.rand(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        outputs = tuple(torch.randn_like(o) for o in model(images))
    post = {
        "postprocess (one sort, then nms per image and class)": lambda: postprocess(
            outputs, args.size
        ),
        "same with torchvision batched_nms": lambda: with_batched_nms(outputs, args.size),
        "reference loop (nms per image and class)": lambda: reference_loop(outputs, args.size),
    }
    with torch.no_grad():
        post["YoloV4Tiny forward (yardstick)"] = lambda: model(images)
        times: dict[str, list[float]] = {k: [] for k in post}
        for _ in range(args.rounds):
            for name, fn in post.items():
                times[name].append(seconds(fn))
    preds, targets = random_eval_set(args.images, args.classes)
    metrics: dict[str, Callable[[], object]] = {
        "VOC AP (attnzoo VOCMeanAP)": lambda: VOCMeanAP(args.classes),
        "COCO AP, pycocotools": lambda: COCOMeanAP(backend="pycocotools"),
    }
    if importlib.util.find_spec("faster_coco_eval"):
        metrics["COCO AP, faster-coco-eval"] = lambda: COCOMeanAP(backend="faster_coco_eval")
    mtimes: dict[str, list[float]] = {k: [] for k in metrics}
    for _ in range(args.rounds):
        for name, make in metrics.items():
            mtimes[name].append(metric_seconds(make, preds, targets))

    base = statistics.median(times["postprocess (one sort, then nms per image and class)"])
    lines = [
        "# Detection evaluation cost",
        "",
        f"`python benchmarks/detection_eval.py --rounds {args.rounds}` - torch {torch.__version__},"
        f" {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} "
        f"threads, load average {os.getloadavg()[0]:.1f} at the end; medians of {args.rounds} "
        "alternating rounds (on a loaded machine compare the ratios, not the seconds).",
        "",
        f"## Post-processing a batch of {args.batch} at {args.size}x{args.size}, {args.classes} "
        "classes, random logits, conf 0.001, NMS 0.5, 100 boxes per image",
        "",
        "| step | median s | ratio to postprocess |",
        "|---|---:|---:|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.3f} | {median / base:.2f} |")
    lines += [
        "",
        f"## Metrics on {args.images} images, 100 detections and 5 boxes each, "
        f"{args.classes} classes (update in batches of 16 + compute)",
        "",
        "| metric | median s |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {statistics.median(v):.2f} |" for name, v in mtimes.items()]
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
