"""DetectionDataset and collate_detection: shapes, resizing, seeded flips, masks, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from attnzoo.datasets import (
    DetectionData,
    DetectionDataset,
    collate_detection,
    make_digit_scenes,
)


@pytest.fixture(scope="module")
def scenes() -> DetectionData:
    return make_digit_scenes(8, 2, canvas=64, scales=(2, 3), seed=11)[0]


def test_item_at_native_size(scenes) -> None:
    image, target = DetectionDataset(scenes)[3]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    torch.testing.assert_close(image, torch.from_numpy(scenes.images[3]).permute(2, 0, 1) / 255)
    torch.testing.assert_close(target["boxes"], torch.from_numpy(scenes.boxes[3]))
    assert target["labels"].dtype == torch.int64
    assert torch.equal(target["labels"], torch.from_numpy(scenes.labels[3]))
    assert set(target) == {"boxes", "labels"}  # the scenes have no difficult flags


def test_resize_scales_boxes_and_masks(scenes) -> None:
    ds = DetectionDataset(scenes, (32, 128), masks=True)
    image, target = ds[0]
    assert image.shape == (3, 32, 128)
    expected = torch.from_numpy(scenes.boxes[0]) * torch.tensor([2.0, 0.5, 2.0, 0.5])
    torch.testing.assert_close(target["boxes"], expected)
    n = len(scenes.labels[0])
    assert target["masks"].shape == (n, 32, 128) and target["masks"].dtype == torch.uint8
    assert target["semantic"].shape == (32, 128) and target["semantic"].dtype == torch.int64
    assert set(target["semantic"].unique().tolist()) <= {0, *(1 + scenes.labels[0]).tolist()}
    # nearest resizing of a 2x wider, 2x lower image: every other row, every column twice
    big = torch.from_numpy(scenes.semantic_masks[0]).long()
    assert torch.equal(target["semantic"], big[1::2].repeat_interleave(2, dim=1))


def test_flip_mirrors_image_boxes_and_masks(scenes) -> None:
    plain = DetectionDataset(scenes, masks=True)
    flipped = DetectionDataset(scenes, hflip=1.0, masks=True)
    for i in range(3):
        (x, t), (xf, tf) = plain[i], flipped[i]
        assert torch.equal(xf, x.flip(-1))
        assert torch.equal(tf["semantic"], t["semantic"].flip(-1))
        assert torch.equal(tf["masks"], t["masks"].flip(-1))
        b = t["boxes"]
        torch.testing.assert_close(
            tf["boxes"], torch.stack([64 - b[:, 2], b[:, 1], 64 - b[:, 0], b[:, 3]], dim=1)
        )
        # the flipped boxes are still tight around the flipped masks
        for box, mask in zip(tf["boxes"].int().tolist(), tf["masks"]):
            x0, y0, x1, y1 = box
            assert mask.sum() == mask[y0:y1, x0:x1].sum() and mask[:, x0].any()


def test_flips_are_seeded_per_epoch_and_item(scenes) -> None:
    def pattern(seed: int, epoch: int) -> list[bool]:
        ds = DetectionDataset(scenes, hflip=0.5, seed=seed)
        ds.set_epoch(epoch)
        plain = DetectionDataset(scenes)
        return [not torch.equal(ds[i][0], plain[i][0]) for i in range(len(scenes))]

    first = pattern(0, 0)
    assert first == pattern(0, 0)  # the same whatever the history
    assert 0 < sum(first) < len(first)
    others = [pattern(0, 1), pattern(0, 2), pattern(1, 0)]
    assert any(p != first for p in others)


def test_collate_and_dataloader(scenes) -> None:
    loader = DataLoader(DetectionDataset(scenes, 96), batch_size=4, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert images.shape == (4, 3, 96, 96) and len(targets) == 4
    assert all(t["boxes"].shape == (len(t["labels"]), 4) for t in targets)
    with pytest.raises(ValueError, match="collate_detection: images of different shapes"):
        collate_detection([(torch.zeros(3, 32, 32), {}), (torch.zeros(3, 64, 32), {})])
    with pytest.raises(ValueError, match="collate_detection: empty batch"):
        collate_detection([])


def test_mixed_sizes_need_a_size() -> None:
    data = DetectionData(
        images=[np.zeros((40, 60, 3), np.uint8), np.zeros((64, 32, 3), np.uint8)],
        boxes=[np.array([[1, 2, 30, 20]], np.float32), np.array([[0, 0, 32, 64]], np.float32)],
        labels=[np.array([0]), np.array([0])],
        classes=("a",),
        names=["x", "y"],
        difficult=[np.array([False]), np.array([True])],
    )
    with pytest.raises(ValueError, match="DetectionDataset: the images differ in size"):
        DetectionDataset(data)
    ds = DetectionDataset(data, 64)
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and target["difficult"].tolist() == [False]
    torch.testing.assert_close(target["boxes"], torch.tensor([[64 / 60, 3.2, 32.0, 32.0]]))
    with pytest.raises(ValueError, match="masks=True needs data with instance_masks"):
        DetectionDataset(data, 64, masks=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 100}, "size must be a positive multiple of 32"),
        ({"size": (64, 0)}, "size must be"),
        ({"size": True}, "size must be"),
        ({"hflip": 1.5}, "hflip must be a probability"),
    ],
)
def test_bad_arguments(scenes, kwargs, match) -> None:
    with pytest.raises(ValueError, match=f"DetectionDataset: {match}"):
        DetectionDataset(scenes, **kwargs)
    with pytest.raises(TypeError, match="DetectionDataset: data must be a DetectionData"):
        DetectionDataset([scenes.images[0]])  # type: ignore[arg-type]


def test_subset_keeps_per_image_fields_aligned(scenes) -> None:
    part = scenes.subset([5, 1])
    assert part.names == [scenes.names[5], scenes.names[1]]
    np.testing.assert_array_equal(part.images[1], scenes.images[1])
    np.testing.assert_array_equal(part.semantic_masks[0], scenes.semantic_masks[5])
    np.testing.assert_array_equal(part.instance_masks[0], scenes.instance_masks[5])
    np.testing.assert_array_equal(part.meta["sources"][0], scenes.meta["sources"][5])
    np.testing.assert_array_equal(part.meta["source_pool"], scenes.meta["source_pool"])


def test_detection_data_checks_lengths(scenes) -> None:
    with pytest.raises(ValueError, match=r"DetectionData: 8 images but \{'labels': 7\}"):
        DetectionData(
            images=scenes.images,
            boxes=scenes.boxes,
            labels=scenes.labels[:7],
            classes=scenes.classes,
            names=scenes.names,
        )
