"""The container every detection loader returns, lazy image files and annotation checks."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["REASONS", "DetectionData", "ImageFiles", "Skipped"]

#: the kinds of annotation problem the readers report (the keys of ``skip_counts``)
REASONS = (
    "missing annotation",
    "malformed annotation",
    "missing image",
    "unreadable image",
    "size mismatch",
    "unknown class",
    "box outside image",
    "degenerate box",
    "no objects",
    "only difficult objects",
)

#: boxes may cross the image border by this much (rounding); they are then clipped to it
EDGE_TOLERANCE = 0.5

OnError = Literal["raise", "skip"]


@dataclass(frozen=True)
class Skipped:
    """One image left out by a reader: its annotation item, the kind of problem, the details."""

    item: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.item}: {self.reason} ({self.detail})"


class ImageFiles(Sequence):
    """Images read on access: ``files[i]`` is a ``uint8`` RGB ``(H, W, 3)`` array.

    Args:
        paths: one file per image.
        sizes: the ``(height, width)`` the annotations give; a file decoding to another size
            raises ``ValueError`` naming it.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], sizes: Sequence[tuple[int, int]]):
        if len(paths) != len(sizes):
            raise ValueError(f"ImageFiles: {len(paths)} paths but {len(sizes)} sizes")
        self.paths = [Path(p) for p in paths]
        self.sizes = [tuple(int(v) for v in s) for s in sizes]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            idx = range(len(self))[index]
            return ImageFiles([self.paths[i] for i in idx], [self.sizes[i] for i in idx])
        from PIL import Image

        path = self.paths[index]
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"), dtype=np.uint8)
        if arr.shape[:2] != self.sizes[index]:
            raise ValueError(
                f"ImageFiles: {path} is {arr.shape[0]}x{arr.shape[1]} (HxW) but its "
                f"annotation says {self.sizes[index][0]}x{self.sizes[index][1]}"
            )
        return arr

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files)"


