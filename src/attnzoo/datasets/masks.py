"""Semantic segmentation data: image + mask folders, the built-in scenes' masks, a Dataset.

Interface::

    data = read_mask_folder("VOC2012/JPEGImages", "VOC2012/SegmentationClass", palette="voc",
                            names="VOC2012/ImageSets/Segmentation/train.txt")
    data = read_mask_folder("leftImg8bit/train", "gtFine/train")   # Cityscapes *_labelTrainIds
    train, test = scenes_segmentation(200, 50, canvas=64)           # built in: 11 classes
    ds = SegmentationDataset(train, train=True, image_size=64)      # (image (3,H,W), mask (H,W))

A :class:`SegmentationData` holds ``images`` (uint8 RGB ``(H, W, 3)`` each), ``masks`` (uint8 or
int64 ``(H, W)`` class indices, ``ignore_index`` for pixels that do not count), ``classes``,
``names``; folders are read on access (:class:`MaskFiles`), the scenes are in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from attnzoo.datasets.data import ImageFiles
from attnzoo.datasets.scenes import make_digit_scenes

__all__ = [
    "CITYSCAPES_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MaskFiles",
    "SCENE_CLASSES",
    "SegmentationData",
    "SegmentationDataset",
    "VOC_SEG_CLASSES",
    "read_mask_folder",
    "scenes_segmentation",
    "voc_colormap",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: PASCAL VOC 2012 segmentation classes (index 0 background; 255 = object borders, ignored)
VOC_SEG_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
#: Cityscapes' 19 evaluation classes, in train-id order (``*_labelTrainIds.png``; 255 ignored)
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
#: the built-in digit scenes' semantic classes: 0 background (and clutter), 1 + digit
SCENE_CLASSES = ("background", *(str(d) for d in range(10)))

_CITYSCAPES_MASK, _CITYSCAPES_IMAGE = "_gtFine_labelTrainIds", "_leftImg8bit"
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_WHO = "read_mask_folder"


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette, ``uint8 (n, 3)``: the bits of index ``i`` spread over the high
    bits of R, G and B (``1 -> (128, 0, 0)``, ``255 -> (224, 224, 192)``)."""
    cmap = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for k in range(3):
                rgb[k] |= ((c >> k) & 1) << (7 - j)
            c >>= 3
        cmap[i] = rgb
    return cmap


def _palette_lut(palette: Any) -> dict[tuple[int, int, int], int] | None:
    if palette is None:
        return None
    if palette == "voc":
        return {tuple(int(v) for v in c): i for i, c in enumerate(voc_colormap())}
    if isinstance(palette, Mapping):
        return {tuple(int(v) for v in k): int(i) for k, i in palette.items()}
    raise ValueError(
        f"{_WHO}: palette must be None, 'voc' or a dict {{(r, g, b): class index}}; got {palette!r}"
    )


def decode_mask(
    path: str | os.PathLike, palette: Mapping[tuple[int, int, int], int] | None = None
) -> np.ndarray:
    """A mask file as ``(H, W)`` class indices: palette ('P') and grey PNGs give their values,
    RGB masks are mapped through ``palette`` (colour -> index; unknown colours raise)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("P", "L", "I", "I;16", "1"):
            return np.asarray(im, dtype=np.int64 if im.mode.startswith("I") else np.uint8)
        if palette is None:
            raise ValueError(
                f"{_WHO}: {path} is an {im.mode} image; colour masks need palette='voc' or a "
                "dict {(r, g, b): class index}"
            )
        rgb = np.asarray(im.convert("RGB"), dtype=np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in palette], np.int64)
    values = np.array(list(palette.values()), np.int64)
    order = np.argsort(keys)
    pos = np.searchsorted(keys[order], code).clip(0, len(keys) - 1)
    found = keys[order][pos] == code
    if not found.all():
        c = int(code[~found][0])
        raise ValueError(
            f"{_WHO}: {path} has the colour {(c >> 16, (c >> 8) & 255, c & 255)} which is not in "
            "the palette"
        )
    return values[order][pos]


def _check_labels(mask: np.ndarray, path: Path, num_classes: int, ignore_index: int) -> None:
    bad = (mask >= num_classes) & (mask != ignore_index) | (mask < 0)
    if bad.any():
        raise ValueError(
            f"{_WHO}: {path} holds the label {int(mask[bad][0])}, outside [0, {num_classes}) "
            f"and not ignore_index ({ignore_index})"
        )


class MaskFiles(Sequence):
    """Masks read on access: ``masks[i]`` is ``(H, W)`` class indices, checked against the
    classes (labels in ``[0, num_classes)`` or ``ignore_index``)."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        num_classes: int,
        *,
        palette: Mapping[tuple[int, int, int], int] | None = None,
        ignore_index: int = 255,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.num_classes, self.palette, self.ignore_index = num_classes, palette, ignore_index

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return MaskFiles(
                self.paths[index], self.num_classes, palette=self.palette,
                ignore_index=self.ignore_index,
            )  # fmt: skip
        mask = decode_mask(self.paths[index], self.palette)
        _check_labels(mask, self.paths[index], self.num_classes, self.ignore_index)
        return mask

    def __repr__(self) -> str:
        return f"MaskFiles({len(self)} files)"


