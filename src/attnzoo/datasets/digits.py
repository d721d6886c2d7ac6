"""Built-in sources: scikit-learn's bundled handwritten digits and sample photos.

Both ship inside the scikit-learn wheel (``sklearn.datasets.load_digits``: 1797 real 8×8 digits,
grey levels 0–16, from the UCI "Optical Recognition of Handwritten Digits" set;
``sklearn.datasets.load_sample_images``: the two 427×640 photos ``china.jpg`` and ``flower.jpg``),
so nothing is downloaded. scikit-learn is imported inside the functions.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

__all__ = ["ink_crop", "sample_photos", "split_sources", "upscaled_digits"]


@lru_cache(maxsize=1)
def _digit_bunch() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, target = bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    images.flags.writeable = target.flags.writeable = False
    return images, target


def upscaled_digits(scale: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits scaled to ``[0, 1]`` and upscaled ``scale``× (bilinear), with labels.

    Returns ``(images (1797, 8·scale, 8·scale) float32, labels (1797,) int64)``.
    """
    images, target = _digit_bunch()
    imgs = torch.from_numpy(images / 16.0).unsqueeze(1)
    if scale > 1:
        imgs = torch.nn.functional.interpolate(
            imgs, scale_factor=scale, mode="bilinear", align_corners=False
        )
    return imgs[:, 0].clamp(0, 1).numpy(), target.copy()


def split_sources(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split item indices per class: ``round(test_fraction · n_class)`` of each go to test.

    Returns sorted ``(train_indices, test_indices)``, disjoint.
    """
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def ink_crop(digit: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size``×``size`` crop holding at least a fifth of the digit's ink (10 tries)."""
    d = digit.shape[-1]
    need = 0.2 * digit.sum() * min(1.0, (size / d) ** 2 * 2)
    crop = digit[:size, :size]
    for _ in range(10):
        cy, cx = (int(v) for v in rng.integers(0, d - size + 1, size=2))
        crop = digit[cy : cy + size, cx : cx + size]
        if crop.sum() >= need:
            break
    return crop


@lru_cache(maxsize=4)
def sample_photos(min_height: int = 0, min_width: int = 0) -> tuple[np.ndarray, ...]:
    """scikit-learn's two sample photos as read-only ``float32`` ``(H, W, 3)`` arrays in ``[0, 1]``,
    upscaled (bicubic, aspect kept) when needed so that each is at least ``min_height`` ×
    ``min_width``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = []
    for photo in load_sample_images().images:
        h, w = photo.shape[:2]
        f = max(1.0, min_height / h, min_width / w)
        if f > 1.0:
            size = (max(min_width, int(np.ceil(w * f))), max(min_height, int(np.ceil(h * f))))
            photo = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BICUBIC))
        arr = photo.astype(np.float32) / 255.0
        arr.flags.writeable = False
        out.append(arr)
    return tuple(out)
