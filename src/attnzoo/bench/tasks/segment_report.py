"""Figures and tables of the segment bench's report (matplotlib, Agg canvas, PNG bytes).

* :func:`plot_prediction_panel`: test images, their true masks and each head's predicted masks
  (one row per image; a colour per class, with a legend);
* :func:`plot_query_attention`: the position-attention row of one query pixel (marked on the
  image) of every pixel-pair module of each head, over the image;
* :func:`per_class_table`: IoU per class and head (mean over seeds, difference to the baseline);
* :func:`per_class_section` and :func:`panel_sections`: the report sections built from them.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "class_colours",
    "colourise",
    "panel_sections",
    "per_class_section",
    "per_class_table",
    "plot_prediction_panel",
    "plot_query_attention",
]

#: colour of ignored pixels (label 255) in the mask panels
IGNORE_COLOUR = (0.85, 0.85, 0.85)


def class_colours(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` RGB in ``[0, 1]``: class 0 (background) black, then matplotlib's
    ``tab10`` / ``tab20`` colours (cycled beyond 20 classes)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num_classes <= 11 else "tab20"]
    rest = [cmap(i % cmap.N)[:3] for i in range(max(num_classes - 1, 0))]
    return np.array([(0.0, 0.0, 0.0), *rest], dtype=np.float64)[:num_classes]


def colourise(mask: Tensor, colours: np.ndarray) -> np.ndarray:
    """A label map ``(H, W)`` as an RGB image; out-of-range labels (255) light grey."""
    m = mask.detach().cpu().long().numpy()
    out = np.empty((*m.shape, 3))
    out[:] = IGNORE_COLOUR
    ok = (m >= 0) & (m < len(colours))
    out[ok] = colours[m[ok]]
    return out


def _display(image: Tensor) -> np.ndarray:
    """An image tensor ``(3, H, W)`` stretched to ``[0, 1]`` per image for display (the task's
    inputs may be normalised)."""
    x = image.detach().cpu().float()
    lo, hi = float(x.min()), float(x.max())
    return ((x - lo) / max(hi - lo, 1e-8)).permute(1, 2, 0).numpy()


def _figure(rows: int, cols: int, cell: float = 1.8) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(cell * cols + 0.6, cell * rows + 0.6))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _plain(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def plot_prediction_panel(
    images: Tensor,
    truths: Tensor,
    predictions: Mapping[str, Tensor],
    classes: Sequence[str],
) -> bytes:
    """One row per image: the image, its true mask, then each head's predicted mask
    (``predictions``: label -> ``(B, H, W)`` labels); a legend of the class colours below."""
    from matplotlib.patches import Patch

    colours = class_colours(len(classes))
    labels = list(predictions)
    cols = ["image", "truth", *labels]
    fig, axes = _figure(images.shape[0], len(cols))
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.95, wspace=0.06, hspace=0.08)
    for r in range(images.shape[0]):
        panels = [
            _display(images[r]),
            colourise(truths[r], colours),
            *(colourise(predictions[k][r], colours) for k in labels),
        ]
        for c, (title, pic) in enumerate(zip(cols, panels)):
            ax = axes[r][c]
            ax.imshow(pic, interpolation="nearest")
            _plain(ax)
            if r == 0:
                ax.set_title(title, fontsize=9)
    handles = [
        Patch(facecolor=colours[i], edgecolor="grey", label=name) for i, name in enumerate(classes)
    ]
    handles.append(Patch(facecolor=IGNORE_COLOUR, edgecolor="grey", label="ignored (255)"))
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=min(len(handles), 8),
        fontsize=7,
        frameon=False,
        bbox_to_anchor=(0.5, 0.02),
    )
    return _png(fig)


def plot_query_attention(
    images: Tensor,
    query: tuple[float, float],
    maps: Mapping[str, Tensor],
) -> bytes:
    """One row per image: the image with the query pixel marked (fractions ``(fy, fx)`` of its
    height and width), then each map of ``maps`` (column title -> ``(B, h, w)`` attention of
    that query over the key positions) upsampled over the image (each map scaled to its own
    maximum)."""
    h, w = images.shape[-2:]
    titles = list(maps)
    fig, axes = _figure(images.shape[0], 1 + len(titles), cell=2.2)
    qy = min(int(query[0] * h), h - 1)
    qx = min(int(query[1] * w), w - 1)
    for r in range(images.shape[0]):
        pic = _display(images[r])
        ax = axes[r][0]
        ax.imshow(pic, interpolation="nearest")
        ax.plot([qx], [qy], marker="+", color="red", markersize=12, mew=2)
        _plain(ax)
        if r == 0:
            ax.set_title("image + query", fontsize=9)
        for c, title in enumerate(titles, start=1):
            m = maps[title][r].detach().cpu().float()[None, None]
            m = torch.nn.functional.interpolate(m, size=(h, w), mode="nearest")[0, 0]
            m = (m / m.max().clamp_min(1e-12)).numpy()
            ax = axes[r][c]
            ax.imshow(pic, interpolation="nearest")
            ax.imshow(m, cmap="jet", alpha=0.55, vmin=0, vmax=1, interpolation="nearest")
            ax.plot([qx], [qy], marker="+", color="white", markersize=10, mew=1.5)
            _plain(ax)
            if r == 0:
                ax.set_title(title.replace(": ", "\n", 1), fontsize=7)
    return _png(fig)


def per_class_table(
    per_class: Mapping[str, Sequence[Sequence[float | None]]],
    classes: Sequence[str],
    baseline: str | None = None,
) -> tuple[list[str], list[list[str]]]:
    """``(headers, rows)``: one row per class, one column per head, IoU % as the mean over the
    seeds that have it (``per_class``: label -> one list of per-class IoU fractions per seed;
    None where the class was absent), with the difference to ``baseline`` in parentheses."""
    labels = list(per_class)

    def mean(label: str, i: int) -> float | None:
        vals = [float(s[i]) for s in per_class[label] if i < len(s) and s[i] is not None]
        return sum(vals) / len(vals) if vals else None

    rows = []
    for i, name in enumerate(classes):
        row = [name]
        base = mean(baseline, i) if baseline in per_class else None
        for label in labels:
            m = mean(label, i)
            cell = "" if m is None else f"{100 * m:.1f}"
            if m is not None and base is not None and label != baseline:
                cell += f" ({100 * (m - base):+.1f})"
            row.append(cell)
        rows.append(row)
    return ["class", *[f"{label} IoU %" for label in labels]], rows


def per_class_section(result: Any, classes: Sequence[str]) -> Any:
    """The "Per-class IoU" section of the report."""
    from attnzoo.bench.report import Section, Table, Text

    per_class: dict[str, list[Sequence[float | None]]] = {}
    for r in result.runs:
        if r.get("per_class_iou") is not None:
            per_class.setdefault(r["attention"], []).append(r["per_class_iou"])
    if not per_class:
        return Section("Per-class IoU", [Text("Not available: no run recorded its per-class IoU.")])
    headers, rows = per_class_table(per_class, classes, result.baseline)
    caption = (
        "IoU per class (%) on the test set after the last epoch, mean over the seeds"
        + (
            f"; in parentheses the difference to `{result.baseline}` (points)"
            if result.baseline in per_class
            else ""
        )
        + ". Empty: the class is in neither the truth nor the predictions."
    )
    return Section("Per-class IoU", [Table(headers, rows, caption)], collapsed=len(classes) > 30)


def _pixel_pair_maps(model: Any, images: Tensor, query: tuple[float, float]) -> dict[str, Tensor]:
    """``{module path: (B, h, w)}``: the attention row of the query pixel of every pixel-pair
    module of ``model`` (PAM, DANet's dual attention, non-local ...)."""
    from attnzoo.viz import attention_maps

    records = attention_maps(model, images, query=query)
    # a record has a query point only for pixel-pair modules
    return {
        path: rec.maps["spatial"]
        for path, rec in records.items()
        if rec.query is not None and "spatial" in rec.maps
    }


def panel_sections(
    data: Any, plan: Sequence[Any], n_images: int, query: tuple[float, float]
) -> list[Any]:
    """The "Predictions" section (first ``n_images`` test images, each head's first seed) and
    the "Position attention" section (the heads with a pixel-pair module)."""
    from attnzoo.bench.checkpoints import load_run_model
    from attnzoo.bench.report import Figure, Section, Text

    n = min(n_images, len(data.test))
    if not n or not plan:
        return []
    seed = min(run.seed for run in plan)
    models = {run.spec.label: load_run_model(run.run_dir)[0] for run in plan if run.seed == seed}
    pairs = [data.test[i] for i in range(n)]
    images = torch.stack([p[0] for p in pairs])
    truths = torch.stack([p[1] for p in pairs])
    with torch.no_grad():
        preds = {label: m(images)["out"].argmax(1) for label, m in models.items()}
    sections = [
        Section(
            "Predictions",
            [
                Figure(
                    "segmentation.png",
                    plot_prediction_panel(images, truths, preds, data.classes),
                    f"The first {n} test images, their true masks and each head's prediction "
                    f"(seed {seed}); `none` is the FCN head. Grey: ignored pixels (255).",
                )
            ],
        )
    ]
    maps: dict[str, Tensor] = {}
    for label, model in models.items():
        for path, m in _pixel_pair_maps(model, images, query).items():
            maps[f"{label}: {path}"] = m
    fy, fx = query
    if not maps:
        blocks: list[Any] = [Text("No head of this bench has a pixel-pair attention module.")]
    else:
        blocks = [
            Figure(
                "position_attention.png",
                plot_query_attention(images, query, maps),
                f"Position attention of the query pixel (red +, at {fy:.2f} of the height and "
                f"{fx:.2f} of the width; option `query`) over the key positions, for each "
                f"pixel-pair module (column title: the head, then the module's path; seed {seed}); "
                "each map scaled to its maximum, upsampled from the module's feature grid "
                "(output stride 8).",
            )
        ]
    return [*sections, Section("Position attention", blocks)]
