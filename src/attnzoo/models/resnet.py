"""ResNet-family builders with attention: torchvision's networks plus :func:`attach`.

Every builder returns the torchvision model (``weights=None``: nothing is downloaded) with the
attention inserted by :func:`attnzoo.attach`, so the ``state_dict`` keys of the plain network are
unchanged and a torchvision checkpoint loads with :func:`attnzoo.load_pretrained` (pass it as
``weights=`` here). Keyword arguments not named below go to the attention module
(``reduction=8``, ``preset="timm"``); torchvision's own options go in ``model_kwargs``.

The papers' placements (all reproduce the papers' parameter counts, see
``tests/models/test_param_counts.py``):

=====================  =======================================================================
SE / CBAM-ResNet-50    ``resnet50(attention="se")`` / ``"cbam"``: every block, before the add
ECA-Net50              ``resnet50(attention="eca", stage_kwargs=ECA_NET50_KERNELS)``
GC-ResNet-50 (r16)     ``resnet50(attention="gc", stages=(2, 3, 4))``: c3-c5, before the add
Non-local (C2D, 5 NL)  ``resnet50(attention="nonlocal", position="after_block", stages=(2, 3),
                       every=2)``
BAM                    ``resnet50(attention=..., position="after_stage", stages=(1, 2, 3))``
SKNet-50               :func:`sknet50` (the SK unit replaces every 3x3 grouped conv)
=====================  =======================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from torch import Tensor, nn
from torchvision.models import get_model_weights
from torchvision.models import resnet as tv_resnet

from attnzoo.models._builders import Attention, Weights, finish, make_builder
from attnzoo.models.attach import _apply, register_block
from attnzoo.registry import create

__all__ = [
    "ECA_NET50_KERNELS",
    "SKBottleneck",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "cifar_resnet18",
    "cifar_resnet34",
    "cifar_resnet50",
    "cifar_resnet101",
    "cifar_resnet152",
    "sknet50",
]

#: ECA kernel sizes of the released ECA-Net50 weights (BangguWu/ECANet), per stage: 80 params.
ECA_NET50_KERNELS: dict[int, dict[str, int]] = {
    1: {"kernel_size": 3},
    2: {"kernel_size": 5},
    3: {"kernel_size": 5},
    4: {"kernel_size": 7},
}


def _builder(tv_fn: Callable[..., nn.Module], name: str, doc: str) -> Callable[..., nn.Module]:
    def construct(num_classes: int, **model_kwargs: Any) -> nn.Module:
        return tv_fn(weights=None, num_classes=num_classes, **model_kwargs)

    weights_enum = get_model_weights(tv_fn)
    doc = f"""{doc} with optional attention (torchvision ``{tv_fn.__name__}``, no
    download).

    Args:
        attention: registry name, module class or factory; ``None`` for the plain network.
        num_classes: classifier outputs.
        stages, position, every, select, stage_kwargs, identity_init: see :func:`attnzoo.attach`.
        weights: the plain or the attached network's weights, loaded with
            :func:`attnzoo.load_pretrained` (only attention keys may be missing): a state dict, a
            file path, or torchvision's ``{weights_enum.__name__}`` (an enum member
            or its name, e.g. ``"DEFAULT"``) read from the local torch hub cache
            (``torch.hub.get_dir()/checkpoints``; never downloaded: a missing file is an error
            naming it). With another ``num_classes`` the classifier keeps its initialisation and
            a warning names its keys (fine-tuning).
        model_kwargs: torchvision's keyword arguments (``zero_init_residual``, ``norm_layer``...).
        **attention_kwargs: the attention module's keyword arguments.

    Example:
        >>> from attnzoo.models import {name}
        >>> model = {name}(attention="cbam", num_classes=10)
    """
    return make_builder(
        construct, name, doc, num_classes=1000, module=__name__, weights_enum=weights_enum
    )


resnet18 = _builder(tv_resnet.resnet18, "resnet18", "ResNet-18")
resnet34 = _builder(tv_resnet.resnet34, "resnet34", "ResNet-34")
resnet50 = _builder(tv_resnet.resnet50, "resnet50", "ResNet-50")
resnet101 = _builder(tv_resnet.resnet101, "resnet101", "ResNet-101")
resnet152 = _builder(tv_resnet.resnet152, "resnet152", "ResNet-152")
resnext50_32x4d = _builder(tv_resnet.resnext50_32x4d, "resnext50_32x4d", "ResNeXt-50 32x4d")
resnext101_32x8d = _builder(tv_resnet.resnext101_32x8d, "resnext101_32x8d", "ResNeXt-101 32x8d")
wide_resnet50_2 = _builder(tv_resnet.wide_resnet50_2, "wide_resnet50_2", "Wide ResNet-50-2")
wide_resnet101_2 = _builder(tv_resnet.wide_resnet101_2, "wide_resnet101_2", "Wide ResNet-101-2")


def _cifar_stem(model: nn.Module) -> nn.Module:
    """3x3 stride-1 stem conv (3 -> 64, no bias) and no max-pool, for 32x32 inputs."""
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def _cifar_builder(tv_fn: Callable[..., nn.Module], name: str) -> Callable[..., nn.Module]:
    def construct(num_classes: int, **model_kwargs: Any) -> nn.Module:
        return _cifar_stem(tv_fn(weights=None, num_classes=num_classes, **model_kwargs))

    doc = f"""CIFAR-style {tv_fn.__name__}: 3x3 stride-1 stem, no max-pool; 100 classes.

    The usual CIFAR adaptation (as in the EMA paper's CIFAR-100 table): torchvision's network
    with ``conv1`` replaced by a 3x3 stride-1 convolution (3 -> 64, no bias) and the stem
    max-pool removed, so a 32x32 input reaches ``layer4`` at 4x4. Other arguments as in
    :func:`{tv_fn.__name__}`.
    """
    return make_builder(construct, name, doc, num_classes=100, module=__name__)


cifar_resnet18 = _cifar_builder(tv_resnet.resnet18, "cifar_resnet18")
cifar_resnet34 = _cifar_builder(tv_resnet.resnet34, "cifar_resnet34")
cifar_resnet50 = _cifar_builder(tv_resnet.resnet50, "cifar_resnet50")
cifar_resnet101 = _cifar_builder(tv_resnet.resnet101, "cifar_resnet101")
cifar_resnet152 = _cifar_builder(tv_resnet.resnet152, "cifar_resnet152")


# ---------------------------------------------------------------------------------------------
# SKNet
class SKBottleneck(nn.Module):
    """ResNeXt bottleneck whose 3x3 grouped conv (+BN+ReLU) is a selective-kernel unit.

    Li et al., "Selective Kernel Networks", CVPR 2019, Table 1 (SKNet-50): 1x1 conv -> SK[M=2,
    G=32, r=16] -> 1x1 conv, with the stride in the SK unit (torchvision's ResNet-v1.5 layout).
    The SK unit's branches end in BN + ReLU and its output is a convex combination of them, so
    no BN/ReLU follows it. Children: ``conv1, bn1, conv2`` (the SK unit), ``conv3, bn3, relu,
    downsample`` (torchvision names, so ``attach`` positions work here too).
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 32,
        base_width: int = 4,
        sk_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = create("sk", width, stride=stride, groups=groups, **dict(sk_kwargs or {}))
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        out = _apply(self, "attention_conv3x3", out)
        out = _apply(self, "attention", self.bn3(self.conv3(out)))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity  # in place, as torchvision's blocks
        out = self.relu(out)
        return _apply(self, "attention_out", out)


def _sk_out(b: nn.Module) -> int:
    return cast(nn.Conv2d, b.conv3).out_channels


register_block(
    SKBottleneck,
    SKBottleneck.forward,  # type: ignore[arg-type]  # a block method, called on SKBottlenecks
    default="before_add",
    channels={
        "before_add": _sk_out,
        "after_conv3x3": lambda b: cast(nn.Conv2d, b.conv3).in_channels,
        "after_block": _sk_out,
    },
)


def sknet50(
    attention: Attention = None,
    num_classes: int = 1000,
    *,
    stages: Iterable[int] | None = None,
    position: str | None = None,
    every: int = 1,
    select: Callable[[str, int], bool] | None = None,
    stage_kwargs: Mapping[int, Mapping[str, Any]] | None = None,
    identity_init: bool = False,
    weights: Weights = None,
    sk_kwargs: Mapping[str, Any] | None = None,
    **attention_kwargs: Any,
) -> nn.Module:
    """SKNet-50: ResNeXt-50 (32x4d) with the SK unit (M=2, G=32, r=16, L=32) in every block.

    Li et al., "Selective Kernel Networks", CVPR 2019: 27.5 M parameters, 4.47 GFLOPs (multiply-
    adds) at 224x224. Built from torchvision's ``ResNet`` with :class:`SKBottleneck`; the stem,
    stages, downsampling and classifier are torchvision's (ResNet v1.5: stride in the 3x3 unit).
    ``sk_kwargs`` go to :class:`attnzoo.modules.sk.SelectiveKernel` (e.g. ``preset``); the other
    arguments as in :func:`resnet50`, so ``sknet50(attention="se")`` adds SE as well.
    """
    sk = dict(sk_kwargs or {})

    def block(
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 32,
        base_width: int = 4,
        dilation: int = 1,
        norm_layer: Any = None,
    ) -> nn.Module:
        if dilation != 1:
            raise ValueError("sknet50: dilation is not supported")
        return SKBottleneck(inplanes, planes, stride, downsample, groups, base_width, sk)

    block.expansion = SKBottleneck.expansion  # type: ignore[attr-defined]
    model = tv_resnet.ResNet(
        block,
        [3, 4, 6, 3],
        num_classes=num_classes,
        groups=32,
        width_per_group=4,
    )
    return finish(
        model,
        attention,
        stages=stages,
        position=position,
        every=every,
        select=select,
        stage_kwargs=stage_kwargs,
        identity_init=identity_init,
        weights=weights,
        attention_kwargs=attention_kwargs,
        name="sknet50",
    )
