"""Cascade R-CNN vs Faster R-CNN: train-step time, inference time and peak train-step memory.

Both detectors are built by :mod:`attnzoo.detection.rcnn` on the same backbone (attention
``--attention``) with the same RPN and RoI settings; only the RoI heads differ (Faster R-CNN: one
``TwoMLPHead`` and class-specific regression; Cascade: three stages at IoU 0.5/0.6/0.7). Inputs are
built-in digit scenes (one class) at ``--size`` px (``N`` or ``HxW``: a non-square size resizes
the square scenes, e.g. ``800x1333``, the paper's test size).

* **train step**: forward in train mode, sum of the loss dict, backward, SGD step, batch
  ``--batch``;
* **inference**: eval-mode forward under ``no_grad`` (the cascade's three stages and score
  ensemble), batch ``--batch``, reported per image;
* the two models alternate within every round (order rotated); times are the median and
  quartiles over ``--rounds`` rounds of ``--steps`` steps each;
* **peak memory** of one train step: each model in a fresh subprocess; the growth of the process's
  peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) from just before the
  step (model built, data loaded, one inference pass done) to just after it. It counts every
  byte the step touches (activations, gradients, optimiser state, allocator caches), not only
  tensors.

Targets (Cai & Vasconcelos, CVPR 2018, Table 7 timings): the cascade's added cost at most +21 %
at inference (0.115 / 0.095 s) and +60 % in training; peak train-step memory at most 1.3x.

``--fast`` builds and runs both with the :mod:`attnzoo.fast` switch on: their shared RoI pooler
then runs torchvision's RoIAlign kernel on chunks of RoIs in all threads at inference (the
kernel itself is single-threaded on the CPU); training is unchanged.

Writes (replaces) the "Cascade vs Faster R-CNN (model, HxW[, fast switch])" section of
``benchmarks/results/detection.md``, keeping the file's other sections.

    python benchmarks/detection.py --threads 2 --rounds 7
    python benchmarks/detection.py --model resnet50 --size 800x1333 --batch 2 --rounds 3 --steps 1
    python benchmarks/detection.py --model resnet50 --size 800x1333 --batch 2 --rounds 3 --steps 1 \
        --fast
    python benchmarks/detection.py --model resnet50 --size 800x1333 --batch 2 --rounds 9 --heads

``--heads`` times only what differs, the RoI heads, on the same features and proposals (with the
fast switch off and on), next to Faster R-CNN's whole inference in the same round: the added
inference cost without the backbone's round-to-round noise in its numerator.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _shared import load_average

SECTION = "## Cascade vs Faster R-CNN"  # + " (model, size)": one section each
MODELS = ("faster", "cascade")


def build(kind: str, size: str, attention: str | None) -> torch.nn.Module:
    from attnzoo.detection import rcnn

    name = f"{'cascade' if kind == 'cascade' else 'faster'}_rcnn_{size}"
    if size == "resnet50":
        name += "_fpn"
        return getattr(rcnn, name)(2, attention, keep_size=True)
    return getattr(rcnn, name)(2, attention)


def image_size(text: str) -> tuple[int, int]:
    """``"800"`` -> (800, 800); ``"800x1333"`` -> (800, 1333): height x width."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--size must be N or HxW, got {text!r}")
    h, w = int(parts[0]), int(parts[-1])
    return h, w


