"""Triplet attention: three rotated [max, mean] spatial gates.

Misra, Nalamada, Arasanipalai, Hou, "Rotate to Attend: Convolutional Triplet Attention Module",
WACV 2021. Official code: https://github.com/landskape-ai/triplet-attention
(``MODELS/triplet_attention.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo.ops.query import Query
from attnzoo.ops.validation import check_input, check_odd_int, check_positive_int
from attnzoo.registry import register

__all__ = ["TripletAttention", "TripletGate", "triplet_param_count"]

_NAME = "TripletAttention"


def _check_args(channels: int, kernel_size: int, no_spatial: bool) -> None:
    check_positive_int(_NAME, "channels", channels)
    check_odd_int(_NAME, "kernel_size", kernel_size)
    if not isinstance(no_spatial, bool):
        raise TypeError(f"{_NAME}: no_spatial must be True or False, got {no_spatial!r}")


def triplet_param_count(channels: int, *, kernel_size: int = 7, no_spatial: bool = False) -> int:
    """``n (2 k^2 + 2)`` for ``n`` = 3 gates (2 with ``no_spatial``): each a ``k x k`` conv
    ``2 -> 1`` without bias and a one-channel BatchNorm; 300 at ``k = 7``, whatever ``C``."""
    _check_args(channels, kernel_size, no_spatial)
    return (2 if no_spatial else 3) * (2 * kernel_size**2 + 2)


class TripletGate(nn.Module):
    """One branch: ``sigmoid(BN(conv_kxk([max, mean])))`` on a ``(B, 2, P, Q)`` pooled pair.

    The official ``AttentionGate`` (``ZPool`` -> ``BasicConv(2, 1, k, relu=False)`` -> sigmoid):
    conv without bias, padding ``k // 2``, ``BatchNorm2d(1, eps=1e-5, momentum=0.01)``.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)
        self.gate = nn.Sigmoid()

    def forward(self, pooled: Tensor) -> Tensor:
        """``(B, 2, P, Q)`` -> the gate ``(B, 1, P, Q)``."""
        return self.gate(self.bn(self.conv(pooled)))


def _zpool(x: Tensor, dim: int) -> Tensor:
    """ZPool: ``[max, mean]`` over ``dim`` of ``(B, C, H, W)``, stacked in dim 1."""
    return torch.stack([x.amax(dim), x.mean(dim)], dim=1)