@dataclass
class DetectionData:
    """One split of a detection data set, held as numpy arrays.

    Attributes:
        images: ``uint8`` RGB images: an ``(N, H, W, 3)`` array (built-in scenes), or a sequence of
            ``(H_i, W_i, 3)`` arrays (:class:`ImageFiles` for folders, read on access).
        boxes: per image, ``float32 (n_i, 4)`` boxes ``(x0, y0, x1, y1)`` in pixels: ``x0, y0``
            the top-left corner and ``x1, y1`` the exclusive bottom-right corner (a box covering
            pixel columns 3..7 has ``x0 = 3, x1 = 8``), the torchvision convention.
        labels: per image, ``int64 (n_i,)`` class indices into ``classes``.
        classes: class names; label ``k`` is ``classes[k]``.
        names: one identifier per image (file stem or scene name), unique.
        difficult: per image, ``bool (n_i,)`` (VOC ``difficult``, COCO ``iscrowd``), or ``None``.
        instance_masks: per image, ``bool (n_i, H, W)`` object masks, or ``None``.
        semantic_masks: ``uint8 (N, H, W)``: 0 background, ``1 + label`` on an object's pixels,
            or ``None``.
        skipped: images a reader left out (``on_error="skip"``), with the reason; see
            :attr:`skip_counts`.
        meta: anything else the loader records (the scenes' source digits per image, the
            readers' paths and COCO ids).
    """

    images: np.ndarray | Sequence[np.ndarray]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    classes: tuple[str, ...]
    names: list[str]
    difficult: list[np.ndarray] | None = None
    instance_masks: list[np.ndarray] | None = None
    semantic_masks: np.ndarray | None = None
    skipped: list[Skipped] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.images)
        lengths = {"boxes": len(self.boxes), "labels": len(self.labels), "names": len(self.names)}
        if self.difficult is not None:
            lengths["difficult"] = len(self.difficult)
        if self.instance_masks is not None:
            lengths["instance_masks"] = len(self.instance_masks)
        if self.semantic_masks is not None:
            lengths["semantic_masks"] = len(self.semantic_masks)
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ValueError(f"DetectionData: {n} images but {bad}")
        self.classes = tuple(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every image (without decoding files)."""
        if isinstance(self.images, ImageFiles):
            return list(self.images.sizes)
        if isinstance(self.images, np.ndarray):
            return [tuple(self.images.shape[1:3])] * len(self)  # type: ignore[list-item]
        return [tuple(im.shape[:2]) for im in self.images]

    @property
    def skip_counts(self) -> dict[str, int]:
        """Images skipped per reason (empty when nothing was skipped)."""
        return dict(Counter(s.reason for s in self.skipped))

    def subset(self, indices: Sequence[int] | np.ndarray) -> DetectionData:
        """The images at ``indices``, in that order; ``meta`` lists with one entry per image are
        subset alike, everything else in ``meta`` and ``skipped`` is kept."""
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]

        def pick(seq):
            if seq is None:
                return None
            if isinstance(seq, np.ndarray):
                return seq[idx]
            if isinstance(seq, ImageFiles):
                return ImageFiles([seq.paths[i] for i in idx], [seq.sizes[i] for i in idx])
            return [seq[i] for i in idx]

        return replace(
            self,
            images=pick(self.images),
            boxes=pick(self.boxes),
            labels=pick(self.labels),
            names=pick(self.names),
            difficult=pick(self.difficult),
            instance_masks=pick(self.instance_masks),
            semantic_masks=pick(self.semantic_masks),
            skipped=list(self.skipped),
            meta={
                k: pick(v) if isinstance(v, list) and len(v) == len(self) else v
                for k, v in self.meta.items()
            },
        )


# ---------------------------------------------------------------------------------------------
# shared by the readers
class Problems:
    """Collects annotation problems: raises the first (``on_error="raise"``) or records them."""

    def __init__(self, reader: str, on_error: str) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"{reader}: on_error must be 'raise' or 'skip'; got {on_error!r}")
        self.reader, self.on_error = reader, on_error
        self.skipped: list[Skipped] = []

    def __call__(self, item: str, reason: str, detail: str, *, always_skip: bool = False) -> None:
        if self.on_error == "raise" and not always_skip:
            raise ValueError(
                f"{self.reader}: {item}: {reason}: {detail} (pass on_error='skip' to "
                "leave such images out; they are then counted in .skipped)"
            )
        self.skipped.append(Skipped(str(item), reason, detail))

    def warn(self, total: int) -> None:
        """One warning summarising the skipped images, if any."""
        if self.skipped:
            counts = Counter(s.reason for s in self.skipped)
            summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
            warnings.warn(
                f"{self.reader}: skipped {len(self.skipped)} of {total} images "
                f"({summary}); see .skipped for each",
                stacklevel=3,
            )


def box_problem(boxes: np.ndarray, height: int, width: int) -> tuple[str, str] | None:
    """``(reason, detail)`` for the first bad box of an image, or ``None`` when all are fine.

    Boxes crossing the border by at most :data:`EDGE_TOLERANCE` pixels pass (the caller clips).
    """
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        shown = f"box {k} ({x0:g}, {y0:g}, {x1:g}, {y1:g})"
        if not np.isfinite([x0, y0, x1, y1]).all() or x1 <= x0 or y1 <= y0:
            return (
                "degenerate box",
                f"{shown} has no area (x0, y0, x1, y1 expected, x1 > x0, y1 > y0)",
            )
        t = EDGE_TOLERANCE
        if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t:
            return "box outside image", f"{shown} is outside the {width}x{height} (WxH) image"
    return None


def clip_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """Boxes clipped to the image (for those within :data:`EDGE_TOLERANCE` of its border)."""
    out = boxes.astype(np.float32, copy=True)
    np.clip(out[:, 0::2], 0, width, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, height, out=out[:, 1::2])
    return out


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the file's header (raises PIL's errors for unreadable files)."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
    return h, w


def find_image(folder: Path, stem: str, preferred: str | None = None) -> Path | None:
    """``folder/preferred`` if it exists, else ``folder/stem.<ext>`` for a known extension."""
    if preferred:
        cand = folder / preferred
        if cand.is_file():
            return cand
    for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG", ".bmp", ".tif", ".tiff", ".webp"):
        cand = folder / f"{stem}{ext}"
        if cand.is_file():
            return cand
    return None


def save_image(image: np.ndarray, path: Path, image_format: str) -> None:
    """Write a ``uint8`` RGB array as JPEG (quality 95) or PNG."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB")
    if image_format == "jpg":
        im.save(path, quality=95)
    else:
        im.save(path)


def check_image_format(writer: str, image_format: str) -> str:
    if image_format not in ("jpg", "png"):
        raise ValueError(f"{writer}: image_format must be 'jpg' or 'png'; got {image_format!r}")
    return image_format


def check_writable(writer: str, data: object) -> None:
    if not isinstance(data, DetectionData):
        raise TypeError(f"{writer}: data must be a DetectionData; got {type(data).__name__}")
    names = list(data.names)
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise ValueError(
            f"{writer}: image names must be unique (they become file names); repeated: {dup[:5]}"
        )
    bad = [n for n in names if not n or "/" in n or "\\" in n or n.startswith(".")]
    if bad:
        raise ValueError(f"{writer}: image names must be plain file stems; got {bad[:5]}")
