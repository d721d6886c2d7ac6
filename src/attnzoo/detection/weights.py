"""Load YOLOv4-tiny state dicts into :class:`~attnzoo.detection.YoloV4Tiny`, whatever attention
it carries.

Two key layouts are understood, key by key:

* the reference's (bubbliiiing/yolov4-tiny-pytorch, ``YoloBody`` in ``nets/yolo.py`` and
  ``CSPDarkNet`` in ``nets/CSPdarknet53_tiny.py``): ``backbone.conv1`` / ``conv2`` (stem),
  ``backbone.resblock_body{1,2,3}.conv{1..4}``, ``backbone.conv3``, ``conv_for_P5``,
  ``yolo_headP5.{0,1}``, ``upsample.upsample.0``, ``yolo_headP4.{0,1}``, and for ``phi`` 1-4 the
  attention modules ``feat1_att``, ``feat2_att``, ``upsample_att`` (``se_block``: ``fc.0``,
  ``fc.2``; ``cbam_block``: ``channelattention.fc1/fc2``, ``spatialattention.conv1``;
  ``eca_block``: ``conv``; ``CA_Block``: ``conv_1x1``, ``bn``, ``F_h``, ``F_w``), which land on
  the matching modules of the ``"yolov4-tiny"`` presets (1x1-conv weights are reshaped to linear
  ones where ours are ``nn.Linear``);
* attnzoo's own (``backbone.stem1``, ``backbone.block1``, ``conv_for_p5``, ``head_p5`` ...).

Attention keys follow :class:`~attnzoo.models.IdentityInit` wrappers both ways (``feat1_att.x``
loads into ``feat1_att.attn.x`` and back). A ``module.`` prefix (``nn.DataParallel``) is removed.
Tensors whose shape differs from the model's (e.g. the 1x1 prediction convs of a head trained
with another number of classes) are skipped and reported, as are keys with no place in the model
and model keys left untouched (e.g. attention inserted into a plain pretrained detector).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from attnzoo.detection.yolov4_tiny import ATTENTION_SLOTS, YoloV4Tiny
from attnzoo.models.attach import IdentityInit

__all__ = ["LoadReport", "load_reference_weights", "reference_to_attnzoo_key"]

_WHERE = "load_reference_weights"

#: reference prefix -> attnzoo prefix (backbone, neck, heads)
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("backbone.conv1.", "backbone.stem1."),
    ("backbone.conv2.", "backbone.stem2."),
    ("backbone.conv3.", "backbone.conv."),
    ("backbone.resblock_body1.", "backbone.block1."),
    ("backbone.resblock_body2.", "backbone.block2."),
    ("backbone.resblock_body3.", "backbone.block3."),
    ("conv_for_P5.", "conv_for_p5."),
    ("yolo_headP5.", "head_p5."),
    ("upsample.upsample.", "upsample."),
    ("yolo_headP4.", "head_p4."),
)

#: reference attention submodule -> attnzoo's (se, cbam, eca, ca "yolov4-tiny" presets)
_ATTENTION_PREFIXES: tuple[tuple[str, str], ...] = (
    ("fc.0.", "fc1."),
    ("fc.2.", "fc2."),  # se_block
    ("channelattention.fc1.", "channel.fc1."),
    ("channelattention.fc2.", "channel.fc2."),
    ("spatialattention.conv1.", "spatial.conv."),  # cbam_block
    ("conv_1x1.", "conv1."),
    ("bn.", "bn1."),
    ("F_h.", "conv_h."),
    ("F_w.", "conv_w."),  # CA
)  # eca_block's "conv." is already ours

#: the class-count-dependent 1x1 prediction convs: shape mismatches there are expected
_HEAD_OUTPUTS = ("head_p5.1.", "head_p4.1.")


@dataclass
class LoadReport:
    """What :func:`load_reference_weights` did.

    Attributes:
        mapped: source key -> model key for every tensor loaded.
        missing: model keys with no source tensor (they keep their values), e.g. the attention
            modules inserted into a plain pretrained detector.
        unexpected: source keys with no place in the model.
        mismatched: ``(model key, source shape, model shape)`` of tensors skipped because the
            shapes differ (e.g. a head trained with another number of classes); they keep
            their values too.
    """

    mapped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"loaded {len(self.mapped)} tensors; {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape mismatches"
        ]
        for title, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mismatched", [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched]),
        ):
            if items:
                shown = ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")
                lines.append(f"  {title}: {shown}")
        return "\n".join(lines)


def reference_to_attnzoo_key(key: str) -> str:
    """The attnzoo name of a reference (bubbliiiing/yolov4-tiny-pytorch) state-dict key.

    Keys of neither known prefix (attnzoo's own, unknown ones) are returned unchanged. Attention
    keys are given without any :class:`~attnzoo.models.IdentityInit` ``attn.`` level.
    """
    for ref, ours in _PREFIXES:
        if key.startswith(ref):
            return ours + key[len(ref) :]
    slot, _, inner = key.partition(".")
    if slot in ATTENTION_SLOTS and inner:
        for ref, ours in _ATTENTION_PREFIXES:
            if inner.startswith(ref):
                return f"{slot}.{ours}{inner[len(ref) :]}"
    return key


def _candidates(key: str, model: YoloV4Tiny) -> list[str]:
    """Model keys ``key`` (already in attnzoo names) may load into, best first."""
    slot, _, inner = key.partition(".")
    if slot not in ATTENTION_SLOTS or not inner:
        return [key]
    bare = inner[len("attn.") :] if inner.startswith("attn.") else inner
    if isinstance(getattr(model, slot), IdentityInit):
        return [f"{slot}.attn.{bare}", f"{slot}.{inner}"]
    return [f"{slot}.{bare}", f"{slot}.{inner}"]


def _fit(src: Tensor, dst: Tensor) -> Tensor | None:
    """``src`` in ``dst``'s shape: equal shapes, or a 1x1 conv weight for a linear one."""
    if src.shape == dst.shape:
        return src
    squeeze = [s for i, s in enumerate(src.shape) if i < 2 or s != 1]
    if src.dim() > dst.dim() and tuple(squeeze) == tuple(dst.shape):
        return src.reshape(dst.shape)
    return None


def _read(source: Mapping[str, Tensor] | str | os.PathLike[str]) -> dict[str, Tensor]:
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{_WHERE}: no weights file at {str(path)!r}")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
            loaded = loaded["state_dict"]  # a training checkpoint
        source = loaded
    if not isinstance(source, Mapping):
        raise TypeError(
            f"{_WHERE}: expected a state dict (a mapping of names to tensors) or a "
            f"path to one, got {type(source).__name__}"
        )
    state = {}
    for key, value in source.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise TypeError(
                f"{_WHERE}: state dict entries must be str -> Tensor; entry "
                f"{key!r} is {type(value).__name__}"
            )
        state[key] = value
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _is_backbone_or_neck(key: str) -> bool:
    slot = key.partition(".")[0]
    return (
        slot not in ATTENTION_SLOTS
        and not key.startswith(_HEAD_OUTPUTS)
        and not key.endswith("num_batches_tracked")
    )


def load_reference_weights(
    model: YoloV4Tiny,
    state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike[str],
    *,
    strict_backbone: bool = True,
) -> LoadReport:
    """Load a YOLOv4-tiny state dict (the reference's layout or ours) into ``model``.

    Args:
        model: the detector to fill, with any attention (``phi``, ``attention=``, identity
            wrappers).
        state_dict_or_path: a state dict, or the path of a file saved with ``torch.save``
            (read with ``weights_only=True``; a checkpoint's ``"state_dict"`` entry is used).
        strict_backbone: raise if any backbone, neck or head 3x3 tensor of ``model`` is not
            loaded (missing or of another shape): the file is then not a YOLOv4-tiny state dict.
            The class-dependent 1x1 prediction convs, attention modules and BN
            ``num_batches_tracked`` counters are never required.

    Returns:
        a :class:`LoadReport`; tensors of another shape are skipped and reported, not loaded.

    Raises:
        TypeError: ``model`` is not a ``YoloV4Tiny``, or the source is not a state dict.
        ValueError: no file at the path; with ``strict_backbone``, backbone/neck tensors missing.
    """
    if not isinstance(model, YoloV4Tiny):
        raise TypeError(
            f"{_WHERE}: model must be an attnzoo.detection.YoloV4Tiny, got {type(model).__name__}"
        )
    source = _read(state_dict_or_path)
    target = model.state_dict()
    report = LoadReport()
    loaded: dict[str, Tensor] = {}
    for key, value in source.items():
        names = [n for n in _candidates(reference_to_attnzoo_key(key), model) if n in target]
        if not names:
            report.unexpected.append(key)
            continue
        name = names[0]
        if name in loaded:
            raise ValueError(
                f"{_WHERE}: two source keys map to {name!r} (a state dict mixing "
                "the reference's layout and attnzoo's?)"
            )
        fitted = _fit(value, target[name])
        if fitted is None:
            report.mismatched.append((name, tuple(value.shape), tuple(target[name].shape)))
            continue
        loaded[name] = fitted
        report.mapped[key] = name
    skipped = {name for name, _, _ in report.mismatched}
    report.missing = [k for k in target if k not in loaded and k not in skipped]
    if strict_backbone:
        absent = [k for k in target if k not in loaded and _is_backbone_or_neck(k)]
        if absent:
            raise ValueError(
                f"{_WHERE}: {len(absent)} backbone/neck tensors of the model were "
                f"not found with a matching shape (first: {', '.join(absent[:4])}); "
                "is this a YOLOv4-tiny state dict? Pass strict_backbone=False to "
                f"load it partially.\n{report}"
            )
    model.load_state_dict(loaded, strict=False)
    return report
