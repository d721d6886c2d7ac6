"""Mask folders (VOC palette PNGs, index PNGs, Cityscapes labelTrainIds), scenes, the Dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from attnzoo.datasets import (
    SegmentationData,
    SegmentationDataset,
    make_digit_scenes,
    read_mask_folder,
    scenes_segmentation,
)
from attnzoo.datasets.masks import CITYSCAPES_CLASSES, VOC_SEG_CLASSES, voc_colormap


def _image(path: Path, h: int = 6, w: int = 8, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _labels(h: int = 6, w: int = 8, top: int = 3, seed: int = 0) -> np.ndarray:
    lab = np.random.default_rng(seed).integers(0, top, (h, w)).astype(np.uint8)
    lab[0, 0] = 255
    return lab


def _palette_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(labels, mode="P")
    im.putpalette(voc_colormap().reshape(-1).tolist())
    im.save(path)


def test_voc_colormap_known_colours():
    cmap = voc_colormap()
    assert cmap[0].tolist() == [0, 0, 0] and cmap[1].tolist() == [128, 0, 0]
    assert cmap[15].tolist() == [192, 128, 128] and cmap[255].tolist() == [224, 224, 192]


def test_palette_png_and_split_file(tmp_path):
    labels = {n: _labels(seed=i, top=21) for i, n in enumerate(["2007_000032", "2007_000039"])}
    for i, (n, lab) in enumerate(labels.items()):
        _image(tmp_path / "JPEGImages" / f"{n}.jpg", seed=i)
        _palette_png(tmp_path / "SegmentationClass" / f"{n}.png", lab)
    _image(tmp_path / "JPEGImages" / "2007_000040.jpg")  # no mask: not in the split
    (tmp_path / "train.txt").write_text("2007_000039\n2007_000032\n")
    data = read_mask_folder(
        tmp_path / "JPEGImages", tmp_path / "SegmentationClass", palette="voc",
        names=tmp_path / "train.txt",
    )  # fmt: skip
    assert data.names == ["2007_000039", "2007_000032"]
    assert data.classes == VOC_SEG_CLASSES and data.num_classes == 21
    np.testing.assert_array_equal(data.masks[0], labels["2007_000039"])
    assert data.images[1].shape == (6, 8, 3) and data.masks[0][0, 0] == 255


def test_rgb_mask_through_the_voc_palette(tmp_path):
    lab = _labels(top=21)
    _image(tmp_path / "img" / "a.png")
    (tmp_path / "mask").mkdir()
    Image.fromarray(voc_colormap()[lab]).save(tmp_path / "mask" / "a.png")  # RGB colours
    data = read_mask_folder(tmp_path / "img", tmp_path / "mask", palette="voc")
    np.testing.assert_array_equal(data.masks[0], lab)
    with pytest.raises(ValueError, match="colour masks need palette"):
        read_mask_folder(tmp_path / "img", tmp_path / "mask")
    rgb = voc_colormap()[lab]
    rgb[2, 3] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "mask" / "a.png")
    with pytest.raises(ValueError, match=r"a.png has the colour \(1, 2, 3\)"):
        read_mask_folder(tmp_path / "img", tmp_path / "mask", palette="voc")


def test_index_png_infers_classes(tmp_path):
    _image(tmp_path / "img" / "x.png")
    (tmp_path / "mask").mkdir()
    lab = _labels(top=4)
    Image.fromarray(lab, mode="L").save(tmp_path / "mask" / "x.png")
    data = read_mask_folder(tmp_path / "img", tmp_path / "mask")
    assert data.classes == ("0", "1", "2", "3")  # 255 is ignore, not a class
    np.testing.assert_array_equal(data.masks[0], lab)


def test_cityscapes_label_train_ids(tmp_path):
    img_dir, gt_dir = tmp_path / "leftImg8bit" / "val", tmp_path / "gtFine" / "val"
    stem = "frankfurt_000000_000294"
    _image(img_dir / "frankfurt" / f"{stem}_leftImg8bit.png")
    lab = _labels(top=19)
    (gt_dir / "frankfurt").mkdir(parents=True)
    Image.fromarray(lab, mode="L").save(gt_dir / "frankfurt" / f"{stem}_gtFine_labelTrainIds.png")
    Image.fromarray(lab + 7, mode="L").save(gt_dir / "frankfurt" / f"{stem}_gtFine_labelIds.png")
    _image(gt_dir / "frankfurt" / f"{stem}_gtFine_color.png")
    data = read_mask_folder(img_dir, gt_dir)
    assert data.names == [f"frankfurt/{stem}"] and data.classes == CITYSCAPES_CLASSES
    np.testing.assert_array_equal(data.masks[0], lab)


def test_errors_missing_mask_size_mismatch_out_of_range(tmp_path):
    _image(tmp_path / "img" / "a.png")
    _image(tmp_path / "img" / "b.png")
    _palette_png(tmp_path / "mask" / "a.png", _labels())
    with pytest.raises(ValueError, match=r"missing mask for .*b.png"):
        read_mask_folder(tmp_path / "img", tmp_path / "mask")
    _palette_png(tmp_path / "mask" / "b.png", _labels(h=5))
    with pytest.raises(ValueError, match=r"size mismatch: .*b.png is 6x8 .* is 5x8"):
        read_mask_folder(tmp_path / "img", tmp_path / "mask")
    _palette_png(tmp_path / "mask" / "b.png", _labels(top=30))
    with pytest.raises(ValueError, match=r"b.png holds the label 2\d, outside \[0, 21\)"):
        read_mask_folder(tmp_path / "img", tmp_path / "mask", palette="voc")
    with pytest.raises(ValueError, match="missing image"):
        read_mask_folder(tmp_path / "img", tmp_path / "mask", names=["c"])
    with pytest.raises(ValueError, match="not a folder"):
        read_mask_folder(tmp_path / "nope", tmp_path / "mask")


def test_scenes_segmentation_masks():
    train, test = scenes_segmentation(3, 2, canvas=64, scales=(2, 3), seed=1)
    ref, _ = make_digit_scenes(3, 2, canvas=64, scales=(2, 3), seed=1)
    assert train.num_classes == 11 and train.classes[0] == "background" and len(test) == 2
    np.testing.assert_array_equal(train.masks, ref.semantic_masks)
    np.testing.assert_array_equal(train.images, ref.images)
    assert int(np.asarray(train.masks).max()) <= 10


def _paired_data(n: int = 3, h: int = 8, w: int = 12) -> SegmentationData:
    """Images whose red channel encodes the mask, so joint transforms can be checked."""
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 4, (n, h, w)).astype(np.uint8)
    images = np.zeros((n, h, w, 3), np.uint8)
    images[..., 0] = masks * 60
    images[..., 1] = np.arange(w, dtype=np.uint8)[None, None] * 20  # shows flips
    return SegmentationData(images, masks, ("a", "b", "c", "d"), [f"s{i}" for i in range(n)])


def _mask_from_image(image: torch.Tensor) -> torch.Tensor:
    return (image[0] * 255 / 60).round().long()


def test_dataset_eval_items_and_normalisation():
    data = _paired_data()
    ds = SegmentationDataset(data, train=False)
    image, mask = ds[1]
    assert image.dtype == torch.float32 and image.shape == (3, 8, 12)
    assert mask.dtype == torch.int64 and torch.equal(mask, torch.from_numpy(data.masks[1]).long())
    raw = SegmentationDataset(data, train=False, mean=(0, 0, 0), std=(1, 1, 1))[1][0]
    expected = (raw - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225]
    )[:, None, None]
    torch.testing.assert_close(image, expected)
    resized = SegmentationDataset(
        data, train=False, image_size=(16, 24), mean=(0,) * 3, std=(1,) * 3
    )
    img, m = resized[0]
    assert img.shape == (3, 16, 24) and m.shape == (16, 24)
    torch.testing.assert_close(m, torch.from_numpy(data.masks[0]).long().repeat_interleave(2, 0)
                               .repeat_interleave(2, 1))  # fmt: skip


def test_training_transforms_are_joint_and_deterministic():
    data = _paired_data()
    ds = SegmentationDataset(
        data, train=True, crop_size=(6, 10), scale=(1.0, 1.0), hflip=0.5, mean=(0,) * 3,
        std=(1,) * 3, seed=3,
    )  # fmt: skip
    flips = 0
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, mask = ds[i]
            assert image.shape == (3, 6, 10) and mask.shape == (6, 10)
            assert torch.equal(_mask_from_image(image), mask)  # same crop and flip on both
            flips += int(image[1, 0, 0] > image[1, 0, -1])
            assert torch.equal(ds[i][0], image)  # same (seed, epoch, index) -> same draw
    assert 0 < flips < 18
    big = SegmentationDataset(data, train=True, crop_size=10, hflip=0.0)  # pads: ignore_index
    _, mask = big[0]
    assert mask.shape == (10, 10) and (mask[8:] == 255).all()


def test_dataset_bad_arguments():
    with pytest.raises(TypeError, match="SegmentationData"):
        SegmentationDataset(np.zeros(3), train=True)
    with pytest.raises(ValueError, match="hflip"):
        SegmentationDataset(_paired_data(), train=True, hflip=2)
    with pytest.raises(ValueError, match="crop_size"):
        SegmentationDataset(_paired_data(), train=True, crop_size=(0, 4))