@register(
    "triplet",
    family="hybrid",
    paper="Rotate to Attend: Convolutional Triplet Attention Module",
    venue="WACV",
    year=2021,
    code="https://github.com/landskape-ai/triplet-attention",
    param_count=triplet_param_count,
    spatial_dims=2,
    example_channels=64,
)
class TripletAttention(nn.Module):
    """Triplet attention: cross-dimension gates on the (C, W), (H, C) and (H, W) planes.

    "Rotate to Attend: Convolutional Triplet Attention Module" (Misra et al., WACV 2021).

    Each branch pools the input over one axis with ZPool (``[max, mean]``, max first), applies a
    ``k x k`` conv ``2 -> 1`` (no bias), BatchNorm and a sigmoid, and rescales the input with the
    resulting plane broadcast along the pooled axis:

    * ``cw``: pooled over H, a ``(C, W)`` gate ``g_cw`` (official: ``permute(0, 2, 1, 3)``);
    * ``hc``: pooled over W, an ``(H, C)`` gate ``g_hc``, H along the rows (official:
      ``permute(0, 3, 2, 1)``);
    * ``hw``: pooled over C, an ``(H, W)`` gate ``g_hw`` (CBAM's spatial gate).

    Output ``y = 1/3 (x g_cw + x g_hc + x g_hw)``; with ``no_spatial=True`` the ``hw`` branch is
    left out and ``y = 1/2 (x g_cw + x g_hc)``. Input and output ``(B, C, H, W)``. The pooling
    is done on the unpermuted input and only the small gates are transposed, so no permuted copy
    of ``x`` is made (the official code permutes ``x`` twice with ``.contiguous()``); the maths
    is the same.

    Defaults = official ``TripletAttention``: ``k = 7``, ``BatchNorm2d(1, eps=1e-5,
    momentum=0.01, affine=True)``, BatchNorm weight 1 at init (the official ResNet init zeroes
    only keys containing ``SpatialGate``). 300 parameters at ``k = 7`` whatever ``C`` (200 with
    ``no_spatial``); the paper's ResNet-50 ablation also uses ``k = 3`` (``kernel_size=3``).
    State dict keys map to the official ones as ``cw.conv.weight`` <-> ``cw.conv.conv.weight``,
    ``cw.bn.*`` <-> ``cw.conv.bn.*`` (same for ``hc``, ``hw``).

    Args:
        channels: input channels ``C`` (only used to check the input).
        kernel_size: odd ``k`` of the three convolutions.
        no_spatial: drop the ``(H, W)`` branch.

    Attention: each branch's gate is the output of ``self.cw.gate`` (``(B, 1, C, W)``),
    ``self.hc.gate`` (``(B, 1, H, C)``) and ``self.hw.gate`` (``(B, 1, H, W)``);
    :meth:`attention_map` returns the combined weight ``(B, C, H, W)`` applied to ``x``.
    """

    def __init__(self, channels: int, *, kernel_size: int = 7, no_spatial: bool = False) -> None:
        super().__init__()
        _check_args(channels, kernel_size, no_spatial)
        self.channels = channels
        self.no_spatial = no_spatial
        self.cw = TripletGate(kernel_size)
        self.hc = TripletGate(kernel_size)
        self.hw = None if no_spatial else TripletGate(kernel_size)

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``g_cw`` as ``(B, C, 1, W)``, ``g_hc`` as ``(B, C, H, 1)`` and ``g_hw`` as
        ``(B, 1, H, W)`` (None with ``no_spatial``), broadcastable against ``x``."""
        check_input(_NAME, x, self.channels)
        g_cw = self.cw(_zpool(x, 2)).transpose(1, 2)  # (B, 1, C, W) -> (B, C, 1, W)
        g_hc = self.hc(_zpool(x, 3).transpose(2, 3)).permute(0, 3, 2, 1)  # (B,1,H,C)->(B,C,H,1)
        g_hw = None if self.hw is None else self.hw(_zpool(x, 1))
        return g_cw, g_hc, g_hw

    def forward(self, x: Tensor) -> Tensor:
        """The average of the three (two) rescaled inputs."""
        g_cw, g_hc, g_hw = self.gates(x)
        if g_hw is None:
            return (x * g_cw + x * g_hc) / 2
        return (x * g_cw + x * g_hc + x * g_hw) / 3

    def attention_map(self, x: Tensor) -> Tensor:
        """The combined weight ``(g_cw + g_hc + g_hw) / 3`` (or ``/ 2``), ``(B, C, H, W)``."""
        g_cw, g_hc, g_hw = self.gates(x)
        return (g_cw + g_hc) / 2 if g_hw is None else (g_cw + g_hc + g_hw) / 3

    def attention_maps(self, x: Tensor, *, query: Query = "mean") -> dict[str, Tensor]:
        """``spatial``: the combined weight averaged over channels ``(B, H, W)``; ``channel``:
        averaged over positions ``(B, C)``; the branch gates ``cw`` ``(B, C, W)``, ``hc``
        ``(B, C, H)`` and ``hw`` ``(B, H, W)`` (not with ``no_spatial``). ``query`` is ignored."""
        g_cw, g_hc, g_hw = self.gates(x)
        n = 2 if g_hw is None else 3
        # mean over C and over (H, W) of the broadcast sum, without building (B, C, H, W)
        spatial = g_cw.mean(1) + g_hc.mean(1)
        channel = g_cw.mean((2, 3)) + g_hc.mean((2, 3))
        out = {"cw": g_cw[:, :, 0], "hc": g_hc[..., 0]}
        if g_hw is not None:
            spatial = spatial + g_hw[:, 0]
            channel = channel + g_hw.mean((1, 2, 3))[:, None]
            out["hw"] = g_hw[:, 0]
        return {"spatial": spatial / n, "channel": channel / n, **out}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, no_spatial={self.no_spatial}"
