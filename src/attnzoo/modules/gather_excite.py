"""Gather-Excite (GE) attention.

Hu, Shen, Albanie, Sun, Vedaldi, "Gather-Excite: Exploiting Feature Context in Convolutional
Neural Networks", NeurIPS 2018. Official code (Caffe prototxts of the global-extent ResNet-50
models): https://github.com/hujie-frank/GENet. PyTorch reference for the other extents:
``timm.layers.GatherExcite`` (https://github.com/huggingface/pytorch-image-models).
"""

from __future__ import annotations

import math

import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.ops.divisible import make_divisible
from attnzoo.ops.query import Query
from attnzoo.ops.validation import check_input, check_positive_int
from attnzoo.registry import register

__all__ = ["GatherExcite", "ge_param_count", "ge_hidden_channels"]

_NAME = "GatherExcite"


def ge_hidden_channels(channels: int, reduction: int = 16) -> int:
    """Width of the excite MLP: ``C / r`` rounded to the nearest integer, at least 1 (timm's
    ``make_divisible(C / r, 1, round_limit=0)``; ``C / r`` exactly for the official widths)."""
    return make_divisible(channels / reduction, 1, round_limit=0.0)


def _check_feat_size(feat_size: object) -> tuple[int, int] | None:
    if feat_size is None:
        return None
    size = (feat_size, feat_size) if isinstance(feat_size, int) else feat_size
    if not (
        isinstance(size, tuple | list)
        and len(size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"{_NAME}: feat_size must be None, an int or (H, W); got {feat_size!r}")
    return int(size[0]), int(size[1])


def _check_args(
    channels: int,
    extent: int,
    extra_params: bool,
    use_mlp: bool,
    reduction: int,
    gather_act: bool,
    feat_size: object,
) -> tuple[int, int] | None:
    check_positive_int(_NAME, "channels", channels)
    check_positive_int(_NAME, "extent", extent, minimum=0)
    if extent != 0 and (extent < 2 or extent & (extent - 1)):
        raise ValueError(f"{_NAME}: extent must be 0 (global) or a power of two >= 2; got {extent}")
    for name, flag in (("extra_params", extra_params), ("use_mlp", use_mlp)):
        if not isinstance(flag, bool):
            raise TypeError(f"{_NAME}: {name} must be True or False, got {flag!r}")
    if not isinstance(gather_act, bool):
        raise TypeError(f"{_NAME}: gather_act must be True or False, got {gather_act!r}")
    check_positive_int(_NAME, "reduction", reduction)
    size = _check_feat_size(feat_size)
    if extent == 0 and extra_params and size is None:
        raise ValueError(
            f"{_NAME}: a global gather with parameters (extent=0, extra_params=True) is a "
            "depthwise conv as large as the feature map: pass feat_size=(H, W)"
        )
    if size is not None and not (extent == 0 and extra_params):
        raise ValueError(
            f"{_NAME}: feat_size is only used by extent=0 with extra_params=True; got "
            f"feat_size={feat_size!r} with extent={extent}, extra_params={extra_params}"
        )
    return size


def ge_param_count(
    channels: int,
    *,
    extent: int = 0,
    extra_params: bool = False,
    use_mlp: bool = False,
    reduction: int = 16,
    gather_act: bool = True,
    feat_size: int | tuple[int, int] | None = None,
) -> int:
    """Closed-form parameter count of :class:`GatherExcite` (same keywords).

    Gather with parameters: ``C (kh kw + 2)`` (global depthwise conv, BatchNorm) or
    ``11 C log2(e)`` (``log2 e`` depthwise 3x3 convs without bias, each with BatchNorm).
    Excite MLP: ``2 C h + h + C``, ``h`` = :func:`ge_hidden_channels`. GE-theta-minus has none.
    """
    size = _check_args(channels, extent, extra_params, use_mlp, reduction, gather_act, feat_size)
    total = 0
    if extra_params:
        per_conv = (size[0] * size[1] if size else 9) + 2
        total += channels * per_conv * (1 if extent == 0 else int(math.log2(extent)))
    if use_mlp:
        h = ge_hidden_channels(channels, reduction)
        total += 2 * channels * h + h + channels
    return total


def _upsample_nearest(g: Tensor, like: Tensor) -> Tensor:
    """``g`` resized to ``like``'s spatial size by nearest neighbours (PyTorch's ``"nearest"``:
    output pixel ``i`` takes input pixel ``floor(i h / H)``), as timm's GatherExcite. An FX leaf:
    the size is read from the tensor."""
    return F.interpolate(g, size=like.shape[-2:], mode="nearest")


torch.fx.wrap("_upsample_nearest")


def _param_gather(
    channels: int, extent: int, size: tuple[int, int] | None, act_last: bool
) -> nn.Sequential:
    """Depthwise convs (no bias) + BatchNorm, ReLU between (and after the last when
    ``act_last``); module names ``conv1, norm1, act1, ...`` as in timm."""
    gather = nn.Sequential()
    if extent == 0:
        assert size is not None
        conv = nn.Conv2d(channels, channels, size, groups=channels, bias=False)
        gather.add_module("conv1", conv)
        gather.add_module("norm1", nn.BatchNorm2d(channels))
        n = 1
    else:
        n = int(math.log2(extent))
        for i in range(1, n + 1):
            conv = nn.Conv2d(channels, channels, 3, 2, padding=1, groups=channels, bias=False)
            gather.add_module(f"conv{i}", conv)
            gather.add_module(f"norm{i}", nn.BatchNorm2d(channels))
            if i < n:
                gather.add_module(f"act{i}", nn.ReLU())
    if act_last:
        gather.add_module(f"act{n}", nn.ReLU())
    return gather


class _ExciteMlp(nn.Module):
    """1x1 conv ``C -> h`` (bias), ReLU, 1x1 conv ``h -> C`` (bias); timm's ``ConvMlp`` names."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


@register(
    "ge",
    family="channel",
    paper="Gather-Excite: Exploiting Feature Context in Convolutional Neural Networks",
    venue="NeurIPS",
    year=2018,
    code="https://github.com/hujie-frank/GENet",
    presets={
        # GE-theta-minus with extent 8 (the paper's E8 models), parameter-free
        "theta-minus-e8": {"extent": 8},
        # GE-theta-plus with extent 2: a strided depthwise gather and the excite MLP
        "theta-plus-e2": {"extent": 2, "extra_params": True, "use_mlp": True},
    },
    param_count=ge_param_count,
    spatial_dims=2,
    example_channels=64,
)
class GatherExcite(nn.Module):
    """Gather-Excite: gather context over an extent, excite each position with it (Hu et al.,
    NeurIPS 2018).

    Equation in words: ``y = x * sigmoid(up(excite(gather(x))))``. *Gather* ``xi_G`` aggregates
    each channel over a spatial extent ``e``: global (``extent=0``) mean over ``H, W``; or, for
    ``extent=e``, average pooling with kernel ``2e - 1``, stride ``e``, padding ``e - 1`` and no
    padded zeros in the means (GE-theta-minus, no parameters); with ``extra_params=True`` it is
    learned instead (GE-theta): ``log2 e`` depthwise 3x3 stride-2 convs (no bias) each followed
    by BatchNorm, ReLU between them, or, global, one depthwise conv as large as the map
    (``feat_size``) with BatchNorm. *Excite* ``xi_E``: identity, or (``use_mlp=True``,
    GE-theta-plus) an SE bottleneck ``1x1 conv C -> C/r`` (bias), ReLU, ``1x1 conv C/r -> C``
    (bias); then ``up``, nearest-neighbour resizing to ``(H, W)`` (a broadcast for the global
    extent), and the sigmoid gate.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; the gathered map is ``(B, C, ceil(H/e), ceil(W/e))``
    (``(B, C, 1, 1)`` for the global extent); any size works, also ``1x1``.

    Defaults: the official GENet prototxts define three global-extent ResNet-50 models, GE-theta-
    minus (``RN50-GEPF``: global average pooling, sigmoid; the default here, no parameters),
    GE-theta (``RN50-GEP``: depthwise conv of the map's size, BN, sigmoid; ``extra_params=True,
    feat_size=(H, W)``) and GE-theta-plus (``RN50-GEPP``: the same gather, BN, **ReLU**, then the
    ``C/16`` MLP with biases, sigmoid; ``extra_params=True, use_mlp=True, feat_size=(H, W)``).
    The official GE-theta-plus has a ReLU after the gather's last BatchNorm, before the MLP
    (``gather_act=True``, default); timm's ``GatherExcite`` has none (``gather_act=False``). The
    global learned gather only accepts inputs of size ``feat_size`` (a ``ValueError`` otherwise);
    the extents ``e = 2, 4, 8`` work at any size. Presets: ``"theta-minus-e8"`` (the official
    README's GE-theta-minus (E8) figure) and ``"theta-plus-e2"``.

    Export: ``torch.export`` with dynamic sizes specialises every strided conv's output size to
    "not 1" when it was not 1 at export (PyTorch's contiguity checks), so a program exported with
    the learned gather of extent ``e >= 4`` refuses inputs whose intermediate gathered sizes are 1
    (e.g. width 4 with ``e = 4`` after exporting at width 6). Export at the smallest size you
    will run, or use the average-pooling gather (``extra_params=False``), which has no such
    guard. The TorchScript ONNX exporter is not affected.

    timm: ``timm.layers.GatherExcite(C, extent=e, extra_params=p, use_mlp=m, rd_ratio=1/r)``
    equals ``GatherExcite(C, extent=e, extra_params=p, use_mlp=m, reduction=r,
    gather_act=False)`` (module names ``gather.conv1/norm1/...``, ``mlp.fc1/fc2`` match; timm's
    default ``use_mlp=True`` at the global extent is SE with ``C/16`` rounded). The MLP width is
    ``C / r`` rounded to the nearest integer, as timm's.

    Args:
        channels: input channels ``C``.
        extent: ``0`` (global) or a power of two ``e >= 2``.
        extra_params: learned (depthwise conv) gather instead of average pooling.
        use_mlp: excite with the SE bottleneck MLP (GE-theta-plus).
        reduction: ``r``, the MLP is ``C / r`` wide.
        gather_act: ReLU after the learned gather's last BatchNorm when the MLP follows
            (official); ignored otherwise.
        feat_size: ``(H, W)`` of the input for the global learned gather only.

    Attention: the gate (``(B, C, H, W)``, or ``(B, C, 1, 1)`` for the global extent) is the
    output of the submodule ``self.gate`` (hook it) and of :meth:`attention_map`.
    """

    def __init__(
        self,
        channels: int,
        *,
        extent: int = 0,
        extra_params: bool = False,
        use_mlp: bool = False,
        reduction: int = 16,
        gather_act: bool = True,
        feat_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        size = _check_args(
            channels, extent, extra_params, use_mlp, reduction, gather_act, feat_size
        )
        self.channels = channels
        self.extent = extent
        self.feat_size = size
        self.gather: nn.Module | None = None
        if extra_params:
            self.gather = _param_gather(channels, extent, size, gather_act and use_mlp)
        elif extent > 0:
            k = 2 * extent - 1
            self.gather = nn.AvgPool2d(k, stride=extent, padding=k // 2, count_include_pad=False)
        hidden = ge_hidden_channels(channels, reduction)
        self.mlp = _ExciteMlp(channels, hidden) if use_mlp else None
        self.gate = nn.Sigmoid()

    def _gather(self, x: Tensor) -> Tensor:
        if self.gather is None:
            return x.mean((2, 3), keepdim=True)
        if self.feat_size is not None and not isinstance(x, torch.fx.Proxy):
            if tuple(x.shape[2:]) != self.feat_size:
                raise ValueError(
                    f"{_NAME}: the global learned gather was built for feat_size="
                    f"{self.feat_size}; got an input of spatial size {tuple(x.shape[2:])}"
                )
        return self.gather(x)

    def forward(self, x: Tensor) -> Tensor:
        """``x * sigmoid(up(excite(gather(x))))``."""
        return x * self.attention_map(x)

    def attention_map(self, x: Tensor) -> Tensor:
        """The gate, ``(B, C, H, W)`` (``(B, C, 1, 1)`` for the global extent)."""
        check_input(_NAME, x, self.channels)
        g = self._gather(x)
        if self.mlp is not None:
            g = self.mlp(g)
        if self.extent > 0:
            g = _upsample_nearest(g, x)
        return self.gate(g)

    def attention_maps(self, x: Tensor, *, query: Query = "mean") -> dict[str, Tensor]:
        """``channel``: the gate averaged over positions ``(B, C)``; for a local extent also
        ``spatial``, averaged over channels ``(B, H, W)``, and ``gate``, all of it
        ``(B, C, H, W)``. ``query`` is ignored (not a pixel-pair module)."""
        g = self.attention_map(x)
        if self.extent == 0:
            return {"channel": g.flatten(1)}
        return {"channel": g.mean((2, 3)), "spatial": g.mean(1), "gate": g}

    def extra_repr(self) -> str:
        return f"channels={self.channels}, extent={self.extent}"
