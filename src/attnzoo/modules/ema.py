"""Efficient Multi-Scale Attention (EMA).

Ouyang, He, Zhang, Huang, Wang, Luo, Li, Huang, Zhu, "Efficient Multi-Scale Attention Module with
Cross-Spatial Learning", ICASSP 2023.
Official code: https://github.com/YOLOonMe/EMA-attention-module
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.ops.query import Query
from attnzoo.ops.validation import check_divisible, check_input, check_positive_int
from attnzoo.registry import register

__all__ = ["EfficientMultiScaleAttention", "ema_param_count"]

_NAME = "EfficientMultiScaleAttention"


def _check_args(channels: int, factor: int) -> int:
    channels = check_positive_int(_NAME, "channels", channels)
    factor = check_positive_int(_NAME, "factor", factor)
    check_divisible(_NAME, "channels", channels, "factor", factor)
    return channels // factor


def ema_param_count(channels: int, *, factor: int = 32) -> int:
    """Closed-form parameter count of :class:`EfficientMultiScaleAttention`.

    With ``c = C / factor``: 1x1 conv ``c^2 + c``, 3x3 conv ``9 c^2 + c``, GroupNorm ``2c``,
    in total ``10 c^2 + 4 c`` (shared by all groups).
    """
    c = _check_args(channels, factor)
    return 10 * c * c + 4 * c


@register(
    "ema",
    family="hybrid",
    paper="Efficient Multi-Scale Attention Module with Cross-Spatial Learning",
    venue="ICASSP",
    year=2023,
    code="https://github.com/YOLOonMe/EMA-attention-module",
    param_count=ema_param_count,
    spatial_dims=2,
    example_channels=64,
)
class EfficientMultiScaleAttention(nn.Module):
    """EMA: grouped coordinate-style gates, a 3x3 branch and cross-spatial learning.

    Paper: Ouyang et al., "Efficient Multi-Scale Attention Module with Cross-Spatial Learning",
    ICASSP 2023.

    Equation. The channels are split into ``G = factor`` groups of ``c = C / G`` channels, each
    group processed like a sample (weights shared by all groups). 1x1 branch: pool over W and over
    H, concatenate, shared 1x1 conv ``c -> c`` (bias), split, sigmoid gates,
    ``x1 = GroupNorm_c(x * g_h * g_w)`` (``c`` groups of one channel: each channel normalised over
    H x W, then scaled and shifted per channel). 3x3 branch: ``x2 = conv3x3(x)`` (``c -> c``,
    bias, padding 1). Cross-spatial learning: ``p1 = softmax_over_c(GAP(x1))``,
    ``p2 = softmax_over_c(GAP(x2))``, ``w = sum_c p1_c x2_c + sum_c p2_c x1_c`` (one map per
    group), ``y = x * sigmoid(w)``.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; the gate is ``(B, G, H, W)``.

    Defaults from the official ``EMA`` class (YOLOonMe/EMA-attention-module): ``factor=32``,
    1x1 and 3x3 convs with bias, ``GroupNorm(c, c)`` (eps 1e-5). The official ``c2`` argument is
    unused there and not taken here. The official code only asserts ``C // factor > 0`` and
    fails later for ``C % factor != 0``; here that is a ``ValueError`` naming ``channels`` and
    ``factor``. The parameters keep the official names and shapes (``conv1x1``, ``conv3x3``,
    ``gn``), so official state dicts load.

    As in the official code the groups are folded into the batch, ``(B * G, c, H, W)``, and the
    submodules run on that tensor; the difference is that pooling uses means over dimensions and
    every reshape infers the batch (``-1``), so ONNX graphs keep a dynamic batch and size, and
    that the output is a view of ``x`` times the gate (channels_last stays channels_last).

    Attention for visualisation: ``self.gate`` (``nn.Sigmoid``) computes the final weights; a
    forward hook on ``module.gate`` captures them as ``(B, G, H, W)``, the official
    ``(B * G, 1, H, W)`` tensor reshaped (``w.reshape(B * G, 1, H, W)`` gives the official
    layout). :meth:`attention_map` returns the same tensor.

    Args:
        channels: input channels ``C`` (divisible by ``factor``).
        factor: number of groups ``G``.
    """

    def __init__(self, channels: int, *, factor: int = 32) -> None:
        super().__init__()
        c = _check_args(channels, factor)
        self.channels = channels
        self.factor = factor
        self.group_channels = c
        self.gn = nn.GroupNorm(c, c)
        self.conv1x1 = nn.Conv2d(c, c, 1)
        self.conv3x3 = nn.Conv2d(c, c, 3, padding=1)
        self.gate = nn.Sigmoid()

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The cross-spatial gate logits ``(B, G, H, W)``."""
        h = x.shape[2]
        group_x = x.unflatten(1, (self.factor, self.group_channels)).flatten(0, 1)  # (BG, c, H, W)
        x_h = group_x.mean(3, keepdim=True)  # (B * G, c, H, 1)
        x_w = group_x.mean(2, keepdim=True).transpose(2, 3)  # (B * G, c, W, 1)
        hw = self.conv1x1(torch.cat([x_h, x_w], dim=2))
        g_h, g_w = hw[:, :, :h], hw[:, :, h:].transpose(2, 3)
        x1 = self.gn(group_x * g_h.sigmoid() * g_w.sigmoid())
        x2 = self.conv3x3(group_x)
        p1 = torch.softmax(x1.mean((2, 3)), dim=1)  # (B * G, c)
        p2 = torch.softmax(x2.mean((2, 3)), dim=1)
        weights = torch.einsum("nc,nchw->nhw", p1, x2) + torch.einsum("nc,nchw->nhw", p2, x1)
        return weights.unflatten(0, (-1, self.factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(_NAME, x, self.channels)
        gate = self.gate(self._logits(x)).to(x.dtype)  # (B, G, H, W)
        xg = x.unflatten(1, (self.factor, self.group_channels))  # a view in both memory formats
        return (xg * gate.unsqueeze(2)).flatten(1, 2)

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The sigmoid weights ``(B, G, H, W)`` for input ``x``."""
        check_input(_NAME, x, self.channels)
        return self.gate(self._logits(x))

    def attention_maps(self, x: torch.Tensor, *, query: Query = "mean") -> dict[str, torch.Tensor]:
        """``query`` is ignored. ``spatial`` ``(B, H, W)``: the sigmoid weights averaged over the
        groups (= over channels: every group has C/G); ``groups`` ``(B, G, H, W)``: per group."""
        weights = self.attention_map(x)
        return {"spatial": weights.mean(1), "groups": weights}
