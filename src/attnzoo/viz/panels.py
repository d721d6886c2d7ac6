"""PNG panels: images with saliency / attention maps overlaid, one row per image.

matplotlib is imported inside the functions (optional dependency, ``pip install "attnzoo[viz]"``)
and used through its object API with the Agg canvas: no pyplot, no display, no global backend
switch.

Geometry: the image and every map are drawn with ``imshow`` at their default extent
(pixel ``(i, j)`` centred at ``(j, i)``, covering ``[j - 0.5, j + 0.5] x [i - 0.5, i + 0.5]``) and
``interpolation="nearest"``; maps smaller than the image are first resized with
:func:`attnzoo.viz.upsample_map` (bilinear, half-pixel centres), so map cell ``(i, j)`` of an
``h x w`` map lands on the image pixels ``[i H/h, (i+1) H/h) x [j W/w, (j+1) W/w)``. A box
``(x0, y0, x1, y1)`` (exclusive ends) is drawn as the rectangle around pixels ``x0 .. x1 - 1``,
``y0 .. y1 - 1``, i.e. from ``(x0 - 0.5, y0 - 0.5)`` to ``(x1 - 0.5, y1 - 0.5)``.
"""

from __future__ import annotations

import io
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._atomic import atomic_write_bytes
from attnzoo.viz.localisation import _check_boxes
from attnzoo.viz.maps import Query, attention_maps, upsample_map

__all__ = ["panel_columns_for", "save_panel"]

_TOL = 1e-3  # values this far outside [0, 1] (rounding of denormalisation) are clamped
_TITLES = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "hirescam": "HiResCAM",
    "xgradcam": "XGrad-CAM",
    "layercam": "LayerCAM",
    "eigencam": "Eigen-CAM",
    "eigengradcam": "EigenGrad-CAM",
    "gradcamelementwise": "Grad-CAM (element-wise)",
    "scorecam": "Score-CAM",
    "ablationcam": "Ablation-CAM",
}


def _unit_range(fn: str, name: str, t: Tensor) -> Tensor:
    t = t.detach().cpu().float()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{fn}: {name} must be finite")
    if t.numel() and (float(t.min()) < -_TOL or float(t.max()) > 1 + _TOL):
        raise ValueError(
            f"{fn}: {name} must lie in [0, 1]; got values in "
            f"[{float(t.min()):.4g}, {float(t.max()):.4g}] (normalise it first)"
        )
    return t.clamp(0.0, 1.0)


def save_panel(
    path: str | os.PathLike,
    images: Tensor,
    columns: Mapping[str, Tensor],
    *,
    title: str,
    boxes: Any = None,
    row_labels: Sequence[str] | None = None,
    cell_labels: Mapping[str, Sequence[str]] | None = None,
    images_as_columns: bool = False,
    cmap: str = "jet",
    alpha: float = 0.5,
    box_color: str = "red",
    cell_inches: float = 2.0,
    dpi: int = 100,
) -> Path:
    """Write a PNG: one row per image; the image, then each map overlaid on it (or, with
    ``images_as_columns``, one column per image: the images, then each map, as rows).

    Args:
        path: the PNG to write (parent folders are created). Written atomically: rendered to a
            temporary file in the same folder, then ``os.replace``-d onto ``path``.
        images: ``(B, 3, H, W)`` RGB (or ``(B, 1, H, W)`` grey) in ``[0, 1]``.
        columns: ordered ``{header: (B, h, w) map in [0, 1]}``; maps of another size are resized
            to ``(H, W)`` with :func:`~attnzoo.viz.upsample_map` (bilinear, half-pixel centres).
            Colours use the fixed range ``[0, 1]`` (``vmin=0, vmax=1``), not per-map scaling.
        title: the figure title (say what is shown: method, class, model, seed).
        boxes: optional ``(B, 4)`` integer ``(x0, y0, x1, y1)`` (exclusive ends), drawn on every
            cell of its row.
        row_labels: optional ``B`` strings naming the images: left of each row (above each
            column with ``images_as_columns``).
        cell_labels: optional ``{header: B strings}`` written under the cells of that column
            (e.g. each model's prediction).
        images_as_columns: one column per image and one row per map (headers on the left),
            which is more compact for a few maps of many images.
        cmap, alpha: colour map and opacity of the overlays (jet, 0.5).
        box_color: edge colour of the boxes.
        cell_inches, dpi: size of one cell (inches) and resolution.

    Returns:
        ``Path(path)``.

    Raises:
        ValueError: shapes, value ranges, boxes or labels that do not fit.
        ImportError: matplotlib is missing (``pip install "attnzoo[viz]"``).
    """
    fn = "attnzoo.viz.save_panel"
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{fn}: images must be a (B, 3, H, W) or (B, 1, H, W) tensor; got {got}")
    b, _, h, w = images.shape
    if b < 1:
        raise ValueError(f"{fn}: images is empty")
    images = _unit_range(fn, "images", images)
    maps: dict[str, Tensor] = {}
    for header, m in columns.items():
        if not isinstance(m, Tensor) or m.dim() != 3 or m.shape[0] != b:
            got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"{fn}: columns[{header!r}] must be a ({b}, h, w) tensor; got {got}")
        maps[str(header)] = upsample_map(_unit_range(fn, f"columns[{header!r}]", m), (h, w))
    box_list = None if boxes is None else _check_boxes(fn, boxes, b, h, w).tolist()
    if row_labels is not None:
        row_labels = [str(s) for s in row_labels]
        if len(row_labels) != b:
            raise ValueError(f"{fn}: row_labels has {len(row_labels)} entries for {b} images")
    under: dict[str, list[str]] = {}
    for header, texts in (cell_labels or {}).items():
        if str(header) not in maps or isinstance(texts, str) or len(texts) != b:
            raise ValueError(
                f"{fn}: cell_labels[{header!r}] must name a column "
                f"({', '.join(map(repr, maps))}) and hold {b} strings"
            )
        under[str(header)] = [str(t) for t in texts]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"{fn}: alpha must be in [0, 1]; got {alpha!r}")

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as err:
        raise ImportError(f'{fn} needs matplotlib: pip install "attnzoo[viz]"') from err

    ncols = 1 + len(maps)
    grid = (ncols, b) if images_as_columns else (b, ncols)
    fig = Figure(
        figsize=(cell_inches * grid[1], cell_inches * grid[0] + 0.6), dpi=dpi, layout="constrained"
    )
    FigureCanvasAgg(fig)
    axes = fig.subplots(*grid, squeeze=False)
    headers = ["image", *maps]
    grey = images.shape[1] == 1
    for r in range(b):
        picture = images[r, 0] if grey else images[r].permute(1, 2, 0)
        for c in range(ncols):
            ax = axes[c][r] if images_as_columns else axes[r][c]
            ax.imshow(
                picture.numpy(),
                cmap="gray" if grey else None,
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            if c > 0:
                ax.imshow(
                    maps[headers[c]][r].numpy(),
                    cmap=cmap,
                    alpha=alpha,
                    vmin=0,
                    vmax=1,
                    interpolation="nearest",
                )
            if box_list is not None:
                x0, y0, x1, y1 = box_list[r]
                ax.add_patch(
                    Rectangle(
                        (x0 - 0.5, y0 - 0.5),
                        x1 - x0,
                        y1 - y0,
                        fill=False,
                        edgecolor=box_color,
                        linewidth=1.5,
                    )
                )
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            header = "\n".join(textwrap.wrap(headers[c], 22)) or " "
            if images_as_columns:
                if r == 0:
                    ax.set_ylabel(header, fontsize=8)
                if c == 0 and row_labels is not None:
                    ax.set_title(row_labels[r], fontsize=8)
            else:
                if r == 0:
                    ax.set_title(header, fontsize=8)
                if c == 0 and row_labels is not None:
                    ax.set_ylabel(row_labels[r], fontsize=8)
            if headers[c] in under:
                ax.set_xlabel(under[headers[c]][r], fontsize=7)
    width_chars = max(30, int(cell_inches * grid[1] * 11))
    fig.suptitle("\n".join(textwrap.wrap(str(title), width_chars)), fontsize=9)

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())


