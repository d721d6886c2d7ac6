"""Pascal VOC layout: read and write ``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Main/``.

Coordinates: VOC XML stores 1-based, inclusive integer pixel indices (``xmin = 1`` is the first
column, a box ``xmin..xmax`` is ``xmax − xmin + 1`` pixels wide). attnzoo boxes are 0-based with
exclusive ends, so reading gives ``x0 = xmin − 1, y0 = ymin − 1, x1 = xmax, y1 = ymax`` and writing
the inverse with each corner rounded to the nearest integer (a box narrower than a pixel is
written one pixel wide): integer boxes round-trip exactly, others within half a pixel.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
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
    find_image,
    image_size,
    save_image,
)

__all__ = ["read_voc", "write_voc"]


def _text(node: ET.Element, tag: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"<{tag}> is missing or empty")
    return child.text.strip()


def _parse_xml(path: Path) -> dict[str, Any]:
    """``{"filename", "size" (h, w) | None, "objects": [(name, difficult, (xmin, ...))]}``.

    Raises ``ValueError`` (message without the path) for anything that is not VOC XML.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"not well-formed XML ({err})") from None
    if root.tag != "annotation":
        raise ValueError(f"the root element is <{root.tag}>, expected <annotation>")
    size = None
    node = root.find("size")
    if node is not None and node.find("width") is not None:
        size = (int(float(_text(node, "height"))), int(float(_text(node, "width"))))
        size = size if min(size) > 0 else None  # some tools write 0 x 0: use the file's size
    objects = []
    for k, obj in enumerate(root.findall("object")):
        try:
            name = _text(obj, "name")
            diff = obj.find("difficult")
            difficult = diff is not None and (diff.text or "0").strip() not in ("0", "")
            bnd = obj.find("bndbox")
            if bnd is None:
                raise ValueError("<bndbox> is missing")
            coords = tuple(float(_text(bnd, t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as err:
            raise ValueError(f"object {k}: {err}") from None
        objects.append((name, difficult, coords))
    fname = root.find("filename")
    return {
        "filename": fname.text.strip() if fname is not None and fname.text else None,
        "size": size,
        "objects": objects,
    }


def _split_ids(root: Path, split: str) -> list[str]:
    for sub in ("JPEGImages", "Annotations"):
        if not (root / sub).is_dir():
            hint = ""
            nested = (
                sorted(p.name for p in root.glob("VOC*") if (p / sub).is_dir())
                if root.is_dir()
                else []
            )
            if nested:
                hint = f"; did you mean {root / nested[0]}?"
            raise ValueError(
                f"read_voc: {root} has no {sub}/ folder; expected the VOC layout "
                f"JPEGImages/, Annotations/*.xml, ImageSets/Main/<split>.txt{hint}"
            )
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        found = (
            sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
            if (root / "ImageSets" / "Main").is_dir()
            else []
        )
        raise ValueError(
            f"read_voc: the split file {split_file} does not exist"
            + (f"; splits found: {', '.join(found)}" if found else "")
        )
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"read_voc: the split file {split_file} lists no image")
    return ids


def _check_record(root: Path, image_id: str, problems: Problems) -> dict[str, Any] | None:
    """Parse one image's XML and check its file; ``None`` if it was reported."""
    xml = root / "Annotations" / f"{image_id}.xml"
    if not xml.is_file():
        problems(str(xml), "missing annotation", "the split file lists it but there is no XML")
        return None
    try:
        rec = _parse_xml(xml)
    except ValueError as err:
        problems(str(xml), "malformed annotation", str(err))
        return None
    path = find_image(root / "JPEGImages", image_id, rec["filename"])
    if path is None:
        problems(
            str(xml),
            "missing image",
            f"no {rec['filename'] or image_id + '.jpg'} in {root / 'JPEGImages'}",
        )
        return None
    try:
        hw = image_size(path)
    except Exception as err:  # noqa: BLE001  (PIL raises many types for broken files)
        problems(str(path), "unreadable image", f"{type(err).__name__}: {err}")
        return None
    if rec["size"] is not None and rec["size"] != hw:
        problems(
            str(xml),
            "size mismatch",
            f"<size> says {rec['size'][1]}x{rec['size'][0]} "
            f"(WxH) but {path.name} is {hw[1]}x{hw[0]}",
        )
        return None
    if not rec["objects"]:
        problems(str(xml), "no objects", "the annotation has no <object>")
        return None
    rec.update(xml=xml, path=path, hw=hw)
    return rec


def read_voc(
    root: str | os.PathLike,
    split: str = "trainval",
    *,
    classes: tuple[str, ...] | list[str] | None = None,
    keep_difficult: bool = True,
    on_error: OnError = "raise",
) -> DetectionData:
    """Read one split of a VOC-layout folder (images are decoded on access).

    Args:
        root: the folder holding ``JPEGImages/``, ``Annotations/`` and ``ImageSets/Main/``
            (e.g. ``VOCdevkit/VOC2007``).
        split: the ``ImageSets/Main/<split>.txt`` file listing the image ids.
        classes: class names in label order; objects of other classes are an "unknown class"
            problem. ``None``: the names in ``root/classes.txt`` (one per line, as
            :func:`write_voc` writes it) if that file exists, else the sorted names found in this
            split (for VOC, the usual 20-class order; pass the training split's ``classes`` when
            reading its test split).
        keep_difficult: keep objects marked ``difficult`` (flagged in ``difficult``); ``False``
            drops them, and an image left without objects is skipped and counted as "only
            difficult objects".
        on_error: ``"raise"``: the first bad annotation raises ``ValueError`` naming its file and
            the problem; ``"skip"``: such images are left out, listed in ``.skipped`` and
            summarised in one warning.

    Problems checked: missing XML, malformed XML, missing or unreadable image, ``<size>`` not
    matching the image, no objects, unknown class, degenerate boxes and boxes outside the image
    (more than half a pixel; boxes within that are clipped). Images may differ in size.
    """
    root = Path(root)
    problems = Problems("read_voc", on_error)
    if classes is not None and (
        isinstance(classes, str)
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise ValueError(f"read_voc: classes must be a sequence of distinct names; got {classes!r}")
    ids = _split_ids(root, split)
    records = [r for r in (_check_record(root, i, problems) for i in ids) if r is not None]
    if classes is None and (root / "classes.txt").is_file():
        classes = [c.strip() for c in (root / "classes.txt").read_text().splitlines() if c.strip()]
    if classes is None:
        classes = sorted({name for r in records for name, _, _ in r["objects"]})
    index = {c: k for k, c in enumerate(classes)}
    keep: list[dict[str, Any]] = []
    for rec in records:
        names = [o[0] for o in rec["objects"]]
        unknown = sorted({n for n in names if n not in index})
        if unknown:
            problems(str(rec["xml"]), "unknown class", f"{unknown} not in classes {list(classes)}")
            continue
        xyxy = np.array([o[2] for o in rec["objects"]], np.float64)
        xyxy[:, :2] -= 1.0
        bad = box_problem(xyxy, *rec["hw"])
        if bad:
            problems(str(rec["xml"]), *bad)
            continue
        difficult = np.array([o[1] for o in rec["objects"]], bool)
        labels = np.array([index[n] for n in names], np.int64)
        if not keep_difficult:
            if difficult.all():
                problems(
                    str(rec["xml"]),
                    "only difficult objects",
                    "keep_difficult=False",
                    always_skip=True,
                )
                continue
            xyxy, labels, difficult = xyxy[~difficult], labels[~difficult], difficult[~difficult]
        rec.update(boxes=clip_boxes(xyxy, *rec["hw"]), labels=labels, difficult=difficult)
        keep.append(rec)
    problems.warn(len(ids))
    if not keep:
        raise ValueError(
            f"read_voc: no usable image in split {split!r} of {root} "
            f"({len(problems.skipped)} skipped: "
            f"{'; '.join(map(str, problems.skipped[:3]))})"
        )
    return DetectionData(
        images=ImageFiles([r["path"] for r in keep], [r["hw"] for r in keep]),
        boxes=[r["boxes"] for r in keep],
        labels=[r["labels"] for r in keep],
        classes=tuple(classes),
        names=[r["xml"].stem for r in keep],
        difficult=[r["difficult"] for r in keep],
        skipped=problems.skipped,
        meta={"root": str(root), "split": split},
    )


def _voc_corners(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """0-based exclusive-end box → VOC 1-based inclusive integers (see the module docstring)."""
    x0, y0, x1, y1 = (int(np.floor(float(v) + 0.5)) for v in box)
    xmin, ymin = min(max(x0 + 1, 1), width), min(max(y0 + 1, 1), height)
    xmax, ymax = min(max(x1, xmin), width), min(max(y1, ymin), height)
    return xmin, ymin, xmax, ymax


def _xml(name: str, filename: str, hw: tuple[int, int], objects: list[tuple]) -> ET.ElementTree:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = filename
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "attnzoo"
    size = ET.SubElement(root, "size")
    for tag, v in (("width", hw[1]), ("height", hw[0]), ("depth", 3)):
        ET.SubElement(size, tag).text = str(v)
    ET.SubElement(root, "segmented").text = "0"
    for cls, difficult, corners in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = cls
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "1" if difficult else "0"
        bnd = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), corners):
            ET.SubElement(bnd, tag).text = str(v)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def write_voc(
    data: DetectionData, root: str | os.PathLike, split: str = "train", *, image_format: str = "jpg"
) -> Path:
    """Write ``data`` as a VOC-layout folder under ``root``; returns ``root``.

    Images go to ``JPEGImages/<name>.jpg`` (JPEG quality 95) or ``.png``, one XML per image to
    ``Annotations/``, the names to ``ImageSets/Main/<split>.txt`` (replaced if present; other
    splits' files are kept, so a train and a test split with distinct names can share a folder)
    and the class names in label order to ``classes.txt`` (which :func:`read_voc` reads).
    Boxes are rounded as the module docstring says.
    """
    check_writable("write_voc", data)
    ext = check_image_format("write_voc", image_format)
    if not isinstance(split, str) or not split or "/" in split:
        raise ValueError(f"write_voc: split must be a plain name such as 'train'; got {split!r}")
    root = Path(root)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    difficult = data.difficult
    for i, name in enumerate(data.names):
        image = np.asarray(data.images[i])
        hw = image.shape[:2]
        filename = f"{name}.{ext}"
        save_image(image, root / "JPEGImages" / filename, ext)
        flags = difficult[i] if difficult is not None else np.zeros(len(data.labels[i]), bool)
        objects = [
            (data.classes[int(c)], bool(f), _voc_corners(b, *hw))
            for b, c, f in zip(data.boxes[i], data.labels[i], flags)
        ]
        _xml(name, filename, hw, objects).write(
            root / "Annotations" / f"{name}.xml", encoding="utf-8"
        )
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in data.names))
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in data.classes))
    return root
