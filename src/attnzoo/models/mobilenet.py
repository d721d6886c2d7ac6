"""MobileNetV2 with attention inside the inverted residuals (torchvision's network + attach).

Coordinate Attention (Hou et al., CVPR 2021) and EMA (Ouyang et al., ICASSP 2023) go after the
depthwise conv + BN + ReLU6 of an inverted residual, on the expanded (hidden) channels:

* MobileNetV2 + CA (3.95 M params): ``mobilenet_v2(attention="ca", select=EXPANDED_ONLY)``,
  every block with an expansion layer, as in the official ``mbv2_ca.py`` (houqb/CoordAttention),
  where the first block (expansion 1) has no CA.
* MobileNetV2 + EMA (3.55 M params): ``mobilenet_v2(attention="ema", select=HIDDEN_OVER_144)``,
  the blocks whose hidden width exceeds 144.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from torch import nn
from torchvision.models import mobilenetv2 as tv_mobilenetv2

from attnzoo.models._builders import Select, make_builder

__all__ = ["EXPANDED_ONLY", "HIDDEN_OVER_144", "mobilenet_v2"]


def _expanded(model: nn.Module) -> Callable[[str, int], bool]:
    # a block has an expansion layer when its ``conv`` has 4 entries (expand, dw, project, BN)
    return lambda path, channels: len(cast(nn.Sequential, model.get_submodule(path).conv)) == 4


#: ``select`` for the Coordinate Attention placement: blocks with an expansion layer.
EXPANDED_ONLY = "expanded"


def HIDDEN_OVER_144(path: str, channels: int) -> bool:  # noqa: N802  (a constant-like filter)
    """``select`` for the EMA placement: blocks whose hidden width is larger than 144."""
    return channels > 144


def _resolve_select(model: nn.Module, select: Any) -> Select | None:
    if select == EXPANDED_ONLY:
        return _expanded(model)
    if isinstance(select, str):
        raise ValueError(
            f"mobilenet_v2: select must be a callable or {EXPANDED_ONLY!r}, got {select!r}"
        )
    return select


def _mobilenet_v2(num_classes: int, **model_kwargs: Any) -> nn.Module:
    return tv_mobilenetv2.mobilenet_v2(weights=None, num_classes=num_classes, **model_kwargs)


mobilenet_v2 = make_builder(
    _mobilenet_v2,
    "mobilenet_v2",
    """MobileNetV2 (torchvision, no download) with attention after each depthwise conv.

    Args:
        attention: registry name, module class or factory; ``None`` for the plain network.
        num_classes: classifier outputs.
        stages: 1-based stages of the (t, c, n, s) table (7 stages); default all.
        position: default ``"after_dwconv"`` (hidden channels); also ``"before_add"``,
            ``"after_block"``, ``"after_stage"``.
        select: ``select(block_path, channels) -> bool``, or :data:`EXPANDED_ONLY` (the string
            ``"expanded"``: only blocks with an expansion layer, the CA paper's placement), or
            :data:`HIDDEN_OVER_144` (the EMA paper's placement).
        every, stage_kwargs, identity_init: see :func:`attnzoo.attach`.
        weights: a state dict, a file path, or ``MobileNet_V2_Weights`` (member or name) from
            the local torch hub cache, as in :func:`attnzoo.models.resnet50`.
        model_kwargs: torchvision's ``mobilenet_v2`` keywords (``width_mult``, ``dropout``...).
        **attention_kwargs: the attention module's keyword arguments.

    Example:
        >>> from attnzoo.models import mobilenet_v2
        >>> model = mobilenet_v2(attention="ca", select="expanded")
    """,
    num_classes=1000,
    module=__name__,
    weights_enum=tv_mobilenetv2.MobileNet_V2_Weights,
    resolve_select=_resolve_select,
)
