"""Figures and tables of the detect bench's report (matplotlib, Agg canvas, PNG bytes).

* :func:`plot_box_panel`: test images with the true boxes (green, dashed) and the predicted boxes
  (red, with class and score) of each attention, one row per attention.
* :func:`plot_cam_panel`: class activation maps (EigenCAM by default) of each attention over the
  same images, one row per attention.
* :func:`per_class_table`: AP50 per class and attention (mean over seeds).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["per_class_table", "plot_box_panel", "plot_cam_panel"]


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
