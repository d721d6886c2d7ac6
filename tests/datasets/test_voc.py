"""VOC layout: write → read round trips and every bad-annotation case (error or counted skip)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attnzoo.datasets import DetectionData, make_digit_scenes, read_voc, write_voc


@pytest.fixture(scope="module")
def scenes() -> tuple[DetectionData, DetectionData]:
    return make_digit_scenes(6, 4, canvas=64, scales=(2, 3), seed=2)


def _gradient(h: int, w: int) -> np.ndarray:
    """A smooth image (JPEG keeps it within a few grey levels) that differs along both axes."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([3 * x, 2 * y, x + y + 40], axis=-1).clip(0, 255).astype(np.uint8)


def _mixed_sizes() -> DetectionData:
    """Two images of different sizes with fractional boxes and difficult flags."""
    images = [_gradient(40, 60), _gradient(70, 50)]
    boxes = [
        np.array([[0.0, 0.0, 60.0, 40.0], [10.3, 5.7, 20.49, 30.5]], np.float32),
        np.array([[3.2, 4.8, 44.6, 69.1]], np.float32),
    ]
    return DetectionData(
        images=images,
        boxes=boxes,
        labels=[np.array([1, 0]), np.array([1])],
        classes=("cat", "dog"),
        names=["a", "b"],
        difficult=[np.array([False, True]), np.array([False])],
    )


def test_round_trip_scenes_exact(scenes, tmp_path) -> None:
    train, test = scenes
    write_voc(train, tmp_path, "train", image_format="png")
    write_voc(test, tmp_path, "test", image_format="png")
    for split, data in (("train", train), ("test", test)):
        back = read_voc(tmp_path, split)
        assert back.classes == data.classes and back.names == data.names and not back.skipped
        for i in range(len(data)):
            np.testing.assert_array_equal(back.boxes[i], data.boxes[i])  # integer boxes: exact
            np.testing.assert_array_equal(back.labels[i], data.labels[i])
            np.testing.assert_array_equal(back.images[i], data.images[i])  # PNG is lossless
            assert not back.difficult[i].any()


def test_round_trip_jpeg_and_mixed_sizes_within_half_a_pixel(tmp_path) -> None:
    data = _mixed_sizes()
    write_voc(data, tmp_path)
    assert (tmp_path / "JPEGImages" / "a.jpg").is_file()
    back = read_voc(tmp_path, "train")
    assert back.sizes == [(40, 60), (70, 50)] and back.classes == ("cat", "dog")
    for i in range(2):
        assert np.abs(back.boxes[i] - data.boxes[i]).max() <= 0.5
        np.testing.assert_array_equal(back.labels[i], data.labels[i])
        np.testing.assert_array_equal(back.difficult[i], data.difficult[i])
        assert back.images[i].shape == data.images[i].shape
        assert np.abs(back.images[i].astype(int) - data.images[i]).mean() < 3  # JPEG q95
    xml = (tmp_path / "Annotations" / "a.xml").read_text()
    assert "<xmin>1</xmin>" in xml and "<xmax>60</xmax>" in xml  # 1-based inclusive corners
    dropped = read_voc(tmp_path, "train", keep_difficult=False)
    assert [len(b) for b in dropped.boxes] == [1, 1] and not dropped.skipped


def test_classes_order_given(tmp_path) -> None:
    write_voc(_mixed_sizes(), tmp_path)
    back = read_voc(tmp_path, "train", classes=("dog", "cat", "bird"))
    np.testing.assert_array_equal(back.labels[0], [0, 1])


def test_only_difficult_objects_are_counted(tmp_path) -> None:
    data = _mixed_sizes()
    data.difficult = [np.array([True, True]), np.array([False])]
    write_voc(data, tmp_path)
    with pytest.warns(UserWarning, match="only difficult objects: 1"):
        back = read_voc(tmp_path, "train", keep_difficult=False)
    assert back.names == ["b"] and back.skip_counts == {"only difficult objects": 1}


def _object(name: str, box: tuple[int, int, int, int]) -> str:
    return (
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{box[0]}</xmin>"
        f"<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"
    )


