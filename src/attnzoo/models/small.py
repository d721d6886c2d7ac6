"""Small networks that train in seconds on a CPU: :func:`cifar_resnet8`, the bench's default.

Built from torchvision's ``BasicBlock`` so that :func:`attnzoo.attach` places attention exactly as
in the project's other ResNets (after the block's last BN, before the residual add, by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from attnzoo.models._builders import make_builder

__all__ = ["SmallResNet", "cifar_resnet8"]


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet of BasicBlocks with configurable widths and depths.

    Layout (torchvision attribute names, so ``attnzoo.attach`` recognises the blocks):
    ``conv1`` 3×3 stride 1 (``in_channels`` → ``stem``), ``bn1``, ``relu``, no max-pool, then
    ``layer1 … layerN`` (``blocks[i]`` BasicBlocks of ``widths[i]`` channels, first block of a
    stage with stride ``strides[i]`` and a 1×1 conv + BN shortcut when the shape changes),
    global average pooling and ``fc``. Kaiming-normal (fan-out) convolutions, BN weight 1 bias 0,
    as torchvision.
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        stem: int = 16,
        widths: Sequence[int] = (32, 64, 128),
        blocks: Sequence[int] = (1, 1, 1),
        strides: Sequence[int] = (2, 2, 2),
    ) -> None:
        super().__init__()
        if not (len(widths) == len(blocks) == len(strides) >= 1):
            raise ValueError(
                "SmallResNet: widths, blocks and strides must have the same length "
                f">= 1; got {widths}, {blocks}, {strides}"
            )
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        inplanes = stem
        for i, (w, n, s) in enumerate(zip(widths, blocks, strides), start=1):
            layers = []
            for j in range(n):
                stride = s if j == 0 else 1
                down = None
                if stride != 1 or inplanes != w:
                    down = nn.Sequential(
                        nn.Conv2d(inplanes, w, 1, stride, bias=False), nn.BatchNorm2d(w)
                    )
                layers.append(BasicBlock(inplanes, w, stride, down))
                inplanes = w
            self.add_module(f"layer{i}", nn.Sequential(*layers))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _small_resnet(num_classes: int, **model_kwargs: Any) -> nn.Module:
    return SmallResNet(num_classes, **model_kwargs)


cifar_resnet8 = make_builder(
    _small_resnet,
    "cifar_resnet8",
    """ResNet-8 for 32×32 inputs, the bench's default: 3×3 stem of 16 channels, then one
    BasicBlock per stage with 32/64/128 channels at 16×16, 8×8 and 4×4 (≈ 0.29 M parameters,
    ≈ 12 MMACs per 32×32 image).

    The widths start at 32 so that every registered module works with its official defaults
    (EMA's ``factor=32`` groups need ≥ 32 channels); the first stage downsamples so that a
    training run of the built-in digits takes seconds on a CPU.

    Args:
        attention: registry name, class or factory; ``None`` for the plain network.
        num_classes: classifier outputs.
        stages, position, every, select, stage_kwargs, identity_init: see
            :func:`attnzoo.attach` (default: every block, before the add).
        weights: a state dict or a file, as in :func:`attnzoo.models.resnet50`.
        model_kwargs: :class:`SmallResNet` keywords (``stem``, ``widths``, ``blocks``, ...).
        **attention_kwargs: the attention module's keyword arguments.
    """,
    num_classes=10,
    module=__name__,
)