def _min_max(maps: Tensor) -> Tensor:
    """Per-map min-max scaling to ``[0, 1]``; a constant map becomes 0."""
    flat = maps.flatten(1).float()
    lo = flat.amin(1, keepdim=True)
    span = flat.amax(1, keepdim=True) - lo
    scaled = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, 1.0), 0.0)
    return scaled.view(maps.shape)


def panel_columns_for(
    model: nn.Module,
    images: Tensor,
    *,
    cam: bool = True,
    method: str = "gradcam",
    target_layer: str | nn.Module | None = None,
    targets: Any = None,
    max_maps: int | None = 4,
    query: Query = "mean",
) -> dict[str, Tensor]:
    """The columns of a :func:`save_panel` for one model: Grad-CAM and spatial attention maps.

    Args:
        model: a classifier (its train/eval mode is left as it was; both parts run in eval mode).
        images: ``(B, C, H, W)`` network inputs.
        cam: include the CAM column (``method``, ``target_layer``, ``targets`` as in
            :func:`~attnzoo.viz.cam`); header: the method's name (``"Grad-CAM"``).
        max_maps: how many attention maps: the spatial maps of the LAST ``max_maps`` attention
            modules (in ``named_modules()`` order, i.e. depth order for the project's networks)
            that produce a 2-D ``"spatial"`` map (CBAM, CA, GC, EMA, pixel-pair modules...;
            channel-only modules such as SE and ECA have none); ``None`` for all.
        query: the pixel-pair query (see :func:`~attnzoo.viz.attention_maps`).

    Returns:
        Ordered ``{header: (B, H, W)}``, all at the image size in ``[0, 1]``: the CAM, then
        ``"<module path> spatial"`` per attention map. The attention maps are min-max scaled per
        image (sigmoid gates often span a narrow range such as 0.45-0.55, and pixel-pair rows sum
        to 1, so raw values would show nothing) and upsampled with :func:`upsample_map`.
    """
    if max_maps is not None and (
        isinstance(max_maps, bool) or not isinstance(max_maps, int) or max_maps < 0
    ):
        raise ValueError(
            f"attnzoo.viz.panel_columns_for: max_maps must be None or an int >= 0; got {max_maps!r}"
        )
    h, w = images.shape[-2:]
    columns: dict[str, Tensor] = {}
    if cam:
        from attnzoo.viz.gradcam import cam as compute_cam

        title = _TITLES.get(method.lower(), method) if isinstance(method, str) else str(method)
        columns[title] = compute_cam(
            model, images, method=method, target_layer=target_layer, targets=targets
        )
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        records = attention_maps(model, images, query=query)
    finally:
        for m, training in modes:
            m.training = training
    spatial = [
        (key or rec.name, rec.maps["spatial"])
        for key, rec in records.items()
        if "spatial" in rec.maps and rec.maps["spatial"].dim() == 3
    ]
    if max_maps is not None:
        spatial = spatial[-max_maps:] if max_maps else []
    for key, smap in spatial:
        columns[f"{key} spatial"] = upsample_map(_min_max(smap), (h, w))
    return columns
