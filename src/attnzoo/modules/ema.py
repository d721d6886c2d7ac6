"""Efficient Multi-Scale Attention (EMA).

Ouyang, He, Zhang, Huang, Wang, Luo, Li, Huang, Zhu, "Efficient Multi-Scale Attention Module with
Cross-Spatial Learning", ICASSP 2023.
Official code: https://github.com/YOLOonMe/EMA-attention-module
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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

    Defaults from the official ``EMA`` class (YOLOonMe/EMA-attention-module; the source documents
    show the same code): ``factor=32``, 1x1 and 3x3 convs with bias, ``GroupNorm(c, c)`` (eps
    1e-5). The official ``c2`` argument is unused there and not taken here. The official code only
    asserts ``C // factor > 0`` and fails later for ``C % factor != 0``; here that is a
    ``ValueError`` naming ``channels`` and ``factor``.

    Implementation (same maths, fewer passes over the feature map, no layout copies):

    * the tensor is viewed as ``(B, G, c, H, W)`` instead of the official
      ``reshape(B * G, c, H, W)`` (a copy for channels_last inputs); channels_last stays
      channels_last; pooling uses means over dimensions (dynamic-size ONNX export);
    * GroupNorm is computed in closed form (two-pass variance, eps from ``self.gn``) and its output
      is never materialised: only ``GAP(x1)`` and ``sum_c p2_c x1_c`` are needed;
    * ``GAP(x1)`` equals the GroupNorm bias ``beta`` exactly (each normalised channel has zero
      mean), so ``p1 = softmax(beta)`` and ``sum_c p1_c x2_c`` is a 3x3 conv with weights
      contracted by ``p1``: a depthwise conv instead of the full ``c -> c`` conv;
    * ``GAP(x2)`` comes from the row and column sums (already computed for the 1x1 branch) and the
      four corner pixels: the spatial sum of a zero-padded 3x3 conv needs nothing else.

    The parameters keep the official names and shapes (``conv1x1``, ``conv3x3``, ``gn``), so
    official state dicts load; the float64 tests compare with a direct transcription of the
    official algorithm to 1e-10.

    Attention for visualisation: ``self.gate`` (``nn.Sigmoid``) computes the final weights; a
    forward hook on ``module.gate`` captures them as ``(B, G, H, W)``, which is the official
    ``(B * G, 1, H, W)`` tensor reshaped (``w.reshape(B * G, 1, H, W)`` gives the official
    layout). :meth:`attention_map` returns the same ``(B, G, H, W)`` tensor.

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

    def _conv3x3_mean(self, xg: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """``GAP(conv3x3(x))`` per group and channel ``(B, G, c)`` without the convolution.

        The spatial sum of a zero-padded 3x3 convolution is, per tap ``(ky, kx)``, the sum of ``x``
        over all pixels except the last/first row (``ky = 0``/``2``) and the last/first column
        (``kx = 0``/``2``): the total minus those row and column sums plus the corner pixel counted
        twice. ``row``/``col`` are the means over W and over H (already computed for the gates).
        """
        h, w = xg.shape[3], xg.shape[4]
        rows, cols = row * w, col * h  # (B, G, c, H) row sums, (B, G, c, W) column sums
        total = rows.sum(-1)
        zero = torch.zeros_like(total)
        row_out = torch.stack([rows[..., -1], zero, rows[..., 0]], -1)  # excluded row per ky
        col_out = torch.stack([cols[..., -1], zero, cols[..., 0]], -1)  # excluded column per kx
        corner = torch.stack([
            torch.stack([xg[..., -1, -1], zero, xg[..., -1, 0]], -1),
            torch.stack([zero, zero, zero], -1),
            torch.stack([xg[..., 0, -1], zero, xg[..., 0, 0]], -1),
        ], -2)
        tap_sums = total[..., None, None] - row_out[..., :, None] - col_out[..., None, :] + corner
        return torch.einsum("oiyx,bgiyx->bgo", self.conv3x3.weight, tap_sums) / (h * w) + \
            self.conv3x3.bias

    def _weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grouped view ``(B, G, c, H, W)`` and the gate logits ``(B, G, H, W)``."""
        g, h = self.factor, x.shape[2]
        xg = x.unflatten(1, (g, self.group_channels))
        row, col = xg.mean(4), xg.mean(3)  # (B, G, c, H), (B, G, c, W)
        hw = torch.matmul(self.conv1x1.weight.flatten(1), torch.cat([row, col], dim=3))
        hw = hw + self.conv1x1.bias[:, None]
        y = xg * hw[..., :h].sigmoid().unsqueeze(-1) * hw[..., h:].sigmoid().unsqueeze(-2)
        # GroupNorm(c, c): x1 = gamma * (y - mean) * rstd + beta, per channel over H x W (two-pass
        # variance). x1 itself is never formed: only GAP(x1) and sum_c p2_c x1_c are needed.
        centred = y - y.mean((3, 4), keepdim=True)
        rstd = torch.rsqrt(centred.square().mean((3, 4), keepdim=True) + self.gn.eps)
        gamma, beta = self.gn.weight, self.gn.bias
        # GAP(x1) = beta exactly (a normalised channel has zero mean), so p1 = softmax(beta) does
        # not depend on x: sum_c p1_c x2_c is a 3x3 conv with the weights contracted by p1, run
        # as a depthwise conv (cheap in both memory formats) summed over each group's channels
        # together with sum_c p2_c x1_c.
        p1 = torch.softmax(beta, 0)
        w_fold = torch.einsum("o,oikl->ikl", p1, self.conv3x3.weight)  # (c, 3, 3)
        w_fold = w_fold.unsqueeze(1).repeat(g, 1, 1, 1)  # depthwise weight (C, 1, 3, 3)
        dw = F.conv2d(x, w_fold, padding=1, groups=self.channels)
        p2 = torch.softmax(self._conv3x3_mean(xg, row, col), dim=2)  # (B, G, c)
        q = (p2 * gamma)[..., None, None] * rstd  # (B, G, c, 1, 1)
        logits = torch.addcmul(dw.unflatten(1, (g, self.group_channels)), centred, q).sum(2)
        const = (p2 * beta).sum(2) + (p1 * self.conv3x3.bias).sum()  # (B, G)
        return xg, logits + const[..., None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(_NAME, x, self.channels)
        xg, logits = self._weights(x)
        return (xg * self.gate(logits).unsqueeze(2)).flatten(1, 2)

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The sigmoid weights ``(B, G, H, W)`` for input ``x``."""
        check_input(_NAME, x, self.channels)
        return self.gate(self._weights(x)[1])