@dataclass
class SegmentationData:
    """One split of a semantic segmentation data set.

    Attributes:
        images: uint8 RGB ``(N, H, W, 3)`` array, or a sequence of ``(H_i, W_i, 3)`` arrays
            (:class:`~attnzoo.datasets.ImageFiles`, read on access).
        masks: class indices, ``(N, H, W)`` array or a sequence of ``(H_i, W_i)`` arrays
            (:class:`MaskFiles`); ``ignore_index`` marks pixels that do not count.
        classes: class names; label ``k`` is ``classes[k]``.
        names: one identifier per image.
        ignore_index: the label of ignored pixels (255).
        meta: anything else (the readers' paths).
    """

    images: np.ndarray | Sequence[np.ndarray]
    masks: np.ndarray | Sequence[np.ndarray]
    classes: tuple[str, ...]
    names: list[str]
    ignore_index: int = 255
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.names)


def _index(folder: Path, suffix: str) -> dict[str, Path]:
    """``{key: path}`` of the image files under ``folder`` whose stem ends with ``suffix``; the
    key is the path relative to ``folder`` without extension and suffix (``"aachen/x_000"``)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in _IMAGE_EXTS or not p.stem.endswith(suffix):
            continue
        rel = p.relative_to(folder)
        out[str(rel.parent / p.stem[: len(p.stem) - len(suffix)])] = p
    return out


def _names(names: Sequence[str] | str | os.PathLike | None) -> list[str] | None:
    if names is None or (isinstance(names, Sequence) and not isinstance(names, str)):
        return None if names is None else [str(n) for n in names]
    path = Path(names)
    if not path.is_file():
        raise ValueError(
            f"{_WHO}: names must be a list of names or a split file; {path} is not a file"
        )
    return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width


def read_mask_folder(
    images_dir: str | os.PathLike,
    masks_dir: str | os.PathLike,
    *,
    palette: str | Mapping[tuple[int, int, int], int] | None = None,
    label_suffix: str | None = None,
    image_suffix: str | None = None,
    names: Sequence[str] | str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    ignore_index: int = 255,
    check_labels: bool = True,
) -> SegmentationData:
    """Pair images with masks by name and check them.

    Masks: palette PNGs (VOC ``SegmentationClass/``: the pixel values are the class indices) and
    grey PNGs (Cityscapes ``*_gtFine_labelTrainIds.png``) are read as indices; RGB masks are
    mapped through ``palette`` (``"voc"`` or a dict ``{(r, g, b): index}``). ``ignore_index``
    (255: VOC's object borders, Cityscapes' void) is kept as is.

    Pairing: image ``<key><image_suffix>.<ext>`` with mask ``<key><label_suffix>.<ext>``, ``key``
    being the path below the folder (subfolders such as Cityscapes' cities are searched). With
    ``label_suffix=None``, a mask folder holding ``*_gtFine_labelTrainIds.png`` files is read as
    Cityscapes (suffixes ``_gtFine_labelTrainIds`` / ``_leftImg8bit``, its 19 classes), any
    other with equal stems.

    Args:
        images_dir, masks_dir: the two folders.
        palette: see above.
        label_suffix, image_suffix: stem endings removed before pairing.
        names: the keys to read (a list, or a split file with one per line such as VOC's
            ``ImageSets/Segmentation/train.txt``); default every image of ``images_dir``.
        classes: class names; default VOC's 21 with ``palette="voc"``, Cityscapes' 19 for
            ``labelTrainIds`` masks, else ``"0" .. str(max label)`` (all masks are decoded).
        ignore_index: label of ignored pixels.
        check_labels: decode every mask now and check its labels (else on access).

    Raises:
        ValueError: a missing folder, image or mask, an image and mask of different sizes, a
            label outside ``[0, len(classes))`` other than ``ignore_index`` (naming the file and
            the label), an unknown colour.
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for arg, d in (("images_dir", images_dir), ("masks_dir", masks_dir)):
        if not d.is_dir():
            raise ValueError(f"{_WHO}: {arg} {d} is not a folder")
    lut = _palette_lut(palette)
    cityscapes = label_suffix is None and any(masks_dir.rglob(f"*{_CITYSCAPES_MASK}.png"))
    if label_suffix is None:
        label_suffix = _CITYSCAPES_MASK if cityscapes else ""
    if image_suffix is None:
        image_suffix = _CITYSCAPES_IMAGE if cityscapes else ""
    images, masks = _index(images_dir, image_suffix), _index(masks_dir, label_suffix)
    keys = _names(names) or sorted(images)
    if not keys:
        raise ValueError(f"{_WHO}: no images found in {images_dir}")
    for key in keys:
        if key not in images:
            raise ValueError(f"{_WHO}: missing image: {images_dir / key}{image_suffix}.* not found")
        if key not in masks:
            raise ValueError(
                f"{_WHO}: missing mask for {images[key]}: expected "
                f"{masks_dir / key}{label_suffix}.png (pass names= to read a subset)"
            )
    sizes = []
    for key in keys:
        hw, mhw = _image_size(images[key]), _image_size(masks[key])
        if hw != mhw:
            raise ValueError(
                f"{_WHO}: size mismatch: {images[key]} is {hw[0]}x{hw[1]} (HxW) but its mask "
                f"{masks[key]} is {mhw[0]}x{mhw[1]}"
            )
        sizes.append(hw)
    if classes is None:
        if palette == "voc":
            classes = VOC_SEG_CLASSES
        elif cityscapes:
            classes = CITYSCAPES_CLASSES
        else:
            top = max(int(np.max(np.where(m == ignore_index, 0, m))) for m in
                      (decode_mask(masks[k], lut) for k in keys))  # fmt: skip
            classes = tuple(str(i) for i in range(top + 1))
    mask_files = MaskFiles([masks[k] for k in keys], len(classes), palette=lut,
                           ignore_index=ignore_index)  # fmt: skip
    if check_labels:
        for i in range(len(mask_files)):
            mask_files[i]
    return SegmentationData(
        images=ImageFiles([images[k] for k in keys], sizes),
        masks=mask_files,
        classes=tuple(classes),
        names=list(keys),
        ignore_index=ignore_index,
        meta={"images_dir": str(images_dir), "masks_dir": str(masks_dir)},
    )


def scenes_segmentation(
    n_train: int = 2000, n_test: int = 500, **kwargs: Any
) -> tuple[SegmentationData, SegmentationData]:
    """The built-in digit scenes as semantic segmentation: 11 classes (0 background and
    clutter, ``1 + digit``), no ignored pixels. Keyword arguments go to
    :func:`~attnzoo.datasets.make_digit_scenes` (``canvas``, ``objects``, ``seed`` ...)."""
    splits = make_digit_scenes(n_train, n_test, **kwargs)
    return tuple(  # type: ignore[return-value]
        SegmentationData(
            images=s.images,
            masks=s.semantic_masks,
            classes=SCENE_CLASSES,
            names=list(s.names),
            meta={"source": "make_digit_scenes", **kwargs},
        )  # fmt: skip
        for s in splits
    )


def _hw(value: Any, who: str, arg: str) -> tuple[int, int] | None:
    if value is None:
        return None
    hw = (value, value) if isinstance(value, (int, np.integer)) else value
    if not (
        isinstance(hw, (tuple, list))
        and len(hw) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in hw)
    ):
        raise ValueError(f"{who}: {arg} must be a positive integer or a pair (H, W); got {value!r}")
    return int(hw[0]), int(hw[1])


