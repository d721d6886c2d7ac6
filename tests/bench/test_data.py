"""The bench's data: cluttered digits generator, image folders, CIFAR files, the sampler."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from attnzoo.bench.data import (
    SeededSampler,
    check_data_spec,
    load_data,
    load_image_folder,
    make_cluttered_digits,
    stratified_counts,
    stratified_indices,
)


@pytest.fixture(scope="module")
def digits():
    return make_cluttered_digits(n_train=300, n_test=120, seed=3)


def test_digits_shapes_ranges_and_determinism(digits) -> None:
    train, test = digits
    assert train.images.shape == (300, 32, 32) and test.images.shape == (120, 32, 32)
    assert train.images.dtype == np.float32
    assert 0.0 <= train.images.min() and train.images.max() <= 1.0
    assert set(np.unique(train.labels)) <= set(range(10))
    again_train, again_test = make_cluttered_digits(n_train=300, n_test=120, seed=3)
    np.testing.assert_array_equal(train.images, again_train.images)
    np.testing.assert_array_equal(test.boxes, again_test.boxes)
    other, _ = make_cluttered_digits(n_train=300, n_test=120, seed=4)
    assert not np.array_equal(train.images, other.images)


def test_digits_split_by_source_digit(digits) -> None:
    from sklearn.datasets import load_digits

    train, test = digits
    assert not set(train.sources.tolist()) & set(test.sources.tolist())
    # the label is the class of the source digit
    target = load_digits().target
    np.testing.assert_array_equal(train.labels, target[train.sources])
    np.testing.assert_array_equal(test.labels, target[test.sources])


def test_digits_split_is_disjoint_over_all_sources() -> None:
    # with enough images every source of each split is used: the splits partition the 1797 digits
    train, test = make_cluttered_digits(n_train=1300, n_test=600, seed=0, clutter=0)
    used = set(train.sources.tolist()) | set(test.sources.tolist())
    assert len(used) == 1797
    assert not set(train.sources.tolist()) & set(test.sources.tolist())


def test_box_holds_the_digit_and_the_digit_is_in_the_image(digits) -> None:
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    src = torch.from_numpy(load_digits().images.astype(np.float32) / 16).unsqueeze(1)
    up = F.interpolate(src, scale_factor=2, mode="bilinear", align_corners=False)[:, 0]
    up = up.clamp(0, 1).numpy()
    train, _ = digits
    for i in range(40):
        x0, y0, x1, y1 = (int(v) for v in train.boxes[i])
        assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
        digit = up[train.sources[i]]
        rows = np.flatnonzero(digit.max(1) > 0.05)
        cols = np.flatnonzero(digit.max(0) > 0.05)
        tight = digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert tight.shape == (y1 - y0, x1 - x0)
        # max-composition: the image is at least the digit everywhere inside the box
        assert (train.images[i, y0:y1, x0:x1] >= tight - 1e-6).all()


def test_clutter_adds_ink_outside_the_box() -> None:
    clean, _ = make_cluttered_digits(n_train=50, n_test=10, clutter=0, seed=1)
    busy, _ = make_cluttered_digits(n_train=50, n_test=10, clutter=6, seed=1)

    def outside_ink(split):
        total = 0.0
        for img, (x0, y0, x1, y1) in zip(split.images, split.boxes):
            mask = np.ones_like(img, dtype=bool)
            mask[y0:y1, x0:x1] = False
            total += int((img[mask] > 0.05).sum())  # the box is the digit's ink above 0.05
        return total

    assert outside_ink(clean) == 0
    assert outside_ink(busy) > 50 * 20


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_train": 0}, "n_train"),
        ({"canvas": 10}, "canvas"),
        ({"fragment": 17}, "fragment"),
        ({"test_fraction": 1.0}, "test_fraction"),
    ],
)
def test_digits_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        make_cluttered_digits(**kwargs)


def test_load_data_digits_is_normalised_three_channel() -> None:
    data = load_data("digits", n_train=64, n_test=33)
    assert data.train.images.shape == (64, 3, 32, 32) and len(data.test) == 33
    assert data.num_classes == 10 and data.test.boxes.shape == (33, 4)
    back = data.denormalise(data.test.images)
    assert back.min() >= 0 and back.max() <= 1


# ---------------------------------------------------------------------------------------------
def _png(path: Path, color: tuple[int, int, int], size=(10, 12)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_image_folder_loads_and_splits(tmp_path: Path) -> None:
    for k in range(6):
        _png(tmp_path / "cat" / f"{k}.png", (200, 10, 10))
        _png(tmp_path / "dog" / f"{k}.jpg", (10, 10, 200))
    data = load_image_folder(tmp_path, image_size=16, test_fraction=0.5)
    assert data.classes == ["cat", "dog"]
    assert data.train.images.shape == (6, 3, 16, 16) and len(data.test) == 6
    assert sorted(data.test.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    # red images stay red after normalisation
    back = data.denormalise(data.train.images[data.train.labels == 0])
    assert (back[:, 0] > back[:, 2]).all()


def test_image_folder_with_train_test_subfolders(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("val", 2)):
        for c in ("a", "b"):
            for k in range(n):
                _png(tmp_path / split / c / f"{k}.png", (k * 40, 0, 0))
    data = load_image_folder(tmp_path, image_size=8)
    assert len(data.train) == 6 and len(data.test) == 4


def test_missing_empty_and_non_image_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        check_data_spec(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no class sub-folders"):
        check_data_spec(str(tmp_path))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("hello")
    _png(tmp_path / "a" / "x.png", (1, 2, 3))
    with pytest.raises(ValueError, match=r"contain no images.*[/\\]b.*notes\.txt"):
        check_data_spec(str(tmp_path))


def test_unreadable_images_are_listed(tmp_path: Path) -> None:
    for c in ("a", "b"):
        for k in range(3):
            _png(tmp_path / c / f"{k}.png", (9, 9, 9))
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "b" / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(
        ValueError, match=r"2 image file\(s\) cannot be read.*broken\.png.*cut\.jpg"
    ):
        load_data(str(tmp_path))


def test_cifar_missing_files_explain_what_to_place_where(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"never downloads.*cifar-100-python.tar.gz.*"
        r"cifar-100-python",
    ):
        check_data_spec(f"cifar100:{tmp_path}")
    with pytest.raises(ValueError, match="needs the folder"):
        check_data_spec("cifar10")


def test_cifar10_from_local_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {
            "data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, 4).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    data = load_data(f"cifar10:{tmp_path}")
    assert data.train.images.shape == (20, 3, 32, 32) and len(data.test) == 4
    assert data.classes[3] == "c3"


# ---------------------------------------------------------------------------------------------
def test_sampler_order_depends_only_on_seed_and_epoch() -> None:
    a, b = SeededSampler(50, seed=1), SeededSampler(50, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(SeededSampler(50, seed=2)) != list(SeededSampler(50, seed=1))


def test_sampler_shards_cover_everything() -> None:
    train = [SeededSampler(11, seed=0, rank=r, world_size=2) for r in range(2)]
    idx = list(train[0]) + list(train[1])
    assert len(train[0]) == len(train[1]) == 6 and set(idx) == set(range(11))
    test = [SeededSampler(11, shuffle=False, rank=r, world_size=2) for r in range(2)]
    got = list(test[0]) + list(test[1])
    assert sorted(got) == list(range(11))  # every test image exactly once, no padding


# ---------------------------------------------------------------------------------------------
# stratified subsets (--n-train / --n-test on folders and CIFAR)
SHAPES = ("circle", "square", "triangle")


def _class_sorted_folder(root: Path, n_train: int = 12, n_test: int = 6) -> Path:
    """train/ and test/ with 3 classes, PNG and JPEG; each class a distinct colour."""
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(SHAPES):
            for k in range(n):
                colour = tuple(200 if i == c else 20 + k for i in range(3))
                ext = "png" if k % 2 else "jpg"
                _png(root / split / name / f"{k:02d}.{ext}", colour, size=(8, 8))
    return root


def test_n_train_on_a_class_sorted_folder_keeps_every_class(tmp_path: Path) -> None:
    root = _class_sorted_folder(tmp_path)
    data = load_data(str(root), image_size=8, n_train=12, n_test=9)
    assert len(data.train) == 12 and len(data.test) == 9
    assert data.class_counts == {
        "train": dict.fromkeys(SHAPES, 4),
        "test": dict.fromkeys(SHAPES, 3),
    }
    # the labels match the images (class c is the image whose channel c is bright)
    back = data.denormalise(data.train.images)
    assert torch.equal(back.mean(dim=(2, 3)).argmax(1), data.train.labels)
    assert "stratified" in data.description and "12 of 36 train" in data.description


def test_stratified_subset_is_proportional_and_seeded(tmp_path: Path) -> None:
    root = tmp_path / "uneven"
    for name, n in (("a", 10), ("b", 20), ("c", 30)):
        for k in range(n):
            _png(root / name / f"{k}.png", (k * 8, 0, 0), size=(4, 4))
    # no train/test sub-folders: the 20 % test split is drawn first (2 / 4 / 6 images)
    data = load_data(str(root), image_size=4, n_train=24, seed=5)
    assert data.class_counts["train"] == {"a": 4, "b": 8, "c": 12}
    assert data.class_counts["test"] == {"a": 2, "b": 4, "c": 6}
    again = load_data(str(root), image_size=4, n_train=24, seed=5)
    other = load_data(str(root), image_size=4, n_train=24, seed=6)
    assert torch.equal(data.train.images, again.train.images)
    assert not torch.equal(data.train.images, other.train.images)
    # n larger than the split: everything, and the description says nothing was cut
    full = load_data(str(root), image_size=4, n_train=1000)
    assert len(full.train) == 48 and "stratified subsets" not in full.description


def test_stratified_counts_largest_remainder() -> None:
    assert stratified_counts([40, 40, 40], 40) == [14, 13, 13]
    assert stratified_counts([10, 20, 30], 7) == [1, 2, 4]
    assert stratified_counts([5, 5], 100) == [5, 5]
    for n in range(0, 61):
        counts = stratified_counts([10, 20, 30], n)
        assert sum(counts) == n and all(0 <= k <= s for k, s in zip(counts, [10, 20, 30]))


def test_a_class_left_with_no_image_is_named(tmp_path: Path) -> None:
    root = _class_sorted_folder(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"--n-train=2 .*leaves 'triangle' with no image; use "
        r"--n-train >= 3",
    ):
        load_data(str(root), image_size=8, n_train=2)
    with pytest.raises(ValueError, match=r"--n-test=1 .*'square', 'triangle'"):
        load_data(str(root), image_size=8, n_test=1)
    labels = [0] * 98 + [1] * 2
    with pytest.raises(ValueError, match=r"leaves 'rare' .*use n >= 26"):
        stratified_indices(labels, 10, seed=0, classes=["common", "rare"])
    with pytest.raises(ValueError, match="'rare'"):  # 25 x 2 % = 0.5: the tie goes to 'common'
        stratified_indices(labels, 25, seed=0, classes=["common", "rare"])
    kept = stratified_indices(labels, 26, seed=0, classes=["common", "rare"])
    assert len(kept) == 26 and (np.asarray(labels)[kept] == 1).sum() == 1


def test_cli_rejects_an_empty_class_before_training(tmp_path: Path, capsys) -> None:
    from attnzoo.cli import main

    root = _class_sorted_folder(tmp_path / "data")
    out = tmp_path / "out"
    code = main(
        [
            "bench",
            "--data",
            str(root),
            "--attention",
            "none",
            "--n-train",
            "2",
            "--epochs",
            "1",
            "--seeds",
            "1",
            "--out",
            str(out),
            "--no-progress",
            "--no-localise",
        ]
    )
    assert code == 2
    assert "'triangle' with no image" in capsys.readouterr().err
    assert not (out / "runs").exists()


def test_cifar_subsets_are_stratified(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = np.sort(np.arange(20) % 10)  # class-sorted files
        entry = {
            "data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
            "labels": labels.tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    data = load_data(f"cifar10:{tmp_path}", n_train=30, n_test=10)
    assert list(data.class_counts["train"].values()) == [3] * 10
    assert list(data.class_counts["test"].values()) == [1] * 10


def test_a_class_too_small_to_split_is_named(tmp_path: Path) -> None:
    for name, n in (("many", 6), ("single", 1)):
        for k in range(n):
            _png(tmp_path / name / f"{k}.png", (k * 30, 0, 0), size=(4, 4))
    with pytest.raises(
        ValueError,
        match=r"too few images of 'single' .*test split would have "
        r"none",
    ):
        load_data(str(tmp_path), image_size=4)
