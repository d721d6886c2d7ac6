"""YOLOv4-tiny with an attention neck (CSPDarknet53-tiny backbone, FPN neck, two YOLO heads).

Bochkovskiy, Wang, Liao, "YOLOv4: Optimal Speed and Accuracy of Object Detection", arXiv 2020
(the tiny configuration: ``yolov4-tiny.cfg`` of AlexeyAB/darknet). The attention placement is the
one of the reference implementation (bubbliiiing/
yolov4-tiny-pytorch, ``nets/yolo.py``): one module on each backbone output, ``feat1`` (256
channels, stride 16) and ``feat2`` (512 channels, stride 32), and one on the upsampled P5 branch
(128 channels, stride 16) before it is concatenated with ``feat1``. ``phi`` selects the module as
in the reference: 0 none, 1 SE, 2 CBAM, 3 ECA, 4 Coordinate Attention (the reference's
``CA_Block``: the ``ca`` preset ``"yolov4-tiny"``).

Pretrained weights: :func:`attnzoo.detection.load_reference_weights` loads the reference's state
dicts (plain or with attention) into any ``YoloV4Tiny``; ``attention_init="identity"`` makes the
inserted modules start as the identity so a pretrained detector starts where it was.

Written from the architecture's description; layer by layer:

* ``ConvBlock(c_in, c_out, k, s)``: k x k conv (padding k // 2, no bias) -> BN -> LeakyReLU(0.1).
* Backbone: ConvBlock(3, 32, 3, 2) -> ConvBlock(32, 64, 3, 2) -> three CSP blocks (64, 128, 256)
  -> ConvBlock(512, 512, 3). A CSP block with width ``c``: ``a = ConvBlock(c_in, c, 3)``; take
  the *second* half of ``a``'s channels; ``b = ConvBlock(c/2, c/2, 3)`` on it, ``d =
  ConvBlock(c/2, c/2, 3)(b)``; ``feat = ConvBlock(c, c, 1)(cat[d, b])``; output
  ``maxpool2x2(cat[a, feat])`` (2c channels). ``feat1`` is the last CSP block's ``feat``.
* Neck: ``P5 = ConvBlock(512, 256, 1)(feat2)``; head P5: ConvBlock(256, 512, 3) -> 1x1 conv
  (bias) to ``A = 3 (5 + num_classes)``; upsample: ConvBlock(256, 128, 1) -> nearest x2;
  head P4: ConvBlock(384, 256, 3) on ``cat[up(P5), feat1]`` -> 1x1 conv (bias) to ``A``.

Parameter count with ``phi=0``: 6,056,606 for 80 classes and 5,918,006 for 20 classes, i.e. the
reference's 6.06 M / 5.92 M (``tests/detection/test_yolov4_tiny.py`` derives both from the layer
shapes above, which were read from the reference's ``nets/CSPdarknet53_tiny.py`` and
``nets/yolo.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo.models.attach import IdentityInit, _is_identity
from attnzoo.registry import create, info

__all__ = [
    "ANCHORS",
    "ANCHOR_MASKS",
    "ATTENTION_INITS",
    "ATTENTION_SLOTS",
    "PHI_ATTENTION",
    "CSPDarknet53Tiny",
    "YoloV4Tiny",
]

#: the reference's anchors (w, h) in pixels at 416x416 and the anchors each head uses
ANCHORS: tuple[tuple[int, int], ...] = (
    (10, 14),
    (23, 27),
    (37, 58),
    (81, 82),
    (135, 169),
    (344, 319),
)
ANCHOR_MASKS: tuple[tuple[int, ...], ...] = ((3, 4, 5), (1, 2, 3))  # P5 (stride 32), P4 (16)

#: the inserted modules' attribute names and channels (feat1, feat2, upsampled P5)
ATTENTION_SLOTS: dict[str, int] = {"feat1_att": 256, "feat2_att": 512, "upsample_att": 128}
#: accepted values of ``YoloV4Tiny(attention_init=...)``
ATTENTION_INITS: tuple[str, ...] = ("default", "identity")

#: phi -> (registry name, preset): the reference's module variants where a preset exists
PHI_ATTENTION: dict[int, tuple[str, str | None] | None] = {
    0: None,
    1: ("se", "yolov4-tiny"),  # SE, reduction 16, FCs without bias
    2: ("cbam", "yolov4-tiny"),  # CBAM, reduction 8, no MLP bias, [avg, max], no BN
    3: ("eca", "yolov4-tiny"),  # ECA with the adaptive kernel size (gamma 2, b 1)
    4: ("ca", "yolov4-tiny"),  # CA_Block: reduction 16, mip = C // 16, no bias, BN, ReLU
}


class ConvBlock(nn.Sequential):
    """Conv (no bias, 'same' padding) -> BatchNorm -> LeakyReLU(0.1)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.LeakyReLU(0.1)


