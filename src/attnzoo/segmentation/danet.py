"""DANet for semantic segmentation: a dilated ResNet and the dual attention head.

Fu, Liu, Tian, Li, Bao, Fang, Lu, "Dual Attention Network for Scene Segmentation", CVPR 2019.
Official code: https://github.com/junfu1115/DANet (``encoding/models/sseg/danet.py``);
mmsegmentation's ``DAHead`` (``mmseg/models/decode_heads/da_head.py``).

Interface::

    model = DANet(19, backbone="resnet50", attention="dual_attention", preset="official")
    model.train(); out = model(x)   # {"out", "pam", "cam"} (+ "aux" with preset="mmseg"),
    model.eval();  out = model(x)   # {"out"}; every tensor (B, num_classes, H, W) at x's size
    SEGMENTATION_MODELS["danet_small"](11, attention=None)   # FCN baseline on the CPU trunk
    module, inp = model.attention_input(x, "pam")  # the PAM and its input, for attention maps
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.registry import create
from attnzoo.segmentation.backbones import dilated_resnet

__all__ = [
    "DANet",
    "DANetHead",
    "FCNAuxHead",
    "HEADS",
    "PRESETS",
    "SEGMENTATION_MODELS",
    "danet_resnet50",
    "danet_resnet101",
    "danet_small",
    "danet_head_param_count",
]

#: ``attention`` values with a fixed meaning; any other string is a registry module name
HEADS = ("dual_attention", "fcn", "pam", "cam")
#: preset -> (auxiliary FCN head on layer3, align_corners)
PRESETS = {"official": (False, True), "mmseg": (True, False)}


def conv_bn_relu(cin: int, cout: int, kernel_size: int = 3) -> nn.Sequential:
    """``Conv(k, no bias) + BN + ReLU``, the head's building block."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def classifier(cin: int, num_classes: int, dropout: float) -> nn.Sequential:
    """``Dropout2d + Conv1x1(bias)`` to class logits (the official ``conv6/7/8``)."""
    return nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(cin, num_classes, 1))


