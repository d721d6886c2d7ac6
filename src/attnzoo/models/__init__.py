"""Networks with attention: :func:`attach` for any torchvision/timm ResNet or MobileNetV2 (or any
model by module path), and builders that reproduce the papers' attention networks.

>>> import attnzoo
>>> from attnzoo.models import resnet50
>>> model = resnet50(attention="cbam")            # CBAM in every bottleneck, before the add
>>> [a.path for a in attnzoo.attached(model)][:2]
['layer1.0.attention', 'layer1.1.attention']
"""

from __future__ import annotations

from attnzoo.models.attach import (
    POSITIONS,
    AttachedModule,
    IdentityInit,
    attach,
    attached,
    detach,
    load_pretrained,
    register_block,
)
from attnzoo.models.mobilenet import EXPANDED_ONLY, HIDDEN_OVER_144, mobilenet_v2
from attnzoo.models.resnet import (
    ECA_NET50_KERNELS,
    SKBottleneck,
    cifar_resnet18,
    cifar_resnet34,
    cifar_resnet50,
    cifar_resnet101,
    cifar_resnet152,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    sknet50,
    wide_resnet50_2,
    wide_resnet101_2,
)
from attnzoo.models.timm_compat import timm_attn_layer

#: builder name -> builder, for the CLI and the benchmarks
BUILDERS = {
    f.__name__: f
    for f in (resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d,
              resnext101_32x8d, wide_resnet50_2, wide_resnet101_2, cifar_resnet18,
              cifar_resnet34, cifar_resnet50, cifar_resnet101, cifar_resnet152, sknet50,
              mobilenet_v2)
}

__all__ = [
    "BUILDERS",
    "ECA_NET50_KERNELS",
    "EXPANDED_ONLY",
    "HIDDEN_OVER_144",
    "POSITIONS",
    "AttachedModule",
    "IdentityInit",
    "SKBottleneck",
    "attach",
    "attached",
    "detach",
    "load_pretrained",
    "register_block",
    "timm_attn_layer",
    *sorted(k for k in BUILDERS),
]
