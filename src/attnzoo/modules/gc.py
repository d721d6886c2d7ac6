"""Global context block (GCNet).

Cao, Xu, Lin, Wei, Hu, "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
ICCV Workshops 2019. Official code: https://github.com/xvjiarui/GCNet (identical to mmcv's
``ContextBlock``).
"""

from __future__ import annotations

from collections.abc import Iterable

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

__all__ = ["GlobalContext", "gc_param_count"]

_NAME = "GlobalContext"
_FUSIONS = ("channel_add", "channel_mul")


def _check_fusion(fusion: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise ``fusion`` to a tuple in canonical order; a single string is one fusion."""
    items = (fusion,) if isinstance(fusion, str) else tuple(fusion) if _iterable(fusion) else None
    if not items or any(f not in _FUSIONS for f in items):
        raise ValueError(
            f"{_NAME}: fusion must be a non-empty subset of {_FUSIONS}; got {fusion!r}"
        )
    return tuple(f for f in _FUSIONS if f in items)


def _iterable(value: object) -> bool:
    try:
        iter(value)  # type: ignore[call-overload]
    except TypeError:
        return False
    return True


def _planes(channels: int, ratio: float, divisor: int | None) -> int:
    """Bottleneck width: ``int(C * ratio)`` (official), or rounded to ``divisor`` (timm); >= 1."""
    if divisor is None:
        return max(1, int(channels * ratio))
    return make_divisible(channels * ratio, divisor, round_limit=0.0)


def _check_args(
    channels: int,
    ratio: float,
    pooling: str,
    fusion: str | Iterable[str],
    divisor: int | None,
    eps: float,
) -> tuple[str, ...]:
    check_positive_int(_NAME, "channels", channels)
    check_positive_float(_NAME, "ratio", ratio)
    check_choice(_NAME, "pooling", pooling, ("att", "avg"))
    if divisor is not None:
        check_positive_int(_NAME, "divisor", divisor)
    check_positive_float(_NAME, "eps", eps)
    return _check_fusion(fusion)


def gc_param_count(
    channels: int,
    *,
    ratio: float = 1 / 16,
    pooling: str = "att",
    fusion: str | Iterable[str] = ("channel_add",),
    divisor: int | None = None,
    eps: float = 1e-5,
) -> int:
    """Closed-form parameter count of :class:`GlobalContext` (same keywords).

    ``C + 1`` for the attention-pooling mask (``pooling="att"``), plus per fusion branch
    ``C p + p`` (conv) ``+ 2p`` (LayerNorm) ``+ p C + C`` (conv), ``p = planes``.
    """
    fusions = _check_args(channels, ratio, pooling, fusion, divisor, eps)
    p = _planes(channels, ratio, divisor)
    mask = channels + 1 if pooling == "att" else 0
    return mask + len(fusions) * (2 * channels * p + 3 * p + channels)


def _transform(channels: int, planes: int, eps: float) -> nn.Sequential:
    """conv 1x1 C->p, LayerNorm([p, 1, 1]), ReLU, conv 1x1 p->C (official layer indices 0..3)."""
    return nn.Sequential(
        nn.Conv2d(channels, planes, 1),
        nn.LayerNorm([planes, 1, 1], eps=eps),
        nn.ReLU(),
        nn.Conv2d(planes, channels, 1),
    )


@register(
    "gc",
    family="channel",
    paper="GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
    venue="ICCVW",
    year=2019,
    code="https://github.com/xvjiarui/GCNet",
    presets={
        # timm.layers.GlobalContext defaults (fuse_scale only, rd_ratio 1/8, LayerNorm2d eps 1e-6).
        "timm": {"fusion": ("channel_mul",), "ratio": 1 / 8, "divisor": 1, "eps": 1e-6},
        "r4": {"ratio": 1 / 4},
    },
    param_count=gc_param_count,
    spatial_dims=2,
    example_channels=64,
    identity_at_init=True,
)
class GlobalContext(nn.Module):
    """GCNet's global context block: attention-pooled context, bottleneck transform, fusion.

    Paper: Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond",
    ICCV Workshops 2019 (journal version TPAMI 2020).

    Equation. Context modelling (``pooling="att"``): ``w = softmax_over_HW(W_k x)`` with a 1x1
    conv ``C -> 1`` (bias), ``c = sum_j w_j x_j`` (a ``(C, HW) x (HW, 1)`` product, no ``N x N``
    matrix). ``pooling="avg"``: ``c = mean_HW(x)``. Transform per fusion branch:
    ``t = conv_2(ReLU(LayerNorm(conv_1(c))))`` with ``conv_1: C -> p``, ``p = int(C * ratio)``
    (at least 1), LayerNorm over ``[p, 1, 1]``, ``conv_2: p -> C`` (biases). Fusion:
    ``channel_mul``: ``y = x * sigmoid(t_mul)``; ``channel_add``: ``y = y + t_add`` (multiplication
    first when both are used, as in the official code).

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; context ``(B, C, 1, 1)``.

    Defaults from the official code: ``ratio=1/16`` (the paper's r16; ``preset="r4"`` for 1/4),
    ``pooling="att"``, ``fusion=("channel_add",)``. Official initialisation: the mask conv is
    Kaiming-normal (fan_in, ReLU gain) with zero bias, and the LAST conv of every fusion branch
    has zero weight and bias. So the default (add) block is the identity at init; with
    ``channel_mul`` the gate starts at ``sigmoid(0) = 0.5``, i.e. ``channel_mul`` alone halves
    the input at init, exactly as in the official code.

    Submodule names follow the official code (``conv_mask``, ``channel_add_conv.{0,1,3}``,
    ``channel_mul_conv.{0,1,3}``), so official/mmcv ``ContextBlock`` state dicts load directly.

    Attention for visualisation: ``self.context_softmax`` produces the pooling weights
    ``(B, 1, H*W)`` (hook it), :meth:`attention_map` returns them as ``(B, 1, H, W)``; the
    channel_mul gate is ``self.gate`` (``nn.Sigmoid``), output ``(B, C, 1, 1)``.

    Variants by keyword: timm's ``GlobalContext`` defaults are ``fusion=("channel_mul",)``,
    ``ratio=1/8``, ``divisor=1`` (timm rounds ``C * ratio`` to the nearest integer instead of
    truncating) and ``eps=1e-6`` (its ``LayerNorm2d``); preset ``"timm"``. timm's ``"gca"``
    attention is ``fusion=("channel_add",)`` with those widths. mmcv's ``ContextBlock`` is the
    official code.

    Args:
        channels: input channels ``C``.
        ratio: bottleneck ratio ``p / C``.
        pooling: ``"att"`` (attention pooling) or ``"avg"`` (global average pooling).
        fusion: non-empty subset of ``("channel_add", "channel_mul")`` (a single string is one).
        divisor: ``None`` truncates ``C * ratio`` (official); an integer rounds it to the nearest
            multiple of ``divisor`` (timm's ``make_divisible(.., round_limit=0)``).
        eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        channels: int,
        *,
        ratio: float = 1 / 16,
        pooling: str = "att",
        fusion: str | Iterable[str] = ("channel_add",),
        divisor: int | None = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        fusions = _check_args(channels, ratio, pooling, fusion, divisor, eps)
        self.channels = channels
        self.pooling = pooling
        self.fusion = fusions
        self.planes = planes = _planes(channels, ratio, divisor)
        if pooling == "att":
            self.conv_mask = nn.Conv2d(channels, 1, 1)
            self.context_softmax = nn.Softmax(dim=-1)
        self.channel_add_conv = (
            _transform(channels, planes, eps) if "channel_add" in fusions else None
        )
        self.channel_mul_conv = (
            _transform(channels, planes, eps) if "channel_mul" in fusions else None
        )
        self.gate = nn.Sigmoid()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation (``kaiming_init(conv_mask, mode='fan_in')``, last zero)."""
        if self.pooling == "att":
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)
        for branch in (self.channel_add_conv, self.channel_mul_conv):
            if branch is not None:
                nn.init.zeros_(branch[-1].weight)
                nn.init.zeros_(branch[-1].bias)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """Global context ``c`` ``(B, C, 1, 1)``: ``sum_j w_j x_j`` (or the mean of ``x``)."""
        b, c, h, w = x.shape
        if self.pooling == "att":
            weights = self.context_softmax(self.conv_mask(x).reshape(b, 1, h * w))  # (B, 1, HW)
            # (B, 1, C, HW) @ (B, 1, HW, 1): no N x N matrix
            context = x.reshape(b, 1, c, h * w) @ weights.reshape(b, 1, h * w, 1)
            return context.reshape(b, c, 1, 1)
        return x.mean((2, 3), keepdim=True)

    def transforms(self, ctx: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The mul gate ``sigmoid(t_mul)`` and the add term ``t_add`` (``None`` when unused)."""
        scale = self.gate(self.channel_mul_conv(ctx)) if self.channel_mul_conv is not None else None
        shift = self.channel_add_conv(ctx) if self.channel_add_conv is not None else None
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x * sigmoid(t_mul(c)) + t_add(c)`` (each term only with its fusion branch)."""
        check_input(_NAME, x, self.channels)
        scale, shift = self.transforms(self.context(x))
        out = x if scale is None else x * scale
        return out if shift is None else out + shift

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Context pooling weights ``(B, 1, H, W)`` (uniform ``1/HW`` for ``pooling="avg"``)."""
        check_input(_NAME, x, self.channels)
        b, _, h, w = x.shape
        if self.pooling == "att":
            return self.context_softmax(self.conv_mask(x).reshape(b, 1, h * w)).reshape(b, 1, h, w)
        return x.new_full((b, 1, h, w), 1.0 / (h * w))

    def attention_maps(self, x: torch.Tensor, *, query: Query = "mean") -> dict[str, torch.Tensor]:
        """``query`` is ignored. ``spatial`` ``(B, H, W)``: the softmax context-pooling weights
        (sum to 1; only with ``pooling="att"``); ``channel_mul`` ``(B, C)``: ``sigmoid(t_mul)``
        (with ``channel_mul``); ``channel_add`` ``(B, C)``: the added term ``t_add`` (with
        ``channel_add``; zero at the official initialisation)."""
        out: dict[str, torch.Tensor] = {}
        if self.pooling == "att":
            out["spatial"] = self.attention_map(x)[:, 0]
        scale, shift = self.transforms(self.context(x))
        if scale is not None:
            out["channel_mul"] = scale.flatten(1)
        if shift is not None:
            out["channel_add"] = shift.flatten(1)
        return out
