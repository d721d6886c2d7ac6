"""Selective Kernel unit (SKNet).

Li, Wang, Hu, Yang, "Selective Kernel Networks", CVPR 2019. Official code (Caffe prototxt):
https://github.com/implus/SKNet
"""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.ops.divisible import make_divisible
from attnzoo.ops.query import Query
from attnzoo.ops.validation import (
    check_divisible,
    check_input,
    check_positive_float,
    check_positive_int,
)
from attnzoo.registry import register

__all__ = ["SelectiveKernel", "sk_param_count"]

_NAME = "SelectiveKernel"


def _attn_channels(out_channels: int, reduction: float, min_dim: int, divisor: int | None) -> int:
    """Width ``d`` of the fuse layer: ``max(C / r, L)`` (official) or timm's rounding."""
    if divisor is None:
        return max(int(out_channels / reduction), min_dim)
    return max(make_divisible(out_channels / reduction, divisor, round_limit=0.9), min_dim)


def _branch_geometry(index: int, keep_3x3: bool) -> tuple[int, int, int]:
    """(kernel size, dilation, padding) of branch ``index``: 3x3 with dilation i+1, or (3+2i)^2."""
    if keep_3x3:
        return 3, index + 1, index + 1
    return 3 + 2 * index, 1, 1 + index


def _check_args(
    channels: int,
    out_channels: int | None,
    stride: int,
    branches: int,
    groups: int,
    reduction: float,
    min_dim: int,
    divisor: int | None,
    split_input: bool,
) -> tuple[int, int]:
    channels = check_positive_int(_NAME, "channels", channels)
    out_channels = channels if out_channels is None else out_channels
    out_channels = check_positive_int(_NAME, "out_channels", out_channels)
    check_positive_int(_NAME, "stride", stride)
    branches = check_positive_int(_NAME, "branches", branches)
    groups = check_positive_int(_NAME, "groups", groups)
    check_positive_float(_NAME, "reduction", reduction)
    check_positive_int(_NAME, "min_dim", min_dim)
    if divisor is not None:
        check_positive_int(_NAME, "divisor", divisor)
    in_per_branch = channels
    if split_input:
        check_divisible(_NAME, "channels", channels, "branches", branches)
        in_per_branch = channels // branches
        check_divisible(_NAME, "channels // branches", in_per_branch, "groups", groups)
    else:
        check_divisible(_NAME, "channels", channels, "groups", groups)
    check_divisible(_NAME, "out_channels", out_channels, "groups", groups)
    return in_per_branch, out_channels


