"""COCO JSON: read and write ``{"images", "annotations", "categories"}`` object detection files.

Boxes in COCO JSON are ``[x, y, width, height]`` in float pixels from the image's top-left corner;
attnzoo's are ``(x0, y0, x1, y1) = (x, y, x + width, y + height)``, so the conversion is exact up
to float rounding. Category ids may be any integers: they are sorted and mapped to contiguous
labels ``0..K-1`` in id order (``meta["category_ids"]`` keeps them); ``iscrowd`` objects are flagged
in ``difficult``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from attnzoo.datasets.data import (
    DetectionData,
    ImageFiles,
    OnError,
    Problems,
    box_problem,
    check_image_format,
    check_writable,
    clip_boxes,
    image_size,
    save_image,
)

__all__ = ["read_coco", "write_coco"]


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"read_coco: the annotation file {path} does not exist")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"read_coco: {path} is not valid JSON ({err})") from None
    missing = [
        k
        for k in ("images", "annotations", "categories")
        if not isinstance(doc, dict) or not isinstance(doc.get(k), list)
    ]
    if missing:
        raise ValueError(
            f"read_coco: {path} is not a COCO detection file: it needs the lists "
            f"'images', 'annotations' and 'categories'; missing or not a list: "
            f"{missing}"
        )
    return doc


def _categories(doc: dict[str, Any], path: Path) -> tuple[list[int], list[str]]:
    try:
        cats = sorted((int(c["id"]), str(c["name"])) for c in doc["categories"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"read_coco: {path}: every category needs an integer 'id' and a 'name'"
        ) from None
    ids = [i for i, _ in cats]
    if len(set(ids)) != len(ids) or not ids:
        raise ValueError(
            f"read_coco: {path}: category ids must be distinct and at least one is "
            f"needed; got {ids}"
        )
    return ids, [n for _, n in cats]


def _image_entry(entry: Any) -> tuple[Any, str, tuple[int, int] | None]:
    if not isinstance(entry, dict) or "id" not in entry or not entry.get("file_name"):
        raise ValueError("an image entry needs 'id' and 'file_name'")
    hw = None
    if entry.get("width") is not None and entry.get("height") is not None:
        hw = (int(entry["height"]), int(entry["width"]))
    return entry["id"], str(entry["file_name"]), hw


def _boxes(
    anns: list[dict], label_of: dict[int, int], where: str, problems: Problems
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    xyxy, labels, crowd = [], [], []
    for ann in anns:
        cat = ann.get("category_id")
        if cat not in label_of:
            problems(
                where,
                "unknown class",
                f"annotation {ann.get('id')} has category_id {cat!r},"
                f" not among the categories {sorted(label_of)}",
            )
            return None
        box = ann.get("bbox")
        if (
            not isinstance(box, (list, tuple))
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        ):
            problems(
                where,
                "malformed annotation",
                f"annotation {ann.get('id')} has bbox {box!r}, expected [x, y, width, height]",
            )
            return None
        x, y, w, h = (float(v) for v in box)
        xyxy.append((x, y, x + w, y + h))
        labels.append(label_of[cat])
        crowd.append(bool(ann.get("iscrowd", 0)))
    return np.array(xyxy, np.float64), np.array(labels, np.int64), np.array(crowd, bool)


def read_coco(
    annotation_json: str | os.PathLike,
    images_dir: str | os.PathLike,
    *,
    on_error: OnError = "raise",
) -> DetectionData:
    """Read a COCO object-detection JSON file and its images (decoded on access).

    Args:
        annotation_json: the JSON file (``images``, ``annotations``, ``categories``).
        images_dir: the folder the images' ``file_name`` is relative to.
        on_error: ``"raise"``: the first bad annotation raises ``ValueError`` naming the image or
            annotation and the problem; ``"skip"``: such images are left out, listed in
            ``.skipped`` and summarised in one warning.

    Problems checked per image: missing or unreadable file, ``width``/``height`` not matching the
    file, no annotation, unknown ``category_id``, malformed ``bbox``, degenerate boxes and boxes
    outside the image (more than half a pixel; boxes within that are clipped); an annotation whose
    ``image_id`` is not listed is reported too. Images may differ in size.
    """
    path, folder = Path(annotation_json), Path(images_dir)
    problems = Problems("read_coco", on_error)
    doc = _load_json(path)
    if not folder.is_dir():
        raise ValueError(f"read_coco: the images folder {folder} does not exist")
    cat_ids, classes = _categories(doc, path)
    label_of = {c: k for k, c in enumerate(cat_ids)}
    entries = []
    for k, entry in enumerate(doc["images"]):
        try:
            entries.append(_image_entry(entry))
        except ValueError as err:
            problems(f"{path} images[{k}]", "malformed annotation", str(err))
    by_image: dict[Any, list[dict]] = defaultdict(list)
    known = {e[0] for e in entries}
    for k, ann in enumerate(doc["annotations"]):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in known:
            problems(
                f"{path} annotations[{k}]",
                "malformed annotation",
                f"image_id {image_id!r} is not among the images",
            )
            continue
        by_image[image_id].append(ann)
    keep: list[dict[str, Any]] = []
    for image_id, file_name, hw_json in entries:
        file = folder / file_name
        where = f"{path} image {image_id} ({file_name})"
        if not file.is_file():
            problems(where, "missing image", f"{file} does not exist")
            continue
        try:
            hw = image_size(file)
        except Exception as err:  # noqa: BLE001  (PIL raises many types for broken files)
            problems(where, "unreadable image", f"{type(err).__name__}: {err}")
            continue
        if hw_json is not None and hw_json != hw:
            problems(
                where,
                "size mismatch",
                f"the JSON says {hw_json[1]}x{hw_json[0]} (WxH) but the file is {hw[1]}x{hw[0]}",
            )
            continue
        if not by_image[image_id]:
            problems(where, "no objects", "no annotation refers to this image")
            continue
        parsed = _boxes(by_image[image_id], label_of, where, problems)
        if parsed is None:
            continue
        bad = box_problem(parsed[0], *hw)
        if bad:
            problems(where, *bad)
            continue
        keep.append(
            {
                "file": file,
                "hw": hw,
                "id": image_id,
                "boxes": clip_boxes(parsed[0], *hw),
                "labels": parsed[1],
                "difficult": parsed[2],
            }
        )
    problems.warn(len(doc["images"]))
    if not keep:
        raise ValueError(
            f"read_coco: no usable image in {path} ({len(problems.skipped)} skipped: "
            f"{'; '.join(map(str, problems.skipped[:3]))})"
        )
    return DetectionData(
        images=ImageFiles([r["file"] for r in keep], [r["hw"] for r in keep]),
        boxes=[r["boxes"] for r in keep],
        labels=[r["labels"] for r in keep],
        classes=tuple(classes),
        names=[r["file"].stem for r in keep],
        difficult=[r["difficult"] for r in keep],
        skipped=problems.skipped,
        meta={
            "annotation_json": str(path),
            "images_dir": str(folder),
            "category_ids": cat_ids,
            "image_ids": [r["id"] for r in keep],
        },
    )


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE of a bool ``(H, W)`` mask (column-major runs, starting with 0s)."""
    flat = mask.reshape(-1, order="F")
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def write_coco(
    data: DetectionData,
    root: str | os.PathLike,
    *,
    image_format: str = "jpg",
    annotation_file: str = "annotations.json",
) -> Path:
    """Write ``data`` as ``root/images/<name>.jpg`` (or ``.png``) plus a COCO JSON file.

    Image ids are ``1..N`` in order, category ids ``1..K`` (label + 1), ``bbox`` is ``[x0, y0,
    x1 − x0, y1 − y0]``, ``iscrowd`` is the ``difficult`` flag. With instance masks, each
    annotation's ``segmentation`` is its mask as uncompressed RLE and ``area`` its pixel count;
    otherwise the box as a polygon and the box area. Returns the JSON file's path
    (``read_coco(path, root / "images")`` reads it back).
    """
    check_writable("write_coco", data)
    ext = check_image_format("write_coco", image_format)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i, name in enumerate(data.names):
        image = np.asarray(data.images[i])
        h, w = image.shape[:2]
        file_name = f"{name}.{ext}"
        save_image(image, root / "images" / file_name, ext)
        images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        for k, (box, label) in enumerate(zip(data.boxes[i], data.labels[i])):
            x0, y0, x1, y1 = (float(v) for v in box)
            segmentation: Any
            area: float
            if data.instance_masks is not None:
                mask = data.instance_masks[i][k]
                segmentation, area = _rle(mask), int(mask.sum())
            else:
                segmentation, area = [[x0, y0, x1, y0, x1, y1, x0, y1]], (x1 - x0) * (y1 - y0)
            crowd = data.difficult is not None and bool(data.difficult[i][k])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(label) + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": area,
                    "iscrowd": int(crowd),
                    "segmentation": segmentation,
                }
            )
    doc = {
        "info": {"description": "written by attnzoo"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": c, "supercategory": "object"} for k, c in enumerate(data.classes)
        ],
    }
    out = root / annotation_file
    out.write_text(json.dumps(doc), encoding="utf-8")
    return out