def _break(root: Path, case: str) -> str:
    """Corrupt image ``b`` of a valid folder; returns the expected reason."""
    xml = root / "Annotations" / "b.xml"
    head = (
        "<annotation><filename>b.jpg</filename><size><width>50</width><height>70</height>"
        "<depth>3</depth></size>"
    )
    if case == "missing image":
        (root / "JPEGImages" / "b.jpg").unlink()
    elif case == "unreadable image":
        (root / "JPEGImages" / "b.jpg").write_bytes(b"not a jpeg")
    elif case == "missing annotation":
        xml.unlink()
    elif case == "malformed annotation":
        xml.write_text(xml.read_text()[:-40])
    elif case == "malformed coordinates":
        xml.write_text(head + _object("cat", (1, 2, 3, 4)).replace(">3<", ">x<") + "</annotation>")
        return "malformed annotation"
    elif case == "size mismatch":
        xml.write_text(
            head.replace(">70<", ">71<") + _object("cat", (1, 1, 9, 9)) + "</annotation>"
        )
    elif case == "box outside image":
        xml.write_text(head + _object("cat", (1, 1, 52, 9)) + "</annotation>")
    elif case == "degenerate box":
        xml.write_text(head + _object("cat", (20, 1, 10, 9)) + "</annotation>")
    elif case == "unknown class":
        xml.write_text(
            head + _object("cat", (1, 1, 9, 9)) + _object("zebra", (2, 2, 9, 9)) + "</annotation>"
        )
    elif case == "no objects":
        xml.write_text(head + "</annotation>")
    return case


CASES = [
    "missing image",
    "unreadable image",
    "missing annotation",
    "malformed annotation",
    "malformed coordinates",
    "size mismatch",
    "box outside image",
    "degenerate box",
    "unknown class",
    "no objects",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_annotation_raises_or_is_counted(tmp_path, case) -> None:
    write_voc(_mixed_sizes(), tmp_path)
    reason = _break(tmp_path, case)
    classes = ("cat", "dog")
    with pytest.raises(ValueError, match=rf"read_voc: .*b\.(xml|jpg): {reason}"):
        read_voc(tmp_path, "train", classes=classes)
    with pytest.warns(UserWarning, match=f"skipped 1 of 2 images \\({reason}: 1\\)"):
        data = read_voc(tmp_path, "train", classes=classes, on_error="skip")
    assert data.names == ["a"] and data.skip_counts == {reason: 1}
    assert "b." in data.skipped[0].item


def test_box_within_half_a_pixel_of_the_border_is_clipped(tmp_path) -> None:
    write_voc(_mixed_sizes(), tmp_path)
    xml = tmp_path / "Annotations" / "b.xml"
    xml.write_text(xml.read_text().replace("<xmax>45</xmax>", "<xmax>50.4</xmax>"))
    back = read_voc(tmp_path, "train")
    assert back.boxes[1][0, 2] == 50.0


def test_bad_layout_and_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="no JPEGImages/ folder"):
        read_voc(tmp_path, "train")
    write_voc(_mixed_sizes(), tmp_path / "VOC2007")
    with pytest.raises(ValueError, match="did you mean .*VOC2007"):
        read_voc(tmp_path, "train")
    with pytest.raises(
        ValueError, match="split file .*val.txt does not exist; splits found: train"
    ):
        read_voc(tmp_path / "VOC2007", "val")
    with pytest.raises(ValueError, match="on_error"):
        read_voc(tmp_path / "VOC2007", "train", on_error="ignore")
    with pytest.raises(TypeError, match="write_voc: data must be a DetectionData"):
        write_voc({"images": []}, tmp_path)  # type: ignore[arg-type]
    data = _mixed_sizes()
    data.names = ["a", "a"]
    with pytest.raises(ValueError, match="write_voc: image names must be unique"):
        write_voc(data, tmp_path)
    with pytest.raises(ValueError, match="write_voc: image_format"):
        write_voc(_mixed_sizes(), tmp_path, image_format="gif")


def test_image_changed_after_reading_is_named(tmp_path) -> None:
    from PIL import Image

    write_voc(_mixed_sizes(), tmp_path)
    data = read_voc(tmp_path, "train")
    Image.fromarray(_gradient(10, 10)).save(tmp_path / "JPEGImages" / "b.jpg")
    with pytest.raises(ValueError, match=r"b\.jpg is 10x10 \(HxW\) but its annotation says 70x50"):
        data.images[1]


def test_zero_size_in_xml_means_use_the_file(tmp_path) -> None:
    write_voc(_mixed_sizes(), tmp_path)
    xml = tmp_path / "Annotations" / "b.xml"
    text = xml.read_text().replace("<width>50</width>", "<width>0</width>")
    xml.write_text(text.replace("<height>70</height>", "<height>0</height>"))
    assert read_voc(tmp_path, "train").sizes == [(40, 60), (70, 50)]