def sk_param_count(
    channels: int,
    *,
    out_channels: int | None = None,
    stride: int = 1,
    branches: int = 2,
    groups: int = 32,
    reduction: float = 16,
    min_dim: int = 32,
    divisor: int | None = None,
    keep_3x3: bool = True,
    split_input: bool = False,
    conv_bias: bool = False,
    fc_bias: bool = False,
    fc_norm_act: bool = True,
) -> int:
    """Closed-form parameter count of :class:`SelectiveKernel` (same keywords).

    Branch i: ``C_out * C_in/G * k_i^2`` (+ ``C_out`` bias) + ``2 C_out`` (BN); fuse:
    ``C_out d`` (+ d) + ``2d`` (BN); select: ``d M C_out`` (+ ``M C_out``).
    """
    in_per_branch, c_out = _check_args(
        channels, out_channels, stride, branches, groups, reduction, min_dim, divisor, split_input
    )
    d = _attn_channels(c_out, reduction, min_dim, divisor)
    total = 0
    for i in range(branches):
        k = _branch_geometry(i, keep_3x3)[0]
        total += c_out * (in_per_branch // groups) * k * k + (c_out if conv_bias else 0) + 2 * c_out
    total += c_out * d + (d if fc_bias else 0) + (2 * d if fc_norm_act else 0)
    total += d * branches * c_out + (branches * c_out if fc_bias else 0)
    return total


@register(
    "sk",
    family="kernel",
    paper="Selective Kernel Networks",
    venue="CVPR",
    year=2019,
    code="https://github.com/implus/SKNet",
    presets={
        # timm.layers.SelectiveKernel with its class defaults.
        "timm": {"groups": 1, "split_input": True, "divisor": 8, "min_dim": 8},
        # timm's skresnext50_32x4d blocks (cardinality 32, rd_divisor 32, no input split).
        "timm-skresnext": {"divisor": 32, "min_dim": 32},
        # The widely copied PyTorch SKConv (kernels 3+2i, biases everywhere, plain FC fuse layer).
        "skconv": {"keep_3x3": False, "conv_bias": True, "fc_bias": True, "fc_norm_act": False},
    },
    param_count=sk_param_count,
    spatial_dims=2,
    example_channels=64,
)
class SelectiveKernel(nn.Module):
    """SKNet's selective kernel unit: M convolution branches mixed by a softmax over branches.

    Paper: Li et al., "Selective Kernel Networks", CVPR 2019. Use it in place of the 3x3 (grouped)
    convolution of a ResNeXt bottleneck; it takes ``stride`` and ``out_channels`` for that.

    Equation (Split, Fuse, Select). Split: branch ``i`` is a 3x3 grouped convolution with dilation
    ``i + 1`` (a 3x3 and a "5x5" for M = 2), then BatchNorm and ReLU: ``U_i = ReLU(BN(conv_i(x)))``.
    Fuse: ``s = GAP(sum_i U_i)``, ``z = ReLU(BN(W_fuse s))`` with ``d = max(C_out / r, L)``
    channels. Select: ``a = softmax_over_i(W_select z)`` reshaped to ``(B, M, C_out, 1, 1)``
    (the first ``C_out`` logits belong to branch 0, as in the official Reshape), and
    ``V = sum_i a_i * U_i``.

    Shapes: ``(B, channels, H, W) -> (B, out_channels, H', W')``,
    ``H' = floor((H - 1) / stride) + 1``.
    With the defaults (``out_channels=None``, ``stride=1``) the shape is preserved.

    Defaults from the official SKNet-50 prototxt (implus/SKNet): M = 2, G = 32, r = 16, L = 32,
    branch convolutions without bias followed by BN + ReLU, both fuse/select 1x1 convolutions
    without bias, BN + ReLU on ``z``, softmax over the branch axis.

    Attention for visualisation: ``self.gate`` (``nn.Softmax(dim=1)``) is applied to the select
    logits, so a forward hook on ``module.gate`` captures the branch weights
    ``(B, M, C_out, 1, 1)``; :meth:`attention_map` returns the same tensor.

    Variants by keyword:

    * the widely copied PyTorch ``SKConv(features, WH, M, G, r, stride, L)``: ``keep_3x3=False``
      (branch i is a ``(3+2i) x (3+2i)`` kernel with padding ``1+i``), ``conv_bias=True``,
      ``fc_bias=True``, ``fc_norm_act=False`` (``z = W s + b``, no BN, no ReLU). Its ``WH``
      argument is unused there and is not taken here. Preset ``"skconv"``.
    * timm's ``SelectiveKernel`` class defaults: ``groups=1``, ``split_input=True`` (each branch
      sees ``channels / M`` input channels), ``divisor=8``, ``min_dim=8``
      (``d = make_divisible(C_out / 16, 8)``). Preset ``"timm"``. timm's ``skresnext50_32x4d``
      blocks: ``divisor=32``, ``min_dim=32``; preset ``"timm-skresnext"``. (timm pads
      ``((stride - 1) + dilation * (k - 1)) // 2``, equal to ours for stride 1 and 2.)

    Args:
        channels: input channels ``C``.
        out_channels: output channels ``C_out`` (default ``channels``).
        stride: stride of every branch convolution.
        branches: number of branches ``M`` (>= 1).
        groups: groups ``G`` of every branch convolution.
        reduction: ``r`` in ``d = max(C_out / r, L)``.
        min_dim: ``L``, the smallest fuse width.
        divisor: ``None`` for the official ``d``; an integer rounds ``C_out / r`` to a multiple
            of it as timm does (``make_divisible`` with ``round_limit=0.9``), then applies ``L``.
        keep_3x3: realise larger kernels as dilated 3x3 convolutions (official) instead of
            ``(3+2i) x (3+2i)`` kernels.
        split_input: feed each branch ``channels / M`` input channels (timm) instead of all.
        conv_bias: bias in the branch convolutions.
        fc_bias: bias in the fuse and select 1x1 convolutions.
        fc_norm_act: BatchNorm + ReLU on ``z``.
    """

    def __init__(
        self,
        channels: int,
        *,
        out_channels: int | None = None,
        stride: int = 1,
        branches: int = 2,
        groups: int = 32,
        reduction: float = 16,
        min_dim: int = 32,
        divisor: int | None = None,
        keep_3x3: bool = True,
        split_input: bool = False,
        conv_bias: bool = False,
        fc_bias: bool = False,
        fc_norm_act: bool = True,
    ) -> None:
        super().__init__()
        in_per_branch, c_out = _check_args(
            channels,
            out_channels,
            stride,
            branches,
            groups,
            reduction,
            min_dim,
            divisor,
            split_input,
        )
        self.channels = channels
        self.out_channels = c_out
        self.num_branches = branches
        self.split_input = split_input
        self.in_per_branch = in_per_branch
        self.paths = nn.ModuleList()
        for i in range(branches):
            k, dilation, padding = _branch_geometry(i, keep_3x3)
            conv = nn.Conv2d(
                in_per_branch,
                c_out,
                k,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=conv_bias,
            )
            self.paths.append(nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)))
        self.attn_channels = d = _attn_channels(c_out, reduction, min_dim, divisor)
        self.fc_reduce = nn.Conv2d(c_out, d, 1, bias=fc_bias)
        self.bn = nn.BatchNorm2d(d) if fc_norm_act else nn.Identity()
        self.act = nn.ReLU(inplace=True) if fc_norm_act else nn.Identity()
        self.fc_select = nn.Conv2d(d, branches * c_out, 1, bias=fc_bias)
        self.gate = nn.Softmax(dim=1)

    def _split(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.split_input:
            chunks = torch.split(x, self.in_per_branch, dim=1)  # indexed, not iterated: FX
            return [path(chunks[i]) for i, path in enumerate(self.paths)]
        return [path(x) for path in self.paths]

    def _select(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Branch weights ``(B, M, C_out, 1, 1)`` from the branch outputs."""
        u = feats[0]
        for f in feats[1:]:
            u = u + f
        z = self.act(self.bn(self.fc_reduce(u.mean((2, 3), keepdim=True))))
        logits = self.fc_select(z).unflatten(1, (self.num_branches, self.out_channels))
        return self.gate(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(_NAME, x, self.channels)
        feats = self._split(x)
        attn = self._select(feats)
        out = feats[0] * attn[:, 0]
        for i in range(1, self.num_branches):
            out = out + feats[i] * attn[:, i]
        return out

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax branch weights ``(B, M, C_out, 1, 1)`` for input ``x`` (no grad).

        Use it in eval mode: in train mode the BatchNorms use (and update) batch statistics.
        """
        check_input(_NAME, x, self.channels)
        return self._select(self._split(x))

    def attention_maps(self, x: torch.Tensor, *, query: Query = "mean") -> dict[str, torch.Tensor]:
        """``{"branch": ...}``: the softmax weights of the M branches, ``(B, M, C_out)``;
        ``query`` is ignored."""
        return {"branch": self.attention_map(x).flatten(2)}  # (B, M, C_out, 1, 1) -> (B, M, C)
