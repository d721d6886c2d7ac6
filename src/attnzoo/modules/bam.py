"""Bottleneck Attention Module (BAM).

Park, Woo, Lee, Kweon, "BAM: Bottleneck Attention Module", BMVC 2018.
Official code: https://github.com/Jongchan/attention-module (``MODELS/bam.py``,
``MODELS/model_resnet.py``).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from attnzoo.ops.query import Query
from attnzoo.ops.validation import check_choice, check_input, check_positive_int
from attnzoo.registry import register

__all__ = ["BAM", "BAMChannelGate", "BAMSpatialGate", "bam_param_count"]

_NAME = "BAM"
_COMBINES = ("sum", "product")


def _check_args(
    channels: int, reduction: int, dilation_conv_num: int, dilation_val: int, combine: str
) -> int:
    """Validate; return the bottleneck width ``max(1, C // r)``."""
    check_positive_int(_NAME, "channels", channels)
    check_positive_int(_NAME, "reduction", reduction)
    check_positive_int(_NAME, "dilation_conv_num", dilation_conv_num, minimum=0)
    check_positive_int(_NAME, "dilation_val", dilation_val)
    check_choice(_NAME, "combine", combine, _COMBINES)
    return max(1, channels // reduction)


def bam_param_count(
    channels: int,
    *,
    reduction: int = 16,
    dilation_conv_num: int = 2,
    dilation_val: int = 4,
    combine: str = "sum",
) -> int:
    """Closed form with ``h = max(1, C // r)`` and ``n = dilation_conv_num``.

    Channel branch: ``C h + h`` (FC) + ``2 h`` (BatchNorm1d) + ``h C + C`` (FC).
    Spatial branch: ``C h + h`` (1x1) + ``2 h`` (BN) + ``n (9 h^2 + h + 2 h)`` (dilated 3x3 + BN)
    + ``h + 1`` (final 1x1).
    """
    h = _check_args(channels, reduction, dilation_conv_num, dilation_val, combine)
    channel = 2 * channels * h + 3 * h + channels
    spatial = channels * h + 3 * h + dilation_conv_num * (9 * h * h + 3 * h) + h + 1
    return channel + spatial


class BAMChannelGate(nn.Module):
    """``M_c = FC(ReLU(BN1d(FC(mean_hw(x)))))``, the logits ``(B, C, 1, 1)`` (no sigmoid).

    Layers keep the official names (``gate_c.gate_c_fc_0``, ``gate_c_bn_1``,
    ``gate_c_fc_final``), so official state dicts load. The squeeze is a mean over ``H, W``
    (the official ``avg_pool2d(x, H)`` assumes square maps).
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.gate_c = nn.Sequential(
            OrderedDict(
                gate_c_fc_0=nn.Linear(channels, hidden),
                gate_c_bn_1=nn.BatchNorm1d(hidden),
                gate_c_relu_1=nn.ReLU(),
                gate_c_fc_final=nn.Linear(hidden, channels),
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.gate_c(x.mean((2, 3)))[:, :, None, None]


class BAMSpatialGate(nn.Module):
    """``M_s``: 1x1 conv ``C -> h``, BN, ReLU, ``n`` x [3x3 conv dilated ``d`` (padding ``d``),
    BN, ReLU], 1x1 conv ``h -> 1``: the logits ``(B, 1, H, W)`` (no sigmoid). Official layer
    names (``gate_s.gate_s_conv_reduce0`` ... ``gate_s_conv_final``)."""

    def __init__(self, channels: int, hidden: int, dilation_conv_num: int, dilation_val: int):
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            gate_s_conv_reduce0=nn.Conv2d(channels, hidden, 1),
            gate_s_bn_reduce0=nn.BatchNorm2d(hidden),
            gate_s_relu_reduce0=nn.ReLU(),
        )
        for i in range(dilation_conv_num):
            layers[f"gate_s_conv_di_{i}"] = nn.Conv2d(
                hidden, hidden, 3, padding=dilation_val, dilation=dilation_val
            )
            layers[f"gate_s_bn_di_{i}"] = nn.BatchNorm2d(hidden)
            layers[f"gate_s_relu_di_{i}"] = nn.ReLU()
        layers["gate_s_conv_final"] = nn.Conv2d(hidden, 1, 1)
        self.gate_s = nn.Sequential(layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.gate_s(x)


@register(
    "bam",
    family="hybrid",
    paper="BAM: Bottleneck Attention Module",
    venue="BMVC",
    year=2018,
    code="https://github.com/Jongchan/attention-module",
    presets={"official-code": {"combine": "product"}},
    param_count=bam_param_count,
    spatial_dims=2,
    example_channels=64,
)
class BAM(nn.Module):
    """Bottleneck Attention Module (Park et al., BMVC 2018): ``F' = F + F * sigmoid(M_c + M_s)``.

    Channel branch ``M_c(F)`` (``(B, C, 1, 1)``): global average pooling, an MLP ``C -> C/r ->
    C`` with BatchNorm1d and ReLU after the hidden layer. Spatial branch ``M_s(F)``
    (``(B, 1, H, W)``): 1x1 conv ``C -> C/r``, two 3x3 convs with dilation 4, 1x1 conv
    ``C/r -> 1``, each hidden conv followed by BatchNorm and ReLU. The two are broadcast to
    ``(B, C, H, W)``, combined, passed through a sigmoid and applied residually:
    ``F' = F * (1 + M(F))``. Input and output ``(B, C, H, W)``, any (non-square) size.

    Defaults: reduction 16, ``dilation_conv_num=2``, ``dilation_val=4`` (official code and paper);
    ``h = max(1, C // 16)``. The combination follows the **paper**, ``M = sigmoid(M_c + M_s)``
    (element-wise sum, the best in its ablation, Table 1); the official ``BAM.forward``
    multiplies, ``sigmoid(M_c * M_s)``: ``combine="product"`` (preset ``"official-code"``). The
    default departs from the official code because that code is broken as released (its
    ``ChannelGate`` references an undefined ``gate_activation``) and disagrees with the paper.
    Also fixed: the official squeeze ``avg_pool2d(x, H)`` assumes square maps (here
    ``mean_hw``). As there, BatchNorm1d in the channel branch cannot train on a batch of one.

    Placement (official ResNets): between stages, after ``layer1``, ``layer2`` and ``layer3``:
    ``attnzoo.attach(model, "bam", position="after_stage", stages=(1, 2, 3))``.

    Args:
        channels: input channels ``C``.
        reduction: ``r`` of both branches.
        dilation_conv_num: number of dilated 3x3 convs in the spatial branch.
        dilation_val: their dilation (and padding).
        combine: ``"sum"`` (paper) or ``"product"`` (official code).

    Attention: ``M(F)`` (``(B, C, H, W)``) is the output of ``self.gate``;
    :meth:`attention_map` returns it.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        dilation_conv_num: int = 2,
        dilation_val: int = 4,
        combine: str = "sum",
    ) -> None:
        super().__init__()
        hidden = _check_args(channels, reduction, dilation_conv_num, dilation_val, combine)
        self.channels = channels
        self.combine = combine
        self.channel_att = BAMChannelGate(channels, hidden)
        self.spatial_att = BAMSpatialGate(channels, hidden, dilation_conv_num, dilation_val)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        """``F + F * M(F)``."""
        return x + x * self.attention_map(x)

    def attention_map(self, x: Tensor) -> Tensor:
        """``M(F) = sigmoid(M_c + M_s)`` (or of ``M_c * M_s``), ``(B, C, H, W)``."""
        check_input(_NAME, x, self.channels)
        m_c, m_s = self.channel_att(x), self.spatial_att(x)
        return self.gate(m_c + m_s if self.combine == "sum" else m_c * m_s)

    def attention_maps(self, x: Tensor, *, query: Query = "mean") -> dict[str, Tensor]:
        """``spatial``: ``M(F)`` averaged over channels ``(B, H, W)``; ``channel``: averaged over
        positions ``(B, C)``; ``m_c`` ``(B, C)`` and ``m_s`` ``(B, H, W)``: the branch logits.
        ``query`` is ignored."""
        m = self.attention_map(x)
        return {
            "spatial": m.mean(1),
            "channel": m.mean((2, 3)),
            "m_c": self.channel_att(x).flatten(1),
            "m_s": self.spatial_att(x)[:, 0],
        }

    def extra_repr(self) -> str:
        return f"channels={self.channels}, combine={self.combine!r}"
