"""Use attnzoo modules through timm's own ``attn_layer`` hook.

timm builds a block's attention with ``create_attn(attn_layer, channels, device=..., dtype=...)``
(timm 1.0: ``module_cls(channels, **kwargs)`` with the factory keywords ``device`` and ``dtype``).
:func:`timm_attn_layer` turns a registry name (plus keyword arguments) into a factory with that
signature, so any attnzoo module plugs into any timm model that takes ``attn_layer``/``se_layer``::

    timm.create_model("resnet50", block_args=dict(attn_layer=timm_attn_layer("cbam")))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnzoo.registry import create

__all__ = ["timm_attn_layer"]


class _TimmFactory:
    """Picklable ``factory(channels, *, device=None, dtype=None)`` for timm's ``attn_layer``."""

    def __init__(self, attention: Any, kwargs: dict[str, Any]) -> None:
        self.attention = attention
        self.kwargs = kwargs

    def __call__(
        self,
        channels: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> nn.Module:
        module = create(self.attention, channels, **self.kwargs)
        if device is not None or dtype is not None:
            module = module.to(device=device, dtype=dtype)
        return module

    def __repr__(self) -> str:
        args = ", ".join([repr(self.attention), *(f"{k}={v!r}" for k, v in self.kwargs.items())])
        return f"timm_attn_layer({args})"


def timm_attn_layer(attention: Any, **kwargs: Any) -> Callable[..., nn.Module]:
    """A factory for timm's ``attn_layer``: ``attention`` is a registry name, class or factory,
    ``kwargs`` its keyword arguments (``preset=`` too). ``device``/``dtype`` from timm are applied
    with ``.to()`` after construction."""
    return _TimmFactory(attention, dict(kwargs))
