"""Dilated ResNet trunks for dense prediction (output stride 8, 16 or 32).

Interface::

    trunk = dilated_resnet("resnet50", output_stride=8, multi_grid=None, weights=None)
    c3, c4 = trunk(x)            # layer3 and layer4 features; trunk.channels == (1024, 2048)
    trunk = dilated_resnet("small")  # CPU-sized ResNet-18-style trunk; channels (64, 128)

Dilation follows the dilated ResNets of Yu & Koltun ("Multi-Scale Context Aggregation by Dilated
Convolutions", ICLR 2016) as used by DANet (junfu1115/DANet, ``encoding/models/backbone/resnet.py``)
and torchvision's ``replace_stride_with_dilation``: a stage that stops downsampling dilates its 3x3
convolutions instead; its first block keeps the previous stage's dilation, the others use the new
one (output stride 8: layer3 dilation 2, layer4 dilation 4).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn
from torchvision.models import resnet as tv
from torchvision.models.resnet import BasicBlock, Bottleneck

from attnzoo.models.attach import resolve_weights

__all__ = ["BACKBONES", "DilatedResNet", "dilated_resnet", "OUTPUT_STRIDES"]

OUTPUT_STRIDES = (8, 16, 32)
#: which of layer2/3/4 trade their stride for dilation, per output stride (torchvision's flags)
_DILATE = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}
_WHO = "dilated_resnet"


class DilatedResNet(nn.Module):
    """A ResNet without its pooling and classifier: ``forward(x) -> (c3, c4)``.

    Attributes (torchvision names): ``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1`` ..
    ``layer4``; ``channels`` is ``(C3, C4)``, the widths of layer3's and layer4's outputs;
    ``output_stride`` the input-to-``c4`` size ratio.
    """

    conv1: nn.Module
    bn1: nn.Module
    relu: nn.Module
    maxpool: nn.Module
    layer1: nn.Module
    layer2: nn.Module
    layer3: nn.Module
    layer4: nn.Module

    def __init__(self, net: nn.Module, channels: tuple[int, int], output_stride: int) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))
        self.channels = channels
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c3 = self.layer3(self.layer2(self.layer1(x)))
        return c3, self.layer4(c3)


def _dilated_convs(block: nn.Module) -> list[nn.Conv2d]:
    """The 3x3 convolutions of a block that dilation applies to (conv2 of a Bottleneck, both of a
    BasicBlock)."""
    names = ["conv2"] if isinstance(block, Bottleneck) else ["conv1", "conv2"]
    return [cast(nn.Conv2d, getattr(block, n)) for n in names]


def _set_dilation(conv: nn.Conv2d, dilation: int) -> None:
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation, dilation)


def _apply_multi_grid(layer4: nn.Sequential, multi_grid: Sequence[int] | None) -> None:
    """Give block ``i`` of layer4 the dilation ``multi_grid[i]`` (absolute values, as the
    official DANet's ``multi_dilation=(4, 8, 16)``)."""
    if multi_grid is None:
        return
    grid = tuple(multi_grid)
    if len(grid) != len(layer4) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in grid
    ):
        raise ValueError(
            f"{_WHO}: multi_grid must hold one dilation >= 1 per layer4 block "
            f"({len(layer4)} blocks), e.g. (4, 8, 16) for ResNet-50/101; got {multi_grid!r}"
        )
    for block, d in zip(layer4, grid):
        for conv in _dilated_convs(block):
            _set_dilation(conv, d)


def _torchvision_trunk(
    name: str, output_stride: int, weights: Any, **kwargs: Any
) -> tuple[nn.Module, tuple[int, int]]:
    if kwargs:
        raise ValueError(f"{_WHO}: {name!r} takes no {sorted(kwargs)} (only the 'small' trunk)")
    fn: Callable[..., nn.Module] = getattr(tv, name)
    net = fn(weights=None, replace_stride_with_dilation=_DILATE[output_stride])
    if weights is not None:
        enum = tv.ResNet50_Weights if name == "resnet50" else tv.ResNet101_Weights
        state = resolve_weights(weights, enum, who=f"{_WHO}({name!r})")
        net.load_state_dict(state)  # strict: a wrong checkpoint fails loudly
    return net, (1024, 2048)


