"""DANet's training loss: weighted pixel-wise cross-entropy over the network's outputs.

Interface::

    loss_fn = SegmentationLoss(preset="official", ignore_index=255)
    parts = loss_fn(model(x), target)   # target int64 (B, H, W)
    parts["loss"].backward()            # parts also holds each weighted term ("out", "pam", ...)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LOSS_WEIGHTS", "SegmentationLoss"]

#: preset -> weight of each output's cross-entropy
LOSS_WEIGHTS: dict[str, dict[str, float]] = {
    # junfu1115/DANet SegmentationMultiLosses: CE(fused) + CE(pam) + CE(cam)
    "official": {"out": 1.0, "pam": 1.0, "cam": 1.0},
    # mmsegmentation DAHead.loss_by_feat (pam_cam, pam, cam at loss_weight 1.0) + FCNHead aux 0.4
    "mmseg": {"out": 1.0, "pam": 1.0, "cam": 1.0, "aux": 0.4},
}


class SegmentationLoss(nn.Module):
    """``sum_k w_k CE(outputs[k], target)`` over the outputs present, pixels at ``ignore_index``
    left out (each CE is the mean over the remaining pixels; 0 if there are none).

    Weights per preset: ``"official"`` (junfu1115/DANet ``SegmentationMultiLosses``):
    ``out`` 1, ``pam`` 1, ``cam`` 1. ``"mmseg"`` (mmsegmentation): the same three terms at weight
    1 each (``DAHead.loss_by_feat`` adds ``pam_cam``, ``pam`` and ``cam`` losses, each with the
    head's ``loss_weight=1.0``) plus the auxiliary FCN head's ``aux`` at 0.4. Outputs absent from
    the dict (``pam``/``cam`` of a single-branch head, ``aux`` without the auxiliary head) are
    skipped; keys without a weight raise. The official 2018 code used ``ignore_index=-1``;
    Cityscapes train ids and VOC use 255, the default here.

    Returns a dict of the weighted terms and their sum under ``"loss"``.

    Args:
        preset: ``"official"`` or ``"mmseg"``.
        ignore_index: target value of pixels that do not count.
        weights: overrides the preset's weights (a mapping output name -> weight).
    """

    def __init__(
        self,
        preset: str = "official",
        ignore_index: int = 255,
        *,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if preset not in LOSS_WEIGHTS:
            raise ValueError(
                f"SegmentationLoss: preset must be one of {', '.join(map(repr, LOSS_WEIGHTS))}; "
                f"got {preset!r}"
            )
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(
                f"SegmentationLoss: ignore_index must be an integer; got {ignore_index!r}"
            )
        self.preset = preset
        self.ignore_index = ignore_index
        self.weights = dict(LOSS_WEIGHTS[preset] if weights is None else weights)

    def forward(
        self, outputs: Mapping[str, torch.Tensor], target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if not isinstance(outputs, Mapping) or "out" not in outputs:
            raise TypeError(
                "SegmentationLoss: outputs must be the model's dict of logits with an 'out' key; "
                f"got {type(outputs).__name__}"
            )
        unknown = sorted(set(outputs) - set(self.weights))
        if unknown:
            raise ValueError(
                f"SegmentationLoss: outputs {unknown} have no weight (weights: {self.weights})"
            )
        if target.dtype != torch.int64 or target.dim() != 3:
            raise TypeError(
                "SegmentationLoss: target must be an int64 (B, H, W) tensor; got "
                f"{target.dtype} {tuple(target.shape)}"
            )
        valid = (target != self.ignore_index).sum().clamp_min(1)
        parts = {}
        for name, logits in outputs.items():
            if logits.shape[-2:] != target.shape[-2:] or logits.shape[0] != target.shape[0]:
                raise ValueError(
                    f"SegmentationLoss: outputs[{name!r}] {tuple(logits.shape)} does not match "
                    f"the target {tuple(target.shape)} (B, H, W)"
                )
            ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction="sum")
            parts[name] = self.weights[name] * ce / valid
        parts["loss"] = torch.stack(list(parts.values())).sum()
        return parts
