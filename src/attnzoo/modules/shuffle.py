"""Shuffle Attention (SA-Net).

Zhang, Yang, "SA-Net: Shuffle Attention for Deep Convolutional Neural Networks", ICASSP 2021.
Official code: https://github.com/wofmanaf/SA-Net (``models/sa_resnet.py``: ``sa_layer``).
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

from attnzoo.ops.query import Query
from attnzoo.ops.validation import check_input, check_positive_int
from attnzoo.registry import register

__all__ = ["ShuffleAttention", "sa_param_count", "channel_shuffle"]

_NAME = "ShuffleAttention"


def _check_args(channels: int, groups: int) -> int:
    """Validate; return the channels per half sub-feature ``c' = C / 2G``."""
    check_positive_int(_NAME, "channels", channels)
    check_positive_int(_NAME, "groups", groups)
    if channels % (2 * groups):
        raise ValueError(
            f"{_NAME}: channels ({channels}) must be divisible by 2 * groups ({2 * groups}): "
            f"each of the {groups} groups splits into a channel half and a spatial half; pass "
            f"groups=g with 2 g dividing {channels}"
        )
    return channels // (2 * groups)


def sa_param_count(channels: int, *, groups: int = 64) -> int:
    """Closed-form parameter count of :class:`ShuffleAttention`: ``6 C / 2G = 3 C / G``
    (``cweight``, ``cbias``, ``sweight``, ``sbias`` and the GroupNorm's weight and bias, each
    ``C / 2G``, shared by all groups)."""
    return 6 * _check_args(channels, groups)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """ShuffleNet's channel shuffle: ``(B, g * n, H, W) -> (B, n * g, H, W)``, output channel
    ``j g + s`` is input channel ``s n + j``."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


def _layout_like(y: Tensor, x: Tensor) -> Tensor:
    """``y`` in ``x``'s memory format (the shuffle's copy is standard-contiguous). An FX leaf:
    it reads strides."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y.contiguous(memory_format=torch.channels_last)
    return y


torch.fx.wrap("_layout_like")


@register(
    "sa",
    family="hybrid",
    paper="SA-Net: Shuffle Attention for Deep Convolutional Neural Networks",
    venue="ICASSP",
    year=2021,
    code="https://github.com/wofmanaf/SA-Net",
    param_count=sa_param_count,
    spatial_dims=2,
    example_channels=128,
)
class ShuffleAttention(nn.Module):
    """Shuffle Attention: grouped channel and spatial gates, then a channel shuffle (Zhang and
    Yang, ICASSP 2021).

    Equation in words: the ``C`` channels are split into ``G`` groups, and each group into two
    halves of ``c' = C / 2G`` channels. Channel half ``x_k1``: ``x_k1 * sigmoid(cweight *
    GAP(x_k1) + cbias)``. Spatial half ``x_k2``: ``x_k2 * sigmoid(sweight * GN(x_k2) +
    sbias)``, ``GN`` a GroupNorm with ``c'`` groups of one channel (each channel normalised over
    ``H, W``, with its own affine weight and bias). The halves are concatenated back in place and
    the ``C`` channels are shuffled with 2 groups (:func:`channel_shuffle`), so that information
    flows between the sub-features. ``cweight, cbias, sweight, sbias`` are ``c'``-vectors shared
    by all groups; initialised 0, 1, 0, 1 as in the official code (every gate is ``sigmoid(1)``
    at initialisation).

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``, ``C`` divisible by ``2G`` (otherwise a
    ``ValueError``; the official code fails inside ``GroupNorm`` or ``reshape``). With the
    default ``G = 64``: ``C`` a multiple of 128, e.g. the official SA-ResNet-50/101 (after the
    last BatchNorm of every Bottleneck, before the residual addition: widths 256 to 2048), but
    not a ResNet-18/34's first stage (64 channels): use ``groups=32`` or fewer there.

    Defaults and names from the official ``sa_layer(channel, groups=64)``: parameters
    ``cweight``, ``cbias``, ``sweight``, ``sbias`` (shape ``(1, c', 1, 1)``) and ``gn``, so
    official state dicts load. Differences: the pooling is a mean over ``H, W``; the groups are
    handled as a dimension of a view of ``x`` (no ``(B G, C/G, H, W)`` copy); the output keeps
    ``x``'s memory format and dtype (the gates are cast to it under autocast).

    Args:
        channels: input channels ``C``.
        groups: number of groups ``G``.

    Attention: :meth:`attention_map` returns the gate on ``x``'s channels before the shuffle,
    ``(B, C, H, W)`` (the channel halves' gates broadcast over ``H, W``); the two gates are the
    outputs of the submodules ``channel_gate`` and ``spatial_gate`` (``nn.Sigmoid``, hook them).
    """

    def __init__(self, channels: int, *, groups: int = 64) -> None:
        super().__init__()
        c = _check_args(channels, groups)
        self.channels = channels
        self.groups = groups
        self.cweight = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, c, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, c, 1, 1))
        self.gn = nn.GroupNorm(c, c)
        self.channel_gate = nn.Sigmoid()
        self.spatial_gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        """``channel_shuffle(x * gate, 2)``."""
        return _layout_like(channel_shuffle(x * self.attention_map(x), 2), x)

    def attention_map(self, x: Tensor) -> Tensor:
        """The gate on ``x``'s channels (before the shuffle), ``(B, C, H, W)``."""
        check_input(_NAME, x, self.channels)
        xg = x.unflatten(1, (self.groups, 2, -1))  # (B, G, 2, c', H, W), a view
        x1, x2 = xg[:, :, 0], xg[:, :, 1]  # channel half, spatial half: (B, G, c', H, W)
        g1 = self.channel_gate(self.cweight * x1.mean((3, 4), keepdim=True) + self.cbias)
        s = self.gn(x2.flatten(0, 1)).unflatten(0, (-1, self.groups))  # per sub-feature
        g2 = self.spatial_gate(self.sweight * s + self.sbias)
        gate = torch.stack([g1.expand_as(g2), g2], dim=2).flatten(1, 3)
        return gate.to(x.dtype)

    def attention_maps(self, x: Tensor, *, query: Query = "mean") -> dict[str, Tensor]:
        """``channel`` ``(B, C)``: the gate averaged over positions; ``spatial`` ``(B, H, W)``:
        the spatial halves' gates averaged over their channels; ``gate``: all of it
        ``(B, C, H, W)`` (on ``x``'s channels, before the shuffle). ``query`` is ignored."""
        gate = self.attention_map(x)
        spatial = gate.unflatten(1, (self.groups, 2, -1))[:, :, 1].mean((1, 2))
        return {"channel": gate.mean((2, 3)), "spatial": spatial, "gate": gate}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, groups={self.groups}"