class _SmallNet(nn.Module):
    """The parts of a ResNet-18-style trunk of BasicBlocks, narrow enough for a CPU."""

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], output_stride: int) -> None:
        super().__init__()
        stem = widths[0]
        self.conv1 = nn.Conv2d(3, stem, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()  # layer1 downsamples instead: small digits keep detail
        dilate = [False, *_DILATE[output_stride]]
        inplanes, dilation = stem, 1
        for i, (width, n, dil) in enumerate(zip(widths, blocks, dilate), start=1):
            previous = dilation
            stride = 1 if dil else 2
            dilation = dilation * 2 if dil else dilation
            down = None
            if stride != 1 or inplanes != width:
                down = nn.Sequential(
                    nn.Conv2d(inplanes, width, 1, stride, bias=False), nn.BatchNorm2d(width)
                )
            layer = [BasicBlock(inplanes, width, stride, down)]
            layer += [BasicBlock(width, width) for _ in range(n - 1)]
            _set_dilation(layer[0].conv1, previous)
            _set_dilation(layer[0].conv2, dilation)
            for block in layer[1:]:
                for conv in _dilated_convs(block):
                    _set_dilation(conv, dilation)
            setattr(self, f"layer{i}", nn.Sequential(*layer))
            inplanes = width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _small_trunk(
    name: str,
    output_stride: int,
    weights: Any,
    *,
    widths: Sequence[int] = (16, 32, 64, 128),
    blocks: Sequence[int] = (2, 2, 2, 2),
) -> tuple[nn.Module, tuple[int, int]]:
    if weights is not None:
        raise ValueError(f"{_WHO}: the 'small' trunk has no pretrained weights; got {weights!r}")
    for arg, v in (("widths", widths), ("blocks", blocks)):
        if len(v) != 4 or not all(isinstance(k, int) and k >= 1 for k in v):
            raise ValueError(f"{_WHO}: {arg} must be 4 integers >= 1 (layer1..4); got {v!r}")
    return _SmallNet(widths, blocks, output_stride), (widths[2], widths[3])


#: trunk name -> builder(name, output_stride, weights, **kw) -> (net, (C3, C4))
BACKBONES: dict[str, Callable[..., tuple[nn.Module, tuple[int, int]]]] = {
    "resnet50": _torchvision_trunk,
    "resnet101": _torchvision_trunk,
    "small": _small_trunk,
}


def dilated_resnet(
    name: str = "resnet50",
    *,
    output_stride: int = 8,
    multi_grid: Sequence[int] | None = None,
    weights: Any = None,
    **kwargs: Any,
) -> DilatedResNet:
    """A dilated ResNet trunk returning ``(c3, c4)``.

    Args:
        name: ``"resnet50"``, ``"resnet101"`` (torchvision, ``replace_stride_with_dilation``;
            torchvision's 7x7 stem, i.e. the official DANet's ``--no-deepstem`` setting) or
            ``"small"`` (a ResNet-18-style trunk of BasicBlocks, widths ``(16, 32, 64, 128)``,
            two blocks per stage, 3x3 stride-2 stem without max-pool; torchvision's
            ``BasicBlock`` refuses dilation, so its convolutions are dilated after
            construction). ``widths=`` and ``blocks=`` resize the small trunk.
        output_stride: 8 (DANet), 16 or 32.
        multi_grid: per-block dilations of layer4 (absolute, e.g. ``(4, 8, 16)``, the released
            DANet-101's), or ``None`` (all blocks at the stage dilation).
        weights: ImageNet weights for the torchvision trunks (state dict, file, torchvision enum
            or its name, read from the local torch hub cache; nothing is downloaded).
    """
    if name not in BACKBONES:
        names = ", ".join(map(repr, BACKBONES))
        raise ValueError(f"{_WHO}: name must be one of {names}; got {name!r}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"{_WHO}: output_stride must be 8, 16 or 32; got {output_stride!r}")
    net, channels = BACKBONES[name](name, output_stride, weights, **kwargs)
    _apply_multi_grid(cast(nn.Sequential, net.layer4), multi_grid)
    return DilatedResNet(net, channels, output_stride)
