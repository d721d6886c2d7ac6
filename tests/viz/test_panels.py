"""save_panel / panel_columns_for: a valid PNG, written atomically, overlays aligned with the
image (checked on the rendered pixels), and the convenience columns for a model."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from attnzoo.models import cifar_resnet8
from attnzoo.viz import attention_maps, panel_columns_for, save_panel, upsample_map
from conftest import randomize_

pytest.importorskip("matplotlib")
torch.set_num_threads(2)


def test_writes_a_png(tmp_path):
    images = torch.rand(3, 3, 32, 32)
    columns = {"Grad-CAM": torch.rand(3, 32, 32), "layer1.0.attention spatial": torch.rand(3, 8, 8)}
    path = save_panel(
        tmp_path / "sub" / "panel.png",
        images,
        columns,
        title="what it shows",
        boxes=torch.tensor([[1, 2, 10, 12]] * 3),
        row_labels=["a", "b", "c"],
    )
    assert path == tmp_path / "sub" / "panel.png"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode in ("RGB", "RGBA")
        w, h = im.size
    # 3 columns x 3 rows of 2-inch cells at 100 dpi (+ title): about 600 x 660 pixels
    assert 550 <= w <= 650 and 600 <= h <= 720
    assert os.listdir(path.parent) == ["panel.png"]  # no temporary file left behind
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_grey_images_and_no_columns(tmp_path):
    path = save_panel(tmp_path / "g.png", torch.rand(2, 1, 16, 20), {}, title="grey")
    with Image.open(path) as im:
        assert im.size[0] < im.size[1]  # one column, two rows


def test_overwrite_is_atomic_and_failure_leaves_old_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "p.png"
    save_panel(path, torch.rand(1, 3, 8, 8), {"m": torch.rand(1, 8, 8)}, title="first")
    before = path.read_bytes()

    def boom(self, *args, **kwargs):
        args[0].write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_panel(path, torch.rand(1, 3, 8, 8), {"m": torch.rand(1, 8, 8)}, title="second")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["p.png"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"images": torch.rand(2, 4, 8, 8)}, "images must be"),
        ({"images": torch.rand(2, 3, 8, 8) * 2}, "images must lie in \\[0, 1\\]"),
        ({"columns": {"m": torch.rand(1, 8, 8)}}, "columns\\['m'\\] must be a \\(2, h, w\\)"),
        ({"columns": {"m": torch.rand(2, 8, 8) - 0.5}}, "columns\\['m'\\] must lie in"),
        ({"boxes": torch.tensor([[0, 0, 9, 4]] * 2)}, "boxes"),
        ({"row_labels": ["only one"]}, "row_labels"),
        ({"cell_labels": {"m": ["one"]}}, "cell_labels\\['m'\\] must name a column"),
        ({"cell_labels": {"other": ["a", "b"]}}, "cell_labels\\['other'\\]"),
    ],
)
def test_validation(tmp_path, kwargs, match):
    args = {"images": torch.rand(2, 3, 8, 8), "columns": {"m": torch.rand(2, 4, 4)}}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        save_panel(tmp_path / "x.png", args.pop("images"), args.pop("columns"), title="t", **args)
    assert not os.listdir(tmp_path)


def test_images_as_columns_transposes_the_grid(tmp_path):
    images, maps = torch.rand(6, 3, 16, 16), {"a": torch.rand(6, 4, 4), "b": torch.rand(6, 4, 4)}
    rows = save_panel(tmp_path / "rows.png", images, maps, title="t")
    cols = save_panel(
        tmp_path / "cols.png",
        images,
        maps,
        title="t",
        images_as_columns=True,
        row_labels=[f"true {i}" for i in range(6)],
        cell_labels={"a": [f"pred {i}" for i in range(6)]},
    )
    with Image.open(rows) as r, Image.open(cols) as c:
        # 6 images x 3 cells: tall as rows, wide as columns (2-inch cells at 100 dpi)
        assert r.size[1] > 1100 and r.size[0] < 700
        assert c.size[0] > 1100 and c.size[1] < 700


def test_tiny_rounding_outside_unit_range_is_clamped(tmp_path):
    images = torch.rand(1, 3, 8, 8)
    images[0, 0, 0, 0] = 1.0 + 1e-5
    images[0, 1, 0, 0] = -1e-5
    save_panel(tmp_path / "ok.png", images, {"m": torch.rand(1, 8, 8)}, title="t")


# ---------------------------------------------------------------------------------------------
# alignment on the rendered pixels
def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("cell, size", [((2, 5), (8, 8)), ((1, 0), (4, 6)), ((3, 5), (4, 6))])
def test_overlay_and_box_aligned_with_the_image(tmp_path, cell, size):
    """A black 32 x 48 image, a low-resolution map that is 1 in one cell and 0 elsewhere, and
    the box of that cell's image pixels: on the PNG, the hot colour must sit at the cell's place
    within the image area, and the box must frame it."""
    h, w = 32, 48
    mh, mw = size
    cy, cx = cell
    m = torch.zeros(1, mh, mw)
    m[0, cy, cx] = 1.0
    y0, y1 = cy * h // mh, (cy + 1) * h // mh
    x0, x1 = cx * w // mw, (cx + 1) * w // mw
    path = save_panel(
        tmp_path / "a.png",
        torch.zeros(1, 3, h, w),
        {"hot": m},
        title="",
        boxes=torch.tensor([[x0, y0, x1, y1]]),
        box_color="lime",
        cmap="jet",
        alpha=0.5,
        cell_inches=4.0,
    )
    px = np.asarray(Image.open(path).convert("RGB")).astype(int)
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    right = np.zeros_like(r, dtype=bool)
    right[:, px.shape[1] // 2 :] = True  # the overlay column
    # the overlay column's image area: everything coloured (the white background and the grey
    # header text are not; jet over black is never grey)
    coloured = (px.max(-1) - px.min(-1)) > 15
    lime = right & (g > 200) & (r < 100) & (b < 100)
    ax0, ay0, ax1, ay1 = _bbox(right & coloured)
    sx, sy = (ax1 - ax0) / w, (ay1 - ay0) / h  # screen pixels per image pixel
    assert abs(sx - sy) < 0.05 * sx  # square pixels, the whole image shown
    assert abs(sx * w - (px.shape[1] // 2) * 0.98) < 0.05 * sx * w  # fills its cell
    # the hottest colour (jet: red high, blue low) lies inside the cell's image pixels
    heat = np.where(right & coloured & ~lime, r - b, -999)
    hottest = np.unravel_index(np.argmax(heat), heat.shape)
    assert heat[hottest] > 100
    iy, ix = (hottest[0] - ay0) / sy, (hottest[1] - ax0) / sx
    assert y0 <= iy < y1 and x0 <= ix < x1, (iy, ix, (y0, y1), (x0, x1))
    # the box frames the cell: its outline spans [x0, x1) x [y0, y1) in image pixels
    bx0, by0, bx1, by1 = _bbox(lime)
    tol = 0.3  # image pixels: line width and anti-aliasing are ~1-2 screen px = 0.2 image px
    assert abs((bx0 - ax0) / sx - x0) < tol and abs((bx1 - ax0) / sx - x1) < tol
    assert abs((by0 - ay0) / sy - y0) < tol and abs((by1 - ay0) / sy - y1) < tol


# ---------------------------------------------------------------------------------------------
# panel_columns_for
def test_panel_columns_for_cifar_resnet8(tmp_path):
    torch.manual_seed(0)
    model = randomize_(cifar_resnet8("cbam")).train()
    x = torch.randn(2, 3, 32, 32)
    cols = panel_columns_for(model, x)
    assert list(cols) == [
        "Grad-CAM",
        "layer1.0.attention spatial",
        "layer2.0.attention spatial",
        "layer3.0.attention spatial",
    ]
    for k, v in cols.items():
        assert v.shape == (2, 32, 32) and float(v.min()) >= 0 and float(v.max()) <= 1, k
    assert all(m.training for m in model.modules())
    # the attention columns: each eval-mode map min-max scaled per image, then upsampled
    model.eval()
    records = attention_maps(model, x)
    model.train()
    for key, rec in records.items():
        raw = rec.maps["spatial"].flatten(1)
        lo, hi = raw.amin(1, keepdim=True), raw.amax(1, keepdim=True)
        scaled = ((raw - lo) / (hi - lo)).view_as(rec.maps["spatial"])
        torch.testing.assert_close(cols[f"{key} spatial"], upsample_map(scaled, (32, 32)))
    only_last = panel_columns_for(model, x, cam=False, max_maps=1)
    assert list(only_last) == ["layer3.0.attention spatial"]
    torch.testing.assert_close(
        only_last["layer3.0.attention spatial"], cols["layer3.0.attention spatial"]
    )
    assert list(panel_columns_for(model, x, cam=False, max_maps=0)) == []
    save_panel(tmp_path / "m.png", torch.rand(2, 3, 32, 32), cols, title="cbam")


def test_panel_columns_for_channel_only_and_plain_models():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    assert list(panel_columns_for(cifar_resnet8("se").eval(), x, method="eigencam")) == [
        "Eigen-CAM"
    ]
    assert list(panel_columns_for(cifar_resnet8(None).eval(), x)) == ["Grad-CAM"]
