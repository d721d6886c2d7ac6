"""Squeeze-and-Excitation (SE) block.

Hu, Shen, Albanie, Sun, Wu, "Squeeze-and-Excitation Networks", CVPR 2018 (TPAMI 2020).
Official code: https://github.com/hujie-frank/SENet (Caffe).
"""

from __future__ import annotations

from torch import Tensor, nn

from attnzoo.ops.divisible import make_divisible
from attnzoo.ops.query import Query
from attnzoo.ops.validation import check_input, check_positive_int
from attnzoo.registry import register

__all__ = ["SqueezeExcitation", "se_param_count", "se_hidden_channels"]

_NAME = "SqueezeExcitation"


def se_hidden_channels(channels: int, reduction: int = 16, divisor: int | None = None) -> int:
    """Width of the SE bottleneck.

    ``divisor=None`` (official): ``max(1, channels // reduction)``, the official ``C / r`` (all
    channel counts of the paper's networks are multiples of ``r``) guarded so it is never 0.
    ``divisor=d`` (timm): ``C / r`` rounded to the nearest multiple of ``d`` (halves up), at least
    ``d`` (timm's ``make_divisible(C * rd_ratio, d, round_limit=0)``).
    """
    if divisor is None:
        return max(1, channels // reduction)
    return make_divisible(channels / reduction, divisor, round_limit=0.0)


def _check_args(channels: int, reduction: int, bias: bool, divisor: int | None) -> None:
    check_positive_int(_NAME, "channels", channels)
    check_positive_int(_NAME, "reduction", reduction)
    if not isinstance(bias, bool):
        raise TypeError(f"{_NAME}: bias must be True or False, got {bias!r}")
    if divisor is not None:
        check_positive_int(_NAME, "divisor", divisor)


def se_param_count(
    channels: int, *, reduction: int = 16, bias: bool = True, divisor: int | None = None
) -> int:
    """Closed-form parameter count: ``2 C h + h + C`` with bias, ``2 C h`` without.

    ``h`` is :func:`se_hidden_channels`; the paper's ``2 C^2 / r + C / r + C`` when ``r | C``.
    """
    _check_args(channels, reduction, bias, divisor)
    h = se_hidden_channels(channels, reduction, divisor)
    return 2 * channels * h + (h + channels if bias else 0)


@register(
    "se",
    family="channel",
    paper="Squeeze-and-Excitation Networks",
    venue="CVPR",
    year=2018,
    code="https://github.com/hujie-frank/SENet",
    presets={"timm": {"divisor": 8}, "yolov4-tiny": {"bias": False}},
    param_count=se_param_count,
    spatial_dims=2,
    example_channels=64,
)
class SqueezeExcitation(nn.Module):
    """Squeeze-and-Excitation channel gate (Hu et al., CVPR 2018).

    Squeeze: global average pooling of each channel, ``z = mean_hw(x)`` of shape ``(B, C)``.
    Excitation: ``s = sigmoid(W2 relu(W1 z + b1) + b2)`` with ``W1: C -> h`` and ``W2: h -> C``.
    Output: ``x * s`` broadcast over ``H, W``. Input and output ``(B, C, H, W)``; ``forward`` is
    ``x * self.attention_map(x)``.

    Defaults follow the official (Caffe) SENet: reduction ``r = 16``, fully connected layers
    **with bias**, ``h = C / r``. Here ``h = max(1, C // r)`` so that small ``C`` never gives a
    zero-width bottleneck (naive ports compute ``C // r = 0`` for ``C < r``).

    Args:
        channels: input channels ``C``.
        reduction: ``r``, the bottleneck is ``C / r`` wide.
        bias: biases in both fully connected layers (official: True).
        divisor: ``None`` (official ``max(1, C // r)``) or ``d``: round ``C / r`` to the nearest
            multiple of ``d`` (at least ``d``), timm's rule.

    Variants:
        * timm ``SEModule(C)``: ``divisor=8`` (preset ``"timm"``); e.g. ``C = 64`` gives
          ``h = 8`` instead of 4. timm uses 1x1 convolutions; ours are ``nn.Linear`` with the
          same weights reshaped (``conv.weight[:, :, 0, 0]``).
        * YOLOv4-tiny (bubbliiiing/yolov4-tiny-pytorch, ``se_block``) and common PyTorch ports'
          ``SELayer``: ``bias=False`` (preset ``"yolov4-tiny"``); they compute ``C // 16``
          without a guard.

    Attention: the gate ``s`` (``(B, C, 1, 1)``) is the output of the submodule ``self.gate``
    (hook it) and is returned by :meth:`attention_map`.
    """

    def __init__(
        self, channels: int, *, reduction: int = 16, bias: bool = True, divisor: int | None = None
    ) -> None:
        super().__init__()
        _check_args(channels, reduction, bias, divisor)
        self.channels = channels
        hidden = se_hidden_channels(channels, reduction, divisor)
        self.fc1 = nn.Linear(channels, hidden, bias=bias)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, channels, bias=bias)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        """``x * s``, the input rescaled channel by channel."""
        return x * self.attention_map(x)

    def attention_map(self, x: Tensor) -> Tensor:
        """The channel gate ``s = sigmoid(fc2(relu(fc1(mean_hw(x)))))``, ``(B, C, 1, 1)``."""
        check_input(_NAME, x, self.channels)
        z = x.mean((2, 3))  # squeeze: (B, C)
        logits = self.fc2(self.act(self.fc1(z)))  # excitation: (B, C)
        return self.gate(logits[:, :, None, None])

    def attention_maps(self, x: Tensor, *, query: Query = "mean") -> dict[str, Tensor]:
        """``{"channel": s}``, the gate as ``(B, C)``; ``query`` is ignored."""
        return {"channel": self.attention_map(x).flatten(1)}

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