class CSPTinyBlock(nn.Module):
    """CSPDarknet53-tiny stage: split-half residual path, 1x1 fuse, concat, 2x2 max-pool.

    Returns ``(pooled, feat)``: ``pooled`` has ``2 * channels`` channels at half resolution,
    ``feat`` (the fused path before the concat) has ``channels`` at the input resolution.
    """

    def __init__(self, c_in: int, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = ConvBlock(c_in, channels, 3)
        self.conv2 = ConvBlock(half, half, 3)
        self.conv3 = ConvBlock(half, half, 3)
        self.conv4 = ConvBlock(channels, channels, 1)
        self.pool = nn.MaxPool2d(2, 2)
        self.half_channels = half  # not ``self.half``: that would hide nn.Module.half()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        route = self.conv1(x)
        b = self.conv2(route[:, self.half_channels :])
        d = self.conv3(b)
        feat = self.conv4(torch.cat([d, b], dim=1))
        return self.pool(torch.cat([route, feat], dim=1)), feat


class CSPDarknet53Tiny(nn.Module):
    """Backbone: returns ``feat1`` (256 ch, stride 16) and ``feat2`` (512 ch, stride 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem1 = ConvBlock(3, 32, 3, 2)
        self.stem2 = ConvBlock(32, 64, 3, 2)
        self.block1 = CSPTinyBlock(64, 64)
        self.block2 = CSPTinyBlock(128, 128)
        self.block3 = CSPTinyBlock(256, 256)
        self.conv = ConvBlock(512, 512, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.stem2(self.stem1(x))
        x, _ = self.block1(x)
        x, _ = self.block2(x)
        x, feat1 = self.block3(x)
        return feat1, self.conv(x)


def _attention_factory(
    attention: Any, phi: int | None, kwargs: dict[str, Any]
) -> Callable[[int], nn.Module] | None:
    if phi is not None:
        if attention is not None:
            raise ValueError("YoloV4Tiny: give attention= or phi=, not both")
        if phi not in PHI_ATTENTION:
            raise ValueError(
                f"YoloV4Tiny: phi must be one of {sorted(PHI_ATTENTION)} "
                f"(0 none, 1 SE, 2 CBAM, 3 ECA, 4 CA), got {phi!r}"
            )
        choice = PHI_ATTENTION[phi]
        if choice is None:
            if kwargs:
                raise ValueError("YoloV4Tiny: attention keywords given with phi=0 (no attention)")
            return None
        name, preset = choice
        if preset is not None and preset not in info(name).presets:
            preset = None
        if preset is not None:
            kwargs = {"preset": preset, **kwargs}
        attention = name
    if attention is None:
        if kwargs:
            raise ValueError("YoloV4Tiny: attention keywords given without attention=")
        return None
    return lambda channels: create(attention, channels, **kwargs)


def _make_attention(
    factory: Callable[[int], nn.Module] | None, channels: int, attention_init: str
) -> nn.Module:
    """One inserted module: ``nn.Identity`` without attention, else the factory's module,
    wrapped in ``IdentityInit`` for ``attention_init="identity"`` unless already the identity."""
    if factory is None:
        return nn.Identity()
    module = factory(channels)
    if attention_init == "identity" and not _is_identity(module, channels, None, None):
        module = IdentityInit(module)
    return module


class YoloV4Tiny(nn.Module):
    """YOLOv4-tiny with optional attention on feat1, feat2 and the upsampled P5 branch.

    Args:
        num_classes: object classes; each head predicts ``num_anchors * (5 + num_classes)``
            channels per cell (box 4, objectness 1, class scores).
        attention: ``None``, a registry name (``"se"``, ``"cbam"``, ``"eca"``, ``"ca"``, any
            other), a module class or a factory; built with the official defaults unless
            keywords (``preset="yolov4-tiny"``, ``reduction=8``...) are given.
        phi: the reference's switch, 0-4 = none / SE / CBAM / ECA / CA, using the reference's
            module variants (the ``"yolov4-tiny"`` presets of ``se``, ``cbam``, ``eca``, ``ca``).
            Exclusive with ``attention``.
        num_anchors: anchors per head cell (3 in YOLOv4-tiny).
        attention_init: ``"default"`` (the modules' own initialisation, as the reference) or
            ``"identity"``: each inserted module is wrapped in
            :class:`attnzoo.models.IdentityInit`, ``x + alpha * (att(x) - x)`` with a learnable
            scalar ``alpha = 0``, so the network computes exactly the plain detector's function at
            initialisation and fine-tuning from plain pretrained weights starts where they were.
            A deviation from the reference (off by default); modules that already are the
            identity at initialisation are left unwrapped. Their keys then read
            ``feat1_att.attn.*`` and ``feat1_att.alpha``.
        init: ``"backbone"`` (default): the reference backbone's initialisation of the
            detector's own layers, convs N(0, sqrt(2 / (k*k*C_out))), BatchNorm weight 1 and bias
            0, the attention modules keeping theirs; ``"scratch"``: the reference's ``weights_init``
            for training from scratch (bubbliiiing/yolov4-tiny-pytorch ``train.py``, applied when
            no pretrained weights are loaded), over the whole network attention included: every
            conv weight N(0, 0.02), every BatchNorm weight N(1, 0.02) and bias 0. ``"scratch"``
            starts the heads near ``tw = th = 0`` (boxes the size of their anchor) and objectness
            near 0.5, which box regression from scratch needs.
        **attention_kwargs: keywords for the attention modules.

    Input ``(B, 3, H, W)`` with ``H`` and ``W`` multiples of 32. Output: a tuple
    ``(p5, p4)`` of raw head maps, ``(B, A, H/32, W/32)`` and ``(B, A, H/16, W/16)`` (13x13 and
    26x26 at 416x416), in the reference's order. The inserted modules are ``feat1_att``,
    ``feat2_att`` and ``upsample_att`` (``nn.Identity`` without attention).
    """

    feat1_att: nn.Module
    feat2_att: nn.Module
    upsample_att: nn.Module

    def __init__(
        self,
        num_classes: int,
        attention: Any = None,
        *,
        phi: int | None = None,
        num_anchors: int = 3,
        attention_init: str = "default",
        init: str = "backbone",
        **attention_kwargs: Any,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("num_anchors", num_anchors)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"YoloV4Tiny: {name} must be a positive integer, got {value!r}")
        if attention_init not in ATTENTION_INITS:
            raise ValueError(
                f"YoloV4Tiny: attention_init must be one of {ATTENTION_INITS}, got "
                f"{attention_init!r}"
            )
        if init not in ("backbone", "scratch"):
            raise ValueError(f"YoloV4Tiny: init must be 'backbone' or 'scratch', got {init!r}")
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        out = num_anchors * (5 + num_classes)
        factory = _attention_factory(attention, phi, dict(attention_kwargs))
        self.backbone = CSPDarknet53Tiny()
        self.conv_for_p5 = ConvBlock(512, 256, 1)
        self.head_p5 = nn.Sequential(ConvBlock(256, 512, 3), nn.Conv2d(512, out, 1))
        self.upsample = nn.Sequential(
            ConvBlock(256, 128, 1), nn.Upsample(scale_factor=2, mode="nearest")
        )
        self.head_p4 = nn.Sequential(ConvBlock(384, 256, 3), nn.Conv2d(256, out, 1))
        self._init_weights()
        # attention modules keep their own initialisation (e.g. zero-initialised branches)
        for attr, channels in ATTENTION_SLOTS.items():
            setattr(self, attr, _make_attention(factory, channels, attention_init))
        if init == "scratch":
            self._scratch_init()

    def _init_weights(self) -> None:
        # as the reference backbone: N(0, sqrt(2 / (k*k*C_out))) convs, BN weight 1 / bias 0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _scratch_init(self) -> None:
        # the reference's weights_init: every module whose class name contains "Conv"
        for m in self.modules():
            name = type(m).__name__
            weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
            if "Conv" in name and isinstance(weight, nn.Parameter):
                nn.init.normal_(weight, 0.0, 0.02)
            elif "BatchNorm2d" in name and isinstance(weight, Tensor) and isinstance(bias, Tensor):
                nn.init.normal_(weight, 1.0, 0.02)
                nn.init.zeros_(bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"YoloV4Tiny: expected input (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % 32 != 0 or x.shape[-1] % 32 != 0:
            raise ValueError(
                "YoloV4Tiny: input height and width must be multiples of 32, got "
                f"{x.shape[-2]}x{x.shape[-1]}"
            )
        feat1, feat2 = self.backbone(x)
        feat1 = self.feat1_att(feat1)
        p5 = self.conv_for_p5(self.feat2_att(feat2))
        out_p5 = self.head_p5(p5)
        up = self.upsample_att(self.upsample(p5))
        out_p4 = self.head_p4(torch.cat([up, feat1], dim=1))
        return out_p5, out_p4
