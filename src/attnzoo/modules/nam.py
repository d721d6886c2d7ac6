"""Normalization-based Attention Module (NAM).

Liu, Shao, Zhang, Pan, "NAM: Normalization-based Attention Module", NeurIPS 2021 Workshop
(ImageNet PPML), arXiv:2111.12419. Official code: https://github.com/Christian-lyc/NAM
(``MODELS/nam.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo.ops.query import Query
from attnzoo.ops.validation import check_input, check_positive_int
from attnzoo.registry import register

__all__ = ["NAM", "PixelNorm", "nam_param_count"]

_NAME = "NAM"


def _check_args(channels: int, spatial: bool, detach_weights: bool) -> None:
    check_positive_int(_NAME, "channels", channels)
    for name, value in (("spatial", spatial), ("detach_weights", detach_weights)):
        if not isinstance(value, bool):
            raise TypeError(f"{_NAME}: {name} must be True or False, got {value!r}")


def nam_param_count(channels: int, *, spatial: bool = False, detach_weights: bool = False) -> int:
    """``2 C`` (the channel BatchNorm's scale and shift), ``4 C`` with the spatial part."""
    _check_args(channels, spatial, detach_weights)
    return (4 if spatial else 2) * channels


class PixelNorm(nn.Module):
    """Per-pixel normalisation: each position's ``C``-vector to zero mean and unit variance over
    the channels (biased variance, ``eps`` inside the root), then ``lambda_c z + beta_c``.
    ``(B, C, H, W) -> (B, C, H, W)``; ``lambda`` (``weight``) starts at 1, ``beta`` at 0."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).square().mean(1, keepdim=True)
        z = (x - mean) / (var + self.eps).sqrt()
        out = z * self.weight[:, None, None] + self.bias[:, None, None]
        return out.to(x.dtype)  # bfloat16 activations stay bfloat16 under autocast


def _scale_weights(weight: Tensor, detach: bool) -> Tensor:
    """``|w| / sum |w|``, the normalised importance of each scale factor."""
    w = (weight.detach() if detach else weight).abs()
    return w / w.sum()


@register(
    "nam",
    family="channel",
    paper="NAM: Normalization-based Attention Module",
    venue="NeurIPS Workshop",
    year=2021,
    code="https://github.com/Christian-lyc/NAM",
    presets={"official-code": {"detach_weights": True}, "spatial": {"spatial": True}},
    param_count=nam_param_count,
    spatial_dims=2,
    example_channels=64,
)
class NAM(nn.Module):
    """NAM: BatchNorm scale factors as attention weights (Liu et al., 2021).

    Channel attention (the official module): ``M_c = sigmoid(W_gamma BN(x))`` where ``BN`` is a
    ``BatchNorm2d(C)`` with scale factors ``gamma`` and ``W_gamma = |gamma_c| / sum_j |gamma_j|``
    weights each normalised channel by its share of the total scale (the scale factor measures
    the channel's variance, i.e. its importance); output ``x * M_c``, ``(B, C, H, W)``
    elementwise (a weight per neuron, not per channel).

    Spatial attention (``spatial=True``): the paper's "pixel normalisation" with scale factors
    ``lambda``, ``M_s = sigmoid(W_lambda PN(x'))`` applied to the channel output ``x'``
    (``y = x' * M_s``). The official code only releases the channel part (its ``Att`` has
    ``no_spatial=True`` and no spatial branch), and the paper gives no layer for it; here
    :class:`PixelNorm` normalises each position over the channels (a per-pixel statistic, so any
    input size works, unlike ports that put a ``BatchNorm1d(H W)`` over the positions) and
    ``W_lambda = |lambda| / sum |lambda|`` over its ``C`` scale factors, the same rule as
    ``W_gamma``. This reading is attnzoo's; it is off by default.

    Defaults = official ``Channel_Att``: ``BatchNorm2d(C, affine=True)`` (eps ``1e-5``, momentum
    0.1, ``gamma = 1`` at init), with one deviation: the official code computes ``W_gamma`` from
    ``bn.weight.data``, i.e. **detached**, so its backward is not the derivative of its forward
    (``gamma`` then trains only through the normalisation; gradient checks and double backward
    through the parameters disagree with finite differences). Here the gradient flows through
    ``W_gamma`` too; ``detach_weights=True`` (preset ``"official-code"``) reproduces the
    official gradient. The official training also adds an L1 penalty on the
    scale factors (``sum |gamma|``) to the loss; that belongs to the training loop, not to the
    module. Placement (official ResNets): like SE, after the block's last BN, before the add.

    Args:
        channels: input channels ``C``.
        spatial: add the spatial (pixel-normalisation) attention after the channel one.
        detach_weights: compute ``W_gamma`` (and ``W_lambda``) from detached scale factors.

    Attention: ``M_c`` is the output of ``self.gate``, ``M_s`` of ``self.spatial_gate`` (both
    ``(B, C, H, W)``); :meth:`attention_map` returns ``M_c``.
    """

    def __init__(
        self, channels: int, *, spatial: bool = False, detach_weights: bool = False
    ) -> None:
        super().__init__()
        _check_args(channels, spatial, detach_weights)
        self.channels = channels
        self.detach_weights = detach_weights
        self.bn = nn.BatchNorm2d(channels, affine=True)
        self.gate = nn.Sigmoid()
        self.pn = PixelNorm(channels) if spatial else None
        self.spatial_gate = nn.Sigmoid() if spatial else None

    def forward(self, x: Tensor) -> Tensor:
        """``x' = x * M_c(x)``; with ``spatial``, ``x' * M_s(x')``."""
        out = x * self.attention_map(x)
        if self.pn is not None:
            out = out * self.spatial_map(out)
        return out

    def attention_map(self, x: Tensor) -> Tensor:
        """``M_c = sigmoid(W_gamma BN(x))``, ``(B, C, H, W)``."""
        check_input(_NAME, x, self.channels)
        w = _scale_weights(self.bn.weight, self.detach_weights)
        z = self.bn(x)
        return self.gate(z * w[:, None, None].to(z.dtype))

    def spatial_map(self, x: Tensor) -> Tensor:
        """``M_s = sigmoid(W_lambda PN(x))`` (``spatial=True`` only), ``(B, C, H, W)``."""
        if self.pn is None or self.spatial_gate is None:
            raise ValueError(f"{_NAME}: spatial_map needs spatial=True")
        w = _scale_weights(self.pn.weight, self.detach_weights)
        z = self.pn(x)
        return self.spatial_gate(z * w[:, None, None].to(z.dtype))

    def attention_maps(self, x: Tensor, *, query: Query = "mean") -> dict[str, Tensor]:
        """``channel``: ``M_c`` averaged over positions ``(B, C)``; ``spatial``: the weight
        applied in total (``M_c``, times ``M_s`` with ``spatial``) averaged over channels
        ``(B, H, W)``. ``query`` is ignored. In train mode the BatchNorm uses batch statistics."""
        m_c = self.attention_map(x)
        total = m_c if self.pn is None else m_c * self.spatial_map(x * m_c)
        return {"channel": m_c.mean((2, 3)), "spatial": total.mean(1)}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, spatial={self.pn is not None}"