class _Branch(nn.Module):
    """``refine(attention(reduce(x)))``: 3x3 conv-BN-ReLU ``C -> C/4``, the attention slot, 3x3
    conv-BN-ReLU (official ``conv5a``, ``sa``, ``conv51``), and the branch's own classifier."""

    def __init__(
        self, cin: int, inter: int, attention: nn.Module, num_classes: int, dropout: float
    ) -> None:
        super().__init__()
        self.reduce = conv_bn_relu(cin, inter)
        self.attention = attention
        self.refine = conv_bn_relu(inter, inter)
        self.classifier = classifier(inter, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.refine(self.attention(self.reduce(x)))


class DANetHead(nn.Module):
    """DANet's segmentation head, with the attention slot open to any module.

    ``attention="dual_attention"`` (default) is the official head: two branches on the same
    input, each ``3x3 conv-BN-ReLU (C -> C/4)``, an attention module (PAM in ``branches["pam"]``,
    CAM in ``branches["cam"]``), ``3x3 conv-BN-ReLU``; the fused output classifies the sum of the
    two branches, and each branch has its own classifier (``Dropout2d(0.1) + 1x1 conv`` each, the
    official ``conv8``, ``conv6``, ``conv7``). ``forward`` returns ``{"out", "pam", "cam"}`` in
    training and ``{"out"}`` in eval.

    Any other ``attention`` builds ONE such branch (``branches["main"]``) whose classifier gives
    ``"out"``: ``"pam"`` or ``"cam"`` (the paper's ablation rows, FCN + PAM / + CAM), any
    registry name (e.g. ``"nonlocal2d"``, built with ``attention_kwargs``), or ``None`` /
    ``"fcn"``: an identity in the slot, the dilated-FCN baseline (two conv-BN-ReLU and a
    classifier, as mmsegmentation's ``FCNHead(num_convs=2, concat_input=False)``), so that the
    arms of a comparison differ by the attention module alone.

    Args:
        in_channels: channels of the backbone feature (2048 for ResNet-50/101 layer4).
        num_classes: classes to predict.
        attention: see above.
        attention_kwargs: keyword arguments of the attention module(s); for the dual head,
            ``reduction`` goes to PAM and ``energy`` to CAM.
        dropout: dropout probability before each classifier (0.1).
        inter_channels: width of the branches, ``in_channels // 4`` by default (512).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        attention: str | Callable[..., nn.Module] | None = "dual_attention",
        attention_kwargs: Mapping[str, Any] | None = None,
        dropout: float = 0.1,
        inter_channels: int | None = None,
    ) -> None:
        super().__init__()
        for arg, v in (("in_channels", in_channels), ("num_classes", num_classes)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DANetHead: {arg} must be an integer >= 1; got {v!r}")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"DANetHead: dropout must be a number in [0, 1); got {dropout!r}")
        inter = in_channels // 4 if inter_channels is None else inter_channels
        if not isinstance(inter, int) or inter < 1:
            raise ValueError(
                f"DANetHead: inter_channels must be an integer >= 1 (in_channels // 4 by "
                f"default); got {inter!r} for in_channels={in_channels}"
            )
        kw = dict(attention_kwargs or {})
        self.attention = "fcn" if attention is None else attention
        self.dual = self.attention == "dual_attention"
        if self.dual:
            pam_kw = {k: kw.pop(k) for k in ("reduction",) if k in kw}
            cam_kw = {k: kw.pop(k) for k in ("energy",) if k in kw}
            if kw:
                raise ValueError(
                    "DANetHead: attention_kwargs of the dual head may hold 'reduction' (PAM) "
                    f"and 'energy' (CAM); got {sorted(kw)}"
                )
            self.branches = nn.ModuleDict(
                {
                    "pam": _Branch(
                        in_channels, inter, create("pam", inter, **pam_kw), num_classes, dropout
                    ),
                    "cam": _Branch(
                        in_channels, inter, create("cam", inter, **cam_kw), num_classes, dropout
                    ),
                }
            )
            self.classifier = classifier(inter, num_classes, dropout)
        else:
            module = (
                nn.Identity() if self.attention == "fcn" else create(self.attention, inter, **kw)
            )
            self.branches = nn.ModuleDict(
                {"main": _Branch(in_channels, inter, module, num_classes, dropout)}
            )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.dual:
            branch = cast(_Branch, self.branches["main"])
            return {"out": branch.classifier(branch(x))}
        pam, cam = cast(_Branch, self.branches["pam"]), cast(_Branch, self.branches["cam"])
        p, c = pam(x), cam(x)
        out = {"out": self.classifier(p + c)}
        if self.training:
            out["pam"] = pam.classifier(p)
            out["cam"] = cam.classifier(c)
        return out


def danet_head_param_count(
    in_channels: int, num_classes: int, *, inter_channels: int | None = None, reduction: int = 8
) -> int:
    """Parameters of the dual :class:`DANetHead`: two ``3x3`` reductions and two ``3x3``
    refinements (each with BN), PAM ``2 (d i + d) + i^2 + i + 1`` (``d = i // reduction``), CAM 1,
    three ``1x1`` classifiers with bias."""
    i = in_channels // 4 if inter_channels is None else inter_channels
    d = max(1, i // reduction)
    convs = 2 * (9 * in_channels * i + 2 * i) + 2 * (9 * i * i + 2 * i)
    pam = 2 * (i * d + d) + i * i + i + 1
    return convs + pam + 1 + 3 * (i * num_classes + num_classes)


class FCNAuxHead(nn.Module):
    """mmsegmentation's auxiliary ``FCNHead`` on layer3: ``3x3 conv-BN-ReLU (C -> C/4)``,
    ``Dropout2d(0.1)``, ``1x1`` classifier (1024 -> 256 -> classes for ResNet-50/101)."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_channels, max(1, in_channels // 4))
        self.classifier = classifier(max(1, in_channels // 4), num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.conv(x))


class DANet(nn.Module):
    """DANet: dilated ResNet + :class:`DANetHead`, outputs upsampled to the input size.

    ``forward(x) -> dict`` of ``(B, num_classes, H, W)`` logits: ``"out"`` always; in training
    also ``"pam"`` and ``"cam"`` (dual head) and ``"aux"`` (``preset="mmseg"``). Train with
    :class:`~attnzoo.segmentation.SegmentationLoss` of the same preset.

    Presets:

    - ``"official"`` (junfu1115/DANet): no auxiliary head, bilinear upsampling with
      ``align_corners=True`` (PyTorch-Encoding's ``up_kwargs``), losses 1/1/1 on out/pam/cam.
    - ``"mmseg"`` (mmsegmentation ``danet_r50-d8``): plus an :class:`FCNAuxHead` on layer3
      (loss weight 0.4), ``align_corners=False``. (mmsegmentation's R-50-D8 backbone has a deep
      stem, ResNetV1c; here the trunk is torchvision's in both presets.)

    Args:
        num_classes: classes to predict.
        backbone: ``"resnet50"``, ``"resnet101"`` or ``"small"`` (see
            :func:`~attnzoo.segmentation.backbones.dilated_resnet`).
        output_stride: 8 (DANet), 16 or 32.
        attention: the head's attention (see :class:`DANetHead`); ``None`` = FCN baseline.
        attention_kwargs: the attention module's keyword arguments.
        preset: ``"official"`` or ``"mmseg"``.
        align_corners: overrides the preset's upsampling mode.
        multi_grid: layer4 per-block dilations, e.g. ``(4, 8, 16)`` (the released DANet-101).
        weights_backbone: ImageNet weights of the torchvision trunk (nothing is downloaded).
        dropout: classifier dropout (0.1).
        inter_channels: head width (``C4 // 4`` by default).
        backbone_kwargs: extra arguments of the trunk (``widths``, ``blocks`` for ``"small"``).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: str = "resnet50",
        output_stride: int = 8,
        attention: str | Callable[..., nn.Module] | None = "dual_attention",
        attention_kwargs: Mapping[str, Any] | None = None,
        preset: str = "official",
        align_corners: bool | None = None,
        multi_grid: Sequence[int] | None = None,
        weights_backbone: Any = None,
        dropout: float = 0.1,
        inter_channels: int | None = None,
        backbone_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(
                f"DANet: preset must be one of {', '.join(map(repr, PRESETS))}; got {preset!r}"
            )
        if align_corners is not None and not isinstance(align_corners, bool):
            raise TypeError(
                f"DANet: align_corners must be True, False or None; got {align_corners!r}"
            )
        aux, default_corners = PRESETS[preset]
        self.preset = preset
        self.num_classes = num_classes
        self.align_corners = default_corners if align_corners is None else align_corners
        self.backbone = dilated_resnet(
            backbone,
            output_stride=output_stride,
            multi_grid=multi_grid,
            weights=weights_backbone,
            **dict(backbone_kwargs or {}),
        )
        c3, c4 = self.backbone.channels
        self.head = DANetHead(
            c4,
            num_classes,
            attention=attention,
            attention_kwargs=attention_kwargs,
            dropout=dropout,
            inter_channels=inter_channels,
        )
        self.aux_head = FCNAuxHead(c3, num_classes, dropout) if aux else None

    def _up(self, logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        c3, c4 = self.backbone(x)
        out = self.head(c4)
        if self.training and self.aux_head is not None:
            out["aux"] = self.aux_head(c3)
        return {k: self._up(v, size) for k, v in out.items()}

    @torch.no_grad()
    def attention_input(
        self, x: torch.Tensor, branch: str | None = None
    ) -> tuple[nn.Module, torch.Tensor]:
        """``(module, input)``: the head's attention module of ``branch`` (``"pam"``/``"cam"``
        for the dual head, ``"main"`` otherwise; ``None`` picks the first) and the tensor it
        receives for ``x``; e.g. ``module.affinity_rows(input)`` or
        ``module.attention_map(input)`` for a PAM."""
        names = list(self.head.branches)
        name = names[0] if branch is None else branch
        if name not in names:
            raise ValueError(f"DANet.attention_input: branch must be one of {names}; got {name!r}")
        b: Any = self.head.branches[name]
        return b.attention, b.reduce(self.backbone(x)[1])


def _builder(backbone: str, doc: str, **defaults: Any) -> Callable[..., DANet]:
    def build(
        num_classes: int,
        *,
        attention: str | Callable[..., nn.Module] | None = "dual_attention",
        **kw: Any,
    ) -> DANet:
        return DANet(num_classes, backbone=backbone, attention=attention, **{**defaults, **kw})

    build.__name__ = build.__qualname__ = f"danet_{backbone}"
    build.__doc__ = doc
    return build


danet_small = _builder(
    "small",
    """DANet on the CPU-sized ``"small"`` trunk (channels 64/128 at layer3/4, head width 32),
    output stride 8; ``attention=None`` is the FCN baseline. Keyword arguments go to
    :class:`DANet`.""",
)
danet_resnet50 = _builder(
    "resnet50", """DANet-50: dilated ResNet-50 (output stride 8) + :class:`DANetHead`."""
)
danet_resnet101 = _builder(
    "resnet101", """DANet-101: dilated ResNet-101 (output stride 8) + :class:`DANetHead`."""
)

#: name -> builder(num_classes, attention=..., **DANet kwargs)
SEGMENTATION_MODELS: dict[str, Callable[..., nn.Module]] = {
    "danet_small": danet_small,
    "danet_resnet50": danet_resnet50,
    "danet_resnet101": danet_resnet101,
}
