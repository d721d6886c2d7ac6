"""Figures and tables of the detect bench's report (matplotlib, Agg canvas, PNG bytes).

* :func:`plot_box_panel`: test images with the true boxes (green, dashed) and the predicted boxes
  (red, with class and score) of each attention, one row per attention.
* :func:`plot_cam_panel`: class activation maps (EigenCAM by default) of each attention over the
  same images, one row per attention.
* :func:`per_class_table`: AP50 per class and attention (mean over seeds).
* :func:`paired_ap_table`: AP50, AP, AP75 (and AP90) of each arm with the paired difference to the
  baseline and its 95 % CI, for every metric (the engine's table has it for the primary one only).
* :func:`stage_table`: a cascade's AP per stage (each stage's own detections) and of the ensemble.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AP_METRICS",
    "paired_ap_table",
    "per_class_table",
    "plot_box_panel",
    "plot_cam_panel",
    "stage_table",
]

#: ``(key, header)`` of the AP metrics in the R-CNN tables
AP_METRICS = (("map50", "AP50"), ("map", "AP"), ("map75", "AP75"), ("map90", "AP90"))


def _figure(rows: int, cols: int, cell: float = 2.0) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(cell * cols + 0.8, cell * rows + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _show(ax: Any, image: Tensor) -> None:
    ax.imshow(
        image.detach().cpu().float().clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest"
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _rect(ax: Any, box: Sequence[float], color: str, dashed: bool) -> None:
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(
        Rectangle(
            (x0 - 0.5, y0 - 0.5),
            x1 - x0,
            y1 - y0,
            fill=False,
            lw=1.2,
            edgecolor=color,
            linestyle="--" if dashed else "-",
        )
    )


def _name(classes: Sequence[str], i: int) -> str:
    return classes[i] if 0 <= i < len(classes) else str(i)


def plot_box_panel(
    images: Tensor,
    targets: Sequence[Mapping[str, Tensor]],
    predictions: Mapping[str, Sequence[Mapping[str, Tensor]]],
    classes: Sequence[str],
    *,
    score_threshold: float = 0.3,
    title: str = "",
) -> bytes:
    """One row per attention (``predictions``: label -> one prediction dict per image), one
    column per image; true boxes green dashed, predictions with ``score >= score_threshold`` red
    with ``class score``. ``images``: ``(B, 3, H, W)`` in ``[0, 1]``."""
    labels = list(predictions)
    fig, axes = _figure(len(labels), images.shape[0])
    for r, label in enumerate(labels):
        for c in range(images.shape[0]):
            ax = axes[r][c]
            _show(ax, images[c])
            for box in targets[c]["boxes"]:
                _rect(ax, box.tolist(), "#31a354", dashed=True)
            pred = predictions[label][c]
            keep = pred["scores"] >= score_threshold
            for box, score, cls in zip(
                pred["boxes"][keep], pred["scores"][keep], pred["labels"][keep]
            ):
                _rect(ax, box.tolist(), "#e41a1c", dashed=False)
                ax.text(
                    float(box[0]),
                    float(box[1]) - 1,
                    f"{_name(classes, int(cls))} {float(score):.2f}",
                    color="white",
                    fontsize=6,
                    va="bottom",
                    bbox={"facecolor": "#e41a1c", "alpha": 0.8, "pad": 0.5, "lw": 0},
                )
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _png(fig)


def plot_cam_panel(images: Tensor, cams: Mapping[str, Tensor], *, title: str = "") -> bytes:
    """One row per attention (``cams``: label -> ``(B, H, W)`` maps in ``[0, 1]``), one column
    per image, the map overlaid on the image (jet, alpha 0.5, fixed range [0, 1])."""
    labels = list(cams)
    fig, axes = _figure(len(labels), images.shape[0])
    h, w = images.shape[-2:]
    for r, label in enumerate(labels):
        maps = cams[label].detach().cpu().float()
        if maps.shape[-2:] != (h, w):
            maps = torch.nn.functional.interpolate(
                maps[:, None], size=(h, w), mode="bilinear", align_corners=False
            )[:, 0]
        for c in range(images.shape[0]):
            ax = axes[r][c]
            _show(ax, images[c])
            ax.imshow(
                maps[c].clamp(0, 1).numpy(),
                cmap="jet",
                alpha=0.5,
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _png(fig)


def per_class_table(
    per_class: Mapping[str, Sequence[Sequence[float]]], classes: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    """``(headers, rows)``: one row per class, one column per attention, AP50 % as the mean over
    the seeds (``per_class``: label -> one list of per-class AP50 fractions per seed)."""
    labels = list(per_class)
    rows = []
    for i, name in enumerate(classes):
        row = [name]
        for label in labels:
            vals = [float(seed[i]) for seed in per_class[label] if i < len(seed)]
            row.append(f"{100 * sum(vals) / len(vals):.1f}" if vals else "")
        rows.append(row)
    return ["class", *[f"{label} AP50 %" for label in labels]], rows


def _pct(values: Sequence[float]) -> str:
    from attnzoo.bench.report import fmt_pct
    from attnzoo.bench.stats import summarize

    st = summarize([float(v) for v in values])
    return fmt_pct(st.mean, st.std if st.n > 1 else None)


def paired_ap_table(
    runs: Sequence[Mapping[str, Any]], labels: Sequence[str], baseline: str | None
) -> tuple[list[str], list[list[str]]]:
    """``(headers, rows)``: per arm (``labels``, in order) and AP metric present in the runs, the
    mean ± std over seeds (%) and the paired difference to ``baseline`` over the shared seeds,
    ``+d [low, high]`` in points (95 % CI, t over seeds)."""
    from attnzoo.bench.report import fmt_diff
    from attnzoo.bench.stats import paired_difference

    keys = [(k, h) for k, h in AP_METRICS if any(r.get(k) is not None for r in runs)]
    by = {(r["attention"], r["seed"]): r for r in runs}
    headers = ["arm"]
    for _, h in keys:
        headers += [f"{h} %"] + ([f"Δ{h} vs {baseline} [95% CI]"] if baseline else [])
    rows = []
    for label in labels:
        row = [label]
        for k, _ in keys:
            mine = {s: r[k] for (lab, s), r in by.items() if lab == label and r.get(k) is not None}
            row.append(_pct(list(mine.values())) if mine else "")
            if not baseline:
                continue
            base = {
                s: r[k] for (lab, s), r in by.items() if lab == baseline and r.get(k) is not None
            }
            if label == baseline or not (set(mine) & set(base)):
                row.append("baseline" if label == baseline else "")
            else:
                d = paired_difference(mine, base)
                row.append(fmt_diff(d.mean, d.low, d.high))
        rows.append(row)
    return headers, rows


def stage_table(runs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """``(headers, rows)``: for every arm whose runs carry ``stages``, one row per stage (its own
    detections) and one for the ensemble (the cascade's output), AP metrics as mean ± std (%)."""
    keys = [(k, h) for k, h in AP_METRICS if any(r.get(k) is not None for r in runs)]
    arms: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        if r.get("stages"):
            arms.setdefault(r["attention"], []).append(r)
    rows = []
    for label, rs in arms.items():
        for t in range(len(rs[0]["stages"])):
            rows.append(
                [label, f"stage {t + 1}"]
                + [_pct([r["stages"][t][k] for r in rs if t < len(r["stages"])]) for k, _ in keys]
            )
        rows.append([label, "ensemble (output)"] + [_pct([r[k] for r in rs]) for k, _ in keys])
    return ["arm", "detections of", *[f"{h} %" for _, h in keys]], rows
