"""The built-in digit scenes: determinism, disjoint sources, tight boxes, masks, backgrounds."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.ops import box_area, box_iou

from attnzoo.datasets import INK, DetectionData, make_digit_scenes


@pytest.fixture(scope="module")
def scenes() -> tuple[DetectionData, DetectionData]:
    return make_digit_scenes(60, 30, canvas=(96, 128), seed=3)


@pytest.fixture(scope="module")
def photo_scenes() -> tuple[DetectionData, DetectionData]:
    return make_digit_scenes(12, 6, canvas=64, scales=(2, 3), background="photo", seed=5)


def _assert_same(a: DetectionData, b: DetectionData) -> None:
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.semantic_masks, b.semantic_masks)
    for field in ("boxes", "labels", "instance_masks"):
        for x, y in zip(getattr(a, field), getattr(b, field), strict=True):
            np.testing.assert_array_equal(x, y)


def test_shapes_and_dtypes(scenes) -> None:
    train, test = scenes
    assert len(train) == 60 and len(test) == 30
    assert train.images.shape == (60, 96, 128, 3) and train.images.dtype == np.uint8
    assert train.semantic_masks.shape == (60, 96, 128) and train.semantic_masks.dtype == np.uint8
    assert train.classes == tuple("0123456789")
    assert len(set(train.names) | set(test.names)) == 90
    for boxes, labels, masks in zip(train.boxes, train.labels, train.instance_masks):
        n = len(labels)
        assert 1 <= n <= 4
        assert boxes.shape == (n, 4) and boxes.dtype == np.float32
        assert labels.dtype == np.int64 and set(labels.tolist()) <= set(range(10))
        assert masks.shape == (n, 96, 128) and masks.dtype == bool
    counts = [len(b) for b in train.boxes]
    assert min(counts) == 1 and max(counts) == 4  # the whole range occurs in 60 scenes


def test_same_seed_bit_identical_other_seed_differs(scenes) -> None:
    again = make_digit_scenes(60, 30, canvas=(96, 128), seed=3)
    _assert_same(scenes[0], again[0])
    _assert_same(scenes[1], again[1])
    other, _ = make_digit_scenes(60, 30, canvas=(96, 128), seed=4)
    assert not np.array_equal(other.images, scenes[0].images)


def test_train_and_test_sources_are_disjoint(scenes) -> None:
    from sklearn.datasets import load_digits

    train, test = scenes
    pool_train, pool_test = set(train.meta["source_pool"]), set(test.meta["source_pool"])
    assert not pool_train & pool_test
    assert len(pool_train | pool_test) == 1797
    target = load_digits().target
    for split, pool in ((train, pool_train), (test, pool_test)):
        used = np.concatenate(split.meta["sources"] + split.meta["clutter_sources"])
        assert set(used.tolist()) <= pool
        for srcs, labels in zip(split.meta["sources"], split.labels):
            np.testing.assert_array_equal(target[srcs], labels)  # labels are the digits' classes
    assert sum(len(c) for c in train.meta["clutter_sources"]) > 0


def test_boxes_are_tight_around_each_objects_ink(scenes) -> None:
    for split in scenes:
        for boxes, masks in zip(split.boxes, split.instance_masks):
            for box, mask in zip(boxes, masks):
                x0, y0, x1, y1 = (int(v) for v in box)
                np.testing.assert_array_equal(box, [x0, y0, x1, y1])  # integer pixel edges
                assert mask[y0, x0:x1].any() and mask[y1 - 1, x0:x1].any()
                assert mask[y0:y1, x0].any() and mask[y0:y1, x1 - 1].any()
                assert mask.sum() == mask[y0:y1, x0:x1].sum()  # nothing outside the box


def test_masks_consistent_with_boxes_labels_and_pixels(scenes) -> None:
    for split in scenes:
        for i in range(len(split)):
            image = split.images[i].astype(int)
            sem, masks, labels = split.semantic_masks[i], split.instance_masks[i], split.labels[i]
            union = masks.any(axis=0)
            np.testing.assert_array_equal(sem > 0, union)
            top = np.zeros_like(sem)
            for mask, label in zip(masks, labels):  # later objects are painted on top
                top[mask] = 1 + label
            np.testing.assert_array_equal(sem, top)
            assert (image[union].max(axis=-1) > 0).all()  # every mask pixel is painted ink
            # clutter never touches an object's box: inside boxes, non-object pixels are black
            for x0, y0, x1, y1 in split.boxes[i].astype(int):
                inside = np.zeros_like(union)
                inside[y0:y1, x0:x1] = True
                assert (image[inside & ~union] == 0).all()
    # clutter (unannotated ink) exists outside the boxes
    assert any(
        (split.images[i][~split.instance_masks[i].any(0)] > 0).any()
        for split in scenes
        for i in range(len(split))
    )


def test_objects_limited_overlap_and_several_scales() -> None:
    train, _ = make_digit_scenes(
        40, 5, canvas=96, objects=(3, 4), max_overlap_iou=0.1, max_covered=0.3, seed=1
    )
    heights = set()
    for boxes in train.boxes:
        t = torch.from_numpy(boxes)
        iou = box_iou(t, t).fill_diagonal_(0)
        assert float(iou.max()) <= 0.1 + 1e-6
        lt = torch.max(t[:, None, :2], t[None, :, :2])
        rb = torch.min(t[:, None, 2:], t[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1).fill_diagonal_(0)
        smaller = torch.min(box_area(t)[:, None], box_area(t)[None])
        assert float((inter / smaller).max()) <= 0.3 + 1e-6  # no digit inside another's box
        heights |= set((boxes[:, 3] - boxes[:, 1]).tolist())
    assert max(heights) <= 40 and len(heights) >= 3  # 2x..5x upscaled 8x8 digits


def test_no_overlap_when_max_overlap_iou_is_zero() -> None:
    train, _ = make_digit_scenes(20, 5, canvas=64, objects=4, scales=2, max_overlap_iou=0.0)
    for boxes in train.boxes:
        iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(boxes)).fill_diagonal_(0)
        assert float(iou.max()) == 0.0


def test_photo_background(photo_scenes) -> None:
    train, test = photo_scenes
    assert train.images.shape == (12, 64, 64, 3)
    background = ~train.instance_masks[0].any(axis=0)
    assert (train.images[0][background].max(axis=-1) > 0).mean() > 0.9  # textured, not black
    assert train.images[0].std() > 10
    assert not np.array_equal(train.images[0], train.images[1])
    again, _ = make_digit_scenes(12, 6, canvas=64, scales=(2, 3), background="photo", seed=5)
    np.testing.assert_array_equal(again.images, train.images)


def test_white_ink_without_colour() -> None:
    train, _ = make_digit_scenes(5, 5, canvas=64, scales=2, clutter=0, colour=False)
    for image, masks in zip(train.images, train.instance_masks):
        ink = image[masks.any(axis=0)]
        assert (ink[:, 0] == ink[:, 1]).all() and (ink[:, 1] == ink[:, 2]).all()
        assert ink.min() >= int(INK * 255) and (image[~masks.any(axis=0)] == 0).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"canvas": 100}, "canvas"),
        ({"canvas": (64, 100)}, "canvas"),
        ({"objects": (0, 2)}, "objects"),
        ({"objects": (3, 2)}, "objects"),
        ({"canvas": 64, "scales": (2, 9)}, "scales"),
        ({"clutter": -1}, "clutter"),
        ({"background": "white"}, "background"),
        ({"max_overlap_iou": 1.0}, "max_overlap_iou"),
        ({"max_covered": 1.5}, "max_covered"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"n_train": 0}, "n_train"),
        ({"colour": "yes"}, "colour"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=f"make_digit_scenes: {match}"):
        make_digit_scenes(**{"n_train": 2, "n_test": 2, **kwargs})


def test_import_stays_light() -> None:
    code = (
        "import sys, attnzoo.datasets; bad = [m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'matplotlib', 'sklearn', 'PIL') or m.startswith('attnzoo.bench')]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
