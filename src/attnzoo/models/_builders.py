"""What the network builders of :mod:`attnzoo.models` share.

Every builder has the signature ``builder(attention=None, num_classes=..., *, stages=None,
position=None, every=1, select=None, stage_kwargs=None, identity_init=False, weights=None,
model_kwargs=None, **attention_kwargs)``: it builds the plain network, then :func:`finish`
attaches the attention with :func:`attnzoo.attach` and loads ``weights`` with
:func:`attnzoo.load_pretrained`. :func:`make_builder` writes that function once for a network
constructor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from attnzoo.models.attach import attach, load_pretrained, resolve_weights

__all__ = ["Attention", "Select", "Weights", "finish", "make_builder"]

Attention = str | type[nn.Module] | Callable[..., nn.Module] | None
#: a state dict, a file, a torchvision weights enum or its name (see ``resolve_weights``)
Weights = Mapping[str, Tensor] | str | Path | Any | None
#: ``select(block_path, channels) -> bool``, the block filter of :func:`attnzoo.attach`
Select = Callable[[str, int], bool]


def finish(
    model: nn.Module,
    attention: Attention,
    *,
    stages: Iterable[int] | None,
    position: str | None,
    every: int,
    select: Select | None,
    stage_kwargs: Mapping[int, Mapping[str, Any]] | None,
    identity_init: bool,
    weights: Weights,
    attention_kwargs: Mapping[str, Any],
    weights_enum: Any = None,
    name: str = "attnzoo.models",
) -> nn.Module:
    """Attach the attention (if any) and load ``weights`` (if any) into a freshly built model.

    ``weights`` takes every form of :func:`attnzoo.models.resolve_weights` (names of
    ``weights_enum``, the builder's torchvision weights enum, included); a classifier of another
    ``num_classes`` than the weights' is left at its initialisation, with a warning."""
    state = None if weights is None else resolve_weights(weights, weights_enum, who=name)
    if attention is not None:
        attach(
            model,
            attention,
            stages=stages,
            position=position,
            every=every,
            select=select,
            stage_kwargs=stage_kwargs,
            identity_init=identity_init,
            **attention_kwargs,
        )
    elif attention_kwargs or stage_kwargs or stages is not None or position is not None:
        raise ValueError(f"{name}: attention options given without attention=")
    if state is not None:
        load_pretrained(model, state, new_head=True)
    return model


def make_builder(
    construct: Callable[..., nn.Module],
    name: str,
    doc: str,
    *,
    num_classes: int,
    module: str,
    weights_enum: Any = None,
    resolve_select: Callable[[nn.Module, Any], Select | None] | None = None,
) -> Callable[..., nn.Module]:
    """A builder ``name`` (see the module docstring) around ``construct``.

    Args:
        construct: ``construct(num_classes, **model_kwargs)`` -> the plain network.
        name: the builder's ``__name__`` (also in error messages).
        doc: its docstring.
        num_classes: the default number of classes.
        module: the ``__module__`` to report (where the builder is defined for users).
        weights_enum: torchvision weights enum whose member names ``weights`` may give.
        resolve_select: ``resolve_select(model, select)`` turns the builder's own ``select``
            values (e.g. a string naming a placement) into a block filter, or raises
            ``ValueError``; without it ``select`` goes to :func:`attnzoo.attach` unchanged.
    """

    def build(
        attention: Attention = None,
        num_classes: int = num_classes,
        *,
        stages: Iterable[int] | None = None,
        position: str | None = None,
        every: int = 1,
        select: Select | str | None = None,
        stage_kwargs: Mapping[int, Mapping[str, Any]] | None = None,
        identity_init: bool = False,
        weights: Weights = None,
        model_kwargs: Mapping[str, Any] | None = None,
        **attention_kwargs: Any,
    ) -> nn.Module:
        model = construct(num_classes, **dict(model_kwargs or {}))
        if resolve_select is not None:
            select = resolve_select(model, select)
        return finish(
            model,
            attention,
            stages=stages,
            position=position,
            every=every,
            select=select,  # type: ignore[arg-type]  # a string only with resolve_select
            stage_kwargs=stage_kwargs,
            identity_init=identity_init,
            weights=weights,
            attention_kwargs=attention_kwargs,
            weights_enum=weights_enum,
            name=name,
        )

    build.__name__ = build.__qualname__ = name
    build.__module__ = module
    build.__doc__ = doc
    return build
