"""Efficient Channel Attention (ECA).

Wang, Wu, Zhu, Li, Zuo, Hu, "ECA-Net: Efficient Channel Attention for Deep Convolutional Neural
Networks", CVPR 2020. Official code: https://github.com/BangguWu/ECANet
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from attnzoo.ops.query import Query
from attnzoo.ops.validation import (
    check_input,
    check_odd_int,
    check_positive_float,
    check_positive_int,
)
from attnzoo.registry import register

__all__ = ["EfficientChannelAttention", "eca_kernel_size", "eca_param_count"]

_NAME = "EfficientChannelAttention"


def eca_kernel_size(channels: int, gamma: float = 2, b: float = 1, min_kernel_size: int = 1) -> int:
    """The paper's adaptive kernel size ``k = psi(C) = |(log2 C + b) / gamma|_odd``.

    Exact rounding: ``t = int(abs((log2(C) + b) / gamma))`` (truncation), ``k = t`` if ``t`` is
    odd else ``t + 1``; then ``k = max(k, min_kernel_size)``. ``log2`` is ``math.log2`` (exact for
    powers of two). With ``gamma = 2, b = 1``:

    ====  ===  ===  ===  ===  ====  ====
    C     64   128  256  512  1024  2048
    k     3    5    5    5    5     7
    ====  ===  ===  ===  ===  ====  ====

    and ``k = 1`` for ``C < 8`` (``min_kernel_size=3``, timm's rule, gives 3 there).
    """
    t = int(abs((math.log2(channels) + b) / gamma))
    k = t if t % 2 else t + 1
    return max(k, min_kernel_size)


def _resolve_kernel(
    channels: int, kernel_size: int | None, gamma: float, b: float, min_kernel_size: int
) -> int:
    check_positive_int(_NAME, "channels", channels)
    check_positive_float(_NAME, "gamma", gamma)
    if isinstance(b, bool) or not isinstance(b, (int, float)):
        raise TypeError(f"{_NAME}: b must be a real number, got {b!r}")
    check_odd_int(_NAME, "min_kernel_size", min_kernel_size)
    if kernel_size is not None:
        return check_odd_int(_NAME, "kernel_size", kernel_size)
    return eca_kernel_size(channels, gamma, b, min_kernel_size)


def eca_param_count(
    channels: int,
    *,
    kernel_size: int | None = None,
    gamma: float = 2,
    b: float = 1,
    min_kernel_size: int = 1,
) -> int:
    """Closed-form parameter count: ``k`` (one bias-free 1-D kernel shared by all channels)."""
    return _resolve_kernel(channels, kernel_size, gamma, b, min_kernel_size)


@register(
    "eca",
    family="channel",
    paper="ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks",
    venue="CVPR",
    year=2020,
    code="https://github.com/BangguWu/ECANet",
    presets={"timm": {"min_kernel_size": 3}, "yolov4-tiny": {"gamma": 2, "b": 1}},
    param_count=eca_param_count,
    spatial_dims=2,
    example_channels=64,
)
class EfficientChannelAttention(nn.Module):
    """Efficient Channel Attention (Wang et al., CVPR 2020).

    ``z = mean_hw(x)`` (``(B, C)``), then a 1-D convolution *across channels* with one shared
    kernel of odd size ``k`` (zero padding ``(k - 1) / 2``, no bias), then
    ``s = sigmoid(conv1d(z))`` and the output ``x * s``. Input and output ``(B, C, H, W)``;
    ``forward`` is ``x * self.attention_map(x)``.

    Kernel size: ``kernel_size=None`` (default) uses the paper's adaptive rule
    ``k = |(log2 C + b) / gamma|_odd`` with ``gamma = 2, b = 1`` (exact rounding and a table in
    :func:`eca_kernel_size`: 3 for C = 64, 5 for 128 to 1024, 7 for 2048). An explicit odd
    ``kernel_size`` is always honoured (timm ignores it when ``channels`` is given); an even one
    raises ``ValueError``. The official repository hard-codes per-stage kernels instead (its
    released ResNet-50 uses 3, 5, 5, 7): pass ``kernel_size`` to reproduce a given model.

    Args:
        channels: input channels ``C``.
        kernel_size: odd kernel size, or ``None`` for the adaptive rule.
        gamma, b: the adaptive rule's constants.
        min_kernel_size: lower bound of the adaptive kernel (1; timm uses 3).

    Variants:
        * timm ``EcaModule(C)``: ``min_kernel_size=3`` (preset ``"timm"``), differs only for
          ``C < 8``.
        * YOLOv4-tiny (bubbliiiing/yolov4-tiny-pytorch, ``eca_block``): the adaptive rule with
          ``gamma=2, b=1`` = the default (preset ``"yolov4-tiny"``).

    Attention: the gate ``s`` (``(B, C, 1, 1)``) is the output of ``self.gate`` (hook it) and
    is returned by :meth:`attention_map`. The weight is ``self.conv.weight`` (``(1, 1, k)``).
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int | None = None,
        gamma: float = 2,
        b: float = 1,
        min_kernel_size: int = 1,
    ) -> None:
        super().__init__()
        k = _resolve_kernel(channels, kernel_size, gamma, b, min_kernel_size)
        self.channels = channels
        self.kernel_size = k
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        """``x * s``, the input rescaled channel by channel."""
        return x * self.attention_map(x)

    def attention_map(self, x: Tensor) -> Tensor:
        """The channel gate ``s = sigmoid(conv1d(mean_hw(x)))`` of shape ``(B, C, 1, 1)``."""
        check_input(_NAME, x, self.channels)
        z = x.mean((2, 3))[:, None, :]  # (B, 1, C): the channels are the 1-D sequence
        logits = self.conv(z)  # (B, 1, C)
        return self.gate(logits.transpose(1, 2)[..., None])

    def attention_maps(self, x: Tensor, *, query: Query = "mean") -> dict[str, Tensor]:
        """``{"channel": s}``, the gate as ``(B, C)``; ``query`` is ignored."""
        return {"channel": self.attention_map(x).flatten(1)}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"
