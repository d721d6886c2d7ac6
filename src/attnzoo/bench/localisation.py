"""Where does the network look? Localisation scores and Grad-CAM / attention panels for the bench.

The built-in cluttered digits know where each digit is (its ink's bounding box), so "the attention
makes the network look at the object" can be measured rather than eyeballed. For every finished
run, on **every test image**, Grad-CAM (``attnzoo.viz.cam``, default target layer: the last
stage) is computed for the image's **true class** and scored with

* the **pointing game** (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV
  2016): the share of images whose CAM maximum lies inside the digit's box;
* the **energy in the box** (Wang et al., "Score-CAM", CVPR Workshops 2020): the share of the
  CAM's total mass inside the box, averaged over images.

Both are stored as fractions and reported in percent, mean ± std over seeds, with the paired
difference to the baseline (``none`` unless another is named; same seeds) and the **chance
level**: the mean share of the image the box covers, which is what both scores give for a map
that carries no information (uniform, or maximum at a uniformly random place). The scores are
cached per run in ``runs/<attention>/seed<k>/localisation.json`` (written atomically; a re-run
reuses them).

Panels (PNG, see :func:`write_panels`): for a fixed set of test images drawn from every class
in turn, the image (with its box, where the data has boxes), then Grad-CAM of every attention
side by side (one seed), and for the attentions that compute spatial maps, those maps
(``attnzoo.viz.attention_maps``). Panels use the **predicted** class, as a user asking "why did
it say 7?" would; the localisation score uses the true class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnzoo.bench.checkpoints import load_run_model
from attnzoo.bench.data import IMAGE_EXTENSIONS, load_data
from attnzoo.bench.report import (
    Figure,
    Section,
    Table,
    Text,
    fmt_diff,
    fmt_pct,
    sample_per_class,
    write_json,
)
from attnzoo.bench.stats import paired_difference, summarize

__all__ = [
    "LOCALISATION_FILE",
    "chance_of_boxes",
    "check_localisation_available",
    "localise_run",
    "score_localisation",
    "summarize_localisation",
    "make_cam_panels",
    "report_sections",
    "write_panels",
]

LOCALISATION_FILE = "localisation.json"
_VERSION = 2


def check_localisation_available() -> None:
    """Raise ``ImportError`` with the install command when ``grad-cam`` or matplotlib is missing."""
    missing = []
    for module, package in (("pytorch_grad_cam", "grad-cam"), ("matplotlib", "matplotlib")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ImportError(
            f"bench: Grad-CAM panels and localisation scores need "
            f'{", ".join(missing)}: pip install "attnzoo[viz]" (or pass '
            "--no-localise)"
        )


def score_localisation(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor,
    *,
    method: str = "gradcam",
    batch_size: int = 250,
) -> dict[str, Any]:
    """Pointing game and energy-in-box of ``method`` for the true class.

    Args:
        model: a classifier (its mode is left as it was).
        images: ``(N, C, H, W)`` normalised inputs; ``labels`` ``(N,)``; ``boxes`` ``(N, 4)``
            ``(x0, y0, x1, y1)`` with exclusive ends, in pixels of ``images``.
        method: a ``attnzoo.viz.cam`` method name.
        batch_size: images per Grad-CAM call.

    Returns:
        ``{"method", "n", "pointing_game", "energy_in_box", "chance"}``: the scores and the
        chance level as fractions in ``[0, 1]`` (like the bench's accuracies).
    """
    from attnzoo import viz

    if images.shape[0] != labels.shape[0] or images.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"score_localisation: images, labels and boxes must have the same "
            f"length; got {images.shape[0]}, {labels.shape[0]}, {boxes.shape[0]}"
        )
    hits, energy = [], []
    for start in range(0, images.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        cams = viz.cam(model, images[sl], method=method, targets=labels[sl])
        hits.append(viz.pointing_game(cams, boxes[sl]).double())
        energy.append(viz.energy_in_box(cams.double(), boxes[sl]).double())
    return {
        "method": method,
        "n": int(images.shape[0]),
        "pointing_game": float(torch.cat(hits).double().mean()),
        "energy_in_box": float(torch.cat(energy).double().mean()),
        "chance": chance_of_boxes(boxes, *images.shape[-2:]),
    }


def chance_of_boxes(boxes: torch.Tensor, height: int, width: int) -> float:
    """The mean share of the image the boxes cover: what both scores give for a map without
    information."""
    from attnzoo import viz

    return float(viz.box_area_fraction(boxes, height, width).double().mean())


def _cache_key(data: Any, method: str) -> dict[str, Any]:
    boxes = data.test.boxes
    return {
        "version": _VERSION,
        "method": method,
        "n": len(data.test),
        "boxes_sum": int(boxes.sum()),
        "labels_sum": int(data.test.labels.sum()),
    }


def localise_run(
    run_dir: str | os.PathLike,
    data: Any,
    *,
    method: str = "gradcam",
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """The localisation scores of one finished run, from its cache or computed and cached.

    ``data`` is the run's :class:`~attnzoo.bench.data.BenchData` (its test split must carry
    boxes). ``model`` defaults to the run's trained network (``last.ckpt``).
    """
    if data.test.boxes is None:
        raise ValueError(
            f"localise_run: the data {data.name!r} has no boxes; localisation "
            "scores need the built-in digits (or another boxed dataset)"
        )
    run_dir = Path(run_dir)
    cache = run_dir / LOCALISATION_FILE
    key = _cache_key(data, method)
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            cached = {}
        if cached.get("key") == key:
            return cached["scores"]
    if model is None:
        model, _ = load_run_model(run_dir)
    scores = score_localisation(
        model, data.test.images, data.test.labels, data.test.boxes, method=method
    )
    write_json(cache, {"key": key, "scores": scores})
    return scores


def summarize_localisation(
    labels: Sequence[str],
    seeds: Sequence[int],
    per_run: Mapping[tuple[str, int], dict],
    *,
    baseline: str | None = "none",
) -> list[dict[str, Any]]:
    """Per attention: mean ± std over seeds of both scores, the chance level, and the paired
    differences of both scores to ``baseline`` (95 % CI over the shared seeds)."""
    base = {}
    if baseline is not None:
        base = {s: per_run[(baseline, s)] for s in seeds if (baseline, s) in per_run}
    rows = []
    for label in labels:
        got = {s: per_run[(label, s)] for s in seeds if (label, s) in per_run}
        if not got:
            continue
        pg = summarize([g["pointing_game"] for g in got.values()])
        en = summarize([g["energy_in_box"] for g in got.values()])
        row: dict[str, Any] = {
            "attention": label,
            "n_seeds": pg.n,
            "method": next(iter(got.values()))["method"],
            "pointing_game": pg.mean,
            "pointing_game_std": pg.std,
            "energy_in_box": en.mean,
            "energy_in_box_std": en.std,
            "chance": next(iter(got.values()))["chance"],
        }
        if label != baseline and base and set(got) & set(base):
            for key, short in (("pointing_game", "pointing"), ("energy_in_box", "energy")):
                d = paired_difference(
                    {s: g[key] for s, g in got.items()}, {s: g[key] for s, g in base.items()}
                )
                row.update(
                    {
                        f"{short}_diff": d.mean,
                        f"{short}_diff_low": d.low,
                        f"{short}_diff_high": d.high,
                        f"{short}_verdict": d.verdict,
                    }
                )
        rows.append(row)
    return rows


def _predicted(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(images).argmax(1)
    finally:
        model.train(was_training)


def _row_labels(
    pred: torch.Tensor, truth: torch.Tensor | None, classes: Sequence[str] | None
) -> list[str]:
    out = []
    for k, p in enumerate(pred.tolist()):
        text = f"pred {_cls(classes, p)}"
        if truth is not None:
            t = int(truth[k])
            text += f" (true {_cls(classes, t)})" if t != p else " ✓"
        out.append(text)
    return out


def write_panels(
    models: Mapping[str, nn.Module],
    images: torch.Tensor,
    display: torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    labels: torch.Tensor | None = None,
    boxes: torch.Tensor | None = None,
    classes: Sequence[str] | None = None,
    method: str = "gradcam",
    note: str = "",
) -> list[Path]:
    """Write the comparison panel and the attention-map panels; return the PNG paths.

    Args:
        models: label -> trained model (the label is shown in the titles; ``none`` = baseline).
        images: ``(B, C, H, W)`` normalised network inputs; ``display`` the same images in
            ``[0, 1]`` (RGB) for the pictures.
        out_dir: where the PNGs go. With two models or more: ``cam_compare.png`` (one column per
            image; the image, then the CAM of every model, each cell labelled with that model's
            prediction) and ``maps_<label>.png`` for each model whose attention modules compute
            a spatial map (the image, then those maps; the CAM is in the comparison). With one
            model: ``maps_<label>.png`` with the image, its CAM and its spatial maps.
        labels: true classes (shown above each image); ``boxes``: drawn on every image.
        method: the ``attnzoo.viz.cam`` method.
        note: appended to the titles (e.g. ``"seed 0"``).
    """
    from attnzoo import viz

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f", {note}" if note else ""
    title = _method_title(method)
    truth = None if labels is None else [f"true {_cls(classes, int(t))}" for t in labels]
    written = []
    cams = {}
    for label, model in models.items():
        pred = _predicted(model, images)
        cams[label] = (viz.cam(model, images, method=method, targets=pred), pred)
    compare = len(models) > 1
    if compare:
        path = out_dir / "cam_compare.png"
        viz.save_panel(
            path,
            display,
            {label: c for label, (c, _) in cams.items()},
            title=f"{title} for the predicted class, per attention (same images; "
            f"under each: the prediction){suffix}",
            boxes=boxes,
            row_labels=truth,
            images_as_columns=True,
            cell_labels={
                label: _cell_labels(pred, labels, classes) for label, (_, pred) in cams.items()
            },
        )
        written.append(path)
    for label, model in models.items():
        cam, pred = cams[label]
        maps = viz.panel_columns_for(model, images, cam=False)
        if compare and not maps:
            continue  # nothing the comparison panel does not show already
        columns = maps if compare else {title: cam, **maps}
        what = " | ".join([title] * (not compare) + ["spatial attention maps"] * bool(maps))
        path = out_dir / f"maps_{_safe(label)}.png"
        viz.save_panel(
            path,
            display,
            columns,
            title=f"{label}: image | {what}{suffix}",
            boxes=boxes,
            row_labels=_row_labels(pred, labels, classes),
            images_as_columns=True,
        )
        written.append(path)
    return written


def _cell_labels(
    pred: torch.Tensor, truth: torch.Tensor | None, classes: Sequence[str] | None
) -> list[str]:
    marks = (
        [""] * len(pred)
        if truth is None
        else [" ✓" if int(p) == int(t) else " ✗" for p, t in zip(pred, truth)]
    )
    return [f"pred {_cls(classes, int(p))}{m}" for p, m in zip(pred, marks)]


def _cls(classes: Sequence[str] | None, i: int) -> str:
    return str(classes[i]) if classes is not None and i < len(classes) else str(i)


def _method_title(method: str) -> str:
    return {
        "gradcam": "Grad-CAM",
        "gradcam++": "Grad-CAM++",
        "scorecam": "Score-CAM",
        "eigencam": "Eigen-CAM",
        "layercam": "LayerCAM",
        "xgradcam": "XGrad-CAM",
        "hirescam": "HiResCAM",
        "ablationcam": "Ablation-CAM",
    }.get(method.lower(), method)


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label)


LOCALISATION_TEXT = (
    "**Pointing game**: share of test images whose {method} maximum (for the true class) lies "
    "inside the digit's box. **Energy in box**: share of the map's total mass inside the box, "
    "averaged over images. Both over all test images, mean ± std over seeds. **Chance** is the "
    "mean share of the image the box covers: what a map without information scores on both. "
    "Δ is the paired difference to the baseline over the same seeds, with its 95 % CI. Target "
    "layer: the network's last stage; its maps are coarse (4×4 on the default 32×32 "
    "ResNet-8), so a hit means the right cell, not the right pixel."
)


def localisation_table(
    summary: Sequence[dict], baseline: str | None = "none"
) -> tuple[list[str], list[list[str]]]:
    """Rows of the report's localisation table from the bench summary (no Δ columns without a
    ``baseline``)."""

    def delta(s: dict, k: str) -> list[str]:
        if baseline is None:
            return []
        if f"{k}_diff" in s:
            return [fmt_diff(s[f"{k}_diff"], s[f"{k}_diff_low"], s[f"{k}_diff_high"])]
        return ["baseline" if s["attention"] == baseline else "n/a"]

    d = [] if baseline is None else [f"Δ pointing vs {baseline} [95% CI]"]
    e = [] if baseline is None else [f"Δ energy vs {baseline} [95% CI]"]
    headers = ["attention", "top-1 %", "pointing game %", *d, "energy in box %", *e, "chance %"]
    rows = []
    for s in summary:
        if "pointing_game" not in s:
            continue
        rows.append(
            [
                s["attention"],
                fmt_pct(s["test_acc"], s["test_acc_std"]),
                fmt_pct(s["pointing_game"], s["pointing_game_std"]),
                *delta(s, "pointing"),
                fmt_pct(s["energy_in_box"], s["energy_in_box_std"]),
                *delta(s, "energy"),
                fmt_pct(s["chance"]),
            ]
        )
    return headers, rows


def report_sections(
    result: Any, data: Any, plan: Sequence[Any], seeds: Sequence[int], method: str, n_images: int
) -> list[Any]:
    """The report's "Where the network looks" (the localisation table on data with boxes, and
    the CAM comparison panel) and, collapsed, "Attention maps per module" (the panels of the
    attentions that compute spatial maps). The panels show ``n_images`` test images drawn from
    every class in turn (:func:`~attnzoo.bench.report.sample_per_class`), seed ``min(seeds)``;
    their PNGs are written under ``figures/``."""
    title = _method_title(method)
    blocks: list[Any] = []
    headers, rows = localisation_table(result.summary, getattr(result, "baseline", "none"))
    if rows:
        blocks += [Table(headers, rows), Text(LOCALISATION_TEXT.format(method=title))]
    seed = min(seeds)
    models = {run.spec.label: load_run_model(run.run_dir)[0] for run in plan if run.seed == seed}
    idx = sample_per_class(data.test.labels, n_images)
    images = data.test.images[idx]
    boxes = None if data.test.boxes is None else data.test.boxes[idx]
    paths = write_panels(
        models,
        images,
        data.denormalise(images),
        Path(result.out) / "figures",
        labels=data.test.labels[idx],
        boxes=boxes,
        classes=data.classes,
        method=method,
        note=f"seed {seed}",
    )
    box_note = " (red box: the digit)" if boxes is not None else ""
    compare = [p for p in paths if p.name == "cam_compare.png"]
    maps = [p for p in paths if p.name != "cam_compare.png"]
    blocks.append(
        Text(
            f"{len(idx)} test images drawn from every class in turn, seed {seed}, {title} for the "
            "predicted class; under each image the network's prediction (✓ right, ✗ wrong)."
        )
    )
    if compare:
        blocks.append(
            Figure(
                compare[0].name,
                compare[0].read_bytes(),
                f"{title} of every attention for the same test images{box_note}.",
            )
        )
        shown = []
    else:  # one network: its panel (image | CAM | maps) is the picture
        shown, maps = maps, []
    for path in shown:
        blocks.append(
            Figure(
                path.name,
                path.read_bytes(),
                f"{path.stem[len('maps_') :]}: image | {title} | spatial attention maps{box_note}.",
            )
        )
    sections = [Section("Where the network looks", blocks)]
    without = [lab for lab in models if f"maps_{_safe(lab)}.png" not in {p.name for p in maps}]
    if maps:
        sections.append(
            Section(
                "Attention maps per module",
                [
                    Text(
                        "The spatial maps of the last (up to 4) attention modules that compute "
                        "one, in depth "
                        "order, each min-max scaled per image and upsampled onto the image, for "
                        "the images "
                        f"above{box_note}."
                        + (
                            f" {', '.join(f'`{lab}`' for lab in without)}: no spatial map (no "
                            "attention, or "
                            "channel-only modules such as SE and ECA)."
                            if without
                            else ""
                        )
                    ),
                    *[
                        Figure(
                            p.name,
                            p.read_bytes(),
                            f"{p.stem[len('maps_') :]}: spatial attention maps.",
                        )
                        for p in maps
                    ],
                ],
                collapsed=True,
            )
        )
    return sections


# ---------------------------------------------------------------------------------------------
# attnzoo cam
def _run_dirs(checkpoint: Path, seed: int | None) -> dict[str, Path]:
    """label -> run folder: ``checkpoint`` itself, or one seed of every attention of a bench."""
    if (checkpoint / "config.json").is_file() and (checkpoint / "last.ckpt").is_file():
        cfg = json.loads((checkpoint / "config.json").read_text())
        return {cfg["attention"]: checkpoint}
    runs = checkpoint / "runs"
    if not runs.is_dir():
        raise ValueError(
            f"cam: --checkpoint {checkpoint} is neither a bench run folder "
            "(config.json + last.ckpt) nor a bench folder (with runs/)"
        )
    found: dict[int, dict[str, Path]] = {}
    for cfg_file in sorted(runs.glob("*/seed*/config.json")):
        if not (cfg_file.parent / "last.ckpt").is_file():
            continue
        cfg = json.loads(cfg_file.read_text())
        found.setdefault(int(cfg["seed"]), {})[cfg["attention"]] = cfg_file.parent
    if not found:
        raise ValueError(f"cam: {runs} holds no run with a checkpoint")
    if seed is None:
        seed = min(found)
    if seed not in found:
        raise ValueError(
            f"cam: no run of seed {seed} in {checkpoint}; seeds: "
            f"{', '.join(map(str, sorted(found)))}"
        )
    by_label = found[seed]
    order = sorted(by_label, key=lambda lab: (lab != "none", lab))  # the baseline first
    return {lab: by_label[lab] for lab in order}


def _read_image_files(folder: Path, size: int, n: int) -> tuple[torch.Tensor, list[str]]:
    from PIL import Image

    if not folder.is_dir():
        raise ValueError(f"cam: --images {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)[:n]
    if not files:
        raise ValueError(
            f"cam: --images {folder} holds no image file ({', '.join(IMAGE_EXTENSIONS)})"
        )
    arrays = []
    for path in files:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                arrays.append(
                    torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                    .view(size, size, 3)
                    .permute(2, 0, 1)
                    .float()
                    / 255.0
                )
        except OSError as err:
            raise ValueError(f"cam: cannot read {path}: {err}") from None
    return torch.stack(arrays), [p.name for p in files]


def make_cam_panels(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    data: str | None = None,
    n: int = 8,
    seed: int | None = None,
    method: str = "gradcam",
) -> list[Path]:
    """What ``attnzoo cam`` does: load the trained network(s) and write the PNG panels.

    Args:
        checkpoint: a run folder (``out/runs/cbam/seed0``) or a bench folder (``out``): then every
            attention's run of ``seed`` (default: the lowest) goes side by side.
        out: folder for the PNGs (see :func:`write_panels`).
        images: a folder of image files (resized to the run's image size, normalised with the
            run's statistics); else ``data`` (a ``--data`` spec, default the run's own data): ``n``
            of its test images drawn from every class in turn, with their labels and boxes.
        n: number of images (rows).
        method: the ``attnzoo.viz.cam`` method.
    """
    check_localisation_available()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"cam: --n must be an integer >= 1; got {n!r}")
    if images is not None and data is not None:
        raise ValueError("cam: give --images or --data, not both")
    dirs = _run_dirs(Path(checkpoint), seed)
    loaded = {label: load_run_model(d) for label, d in dirs.items()}
    models = {label: m for label, (m, _) in loaded.items()}
    cfg = next(iter(loaded.values()))[1]
    labels = boxes = classes = None
    if images is not None:
        display, names = _read_image_files(Path(images), int(cfg["image_size"]), n)
        mean, std = cfg.get("mean"), cfg.get("std")
        if mean is None or std is None:  # runs written before the statistics were recorded
            ref = load_data(
                cfg["data"],
                image_size=cfg["image_size"],
                seed=cfg["data_seed"],
                n_train=cfg.get("n_train"),
                n_test=cfg.get("n_test"),
            )
            mean, std = ref.mean, ref.std
        m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        inputs = (display - m) / s
        shown = ", ".join(names[:3]) + ("..." if len(names) > 3 else "")
        note = f"images from {Path(images).name}/ ({shown})"
        classes = cfg.get("classes")  # rows say "pred <class name>"
    else:
        spec = data or cfg["data"]
        same = spec == cfg["data"]
        bench_data = load_data(
            spec,
            image_size=cfg["image_size"],
            seed=cfg["data_seed"],
            n_train=cfg.get("n_train") if same else None,
            n_test=cfg.get("n_test") if same else None,
        )
        trained = cfg.get("num_classes")
        if trained is not None and bench_data.num_classes != trained:
            raise ValueError(
                f"cam: --data {spec} has {bench_data.num_classes} classes "
                f"({', '.join(map(str, bench_data.classes))}) but the checkpoint "
                f"was trained on {trained}; give data with the same classes"
            )
        idx = sample_per_class(bench_data.test.labels, n)
        inputs = bench_data.test.images[idx]
        display = bench_data.denormalise(inputs)
        labels, classes = bench_data.test.labels[idx], bench_data.classes
        boxes = None if bench_data.test.boxes is None else bench_data.test.boxes[idx]
        note = f"{len(idx)} test images of {spec}, from every class in turn"
    if len(dirs) > 1:
        note = f"seed {cfg['seed']}, {note}"
    return write_panels(
        models,
        inputs,
        display,
        out,
        labels=labels,
        boxes=boxes,
        classes=classes,
        method=method,
        note=note,
    )
