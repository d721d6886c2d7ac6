"""Networks with attention: :func:`attach` for any torchvision/timm ResNet or MobileNetV2 (or any
model by module path), and builders that reproduce the papers' attention networks.

>>> import attnzoo
>>> from attnzoo.models import resnet50
>>> model = resnet50(attention="cbam")            # CBAM in every bottleneck, before the add
>>> [a.path for a in attnzoo.attached(model)][:2]
['layer1.0.attention', 'layer1.1.attention']
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable

from torch import nn

from attnzoo.models.attach import (
    POSITIONS,
    AttachedModule,
    IdentityInit,
    attach,
    attached,
    detach,
    load_pretrained,
    register_block,
    resolve_weights,
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
from attnzoo.models.small import SmallResNet, cifar_resnet8
from attnzoo.models.timm_compat import timm_attn_layer
from attnzoo.specs import parse_model

#: builder name -> builder: the one table behind ``attnzoo bench/profile/cam --model NAME``
BUILDERS = {
    f.__name__: f
    for f in (
        cifar_resnet8,
        resnet18,
        resnet34,
        resnet50,
        resnet101,
        resnet152,
        resnext50_32x4d,
        resnext101_32x8d,
        wide_resnet50_2,
        wide_resnet101_2,
        cifar_resnet18,
        cifar_resnet34,
        cifar_resnet50,
        cifar_resnet101,
        cifar_resnet152,
        sknet50,
        mobilenet_v2,
    )
}


def resolve_builder(
    model: str | Callable[..., nn.Module], *, prog: str = "bench"
) -> tuple[str, Callable[..., nn.Module]]:
    """``(label, builder)`` for a name of :data:`BUILDERS` with optional ``:key=value`` builder
    arguments (bound with ``functools.partial``; syntax of :func:`attnzoo.specs.parse_model`),
    or a callable ``builder(attention=None|name, num_classes=..., **attention_kwargs)``.
    ``attnzoo bench``, ``profile`` and ``cam`` resolve ``--model`` with it."""
    if callable(model):
        return getattr(model, "__name__", repr(model)), model
    name, kwargs = parse_model(model, prog=prog)
    if name not in BUILDERS:
        close = difflib.get_close_matches(name, list(BUILDERS), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"{prog}: unknown --model {name!r}.{hint} Available: {', '.join(sorted(BUILDERS))}"
        )
    builder = BUILDERS[name]
    if not kwargs:
        return name, builder
    if "attention" in kwargs:
        raise ValueError(f"{prog}: give the attention with --attention, not in --model {model!r}")
    # the builder's named parameters only: its **kwargs are the attention's (--attention)
    named = {
        k
        for k, p in inspect.signature(builder).parameters.items()
        if p.kind is not inspect.Parameter.VAR_KEYWORD and k != "attention"
    }
    bad = [k for k in kwargs if k not in named]
    if bad:
        raise ValueError(
            f"{prog}: --model {name} takes no argument {', '.join(map(repr, bad))}; "
            f"it takes: {', '.join(sorted(named))}"
        )
    label = name + ":" + ":".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
    return label, functools.partial(builder, **kwargs)


__all__ = [
    "BUILDERS",
    "ECA_NET50_KERNELS",
    "EXPANDED_ONLY",
    "HIDDEN_OVER_144",
    "POSITIONS",
    "AttachedModule",
    "IdentityInit",
    "SKBottleneck",
    "SmallResNet",
    "attach",
    "attached",
    "detach",
    "load_pretrained",
    "register_block",
    "resolve_builder",
    "resolve_weights",
    "timm_attn_layer",
    *sorted(k for k in BUILDERS),
]
