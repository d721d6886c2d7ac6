"""Data for ``attnzoo bench``: the built-in *cluttered digits*, image folders and local CIFAR.

Every loader returns a :class:`BenchData`: a train and a test :class:`TensorImageSet` held in
memory as normalised ``float32`` tensors of shape ``(N, 3, S, S)``, the class names, and (for the
built-in data) each image's digit bounding box.

Cluttered digits (the default, nothing is downloaded)
-----------------------------------------------------
Built from scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1797 real
8×8 images, grey levels 0–16, from the UCI "Optical Recognition of Handwritten Digits" set):

1. The *source* digits are split per class into train and test sources (``test_fraction`` of
   each class goes to test), so no test digit, not even as clutter, is ever seen in training.
2. Each source image is scaled to ``[0, 1]`` and upscaled ``scale``× (bilinear) to 16×16.
3. An image is a ``canvas``×``canvas`` black canvas with ``clutter`` fragments: ``fragment``×
   ``fragment`` crops (with enough ink) cut from *other* source digits of the same split, put at
   random places that avoid the target digit's square where possible. The target digit is then
   put at a uniformly random position. Pixels combine by maximum (strokes overlap, as ink does).
4. The label is the digit's class; the bounding box is the tight box ``(x0, y0, x1, y1)``
   (exclusive ends, pixels) of the target digit's ink (value > 0.05) on the canvas.

Sources are used in turn (a shuffled cycle), so every source appears about equally often.
Everything comes from ``numpy.random.default_rng(seed)``: the same arguments give bit-identical
tensors on every machine. The data seed is independent of the training seeds, so all runs of a
bench see the same images.

Image folders and CIFAR
-----------------------
``--data PATH``: a folder with one sub-folder per class (ImageFolder layout). If it has ``train``
and ``test`` (or ``val``) sub-folders, those are used; otherwise a stratified
``test_fraction`` split is drawn with ``seed``. Images are read with Pillow, converted to RGB and
resized to ``image_size``; the folder is checked before training (missing, empty, non-image or
unreadable files are named in the error).

``n_train``/``n_test`` on a folder or CIFAR keep *stratified* subsets: each class keeps the same
share of its images (largest-remainder rounding), drawn at random from ``seed``; a class that
would keep no image is an error naming it. :attr:`BenchData.class_counts` holds the images per
class actually used.

``--data cifar10:/path`` / ``cifar100:/path``: the official "python version" archives extracted
under ``/path`` (``cifar-10-batches-py/`` or ``cifar-100-python/``). attnzoo never downloads.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from attnzoo.datasets.digits import ink_crop as _ink_crop
from attnzoo.datasets.digits import split_sources as _split_sources
from attnzoo.datasets.digits import upscaled_digits as _upscaled_digits

__all__ = [
    "IMAGE_EXTENSIONS",
    "BenchData",
    "ClutteredDigits",
    "SeededSampler",
    "TensorImageSet",
    "load_cifar",
    "load_data",
    "load_image_folder",
    "make_cluttered_digits",
    "stratified_counts",
    "stratified_indices",
]

IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)


# ---------------------------------------------------------------------------------------------
# containers
class TensorImageSet(Dataset):
    """Images, labels (and optionally boxes) held as tensors; ``ds[i] -> (image, label)``.

    Args:
        images: ``(N, C, H, W)`` float tensor, already normalised.
        labels: ``(N,)`` int64 tensor.
        boxes: optional ``(N, 4)`` int64 tensor ``(x0, y0, x1, y1)``, exclusive ends.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor | None = None
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"TensorImageSet: {images.shape[0]} images but {labels.shape[0]} labels"
            )
        self.images = images
        self.labels = labels
        self.boxes = boxes

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def select(self, indices: Sequence[int] | np.ndarray) -> TensorImageSet:
        """The items at ``indices``, in that order."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        boxes = None if self.boxes is None else self.boxes[idx]
        return TensorImageSet(self.images[idx], self.labels[idx], boxes)


@dataclass
class BenchData:
    """A train/test pair with the metadata the bench and its report need."""

    name: str
    train: TensorImageSet
    test: TensorImageSet
    classes: list[str]
    description: str
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class actually used: ``{"train": {class: n}, "test": {class: n}}``."""

        def count(split: TensorImageSet) -> dict[str, int]:
            n = torch.bincount(split.labels, minlength=len(self.classes)).tolist()
            return dict(zip(self.classes, n))

        return {"train": count(self.train), "test": count(self.test)}

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    @property
    def n_train(self) -> int:
        return len(self.train)

    def describe(self) -> dict[str, Any]:
        """Sizes and images per class: part of a bench's fingerprint and configuration."""
        return {
            "n_train": len(self.train),
            "n_test": len(self.test),
            "class_counts": self.class_counts,
        }

    def denormalise(self, images: torch.Tensor) -> torch.Tensor:
        """Back to ``[0, 1]`` for display."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)


class SeededSampler(Sampler[int]):
    """Index order that depends only on ``(seed, epoch)``, sharded over ``world_size`` ranks.

    Training (``shuffle=True``): a permutation drawn from ``torch.Generator`` seeded with
    ``seed * 1_000_003 + epoch``, padded by wrapping to a multiple of ``world_size`` and then
    strided (``rank::world_size``), like ``DistributedSampler``. Evaluation (``shuffle=False``):
    ``rank::world_size`` of ``0..n-1`` without padding, so that the ranks together see every test
    image exactly once (the metric is then summed over ranks). Being a pure function of the epoch,
    the order is the same after a resume and the same for every attention at a given seed.
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._rank, self._world_size = rank, world_size
        self.epoch = 0

    @property
    def rank(self) -> int:
        """Given rank, else ``torch.distributed``'s when initialised (read lazily), else 0."""
        if self._rank is not None:
            return self._rank
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        if self._world_size is not None:
            return self._world_size
        dist = torch.distributed
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        rank, world = self.rank, self.world_size
        if not self.shuffle:
            return list(range(rank, self.n, world))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        total = -(-self.n // world) * world
        order += order[: total - self.n]
        return order[rank:total:world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        if not self.shuffle:
            return len(range(self.rank, self.n, self.world_size))
        return -(-self.n // self.world_size)


def seeded_loaders(
    train: Dataset,
    test: Dataset,
    *,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    collate_fn: Any = None,
    train_sampler: SeededSampler | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Every task's loaders: train (order a pure function of ``(seed, epoch)``, sharded over DDP
    ranks) and test (every image once over the ranks).

    ``rank``/``world_size`` default to ``torch.distributed``'s, read when the loaders are
    iterated (Lightning starts the process group inside ``fit``). ``train_sampler`` replaces the
    default training :class:`SeededSampler` (e.g. a subclass that also sets the epoch's
    augmentation).
    """
    if train_sampler is None:
        train_sampler = SeededSampler(
            len(train),  # type: ignore[arg-type]
            seed=seed,
            shuffle=True,
            rank=rank,
            world_size=world_size,
        )
    train_loader = DataLoader(
        train,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        sampler=train_sampler,
    )
    test_loader = DataLoader(
        test,
        batch_size=eval_batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        sampler=SeededSampler(
            len(test),  # type: ignore[arg-type]
            shuffle=False,
            rank=rank,
            world_size=world_size,
        ),
    )
    return train_loader, test_loader


# ---------------------------------------------------------------------------------------------
# stratified subsets
def stratified_counts(class_sizes: Sequence[int] | np.ndarray, n: int) -> list[int]:
    """Images per class in a stratified subset of ``n`` of them: each class's share
    ``n * size / total`` rounded down, the remaining images going to the largest remainders
    (ties to the lower class index). ``n >= total`` takes everything."""
    sizes = np.asarray(class_sizes, dtype=np.int64)
    total = int(sizes.sum())
    if n >= total:
        return sizes.tolist()
    quota = sizes * n
    counts = quota // total
    left = n - int(counts.sum())
    order = np.lexsort((np.arange(len(sizes)), -(quota % total)))  # largest remainder first
    counts[order[:left]] += 1
    return counts.tolist()


def stratified_indices(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    n: int,
    *,
    seed: int | Sequence[int],
    classes: Sequence[str],
    what: str = "n",
) -> np.ndarray:
    """Sorted indices of a stratified subset of ``n`` items: :func:`stratified_counts` per class,
    each class's items drawn at random with ``numpy.random.default_rng(seed)``.

    Raises ``ValueError`` naming the classes that would be left with no item (and the smallest
    ``n`` that keeps them all), ``what`` being the argument's name in the message.
    """
    labels = np.asarray(labels, dtype=np.int64)
    sizes = np.bincount(labels, minlength=len(classes))
    counts = stratified_counts(sizes, n)
    lost = [c for c, k, size in zip(classes, counts, sizes) if k == 0 and size > 0]
    if lost:
        need = next(
            m
            for m in range(n, int(sizes.sum()) + 1)
            if all(k > 0 for k, size in zip(stratified_counts(sizes, m), sizes) if size)
        )
        shown = ", ".join(map(repr, lost[:10])) + (
            f" and {len(lost) - 10} more" if len(lost) > 10 else ""
        )
        raise ValueError(
            f"bench data: {what}={n} keeps the same share of each of the {len(classes)} classes "
            f"of {int(sizes.sum())} images, which leaves {shown} with no image; use {what} >= "
            f"{need} (or leave it unset to use every image)"
        )
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in enumerate(counts)]
    return np.sort(np.concatenate(picked))


def _subset(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    n: int | None,
    *,
    seed: int,
    split: str,
    classes: Sequence[str],
) -> np.ndarray | None:
    """Indices of the stratified ``n_train``/``n_test`` subset of a split; ``None`` = all."""
    if n is None or n >= len(labels):
        return None
    salt = {"train": 1, "test": 2}[split]  # independent draws for the two splits
    return stratified_indices(labels, n, seed=(seed, salt), classes=classes, what=f"--n-{split}")


def _take(
    items: list[tuple[Path, int]], n: int | None, *, seed: int, split: str, classes: Sequence[str]
) -> list[tuple[Path, int]]:
    keep = _subset([k for _, k in items], n, seed=seed, split=split, classes=classes)
    return items if keep is None else [items[i] for i in keep]


def _subset_note(data: BenchData, totals: tuple[int, int]) -> str:
    """``"; stratified subsets of 40 of 120 train and 20 of 36 test images (...)"`` or ``""``."""
    used = [(len(data.train), totals[0], "train"), (len(data.test), totals[1], "test")]
    cut = [f"{k} of {t} {split}" for k, t, split in used if k < t]
    return (
        f"; stratified subsets of {' and '.join(cut)} images (same share of each class)"
        if cut
        else ""
    )


# ---------------------------------------------------------------------------------------------
# cluttered digits
@dataclass
class ClutteredDigits:
    """Raw output of :func:`make_cluttered_digits` for one split (numpy, values in ``[0, 1]``).

    Attributes:
        images: ``(N, canvas, canvas)`` float32.
        labels: ``(N,)`` int64 digit classes.
        boxes: ``(N, 4)`` int64 ``(x0, y0, x1, y1)`` tight box of the target digit, exclusive ends.
        sources: ``(N,)`` int64 index of the source digit in ``load_digits()``.
    """

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    sources: np.ndarray


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(
            f"make_cluttered_digits: {name} must be an integer >= {low}; got {value!r}"
        )
    return int(value)


def _render_split(
    n: int,
    sources: np.ndarray,
    digits: np.ndarray,
    labels: np.ndarray,
    *,
    canvas: int,
    clutter: int,
    fragment: int,
    rng: np.random.Generator,
) -> ClutteredDigits:
    d = digits.shape[-1]
    images = np.zeros((n, canvas, canvas), np.float32)
    boxes = np.zeros((n, 4), np.int64)
    chosen = np.zeros(n, np.int64)
    cycle: list[int] = []
    for i in range(n):
        if not cycle:
            cycle = rng.permutation(sources).tolist()
        src = cycle.pop()
        chosen[i] = src
        y, x = (int(v) for v in rng.integers(0, canvas - d + 1, size=2))
        img = images[i]
        for _ in range(clutter):
            other = int(rng.choice(sources))
            while other == src and len(sources) > 1:
                other = int(rng.choice(sources))
            crop = _ink_crop(digits[other], fragment, rng)
            fy, fx = _clutter_position(canvas, fragment, (y, x, d), rng)
            np.maximum(
                img[fy : fy + fragment, fx : fx + fragment],
                crop,
                out=img[fy : fy + fragment, fx : fx + fragment],
            )
        digit = digits[src]
        np.maximum(img[y : y + d, x : x + d], digit, out=img[y : y + d, x : x + d])
        rows = np.flatnonzero(digit.max(axis=1) > 0.05)
        cols = np.flatnonzero(digit.max(axis=0) > 0.05)
        boxes[i] = (x + cols[0], y + rows[0], x + cols[-1] + 1, y + rows[-1] + 1)
    return ClutteredDigits(images, labels[chosen], boxes, chosen)


def _clutter_position(
    canvas: int, size: int, target: tuple[int, int, int], rng: np.random.Generator
) -> tuple[int, int]:
    """A random position for a fragment, outside the target's square when one is found."""
    ty, tx, d = target
    fy = fx = 0
    for _ in range(20):
        fy, fx = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
        if fy + size <= ty or fy >= ty + d or fx + size <= tx or fx >= tx + d:
            break
    return fy, fx


def make_cluttered_digits(
    *,
    n_train: int = 3000,
    n_test: int = 1000,
    canvas: int = 32,
    scale: int = 2,
    clutter: int = 6,
    fragment: int = 8,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> tuple[ClutteredDigits, ClutteredDigits]:
    """Generate the cluttered-digits train and test splits (see the module docstring).

    Args:
        n_train, n_test: number of images per split.
        canvas: side of the square canvas in pixels (32 by default).
        scale: upscaling factor of the 8×8 source digits (2 → 16×16).
        clutter: number of clutter fragments per image.
        fragment: side of a clutter fragment in pixels (at most the digit's side).
        test_fraction: share of each class's source digits reserved for the test split.
        seed: the generator's seed; same seed, same data.

    Returns:
        ``(train, test)`` :class:`ClutteredDigits`.
    """
    n_train = _check_int("n_train", n_train, 1)
    n_test = _check_int("n_test", n_test, 1)
    scale = _check_int("scale", scale, 1)
    clutter = _check_int("clutter", clutter, 0)
    fragment = _check_int("fragment", fragment, 1)
    canvas = _check_int("canvas", canvas, 8 * scale)
    if fragment > 8 * scale:
        raise ValueError(
            f"make_cluttered_digits: fragment must be <= the digit side {8 * scale}; got {fragment}"
        )
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(
            f"make_cluttered_digits: test_fraction must be in (0, 1); got {test_fraction!r}"
        )
    digits, labels = _upscaled_digits(scale)
    rng = np.random.default_rng(seed)
    train_src, test_src = _split_sources(labels, float(test_fraction), rng)
    kw = dict(canvas=canvas, clutter=clutter, fragment=fragment)
    train = _render_split(n_train, train_src, digits, labels, rng=rng, **kw)
    test = _render_split(n_test, test_src, digits, labels, rng=rng, **kw)
    return train, test


_DIGITS_MEAN, _DIGITS_STD = 0.1, 0.25


def _digits_to_set(split: ClutteredDigits) -> TensorImageSet:
    x = torch.from_numpy(split.images).unsqueeze(1)
    x = ((x - _DIGITS_MEAN) / _DIGITS_STD).expand(-1, 3, -1, -1).contiguous()
    return TensorImageSet(x, torch.from_numpy(split.labels), torch.from_numpy(split.boxes))


def load_digits_data(
    *, n_train: int = 3000, n_test: int = 1000, seed: int = 0, **kwargs: Any
) -> BenchData:
    """The built-in cluttered digits as a :class:`BenchData` (3 identical channels)."""
    train, test = make_cluttered_digits(n_train=n_train, n_test=n_test, seed=seed, **kwargs)
    desc = (
        f"cluttered digits: {n_train} train / {n_test} test images of "
        f"{train.images.shape[-1]}x{train.images.shape[-1]} px from scikit-learn's 1797 "
        f"handwritten digits, split by source digit (data seed {seed})"
    )
    return BenchData(
        name="digits",
        train=_digits_to_set(train),
        test=_digits_to_set(test),
        classes=[str(i) for i in range(10)],
        description=desc,
        mean=(_DIGITS_MEAN,) * 3,
        std=(_DIGITS_STD,) * 3,
        extra={"train_sources": train.sources, "test_sources": test.sources},
    )


# ---------------------------------------------------------------------------------------------
# image folders
def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names and ``(file, class_index)`` pairs; raises ``ValueError`` naming the problem."""
    if not root.exists():
        raise ValueError(f"bench data: the folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"bench data: {root} is not a folder (expected one sub-folder per class)")
    classes = _class_dirs(root)
    if not classes:
        raise ValueError(
            f"bench data: {root} has no class sub-folders; expected the ImageFolder "
            f"layout {root}/<class_name>/<image files>"
        )
    if len(classes) < 2:
        raise ValueError(
            f"bench data: {root} has one class sub-folder ({classes[0].name}); "
            "classification needs at least 2"
        )
    items: list[tuple[Path, int]] = []
    empty, non_images = [], []
    for k, cdir in enumerate(classes):
        files = sorted(p for p in cdir.rglob("*") if p.is_file() and not p.name.startswith("."))
        imgs = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        non_images += [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if not imgs:
            empty.append(cdir)
        items += [(p, k) for p in imgs]
    if empty:
        hint = f" (it holds non-image files such as {non_images[0].name})" if non_images else ""
        raise ValueError(
            "bench data: these class folders contain no images "
            f"({', '.join(IMAGE_EXTENSIONS)}): {', '.join(str(p) for p in empty)}{hint}"
        )
    return [c.name for c in classes], items


def _read_images(items: Sequence[tuple[Path, int]], size: int) -> tuple[torch.Tensor, list[str]]:
    """Decode, convert to RGB, resize; also returns the unreadable files (with the error type)."""
    from PIL import Image

    out = torch.empty((len(items), 3, size, size), dtype=torch.uint8)
    bad: list[str] = []
    for i, (path, _) in enumerate(items):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except Exception as err:  # noqa: BLE001  (PIL raises many types for broken files)
            bad.append(f"{path} ({type(err).__name__})")
            continue
        out[i] = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    return out, bad


def _raise_unreadable(bad: list[str]) -> None:
    if bad:
        shown = "; ".join(bad[:20]) + (f"; and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ValueError(f"bench data: {len(bad)} image file(s) cannot be read: {shown}")


def _normalise_uint8(x: torch.Tensor) -> tuple[torch.Tensor, tuple, tuple]:
    xf = x.float() / 255.0
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    xf = (xf - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return xf, tuple(mean.tolist()), tuple(std.tolist())


def scan_image_folder(path: str | os.PathLike) -> dict[str, tuple[list[str], list]]:
    """Check a folder without decoding: ``{"train"/"test"/"all": (classes, items)}``."""
    root = Path(path)
    if not root.exists():
        raise ValueError(f"bench data: the folder {root} does not exist")
    test_name = next((n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_name:
        train = _scan_folder(root / "train")
        test = _scan_folder(root / test_name)
        if train[0] != test[0]:
            raise ValueError(
                f"bench data: {root}/train and {root}/{test_name} have different "
                f"classes: {train[0]} vs {test[0]}"
            )
        return {"train": train, "test": test}
    return {"all": _scan_folder(root)}


def load_image_folder(
    path: str | os.PathLike,
    *,
    image_size: int = 32,
    test_fraction: float = 0.2,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
) -> BenchData:
    """Load an ImageFolder-style directory into memory (see the module docstring).

    ``n_train``/``n_test`` keep stratified subsets of the splits (:func:`stratified_indices`,
    drawn with ``seed``) before any image is decoded; the normalisation statistics are those of
    the training images used.
    """
    scanned = scan_image_folder(path)
    if "all" in scanned:
        classes, items = scanned["all"]
        labels = np.array([k for _, k in items])
        rng = np.random.default_rng(seed)
        train_idx, test_idx = _split_sources(labels, test_fraction, rng)
        for split, idx in (("train", train_idx), ("test", test_idx)):
            empty = [c for k, c in enumerate(classes) if not (labels[idx] == k).any()]
            if empty:
                raise ValueError(
                    f"bench data: {path} has too few images of {', '.join(map(repr, empty))} "
                    f"to split them into train and test with test_fraction={test_fraction}: the "
                    f"{split} split would have none; add images or use train/ and test/ folders"
                )
        train_items = [items[i] for i in train_idx]
        test_items = [items[i] for i in test_idx]
        how = f"stratified {test_fraction:.0%} test split (seed {seed})"
    else:
        classes, train_items = scanned["train"]
        test_items = scanned["test"][1]
        how = "the folder's own train/test split"
    totals = (len(train_items), len(test_items))
    train_items = _take(train_items, n_train, seed=seed, split="train", classes=classes)
    test_items = _take(test_items, n_test, seed=seed, split="test", classes=classes)
    x_train, bad_train = _read_images(train_items, image_size)
    x_test, bad_test = _read_images(test_items, image_size)
    _raise_unreadable(sorted(bad_train + bad_test))
    xf_train, mean, std = _normalise_uint8(x_train)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    xf_test = (x_test.float() / 255.0 - m) / s
    y_train = torch.tensor([k for _, k in train_items], dtype=torch.int64)
    y_test = torch.tensor([k for _, k in test_items], dtype=torch.int64)
    desc = (
        f"image folder {path}: {len(classes)} classes, {len(train_items)} train / "
        f"{len(test_items)} test images resized to {image_size}x{image_size} ({how})"
    )
    data = BenchData(
        name=str(path),
        train=TensorImageSet(xf_train, y_train),
        test=TensorImageSet(xf_test, y_test),
        classes=classes,
        description=desc,
        mean=mean,
        std=std,
    )
    data.description += _subset_note(data, totals)
    return data


# ---------------------------------------------------------------------------------------------
# CIFAR from local files
_CIFAR = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        "batches.meta",
        "label_names",
        "cifar-10-python.tar.gz",
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "fine_labels",
        "meta",
        "fine_label_names",
        "cifar-100-python.tar.gz",
    ),
}


def _cifar_dir(kind: str, root: Path) -> Path:
    sub, train_files, test_files, *_rest, archive = _CIFAR[kind]
    for cand in (root / sub, root):
        if all((cand / f).is_file() for f in train_files + test_files):
            return cand
    missing = [f for f in train_files + test_files if not (root / sub / f).is_file()]
    raise ValueError(
        f"bench data: {kind} files not found under {root}. attnzoo never downloads data: get "
        f"{archive} (the 'python version') from https://www.cs.toronto.edu/~kriz/cifar.html and "
        f"extract it there (tar xzf {archive} -C {root}) so that {root / sub}/ holds "
        f"{', '.join(train_files + test_files)}. Missing: {', '.join(missing)}"
    )


def _read_cifar_file(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"bench data: cannot read the CIFAR file {path}: {err}") from None
    return data, labels


def load_cifar(kind: str, root: str | os.PathLike) -> BenchData:
    """CIFAR-10 or CIFAR-100 from the extracted official python archives; never downloads."""
    if kind not in _CIFAR:
        raise ValueError(f"bench data: unknown CIFAR kind {kind!r}; use cifar10 or cifar100")
    folder = _cifar_dir(kind, Path(root))
    _sub, train_files, test_files, label_key, meta_file, names_key, _archive = _CIFAR[kind]
    parts = [_read_cifar_file(folder / f, label_key) for f in train_files]
    x_train = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y_train = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    x_test_np, y_test_np = _read_cifar_file(folder / test_files[0], label_key)
    n_classes = 10 if kind == "cifar10" else 100
    classes = [str(i) for i in range(n_classes)]
    if (folder / meta_file).is_file():
        with open(folder / meta_file, "rb") as f:
            classes = list(pickle.load(f, encoding="latin1")[names_key])
    xf_train, mean, std = _normalise_uint8(x_train)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    xf_test = (torch.from_numpy(x_test_np).float() / 255.0 - m) / s
    desc = f"{kind.upper()} from {folder}: {len(y_train)} train / {len(y_test_np)} test images"
    return BenchData(
        name=kind,
        train=TensorImageSet(xf_train, y_train),
        test=TensorImageSet(xf_test, torch.from_numpy(y_test_np)),
        classes=classes,
        description=desc,
        mean=mean,
        std=std,
    )


# ---------------------------------------------------------------------------------------------
def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """``"digits"`` → ``("digits", None)``; ``"cifar100:/p"`` → ``("cifar100", "/p")``;
    anything else is a folder path → ``("folder", path)``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            "bench data: --data must be 'digits', a folder path, or cifar10:/path / "
            f"cifar100:/path; got {spec!r}"
        )
    spec = spec.strip()
    if spec == "digits":
        return "digits", None
    head, sep, tail = spec.partition(":")
    if sep and head.lower() in _CIFAR:
        if not tail:
            raise ValueError(f"bench data: {head}: needs a folder, e.g. {head}:/data/cifar")
        return head.lower(), tail
    if head.lower() in ("cifar10", "cifar100") and not sep:
        raise ValueError(
            f"bench data: {head} needs the folder holding the extracted archive, "
            f"e.g. --data {head}:/data/cifar (attnzoo never downloads)"
        )
    return "folder", spec


def check_data_spec(spec: str) -> None:
    """Cheap checks of ``--data`` before anything is loaded (existence, layout)."""
    kind, path = parse_data_spec(spec)
    if kind == "folder":
        scan_image_folder(path)  # type: ignore[arg-type]
    elif kind in _CIFAR:
        _cifar_dir(kind, Path(path))  # type: ignore[arg-type]


def load_data(
    spec: str = "digits",
    *,
    image_size: int = 32,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
) -> BenchData:
    """Load ``--data``: ``digits`` (built-in), a folder path, or ``cifar10:/p``/``cifar100:/p``.

    ``n_train``/``n_test`` set the built-in data's sizes; for the others they keep stratified
    subsets (the same share of each class, drawn with ``seed``; a class that would be left with
    no image is a ``ValueError`` naming it). :attr:`BenchData.class_counts` gives the images per
    class actually used.
    """
    kind, path = parse_data_spec(spec)
    if kind == "digits":
        kw = {k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if v is not None}
        return load_digits_data(seed=seed, **kw)
    if kind == "folder":
        return load_image_folder(
            path,  # type: ignore[arg-type]  # a folder spec always has a path
            image_size=image_size,
            seed=seed,
            n_train=n_train,
            n_test=n_test,
        )
    data = load_cifar(kind, path)  # type: ignore[arg-type]
    totals = (len(data.train), len(data.test))
    for split, n in (("train", n_train), ("test", n_test)):
        part = getattr(data, split)
        keep = _subset(part.labels, n, seed=seed, split=split, classes=data.classes)
        if keep is not None:
            setattr(data, split, part.select(keep))
    data.description += _subset_note(data, totals)
    return data
