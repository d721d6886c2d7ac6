"""Coordinate Attention.

Hou, Zhou, Feng, "Coordinate Attention for Efficient Mobile Network Design", CVPR 2021.
Official code: https://github.com/houqb/CoordAttention
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.ops.divisible import make_divisible
from attnzoo.ops.query import Query
from attnzoo.ops.validation import (
    check_choice,
    check_input,
    check_positive_float,
    check_positive_int,
)
from attnzoo.registry import register

__all__ = ["CoordinateAttention", "ca_param_count"]

_NAME = "CoordinateAttention"
#: ``act`` keyword -> activation after the shared conv + BN (official h_swish; ReLU in the
#: bubbliiiing/yolov4-tiny-pytorch ``CA_Block``)
_ACTIVATIONS: dict[str, type[nn.Module]] = {"hardswish": nn.Hardswish, "relu": nn.ReLU}


def _mip(channels: int, reduction: float, min_mip: int, divisor: int | None) -> int:
    """Hidden width: ``max(min_mip, C // r)`` (official) or timm's rounding to ``divisor``."""
    if divisor is None:
        return max(min_mip, int(channels / reduction))
    return max(min_mip, make_divisible(channels / reduction, divisor, round_limit=0.0))


def _check_args(
    channels: int, reduction: float, min_mip: int, divisor: int | None, mip: int | None, act: str
) -> int:
    channels = check_positive_int(_NAME, "channels", channels)
    check_choice(_NAME, "act", act, _ACTIVATIONS)
    check_positive_float(_NAME, "reduction", reduction)
    check_positive_int(_NAME, "min_mip", min_mip)
    if divisor is not None:
        check_positive_int(_NAME, "divisor", divisor)
    if mip is not None:
        return check_positive_int(_NAME, "mip", mip)
    return _mip(channels, reduction, min_mip, divisor)


def ca_param_count(
    channels: int,
    *,
    reduction: float = 32,
    min_mip: int = 8,
    divisor: int | None = None,
    mip: int | None = None,
    bias: bool = True,
    act: str = "hardswish",
) -> int:
    """Closed-form parameter count of :class:`CoordinateAttention` (same keywords).

    ``C m (+ m)`` (shared conv) ``+ 2m`` (BN) ``+ 2 (m C (+ C))`` (two output convs), ``m = mip``
    (``act`` has no parameters).
    """
    m = _check_args(channels, reduction, min_mip, divisor, mip, act)
    b = 1 if bias else 0
    return channels * m + b * m + 2 * m + 2 * (m * channels + b * channels)


@register(
    "ca",
    family="hybrid",
    paper="Coordinate Attention for Efficient Mobile Network Design",
    venue="CVPR",
    year=2021,
    code="https://github.com/houqb/CoordAttention",
    presets={
        # timm.layers.CoordAttn defaults: rd = make_divisible(C / 16 * 2/3, 8, round_limit=0).
        "timm": {"reduction": 24, "divisor": 8, "bias": False},
        # bubbliiiing/yolov4-tiny-pytorch CA_Block (phi=4): mip = C // 16 without a floor, no
        # conv biases, BN, ReLU.
        "yolov4-tiny": {"reduction": 16, "min_mip": 1, "bias": False, "act": "relu"},
    },
    param_count=ca_param_count,
    spatial_dims=2,
    example_channels=64,
)
class CoordinateAttention(nn.Module):
    """Coordinate attention (CA): channel attention factorised along height and width.

    Paper: Hou et al., "Coordinate Attention for Efficient Mobile Network Design", CVPR 2021.
    Registry name ``"ca"`` (coordinate attention).

    Equation. Directional pooling: ``z_h = mean_W(x)`` ``(B, C, H, 1)`` and ``z_w = mean_H(x)``
    ``(B, C, 1, W)``; concatenate along space to ``(B, C, H + W, 1)``; shared 1x1 conv
    ``C -> mip`` (bias), BatchNorm, h_swish (``v * ReLU6(v + 3) / 6``, the same function as
    ``nn.Hardswish``); split back into the H and W parts; two 1x1 convs ``mip -> C`` (bias) and
    sigmoids give ``a_h (B, C, H, 1)`` and ``a_w (B, C, 1, W)``; ``y = x * a_w * a_h``.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.

    Defaults from the official ``CoordAtt`` (houqb/CoordAttention): ``reduction=32``,
    ``mip = max(8, C // 32)``, biases in all three convs, BatchNorm, h_swish, sigmoid gates. The
    official code pools with ``AdaptiveAvgPool2d((None, 1))``, which breaks dynamic-size ONNX
    export; means over dimensions are used here (same values).

    Attention for visualisation: the gates are the submodules ``self.gate_h`` and ``self.gate_w``
    (``nn.Sigmoid``; hooks capture ``a_h (B, C, H, 1)`` and ``a_w (B, C, 1, W)``), and
    :meth:`attention_map` returns their product ``a_h * a_w`` ``(B, C, H, W)``.

    Variants by keyword: timm's ``CoordAttn`` (``timm.layers.coord_attn``, checked with timm 1.0.31;
    its attention type ``"coord"``) defaults are ``reduction=24``
    (``rd_ratio 1/16 * se_factor 2/3``), ``divisor=8`` (round to the nearest multiple of 8,
    at least 8) and ``bias=False``; preset ``"timm"``. ``mip`` sets the hidden width directly.
    The ``CA_Block`` of bubbliiiing/yolov4-tiny-pytorch (``nets/attention.py``, its ``phi=4``
    neck module) is ``reduction=16``, ``min_mip=1`` (``mip = C // 16``, no floor), ``bias=False``
    (BatchNorm kept) and ``act="relu"``; preset ``"yolov4-tiny"``.

    Args:
        channels: input (and output) channels ``C``.
        reduction: ``r`` in ``mip = max(min_mip, C // r)``.
        min_mip: smallest hidden width (official 8).
        divisor: ``None`` floors ``C / r`` (official); an integer rounds ``C / r`` to the nearest
            multiple of it (timm).
        mip: explicit hidden width (overrides ``reduction``, ``min_mip`` and ``divisor``).
        bias: bias in the three 1x1 convolutions.
        act: activation after the shared conv and BN: ``"hardswish"`` (official h_swish) or
            ``"relu"``.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: float = 32,
        min_mip: int = 8,
        divisor: int | None = None,
        mip: int | None = None,
        bias: bool = True,
        act: str = "hardswish",
    ) -> None:
        super().__init__()
        self.channels = channels
        self.mip = m = _check_args(channels, reduction, min_mip, divisor, mip, act)
        self.conv1 = nn.Conv2d(channels, m, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(m)
        self.act = _ACTIVATIONS[act]()
        self.conv_h = nn.Conv2d(m, channels, 1, bias=bias)
        self.conv_w = nn.Conv2d(m, channels, 1, bias=bias)
        self.gate_h = nn.Sigmoid()
        self.gate_w = nn.Sigmoid()

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two gates ``a_h (B, C, H, 1)`` and ``a_w (B, C, 1, W)``."""
        check_input(_NAME, x, self.channels)
        h, w = x.shape[2], x.shape[3]
        z_h = x.mean(3, keepdim=True)  # (B, C, H, 1): average over the width
        z_w = x.mean(2, keepdim=True).transpose(2, 3)  # (B, C, W, 1): average over the height
        y = self.act(self.bn1(self.conv1(torch.cat([z_h, z_w], dim=2))))  # (B, mip, H + W, 1)
        y_h, y_w = torch.split(y, [h, w], dim=2)
        a_h = self.gate_h(self.conv_h(y_h))
        a_w = self.gate_w(self.conv_w(y_w.transpose(2, 3)))
        return a_h, a_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x * a_w * a_h`` (the official order of the two products)."""
        a_h, a_w = self.gates(x)
        return x * a_w * a_h

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The combined gate ``a_h * a_w`` ``(B, C, H, W)`` for input ``x``.

        Use it in eval mode: in train mode the BatchNorm uses (and updates) batch statistics.
        """
        a_h, a_w = self.gates(x)
        return a_h * a_w

    def attention_maps(self, x: torch.Tensor, *, query: Query = "mean") -> dict[str, torch.Tensor]:
        """``query`` is ignored. ``spatial`` ``(B, H, W)``: ``mean_c(a_h a_w)``, the per-channel
        gate ``a_h[c, i] a_w[c, j]`` averaged over channels; ``a_h`` ``(B, C, H)`` and ``a_w``
        ``(B, C, W)``: the height and width gates."""
        a_h, a_w = self.gates(x)  # (B, C, H, 1), (B, C, 1, W)
        a_h, a_w = a_h[..., 0], a_w[:, :, 0]
        spatial = torch.einsum("bch,bcw->bhw", a_h, a_w) / x.shape[1]  # no (B, C, H, W) tensor
        return {"spatial": spatial, "a_h": a_h, "a_w": a_w}