class SegmentationDataset(Dataset):
    """``ds[i] -> (image, mask)``: ``image`` float32 ``(3, H, W)``, ``(x / 255 - mean) / std``
    (ImageNet statistics by default, those of torchvision's pretrained backbones; ``mean=(0, 0,
    0), std=(1, 1, 1)`` gives ``[0, 1]`` like :class:`~attnzoo.datasets.DetectionDataset`);
    ``mask`` int64 ``(H, W)``.

    Every item is first resized to ``image_size`` (bilinear for the image, nearest for the mask).
    In training (``train=True``) the same random transform is then applied to both: a rescale
    by a factor drawn from ``scale`` (e.g. ``(0.75, 2.0)``, DANet's; ``None`` = off), a random
    ``crop_size`` crop (padding with 0 / ``ignore_index`` where the image is smaller; ``None`` =
    off), and a horizontal flip with probability ``hflip``. The draws for item ``i`` come from
    ``(seed, epoch, i)`` only (:meth:`set_epoch`), whatever the worker count. ``transform``, if
    given, is called last as ``transform(image, mask) -> (image, mask)``.
    """

    def __init__(
        self,
        data: SegmentationData,
        *,
        train: bool,
        image_size: int | tuple[int, int] | None = None,
        crop_size: int | tuple[int, int] | None = None,
        scale: tuple[float, float] | None = None,
        hflip: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
        | None = None,
        seed: int = 0,
    ) -> None:
        who = "SegmentationDataset"
        if not isinstance(data, SegmentationData):
            raise TypeError(f"{who}: data must be a SegmentationData; got {type(data).__name__}")
        if not isinstance(hflip, (int, float)) or isinstance(hflip, bool) or not 0 <= hflip <= 1:
            raise ValueError(f"{who}: hflip must be a probability in [0, 1]; got {hflip!r}")
        if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1]):
            raise ValueError(
                f"{who}: scale must be None or (lo, hi) with 0 < lo <= hi; got {scale!r}"
            )
        self.data, self.train = data, bool(train)
        self.image_size = _hw(image_size, who, "image_size")
        self.crop_size = _hw(crop_size, who, "crop_size")
        self.scale, self.hflip, self.transform, self.seed = scale, float(hflip), transform, seed
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the random transforms of this epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.data
        image = torch.from_numpy(np.ascontiguousarray(d.images[index])).permute(2, 0, 1)
        image = image.float().div_(255.0)
        mask = torch.from_numpy(np.array(d.masks[index], dtype=np.int64))  # a writable copy
        if mask.shape != image.shape[1:]:
            raise ValueError(
                f"SegmentationDataset: item {d.names[index]!r}: image {tuple(image.shape[1:])} "
                f"and mask {tuple(mask.shape)} differ in size"
            )
        if self.image_size is not None:
            image, mask = _resize(image, mask, self.image_size)
        if self.train:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            image, mask = self._augment(image, mask, rng)
        image = (image - self.mean) / self.std
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask

    def _augment(
        self, image: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale is not None:
            f = float(rng.uniform(*self.scale))
            h, w = image.shape[1:]
            image, mask = _resize(image, mask, (max(1, round(h * f)), max(1, round(w * f))))
        if self.crop_size is not None:
            image, mask = _random_crop(image, mask, self.crop_size, self.data.ignore_index, rng)
        if rng.random() < self.hflip:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


def _resize(
    image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    if tuple(image.shape[1:]) == size:
        return image, mask
    shrink = size[0] < image.shape[1] or size[1] < image.shape[2]
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                          antialias=shrink)[0].clamp_(0.0, 1.0)  # fmt: skip
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return image, mask


def _random_crop(
    image: torch.Tensor,
    mask: torch.Tensor,
    size: tuple[int, int],
    ignore_index: int,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = image.shape[1:]
    ph, pw = max(0, size[0] - h), max(0, size[1] - w)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        mask = F.pad(mask, (0, pw, 0, ph), value=ignore_index)
        h, w = image.shape[1:]
    y = int(rng.integers(0, h - size[0] + 1))
    x = int(rng.integers(0, w - size[1] + 1))
    return image[:, y : y + size[0], x : x + size[1]], mask[y : y + size[0], x : x + size[1]]
