"""Polarized Self-Attention (PSA).

Liu, Liu, Fan, Huang, "Polarized Self-Attention: Towards High-quality Pixel-wise Regression",
arXiv 2107.00782, 2021. Official code: https://github.com/DeLightCMU/PSA
(``semantic-segmentation/network/PSA.py``: ``PSA_p``, ``PSA_s``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo.ops.query import Query
from attnzoo.ops.validation import check_choice, check_input, check_positive_int
from attnzoo.registry import register

__all__ = ["PolarizedSelfAttention", "psa_param_count"]

_NAME = "PolarizedSelfAttention"
LAYOUTS = ("parallel", "sequential")
SPATIAL_SOFTMAX = ("product", "value", "channel")
CHANNEL_TRANSFORMS = ("conv", "bottleneck", "conv-ln")


def _widths(channels: int) -> tuple[int, int]:
    """``(C / 2, C / 8)``: the branches' inner width and the sequential bottleneck (>= 1)."""
    inner = max(1, channels // 2)
    return inner, max(1, inner // 4)


def _check_args(channels: int, layout: str, spatial_softmax: str, channel_transform: str) -> None:
    check_positive_int(_NAME, "channels", channels)
    check_choice(_NAME, "layout", layout, LAYOUTS)
    check_choice(_NAME, "spatial_softmax", spatial_softmax, SPATIAL_SOFTMAX)
    check_choice(_NAME, "channel_transform", channel_transform, CHANNEL_TRANSFORMS)


def psa_param_count(
    channels: int,
    *,
    layout: str = "parallel",
    spatial_softmax: str = "product",
    channel_transform: str = "conv",
) -> int:
    """Closed-form parameter count of :class:`PolarizedSelfAttention` (same keywords).

    With ``i = C / 2``: the four bias-free 1x1 convs ``C (1 + 3 i)``, plus the channel branch's
    transform: ``i C`` (``"conv"``), ``i C + 2 C`` (``"conv-ln"``) or, with ``r = i / 4``,
    ``i r + r + 2 r + r C + C`` (``"bottleneck"``: two convs with bias and a LayerNorm).
    """
    _check_args(channels, layout, spatial_softmax, channel_transform)
    i, r = _widths(channels)
    convs = channels * (1 + 3 * i)
    if channel_transform == "conv":
        return convs + i * channels
    if channel_transform == "conv-ln":
        return convs + i * channels + 2 * channels
    return convs + i * r + r + 2 * r + r * channels + channels


def _channel_transform(kind: str, inner: int, bottleneck: int, channels: int) -> nn.Module:
    """``W_z``: ``C/2 -> C``. Official PSA_p: one bias-free conv; official PSA_s: conv ``C/2 ->
    C/8`` (bias), LayerNorm, ReLU, conv ``-> C`` (bias); the paper: conv, then LayerNorm."""
    if kind == "conv":
        return nn.Conv2d(inner, channels, 1, bias=False)
    if kind == "conv-ln":
        return nn.Sequential(
            nn.Conv2d(inner, channels, 1, bias=False), nn.LayerNorm([channels, 1, 1])
        )
    return nn.Sequential(
        nn.Conv2d(inner, bottleneck, 1),
        nn.LayerNorm([bottleneck, 1, 1]),
        nn.ReLU(),
        nn.Conv2d(bottleneck, channels, 1),
    )


@register(
    "psa",
    family="hybrid",
    paper="Polarized Self-Attention: Towards High-quality Pixel-wise Regression",
    venue="arXiv",
    year=2021,
    code="https://github.com/DeLightCMU/PSA",
    presets={
        "paper": {
            "layout": "parallel",
            "spatial_softmax": "channel",
            "channel_transform": "conv-ln",
        },
        "official-parallel": {
            "layout": "parallel",
            "spatial_softmax": "product",
            "channel_transform": "conv",
        },
        "official-sequential": {
            "layout": "sequential",
            "spatial_softmax": "value",
            "channel_transform": "bottleneck",
        },
    },
    param_count=psa_param_count,
    spatial_dims=2,
    example_channels=64,
)
class PolarizedSelfAttention(nn.Module):
    """Polarized self-attention: a channel-only and a spatial-only branch, each collapsing one
    dimension completely and keeping the other at full resolution (Liu et al., arXiv 2021).

    Channel-only branch (mask ``(B, C, 1, 1)``): ``A_ch = sigmoid(W_z(W_v x . softmax_HW(W_q
    x)))`` with 1x1 convs ``W_v: C -> C/2``, ``W_q: C -> 1`` (bias-free), the ``C/2`` vector
    ``W_v x`` pooled with the softmax weights over the ``H W`` positions, and ``W_z: C/2 -> C``
    (``channel_transform``). Spatial-only branch (mask ``(B, 1, H, W)``): with ``g = GAP(W_q'
    x)`` (``C/2``) and ``t = W_v' x`` (``C/2`` channels at every position), ``A_sp =
    sigmoid(s)`` where ``s`` is, by ``spatial_softmax``:

    * ``"product"`` (official ``PSA_p``): ``softmax_HW(g . t)``, one softmax over the positions
      of the per-position products;
    * ``"value"`` (official ``PSA_s``): ``g . softmax_HW(t)``, each of the ``C/2`` channels of
      ``t`` normalised over the positions first;
    * ``"channel"`` (the paper's Eq. for ``A_sp``): ``softmax_C(g) . t``, the softmax over the
      ``C/2`` channels of the pooled query (no softmax over positions).

    Layout: ``"parallel"``: ``y = x * A_ch(x) + x * A_sp(x)``; ``"sequential"``: ``z = x *
    A_ch(x)``, ``y = z * A_sp(z)``.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; inner width ``C/2`` (at least 1).

    Defaults: the official ``PSA_p(C, C)``, the repository's best Cityscapes model (HRNetV2-OCR
    + PSA(p), 86.95 mIoU vs 86.72 for PSA(s)): ``layout="parallel"``,
    ``spatial_softmax="product"``, ``channel_transform="conv"`` (one bias-free conv, **no
    LayerNorm**, although the paper puts a LayerNorm before the channel sigmoid). The official
    code and the paper differ; presets: ``"official-parallel"`` (the defaults, ``PSA_p``),
    ``"official-sequential"`` (``PSA_s``: sequential, ``spatial_softmax="value"``,
    ``channel_transform="bottleneck"``: conv ``C/2 -> C/8`` with bias, LayerNorm, ReLU, conv
    ``-> C`` with bias) and ``"paper"`` (parallel, ``spatial_softmax="channel"``,
    ``channel_transform="conv-ln"``: bias-free conv then LayerNorm over ``(C, 1, 1)``; the form
    External-Attention-pytorch implements). Initialisation as official: Kaiming-normal
    (fan_in) for the four query/value convs. Parameter names follow the official code
    (``conv_q_right``, ``conv_v_right``, ``conv_up`` of the channel branch; ``conv_q_left``,
    ``conv_v_left`` of the spatial branch), so its state dicts load.

    Args:
        channels: input channels ``C``.
        layout: ``"parallel"`` or ``"sequential"``.
        spatial_softmax: ``"product"``, ``"value"`` or ``"channel"`` (see above).
        channel_transform: ``"conv"``, ``"bottleneck"`` or ``"conv-ln"`` (see above).

    Attention: the masks are the outputs of the submodules ``channel_gate`` ``(B, C, 1, 1)``
    and ``spatial_gate`` ``(B, 1, H, W)`` (``nn.Sigmoid``, hook them); :meth:`masks` returns
    both, :meth:`attention_map` the spatial one.
    """

    def __init__(
        self,
        channels: int,
        *,
        layout: str = "parallel",
        spatial_softmax: str = "product",
        channel_transform: str = "conv",
    ) -> None:
        super().__init__()
        _check_args(channels, layout, spatial_softmax, channel_transform)
        self.channels = channels
        self.layout = layout
        self.spatial_softmax = spatial_softmax
        inner, bottleneck = _widths(channels)
        # channel-only branch (the official ``spatial_pool``)
        self.conv_q_right = nn.Conv2d(channels, 1, 1, bias=False)
        self.conv_v_right = nn.Conv2d(channels, inner, 1, bias=False)
        self.conv_up = _channel_transform(channel_transform, inner, bottleneck, channels)
        self.channel_gate = nn.Sigmoid()
        # spatial-only branch (the official ``channel_pool``)
        self.conv_q_left = nn.Conv2d(channels, inner, 1, bias=False)
        self.conv_v_left = nn.Conv2d(channels, inner, 1, bias=False)
        self.spatial_gate = nn.Sigmoid()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: Kaiming-normal, fan_in, of the query/value convs."""
        for conv in (self.conv_q_right, self.conv_v_right, self.conv_q_left, self.conv_v_left):
            nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")

    def channel_mask(self, x: Tensor) -> Tensor:
        """``A_ch(x)``, ``(B, C, 1, 1)``."""
        v = self.conv_v_right(x).flatten(2)  # (B, C/2, N)
        w = torch.softmax(self.conv_q_right(x).flatten(1), dim=1)  # (B, N)
        context = torch.einsum("bin,bn->bi", v, w.to(v.dtype))[:, :, None, None]
        return self.channel_gate(self.conv_up(context)).to(x.dtype)

    def spatial_mask(self, x: Tensor) -> Tensor:
        """``A_sp(x)``, ``(B, 1, H, W)``."""
        g = self.conv_q_left(x).mean((2, 3))  # (B, C/2)
        t = self.conv_v_left(x).flatten(2)  # (B, C/2, N)
        if self.spatial_softmax == "product":
            s = torch.softmax(torch.einsum("bi,bin->bn", g, t), dim=1)
        elif self.spatial_softmax == "value":
            s = torch.einsum("bi,bin->bn", g, torch.softmax(t, dim=2).to(g.dtype))
        else:
            s = torch.einsum("bi,bin->bn", torch.softmax(g, dim=1).to(t.dtype), t)
        return self.spatial_gate(s.unflatten(1, x.shape[2:]).unsqueeze(1)).to(x.dtype)

    def masks(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(A_ch, A_sp)`` as applied: in the sequential layout ``A_sp`` of ``x * A_ch``."""
        check_input(_NAME, x, self.channels)
        a_ch = self.channel_mask(x)
        return a_ch, self.spatial_mask(x * a_ch if self.layout == "sequential" else x)

    def forward(self, x: Tensor) -> Tensor:
        """Parallel ``x * A_ch(x) + x * A_sp(x)``; sequential ``z * A_sp(z)``, ``z = x * A_ch``."""
        check_input(_NAME, x, self.channels)
        if self.layout == "sequential":
            z = x * self.channel_mask(x)
            return z * self.spatial_mask(z)
        return x * self.channel_mask(x) + x * self.spatial_mask(x)

    def attention_map(self, x: Tensor) -> Tensor:
        """The spatial mask ``A_sp`` as applied, ``(B, 1, H, W)``."""
        return self.masks(x)[1]

    def attention_maps(self, x: Tensor, *, query: Query = "mean") -> dict[str, Tensor]:
        """``channel`` ``(B, C)``: ``A_ch``; ``spatial`` ``(B, H, W)``: ``A_sp`` as applied (of
        ``x * A_ch`` in the sequential layout). ``query`` is ignored (one mask per image)."""
        a_ch, a_sp = self.masks(x)
        return {"channel": a_ch.flatten(1), "spatial": a_sp[:, 0]}

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, layout={self.layout!r}, "
            f"spatial_softmax={self.spatial_softmax!r}"
        )