def batch(
    size: tuple[int, int], n: int
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``n`` built-in scenes (square canvases of side ``size[0]``), resized to ``size`` with their
    boxes when it is not square."""
    from attnzoo.bench.tasks.detect import load_detection_data
    from attnzoo.bench.tasks.detect_rcnn import rcnn_targets
    from attnzoo.datasets import collate_detection

    h, w = size
    data = load_detection_data("scenes:digit", image_size=h, n_train=n, n_test=1)
    images, targets = collate_detection([data.train[i] for i in range(n)])
    if w != h:
        images = torch.nn.functional.interpolate(
            images, size=(h, w), mode="bilinear", align_corners=False
        )
        for t in targets:
            t["boxes"] = t["boxes"] * t["boxes"].new_tensor([w / h, 1.0, w / h, 1.0])
    return list(images), rcnn_targets(targets)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, images, targets) -> None:
    model.train()
    loss = sum(model(images, targets).values())
    opt.zero_grad()
    loss.backward()
    opt.step()


def infer(model: torch.nn.Module, images) -> None:
    model.eval()
    with torch.no_grad():
        model(images)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, med, q3


def time_models(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    images, targets = batch(args.size, args.batch)
    torch.manual_seed(0)
    models = {k: build(k, args.model, args.attention) for k in MODELS}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    for k, m in models.items():  # warm-up: allocator, oneDNN primitives, lazy imports
        train_step(m, opts[k], images, targets)
        infer(m, images)
    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "infer": []} for k in MODELS}
    for r in range(args.rounds):
        order = MODELS[r % 2 :] + MODELS[: r % 2]
        for k in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(models[k], opts[k], images, targets)
            times[k]["train"].append((time.perf_counter() - t0) / args.steps)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                infer(models[k], images)
            times[k]["infer"].append((time.perf_counter() - t0) / args.steps / args.batch)
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    return times


def peak_memory(args: argparse.Namespace, kind: str) -> float:
    """MB of peak-RSS growth of one train step of ``kind``, in a fresh subprocess."""
    cmd = [
        sys.executable,
        __file__,
        "--memory-child",
        kind,
        "--model",
        args.model,
        "--size",
        f"{args.size[0]}x{args.size[1]}",
        "--batch",
        str(args.batch),
        "--threads",
        str(args.threads),
    ]
    if args.attention:
        cmd += ["--attention", args.attention]
    if args.fast:
        cmd.append("--fast")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["mb"])


def memory_child(args: argparse.Namespace) -> None:
    import resource

    images, targets = batch(args.size, args.batch)
    torch.manual_seed(0)
    model = build(args.memory_child, args.model, args.attention)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    infer(model, images)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_step(model, opt, images, targets)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mb": (after - before) / 1024}))  # ru_maxrss is in KiB on Linux


def section(
    args: argparse.Namespace, times: dict, memory: dict[str, float], wall: float, load0: str
) -> str:
    def cell(values: list[float], scale: float) -> str:
        q1, med, q3 = quartiles([v * scale for v in values])
        return f"{med:.1f} [{q1:.1f}, {q3:.1f}]"

    def ratio(kind: str) -> float:
        return statistics.median(times["cascade"][kind]) / statistics.median(times["faster"][kind])

    load = load_average()
    train_r, infer_r = ratio("train"), ratio("infer")
    mem_r = memory["cascade"] / memory["faster"] if memory.get("faster") else float("nan")
    att = args.attention or "none"
    switch = ", fast switch" if args.fast else ""
    lines = [
        f"{SECTION} ({args.model}, {args.size[0]}x{args.size[1]}{switch})",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall time "
        f"{wall / 60:.1f} min; rounds: {args.rounds} x {args.steps} steps",
        f"- torch {torch.__version__}, Python {platform.python_version()}; CPU: "
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores), torch "
        f"threads: {args.threads}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        f"- `{args.model}` builders of `attnzoo.detection.rcnn`, attention `{att}`, 2 classes "
        f"(1 + background), batch {args.batch} built-in digit scenes at "
        f"{args.size[0]}x{args.size[1]} px (height x width; a non-square size resizes square "
        "scenes); same backbone, RPN and RoI settings, only the RoI heads differ"
        + (
            "; both built and run with the `attnzoo.fast` switch on (inference pools RoIs with "
            "torchvision's RoIAlign kernel on all threads, `attnzoo.fast.FastMultiScaleRoIAlign`)"
            if args.fast
            else ""
        ),
        "- train step: train-mode forward, sum of the loss dict, backward, SGD step; inference: "
        "eval-mode forward under no_grad, per image; the two models alternate within each round "
        "(order rotated); median [quartiles] over rounds",
        "- peak memory: growth of the peak resident set size (`getrusage` `ru_maxrss`) over one "
        "train step, each model in a fresh subprocess after building and one inference pass",
        f"- load average (1/5/15 min) {load0} at the start, {load} at the end, on "
        f"{os.cpu_count()} cores (the benchmark itself keeps {args.threads} threads busy); other "
        "jobs inflate absolute times more than the ratios",
        "",
        "| model | train step ms | inference ms / image | train-step peak memory MB |",
        "|---|---:|---:|---:|",
    ]
    for k in MODELS:
        lines.append(
            f"| {k} | {cell(times[k]['train'], 1e3)} | {cell(times[k]['infer'], 1e3)} | "
            f"{memory.get(k, float('nan')):.0f} |"
        )
    lines += [
        "",
        "| cascade vs faster | measured | target | met |",
        "|---|---:|---:|:---:|",
        f"| added inference time | {100 * (infer_r - 1):+.0f} % | <= +21 % (paper: 0.115 / "
        f"0.095 s) | {'met' if infer_r <= 1.21 else 'not met'} |",
        f"| added train-step time | {100 * (train_r - 1):+.0f} % | <= +60 % | "
        f"{'met' if train_r <= 1.60 else 'not met'} |",
        f"| train-step peak memory | {mem_r:.2f}x | <= 1.3x | "
        f"{'met' if mem_r <= 1.3 else 'not met'} |",
        "",
    ]
    return "\n".join(lines)


def time_heads(args: argparse.Namespace) -> tuple[dict[str, list[float]], float]:
    """Per round: the two detectors' RoI heads on the SAME features and proposals (Faster
    R-CNN's backbone and RPN output), with the fast switch off and on, and Faster R-CNN's whole
    inference (switch off); ms per image. Also returns the RoIs per image."""
    from attnzoo import fast

    images, _ = batch(args.size, args.batch)
    torch.manual_seed(0)
    models = {k: fast.accelerate(build(k, args.model, args.attention).eval()) for k in MODELS}
    faster = models["faster"]
    # An untrained RPN's NMS keeps fewer boxes than the test-time proposal count (1000 for
    # ResNet-50-FPN) that a trained one fills on real images; without suppression every image
    # gets the full count, as in the paper's timings.
    faster.rpn.nms_thresh = 1.0
    with torch.no_grad():
        image_list, _ = faster.transform(images)
        features = faster.backbone(image_list.tensors)
        proposals, _ = faster.rpn(image_list, features)
    sizes = image_list.image_sizes

    def heads(kind: str, on: bool) -> float:
        with torch.no_grad(), fast.enabled(on):
            t0 = time.perf_counter()
            models[kind].roi_heads(features, proposals, sizes)
            return (time.perf_counter() - t0) / args.batch * 1e3

    def whole() -> float:
        with torch.no_grad(), fast.enabled(False):
            t0 = time.perf_counter()
            faster(images)
            return (time.perf_counter() - t0) / args.batch * 1e3

    keys = [f"{k}/{'on' if on else 'off'}" for k in MODELS for on in (False, True)]
    for key in keys:  # warm-up
        heads(key.split("/")[0], key.endswith("on"))
    times: dict[str, list[float]] = {k: [] for k in [*keys, "faster/whole"]}
    for r in range(args.rounds):
        times["faster/whole"].append(whole())
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            times[key].append(heads(key.split("/")[0], key.endswith("on")))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    return times, sum(len(p) for p in proposals) / args.batch


def heads_section(
    args: argparse.Namespace, times: dict[str, list[float]], rois: float, wall: float
) -> str:
    """The heads-alone section: the cascade's added inference cost measured where it arises."""

    def med(key: str) -> str:
        q1, m, q3 = quartiles(times[key])
        return f"{m:.0f} [{q1:.0f}, {q3:.0f}]"

    def added(on: str) -> tuple[float, float, float]:
        per_round = []
        for i, whole in enumerate(times["faster/whole"]):
            f, c = times[f"faster/{on}"][i], times[f"cascade/{on}"][i]
            base = whole - times["faster/off"][i] + f  # Faster R-CNN's inference with this switch
            per_round.append(100 * (c - f) / base)
        return quartiles(per_round)

    h, w = args.size
    lines = [
        f"## Cascade vs Faster R-CNN: RoI heads alone ({args.model}, {h}x{w})",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall time "
        f"{wall / 60:.1f} min; rounds: {args.rounds}; torch threads: {args.threads}; load "
        f"average at the end {load_average()}",
        f"- both detectors' `roi_heads` on the same input: Faster R-CNN's backbone features and "
        f"RPN proposals without NMS ({rois:.0f} RoIs per image, the test-time "
        f"proposal count) of batch {args.batch} built-in "
        f"scenes at {h}x{w}, eval mode, no_grad; the fast switch off and on (on: RoIAlign on all "
        "threads, `attnzoo.fast.FastMultiScaleRoIAlign`); and Faster R-CNN's whole inference "
        "(switch off) in the same round",
        "- added inference time per round = (cascade heads - faster heads) / Faster R-CNN's whole "
        "inference with the same switch (whole - faster heads off + faster heads on); median "
        "[quartiles] over rounds. Backbone and RPN are the same for both detectors, so this is "
        "the whole difference, measured without the backbone's round-to-round noise in the "
        "numerator",
        "",
        "| ms per image | switch off | switch on |",
        "|---|---:|---:|",
        f"| Faster R-CNN RoI heads | {med('faster/off')} | {med('faster/on')} |",
        f"| Cascade R-CNN RoI heads (3 stages) | {med('cascade/off')} | {med('cascade/on')} |",
        f"| Faster R-CNN whole inference | {med('faster/whole')} | |",
        "",
        "| cascade vs faster | switch off | switch on | target |",
        "|---|---:|---:|---:|",
    ]
    off, on = added("off"), added("on")
    lines.append(
        f"| added inference time | {off[1]:+.0f} % [{off[0]:+.0f}, {off[2]:+.0f}] | "
        f"{on[1]:+.0f} % [{on[0]:+.0f}, {on[2]:+.0f}] | <= +21 % |"
    )
    lines.append("")
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of ``path`` (or append it), keeping the others."""
    old = path.read_text() if path.is_file() else "# Detection benchmarks\n"
    title = text.splitlines()[0]
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = (
        pattern.sub(lambda _: text.rstrip("\n") + "\n\n", old)
        if pattern.search(old)
        else (old.rstrip("\n") + "\n\n" + text)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new.rstrip("\n") + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("small", "resnet50"), default="small")
    p.add_argument("--attention", default=None)
    p.add_argument("--size", type=image_size, default=(64, 64), help="N or HxW (default 64)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--fast",
        action="store_true",
        help="build and run both models with the attnzoo.fast switch on (RoIAlign on all threads)",
    )
    p.add_argument(
        "--heads",
        action="store_true",
        help="time the two detectors' RoI heads alone on the same features and proposals",
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "detection.md"))
    p.add_argument("--memory-child", choices=MODELS, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.fast:
        from attnzoo import fast

        fast.set_enabled(True)
    if args.memory_child:
        memory_child(args)
        return
    t0, load0 = time.perf_counter(), load_average()
    if args.heads:
        text = heads_section(args, *time_heads(args), time.perf_counter() - t0)
        write_section(Path(args.out), text)
        print(text)
        return
    memory = {k: peak_memory(args, k) for k in MODELS}
    times = time_models(args)
    text = section(args, times, memory, time.perf_counter() - t0, load0)
    write_section(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
