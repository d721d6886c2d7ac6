"""Concurrent spatial and channel squeeze & excitation (scSE).

Roy, Navab, Wachinger, "Concurrent Spatial and Channel 'Squeeze & Excitation' in Fully
Convolutional Networks", MICCAI 2018 (extended in IEEE TMI 2019, "Recalibrating Fully
Convolutional Networks with Spatial and Channel 'Squeeze and Excitation' Blocks").
Official code: https://github.com/ai-med/squeeze_and_excitation
(``squeeze_and_excitation/squeeze_and_excitation.py``, ``ChannelSpatialSELayer``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo.ops.query import Query
from attnzoo.ops.validation import check_choice, check_input, check_positive_int
from attnzoo.registry import register

__all__ = ["SpatialChannelSE", "scse_param_count"]

_NAME = "SpatialChannelSE"
_COMBINES = ("max", "sum")


def _check_args(channels: int, reduction: int, combine: str) -> int:
    """Validate; return the cSE bottleneck width ``max(1, C // r)``."""
    check_positive_int(_NAME, "channels", channels)
    check_positive_int(_NAME, "reduction", reduction)
    check_choice(_NAME, "combine", combine, _COMBINES)
    return max(1, channels // reduction)


def scse_param_count(channels: int, *, reduction: int = 2, combine: str = "max") -> int:
    """``2 C h + h + C`` (cSE, ``h = max(1, C // r)``) plus ``C + 1`` (sSE's 1x1 conv)."""
    h = _check_args(channels, reduction, combine)
    return 2 * channels * h + h + channels + channels + 1


@register(
    "scse",
    family="hybrid",
    paper="Concurrent Spatial and Channel 'Squeeze & Excitation' in Fully Convolutional Networks",
    venue="MICCAI",
    year=2018,
    code="https://github.com/ai-med/squeeze_and_excitation",
    presets={"smp": {"reduction": 16, "combine": "sum"}},
    param_count=scse_param_count,
    spatial_dims=2,
    example_channels=64,
)
class SpatialChannelSE(nn.Module):
    """scSE: a channel SE gate and a spatial SE gate applied side by side (Roy et al., 2018).

    cSE: ``s_c = sigmoid(W2 relu(W1 mean_hw(x) + b1) + b2)`` (``(B, C)``, ``W1: C -> h``,
    ``W2: h -> C``); sSE: ``s_s = sigmoid(w . x + b)`` per pixel, a 1x1 convolution ``C -> 1``
    (``(B, 1, H, W)``). Output ``max(x * s_c, x * s_s)`` elementwise (``combine="max"``) or
    ``x * s_c + x * s_s`` (``combine="sum"``). Input and output ``(B, C, H, W)``.

    Defaults follow the official ``ChannelSpatialSELayer``: reduction 2, linear layers and the
    1x1 conv with bias, combination by **max**. The MICCAI paper's text combines the two by
    addition (``combine="sum"``); the TMI version compares max, addition, multiplication and
    concatenation and keeps max. ``h = max(1, C // r)`` (the official ``C // r``, guarded).
    The official package imports ``torch.nn.Functional`` (no such module), so it fails to
    import as released; the layers here keep its parameter names (``fc1``, ``fc2``, ``conv``).

    Variants:
        * segmentation_models_pytorch ``SCSEModule`` (U-Net decoders'
          ``decoder_attention_type="scse"``): ``reduction=16, combine="sum"`` (preset ``"smp"``);
          its cSE layers are 1x1 convolutions, i.e. our ``fc`` weights with ``[:, :, None, None]``.

    Args:
        channels: input channels ``C``.
        reduction: ``r``; the cSE bottleneck is ``C / r`` wide.
        combine: ``"max"`` (official code) or ``"sum"`` (MICCAI text, segmentation_models_pytorch).

    Attention: ``s_c`` (``(B, C, 1, 1)``) is the output of ``self.channel_gate`` and ``s_s``
    (``(B, 1, H, W)``) of ``self.spatial_gate``; :meth:`attention_map` returns ``s_s``.
    """

    def __init__(self, channels: int, *, reduction: int = 2, combine: str = "max") -> None:
        super().__init__()
        hidden = _check_args(channels, reduction, combine)
        self.channels = channels
        self.combine = combine
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, channels)
        self.channel_gate = nn.Sigmoid()
        self.conv = nn.Conv2d(channels, 1, 1)
        self.spatial_gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        """``max(x * s_c, x * s_s)`` or ``x * s_c + x * s_s``."""
        check_input(_NAME, x, self.channels)
        cse = x * self.channel_map(x)
        sse = x * self.spatial_gate(self.conv(x))
        return torch.maximum(cse, sse) if self.combine == "max" else cse + sse

    def channel_map(self, x: Tensor) -> Tensor:
        """The cSE gate ``s_c``, ``(B, C, 1, 1)``."""
        logits = self.fc2(self.act(self.fc1(x.mean((2, 3)))))
        return self.channel_gate(logits[:, :, None, None])

    def attention_map(self, x: Tensor) -> Tensor:
        """The sSE gate ``s_s = sigmoid(conv1x1(x))``, ``(B, 1, H, W)``."""
        check_input(_NAME, x, self.channels)
        return self.spatial_gate(self.conv(x))

    def attention_maps(self, x: Tensor, *, query: Query = "mean") -> dict[str, Tensor]:
        """``channel``: ``s_c`` ``(B, C)``; ``spatial``: ``s_s`` ``(B, H, W)``. ``query`` is
        ignored (not a pixel-pair module)."""
        return {"channel": self.channel_map(x).flatten(1), "spatial": self.attention_map(x)[:, 0]}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, combine={self.combine!r}"
