"""SimAM: a simple, parameter-free attention module.

Yang, Zhang, Li, Xie, "SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural
Networks", ICML 2021. Official code: https://github.com/ZjjConan/SimAM
(``networks/attentions/simam_module.py``).
"""

from __future__ import annotations

from torch import Tensor, nn

from attnzoo.ops.query import Query
from attnzoo.ops.validation import check_input, check_positive_float, check_positive_int
from attnzoo.registry import register

__all__ = ["SimAM", "simam_param_count"]

_NAME = "SimAM"


def _check_args(channels: int, e_lambda: float) -> None:
    check_positive_int(_NAME, "channels", channels)
    check_positive_float(_NAME, "e_lambda", e_lambda)


def simam_param_count(channels: int, *, e_lambda: float = 1e-4) -> int:
    """SimAM has no parameters: always 0 (the arguments are still validated)."""
    _check_args(channels, e_lambda)
    return 0


@register(
    "simam",
    family="hybrid",
    paper="SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks",
    venue="ICML",
    year=2021,
    code="https://github.com/ZjjConan/SimAM",
    presets={"imagenet": {"e_lambda": 0.1}},
    param_count=simam_param_count,
    spatial_dims=2,
    example_channels=64,
)
class SimAM(nn.Module):
    """SimAM: every neuron weighted by its inverse minimal energy (Yang et al., ICML 2021).

    For each channel, with ``mu`` the mean over ``H x W`` and ``n = H W - 1``:
    ``d = (x - mu)^2`` (squared distance of each neuron from its channel's mean),
    ``v = sum_hw(d) / n`` (the channel's variance), ``e_inv = d / (4 (v + lambda)) + 0.5``
    (the inverse of the neuron's minimal energy: distinctive neurons get large values),
    output ``x * sigmoid(e_inv)``. Input and output ``(B, C, H, W)``; the weights are
    ``(B, C, H, W)``, one per neuron (a full 3-D attention, no parameters).

    Defaults: ``e_lambda = 1e-4``, the official module's default (its CIFAR runs); the official
    ImageNet runs pass ``0.1`` (preset ``"imagenet"``).

    ``H = W = 1`` gives ``n = 0`` and ``0 / 0`` in the official code (NaN); here ``n`` is at
    least 1, so a ``1 x 1`` map gets ``d = 0`` and the weight ``sigmoid(0.5)``, the limit of the
    formula. ``n`` is computed from a map of ones (``1 x 1 x H x W``), so traced and exported
    graphs keep a dynamic spatial size.

    Placement (official ResNets, ``networks/imagenet``): after the block's 3x3 convolution
    ``conv2`` and **before** its BatchNorm ``bn2`` (``conv2 = Sequential(conv3x3, simam)``), in
    BasicBlock and Bottleneck alike: ``attnzoo.attach(model, "simam",
    position="after_conv3x3_pre_bn")``.

    Args:
        channels: input channels ``C`` (only used to check the input; no parameters).
        e_lambda: the regulariser ``lambda`` of the energy (> 0).

    Attention: the weights ``sigmoid(e_inv)`` (``(B, C, H, W)``) are the output of the submodule
    ``self.gate`` (hook it); :meth:`attention_map` returns them.
    """

    def __init__(self, channels: int, *, e_lambda: float = 1e-4) -> None:
        super().__init__()
        _check_args(channels, e_lambda)
        self.channels = channels
        self.e_lambda = float(e_lambda)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        """``x * sigmoid(d / (4 (v + lambda)) + 0.5)``."""
        return x * self.attention_map(x)

    def attention_map(self, x: Tensor) -> Tensor:
        """The per-neuron weights ``sigmoid(e_inv)``, ``(B, C, H, W)``."""
        check_input(_NAME, x, self.channels)
        d = (x - x.mean((2, 3), keepdim=True)).square()
        ones = x.new_ones(1, 1, 1, 1).expand(1, 1, x.shape[2], x.shape[3])
        n = (ones.sum((2, 3), keepdim=True) - 1).clamp_min(1)  # H W - 1, at least 1
        v = d.sum((2, 3), keepdim=True) / n
        return self.gate(d / (4 * (v + self.e_lambda)) + 0.5)

    def attention_maps(self, x: Tensor, *, query: Query = "mean") -> dict[str, Tensor]:
        """``spatial``: the weights averaged over channels ``(B, H, W)``; ``channel``: averaged
        over positions ``(B, C)``; ``weights``: all of them ``(B, C, H, W)``. ``query`` is
        ignored (not a pixel-pair module)."""
        w = self.attention_map(x)
        return {"spatial": w.mean(1), "channel": w.mean((2, 3)), "weights": w}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, e_lambda={self.e_lambda}"
