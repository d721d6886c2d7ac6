"""Convolutional Block Attention Module (CBAM) and its two gates.

Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", ECCV 2018.
Official code: https://github.com/Jongchan/attention-module (``MODELS/cbam.py``,
``MODELS/model_resnet.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo.ops.divisible import make_divisible
from attnzoo.ops.query import Query
from attnzoo.ops.validation import (
    check_choice,
    check_input,
    check_odd_int,
    check_positive_float,
    check_positive_int,
)
from attnzoo.registry import register

__all__ = [
    "CBAM",
    "ChannelGate",
    "SpatialGate",
    "cbam_param_count",
    "channel_gate_param_count",
    "spatial_gate_param_count",
]

_PAPER = dict(
    paper="CBAM: Convolutional Block Attention Module",
    venue="ECCV",
    year=2018,
    code="https://github.com/Jongchan/attention-module",
)
_POOL_ORDERS = ("max-mean", "mean-max")
_ORDERS = ("channel-spatial", "spatial-channel", "parallel")


def _hidden(channels: int, reduction: int, divisor: int | None) -> int:
    """MLP width: ``max(1, C // r)`` (official ``C // r``, guarded), or timm's rounding."""
    if divisor is None:
        return max(1, channels // reduction)
    return make_divisible(channels / reduction, divisor, round_limit=0.0)


def _check_channel_args(
    name: str, channels: int, reduction: int, mlp_bias: bool, divisor: int | None
) -> None:
    check_positive_int(name, "channels", channels)
    check_positive_int(name, "reduction", reduction)
    if not isinstance(mlp_bias, bool):
        raise TypeError(f"{name}: mlp_bias must be True or False, got {mlp_bias!r}")
    if divisor is not None:
        check_positive_int(name, "divisor", divisor)


def _check_spatial_args(
    name: str,
    channels: int,
    kernel_size: int,
    pool_order: str,
    spatial_norm: bool,
    norm_momentum: float,
    norm_weight_init: float,
) -> None:
    check_positive_int(name, "channels", channels)
    check_odd_int(name, "kernel_size", kernel_size)
    check_choice(name, "pool_order", pool_order, _POOL_ORDERS)
    if not isinstance(spatial_norm, bool):
        raise TypeError(f"{name}: spatial_norm must be True or False, got {spatial_norm!r}")
    check_positive_float(name, "norm_momentum", norm_momentum)
    if norm_momentum > 1:
        raise ValueError(f"{name}: norm_momentum must be in (0, 1], got {norm_momentum}")
    if isinstance(norm_weight_init, bool) or not isinstance(norm_weight_init, (int, float)):
        raise TypeError(f"{name}: norm_weight_init must be a real number, got {norm_weight_init!r}")


def channel_gate_param_count(
    channels: int, *, reduction: int = 16, mlp_bias: bool = True, divisor: int | None = None
) -> int:
    """``2 C h + h + C`` with MLP bias, ``2 C h`` without (``h`` the MLP width)."""
    _check_channel_args("ChannelGate", channels, reduction, mlp_bias, divisor)
    h = _hidden(channels, reduction, divisor)
    return 2 * channels * h + (h + channels if mlp_bias else 0)


def spatial_gate_param_count(
    channels: int,
    *,
    kernel_size: int = 7,
    pool_order: str = "max-mean",
    spatial_norm: bool = True,
    norm_momentum: float = 0.01,
    norm_weight_init: float = 0.0,
) -> int:
    """``2 k^2`` conv weights, plus 2 (BatchNorm weight and bias) with ``spatial_norm``."""
    _check_spatial_args(
        "SpatialGate",
        channels,
        kernel_size,
        pool_order,
        spatial_norm,
        norm_momentum,
        norm_weight_init,
    )
    return 2 * kernel_size**2 + (2 if spatial_norm else 0)


def cbam_param_count(
    channels: int,
    *,
    reduction: int = 16,
    mlp_bias: bool = True,
    divisor: int | None = None,
    kernel_size: int = 7,
    pool_order: str = "max-mean",
    spatial_norm: bool = True,
    norm_momentum: float = 0.01,
    norm_weight_init: float = 0.0,
    order: str = "channel-spatial",
) -> int:
    """Sum of :func:`channel_gate_param_count` and :func:`spatial_gate_param_count`."""
    check_choice("CBAM", "order", order, _ORDERS)
    return channel_gate_param_count(
        channels, reduction=reduction, mlp_bias=mlp_bias, divisor=divisor
    ) + spatial_gate_param_count(
        channels,
        kernel_size=kernel_size,
        pool_order=pool_order,
        spatial_norm=spatial_norm,
        norm_momentum=norm_momentum,
        norm_weight_init=norm_weight_init,
    )


@register(
    "cbam_channel",
    family="channel",
    presets={"timm": {"divisor": 1, "mlp_bias": False}},
    param_count=channel_gate_param_count,
    **_PAPER,
)
class ChannelGate(nn.Module):
    """CBAM's channel attention module (Woo et al., ECCV 2018), usable on its own.

    ``M_c = sigmoid(MLP(mean_hw(x)) + MLP(max_hw(x)))`` with one shared MLP
    ``C -> h -> C`` (ReLU between), output ``x * M_c`` broadcast over ``H, W``.
    Input and output ``(B, C, H, W)``.

    Defaults (official ``ChannelGate``): reduction 16, MLP ``nn.Linear`` **with bias**,
    ``h = C // 16``, guarded here to at least 1.

    Args:
        channels: input channels ``C``.
        reduction: ``r``; the MLP is ``C / r`` wide.
        mlp_bias: biases in the MLP (official True; timm and common PyTorch ports False).
        divisor: ``None`` (``max(1, C // r)``) or timm's rounding to a multiple of ``divisor``
            (timm's CBAM uses ``divisor=1``: ``max(1, round(C / r))``, halves up).

    Attention: ``M_c`` (``(B, C, 1, 1)``) is the output of ``self.gate``; see also
    :meth:`attention_map`.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        mlp_bias: bool = True,
        divisor: int | None = None,
    ) -> None:
        super().__init__()
        _check_channel_args(type(self).__name__, channels, reduction, mlp_bias, divisor)
        self.channels = channels
        hidden = _hidden(channels, reduction, divisor)
        self.fc1 = nn.Linear(channels, hidden, bias=mlp_bias)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, channels, bias=mlp_bias)
        self.gate = nn.Sigmoid()

    def mlp(self, z: Tensor) -> Tensor:
        """The shared MLP ``fc2(relu(fc1(z)))`` on a ``(B, C)`` descriptor."""
        return self.fc2(self.act(self.fc1(z)))

    def forward(self, x: Tensor) -> Tensor:
        """``x * M_c(x)``."""
        return x * self.attention_map(x)

    def attention_map(self, x: Tensor) -> Tensor:
        """The channel gate ``M_c = sigmoid(MLP(mean_hw(x)) + MLP(max_hw(x)))``,
        ``(B, C, 1, 1)``."""
        check_input(type(self).__name__, x, self.channels)
        logits = self.mlp(x.mean((2, 3))) + self.mlp(x.amax((2, 3)))
        return self.gate(logits[:, :, None, None])

    def attention_maps(self, x: Tensor, *, query: Query = "mean") -> dict[str, Tensor]:
        """``{"channel": M_c}`` as ``(B, C)``; ``query`` is ignored."""
        return {"channel": self.attention_map(x).flatten(1)}

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


@register(
    "cbam_spatial",
    family="spatial",
    presets={"timm": {"pool_order": "mean-max", "norm_momentum": 0.1, "norm_weight_init": 1.0}},
    param_count=spatial_gate_param_count,
    **_PAPER,
)
class SpatialGate(nn.Module):
    """CBAM's spatial attention module (Woo et al., ECCV 2018), usable on its own.

    ``M_s = sigmoid(BN(conv_kxk([max_c(x), mean_c(x)])))``: the maximum and the mean over
    channels, stacked as two maps, a ``k x k`` convolution ``2 -> 1`` (padding ``k // 2``, no bias),
    BatchNorm, sigmoid; output ``x * M_s`` broadcast over channels. Input and output
    ``(B, C, H, W)``; ``channels`` is only used to check the input.

    Defaults (official ``SpatialGate`` and ``model_resnet.py``): ``[max, mean]`` (max first),
    ``k = 7``, ``BatchNorm2d(1, momentum=0.01)`` whose weight the official network initialisation
    sets to **0** (so ``M_s = sigmoid(beta) = 0.5`` at init).

    Args:
        channels: input channels ``C``.
        kernel_size: odd ``k`` (official 7; some ports use 3).
        pool_order: ``"max-mean"`` (official) or ``"mean-max"`` (timm, most ports).
        spatial_norm: BatchNorm after the convolution (official True; most ports False).
        norm_momentum: that BatchNorm's momentum (official 0.01; timm 0.1).
        norm_weight_init: initial BatchNorm weight (official 0; timm 1).

    Attention: ``M_s`` (``(B, 1, H, W)``) is the output of ``self.gate``; see also
    :meth:`attention_map`.
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int = 7,
        pool_order: str = "max-mean",
        spatial_norm: bool = True,
        norm_momentum: float = 0.01,
        norm_weight_init: float = 0.0,
    ) -> None:
        super().__init__()
        _check_spatial_args(
            type(self).__name__,
            channels,
            kernel_size,
            pool_order,
            spatial_norm,
            norm_momentum,
            norm_weight_init,
        )
        self.channels = channels
        self.pool_order = pool_order
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn: nn.Module | None = None
        if spatial_norm:
            self.bn = nn.BatchNorm2d(1, momentum=norm_momentum)
            nn.init.constant_(self.bn.weight, norm_weight_init)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        """``x * M_s(x)``."""
        return x * self.attention_map(x)

    def attention_map(self, x: Tensor) -> Tensor:
        """The spatial gate ``M_s = sigmoid(BN(conv([max_c(x), mean_c(x)])))``,
        ``(B, 1, H, W)``."""
        check_input(type(self).__name__, x, self.channels)
        mx, avg = x.amax(1, keepdim=True), x.mean(1, keepdim=True)
        maps = torch.cat([mx, avg] if self.pool_order == "max-mean" else [avg, mx], dim=1)
        logits = self.conv(maps)
        if self.bn is not None:
            logits = self.bn(logits)
        return self.gate(logits)

    def attention_maps(self, x: Tensor, *, query: Query = "mean") -> dict[str, Tensor]:
        """``{"spatial": M_s}`` as ``(B, H, W)``; ``query`` is ignored."""
        return {"spatial": self.attention_map(x)[:, 0]}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, pool_order={self.pool_order!r}"


@register(
    "cbam",
    family="hybrid",
    presets={
        "timm": {
            "divisor": 1,
            "mlp_bias": False,
            "pool_order": "mean-max",
            "norm_momentum": 0.1,
            "norm_weight_init": 1.0,
        },
        "yolov4-tiny": {
            "reduction": 8,
            "mlp_bias": False,
            "pool_order": "mean-max",
            "spatial_norm": False,
            "kernel_size": 7,
        },
    },
    param_count=cbam_param_count,
    **_PAPER,
)
class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018).

    ``F' = M_c(F) * F`` then ``F'' = M_s(F') * F'`` (``order="channel-spatial"``, the paper's
    design and best arrangement) with :class:`ChannelGate` ``M_c`` (shared MLP on the avg- and
    max-pooled descriptors, summed, one sigmoid) and :class:`SpatialGate` ``M_s`` (``k x k`` conv
    on ``[max_c, mean_c]``, BatchNorm, sigmoid). Input and output ``(B, C, H, W)``.

    Defaults = official code: reduction 16, MLP with bias, ``[max, mean]``, 7x7 conv without bias,
    ``BatchNorm2d(1, momentum=0.01)`` with weight initialised to 0. The hidden width is
    ``max(1, C // 16)``.

    Args:
        channels: input channels ``C``.
        reduction, mlp_bias, divisor: :class:`ChannelGate`'s.
        kernel_size, pool_order, spatial_norm, norm_momentum, norm_weight_init:
            :class:`SpatialGate`'s.
        order: ``"channel-spatial"`` (default), ``"spatial-channel"`` (``F' = M_s(F) * F``, then
            ``M_c(F') * F'``) or ``"parallel"``: both maps are computed from the same input and
            both are applied, ``F'' = F * M_c(F) * M_s(F)``. The paper's ablation (Sec. 4.1,
            Table 3) compares the three arrangements ("parallel use of both attention modules")
            without giving a fusion formula; we apply both maps multiplicatively, as each module
            is applied in the sequential designs (BAM, by the same authors, instead adds the
            logits before one sigmoid; that is not offered). Channel-first is the best in the paper.

    Variants (same weights give identical outputs):
        * timm ``CbamModule(C)``: ``divisor=1, mlp_bias=False, pool_order="mean-max",
          norm_momentum=0.1, norm_weight_init=1.0`` (preset ``"timm"``; timm keeps the BatchNorm).
          timm's MLP is two 1x1 convolutions: their weights are ours with ``[:, :, None, None]``.
        * YOLOv4-tiny (bubbliiiing/yolov4-tiny-pytorch, ``cbam_block``): ``reduction=8,
          mlp_bias=False, pool_order="mean-max", spatial_norm=False`` (preset ``"yolov4-tiny"``).
        * Common PyTorch ports with a single ``CBAMLayer`` class: ``mlp_bias=False,
          pool_order="max-mean", spatial_norm=False`` (reduction 16, kernel 7).
        * Ports with separate ``ChannelAttention`` + ``SpatialAttention`` classes:
          ``mlp_bias=False, pool_order="mean-max", spatial_norm=False`` (reduction 16; kernel 7,
          or ``kernel_size=3``).

    Attention: hook ``self.channel.gate`` (``(B, C, 1, 1)``) and ``self.spatial.gate``
    (``(B, 1, H, W)``); :meth:`attention_map` returns the spatial map as applied in ``forward``.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        mlp_bias: bool = True,
        divisor: int | None = None,
        kernel_size: int = 7,
        pool_order: str = "max-mean",
        spatial_norm: bool = True,
        norm_momentum: float = 0.01,
        norm_weight_init: float = 0.0,
        order: str = "channel-spatial",
    ) -> None:
        super().__init__()
        _check_channel_args("CBAM", channels, reduction, mlp_bias, divisor)
        _check_spatial_args(
            "CBAM", channels, kernel_size, pool_order, spatial_norm, norm_momentum, norm_weight_init
        )
        self.order = check_choice("CBAM", "order", order, _ORDERS)
        self.channels = channels
        self.channel = ChannelGate(
            channels, reduction=reduction, mlp_bias=mlp_bias, divisor=divisor
        )
        self.spatial = SpatialGate(
            channels,
            kernel_size=kernel_size,
            pool_order=pool_order,
            spatial_norm=spatial_norm,
            norm_momentum=norm_momentum,
            norm_weight_init=norm_weight_init,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``F''`` for the configured ``order``."""
        check_input("CBAM", x, self.channels)
        if self.order == "channel-spatial":
            return self.spatial(self.channel(x))
        if self.order == "spatial-channel":
            return self.channel(self.spatial(x))
        return x * self.channel.attention_map(x) * self.spatial.attention_map(x)

    def attention_map(self, x: Tensor) -> Tensor:
        """The spatial map ``M_s`` (``(B, 1, H, W)``) computed on the input it is applied to."""
        check_input("CBAM", x, self.channels)
        if self.order == "channel-spatial":
            x = self.channel(x)
        return self.spatial.attention_map(x)

    def attention_maps(self, x: Tensor, *, query: Query = "mean") -> dict[str, Tensor]:
        """``{"channel": M_c (B, C), "spatial": M_s (B, H, W)}``, each on the input it is applied
        to: ``order="channel-spatial"``: ``M_s`` of ``x * M_c``; ``"spatial-channel"``: ``M_c``
        of ``x * M_s``; ``"parallel"``: both of ``x``. ``query`` is ignored."""
        if self.order == "channel-spatial":
            mc = self.channel.attention_map(x)
            ms = self.spatial.attention_map(x * mc)
        elif self.order == "spatial-channel":
            ms = self.spatial.attention_map(x)
            mc = self.channel.attention_map(x * ms)
        else:
            mc, ms = self.channel.attention_map(x), self.spatial.attention_map(x)
        return {"channel": mc.flatten(1), "spatial": ms[:, 0]}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, order={self.order!r}"
