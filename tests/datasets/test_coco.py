"""COCO JSON: write → read round trips, category mapping, masks, every bad-annotation case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnzoo.datasets import DetectionData, make_digit_scenes, read_coco, write_coco


@pytest.fixture(scope="module")
def scenes() -> tuple[DetectionData, DetectionData]:
    return make_digit_scenes(5, 3, canvas=(64, 96), scales=(2, 3), seed=7)


def test_round_trip_scenes(scenes, tmp_path) -> None:
    train, _ = scenes
    train = train.subset(range(len(train)))
    train.difficult = [np.arange(len(b)) == 0 for b in train.boxes]  # first object: iscrowd
    path = write_coco(train, tmp_path, image_format="png")
    back = read_coco(path, tmp_path / "images")
    assert back.classes == train.classes and back.names == train.names and not back.skipped
    for i in range(len(train)):
        np.testing.assert_allclose(back.boxes[i], train.boxes[i], atol=1e-4)
        np.testing.assert_array_equal(back.labels[i], train.labels[i])
        np.testing.assert_array_equal(back.difficult[i], train.difficult[i])
        np.testing.assert_array_equal(back.images[i], train.images[i])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_masks_written_as_rle_decode_with_pycocotools(scenes, tmp_path) -> None:
    mask_utils = pytest.importorskip("pycocotools.mask")
    train, _ = scenes
    doc = json.loads(write_coco(train, tmp_path).read_text())
    anns = [a for a in doc["annotations"] if a["image_id"] == 2]
    assert len(anns) == len(train.boxes[1])
    for ann, mask in zip(anns, train.instance_masks[1]):
        rle = mask_utils.frPyObjects(ann["segmentation"], *ann["segmentation"]["size"])
        np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
        assert ann["area"] == mask.sum()


def _write(root: Path, doc: dict, sizes: dict[str, tuple[int, int]]) -> Path:
    (root / "img").mkdir(exist_ok=True)
    for name, (h, w) in sizes.items():
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / "img" / name)
    path = root / "ann.json"
    path.write_text(json.dumps(doc))
    return path


def _doc() -> dict:
    """Two images of different sizes; category ids 7 and 3 (not contiguous, not sorted)."""
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "width": 60, "height": 40},
            {"id": 11, "file_name": "b.png", "width": 50, "height": 70},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 10,
                "category_id": 7,
                "bbox": [1.5, 2.0, 10.0, 20.25],
                "iscrowd": 0,
            },
            {"id": 2, "image_id": 11, "category_id": 3, "bbox": [0, 0, 50, 70], "iscrowd": 1},
            {"id": 3, "image_id": 11, "category_id": 7, "bbox": [5, 6, 7, 8]},
        ],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }


SIZES = {"a.png": (40, 60), "b.png": (70, 50)}


def test_categories_in_id_order_and_crowd_as_difficult(tmp_path) -> None:
    data = read_coco(_write(tmp_path, _doc(), SIZES), tmp_path / "img")
    assert data.classes == ("cat", "dog") and data.meta["category_ids"] == [3, 7]
    assert data.sizes == [(40, 60), (70, 50)] and data.names == ["a", "b"]
    np.testing.assert_allclose(data.boxes[0], [[1.5, 2.0, 11.5, 22.25]])
    np.testing.assert_array_equal(data.labels[1], [0, 1])
    np.testing.assert_array_equal(data.difficult[1], [True, False])


def _break(doc: dict, root: Path, case: str) -> str:
    """Corrupt image ``b`` (id 11); returns the expected reason."""
    anns = doc["annotations"]
    if case == "missing image":
        (root / "img" / "b.png").unlink()
    elif case == "unreadable image":
        (root / "img" / "b.png").write_bytes(b"not a png")
    elif case == "size mismatch":
        doc["images"][1]["height"] = 71
    elif case == "no objects":
        doc["annotations"] = anns[:1]
    elif case == "unknown class":
        anns[2]["category_id"] = 99
    elif case == "malformed annotation":
        anns[2]["bbox"] = [5, 6, 7]
    elif case == "box outside image":
        anns[2]["bbox"] = [45, 6, 7, 8]
    elif case == "degenerate box":
        anns[2]["bbox"] = [5, 6, 0, 8]
    return case


CASES = [
    "missing image",
    "unreadable image",
    "size mismatch",
    "no objects",
    "unknown class",
    "malformed annotation",
    "box outside image",
    "degenerate box",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_annotation_raises_or_is_counted(tmp_path, case) -> None:
    path = _write(tmp_path, _doc(), SIZES)
    doc = _doc()
    reason = _break(doc, tmp_path, case)
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"read_coco: .*image 11 \(b\.png\): {reason}"):
        read_coco(path, tmp_path / "img")
    with pytest.warns(UserWarning, match=rf"skipped 1 of 2 images \({reason}: 1\)"):
        data = read_coco(path, tmp_path / "img", on_error="skip")
    assert data.names == ["a"] and data.skip_counts == {reason: 1}


def test_orphan_annotation_is_reported(tmp_path) -> None:
    doc = _doc()
    doc["annotations"].append({"id": 4, "image_id": 12, "category_id": 3, "bbox": [0, 0, 1, 1]})
    path = _write(tmp_path, doc, SIZES)
    with pytest.raises(ValueError, match=r"annotations\[3\]: malformed annotation: image_id 12"):
        read_coco(path, tmp_path / "img")
    with pytest.warns(UserWarning, match="malformed annotation: 1"):
        data = read_coco(path, tmp_path / "img", on_error="skip")
    assert len(data) == 2 and data.skipped[0].reason == "malformed annotation"


def test_malformed_files(tmp_path) -> None:
    path = _write(tmp_path, _doc(), SIZES)
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match=r"read_coco: .*ann\.json is not valid JSON"):
        read_coco(path, tmp_path / "img")
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match=r"not a COCO detection file.*\['categories'\]"):
        read_coco(path, tmp_path / "img")
    path.write_text(json.dumps({**_doc(), "categories": [{"name": "cat"}]}))
    with pytest.raises(ValueError, match="every category needs an integer 'id'"):
        read_coco(path, tmp_path / "img")
    with pytest.raises(ValueError, match="read_coco: the annotation file .* does not exist"):
        read_coco(tmp_path / "nope.json", tmp_path / "img")
    path.write_text(json.dumps(_doc()))
    with pytest.raises(ValueError, match="read_coco: the images folder .* does not exist"):
        read_coco(path, tmp_path / "nope")
    with pytest.raises(TypeError, match="write_coco: data must be a DetectionData"):
        write_coco([], tmp_path)  # type: ignore[arg-type]
