"""PyTorch view of a :class:`~attnzoo.datasets.DetectionData`: resized images and targets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from attnzoo.datasets.data import DetectionData

__all__ = ["DetectionDataset", "collate_detection"]


def _size(value: object, data: DetectionData) -> tuple[int, int]:
    if value is None:
        sizes = set(data.sizes)
        if len(sizes) != 1:
            raise ValueError(
                "DetectionDataset: the images differ in size "
                f"({len(sizes)} sizes, e.g. {sorted(sizes)[:3]}); pass size=(H, W)"
            )
        value = sizes.pop()
    hw = (value, value) if isinstance(value, (int, np.integer)) else value
    ok = (
        isinstance(hw, (tuple, list))
        and len(hw) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in hw)
        and all(v >= 32 and v % 32 == 0 for v in hw)
    )
    if not ok:
        raise ValueError(
            f"DetectionDataset: size must be a positive multiple of 32 or a pair "
            f"(H, W) of them (YOLO strides); got {value!r}"
        )
    return int(hw[0]), int(hw[1])


class DetectionDataset(Dataset):
    """``ds[i] -> (image, target)`` for detection (and segmentation) training.

    ``image`` is ``float32 (3, H, W)`` in ``[0, 1]`` (no mean/std), resized to ``size`` (bilinear,
    antialiased when shrinking); ``target`` holds ``"boxes"`` (``float32 (n, 4)`` xyxy pixels at
    ``size``, scaled with the image), ``"labels"`` (``int64 (n,)``), ``"difficult"`` (``bool
    (n,)``, when the data has it) and, with ``masks=True``, ``"masks"`` (``uint8 (n, H, W)``
    instance masks) and ``"semantic"`` (``int64 (H, W)``: 0 background, ``1 + label``), both
    resized nearest.

    Args:
        data: the split to serve.
        size: ``(H, W)`` or a side; multiples of 32. ``None``: the images' own size (they must
            all share it).
        hflip: probability of a horizontal flip (0 = off, the default). The decision for item
            ``i`` is drawn from ``(seed, epoch, i)`` alone (see :meth:`set_epoch`), so it is the
            same whatever the worker count or the order of access.
        seed: seed of the flips.
        masks: also return the masks (the data must have them, e.g. the built-in scenes).
    """

    def __init__(
        self,
        data: DetectionData,
        size: int | tuple[int, int] | None = None,
        *,
        hflip: float = 0.0,
        seed: int = 0,
        masks: bool = False,
    ) -> None:
        if not isinstance(data, DetectionData):
            raise TypeError(
                f"DetectionDataset: data must be a DetectionData; got {type(data).__name__}"
            )
        if isinstance(hflip, bool) or not isinstance(hflip, (int, float)) or not 0 <= hflip <= 1:
            raise ValueError(
                f"DetectionDataset: hflip must be a probability in [0, 1]; got {hflip!r}"
            )
        if masks and (data.instance_masks is None or data.semantic_masks is None):
            raise ValueError(
                "DetectionDataset: masks=True needs data with instance_masks and "
                "semantic_masks (the built-in scenes have them; folders do not)"
            )
        self.data, self.size = data, _size(size, data)
        self.hflip, self.seed, self.masks = float(hflip), int(seed), bool(masks)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the flips of this epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data)

    def _flipped(self, index: int) -> bool:
        if self.hflip == 0.0:
            return False
        return bool(np.random.default_rng((self.seed, self.epoch, index)).random() < self.hflip)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = self.data
        image = torch.from_numpy(np.ascontiguousarray(d.images[index])).permute(2, 0, 1)
        h, w = image.shape[1:]
        image = image.float().div_(255.0)
        boxes = torch.as_tensor(d.boxes[index], dtype=torch.float32).reshape(-1, 4).clone()
        target = {"labels": torch.as_tensor(d.labels[index], dtype=torch.int64)}
        if d.difficult is not None:
            target["difficult"] = torch.as_tensor(d.difficult[index], dtype=torch.bool)
        masks = semantic = None
        if self.masks:
            masks = torch.from_numpy(np.asarray(d.instance_masks[index], dtype=np.uint8))
            semantic = torch.from_numpy(np.asarray(d.semantic_masks[index], dtype=np.uint8))
        if (h, w) != self.size:
            shrink = self.size[0] < h or self.size[1] < w  # antialiasing matters only then
            image = F.interpolate(
                image[None], size=self.size, mode="bilinear", align_corners=False, antialias=shrink
            )[0].clamp_(0.0, 1.0)
            scale = torch.tensor([self.size[1] / w, self.size[0] / h] * 2)
            boxes *= scale
            if self.masks:
                masks = _nearest(masks, self.size)
                semantic = _nearest(semantic[None], self.size)[0]
        if self._flipped(index):
            image = image.flip(-1)
            boxes = torch.stack(
                [self.size[1] - boxes[:, 2], boxes[:, 1], self.size[1] - boxes[:, 0], boxes[:, 3]],
                dim=1,
            )
            if self.masks:
                masks, semantic = masks.flip(-1), semantic.flip(-1)
        target["boxes"] = boxes
        if self.masks:
            target["masks"] = masks
            target["semantic"] = semantic.long()
        return image, target


def _nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(n, H, W)`` uint8 resized with nearest-exact sampling (pixel centres)."""
    if x.shape[0] == 0:
        return x.new_zeros((0, *size))
    return F.interpolate(x[None].float(), size=size, mode="nearest-exact")[0].to(torch.uint8)


def collate_detection(
    batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """``[(image, target), ...] -> (images (B, 3, H, W), [target, ...])`` for a ``DataLoader``."""
    if not batch:
        raise ValueError("collate_detection: empty batch")
    shapes = {tuple(img.shape) for img, _ in batch}
    if len(shapes) != 1:
        raise ValueError(
            f"collate_detection: images of different shapes {sorted(shapes)}; "
            "give DetectionDataset a size"
        )
    return torch.stack([img for img, _ in batch]), [t for _, t in batch]
