"""Argument and input checks shared by every attention module.

Every error names the module, the argument and what was expected, so that a user who passes the
wrong thing learns what to change without reading the source.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx

__all__ = [
    "resolve_submodule",
    "check_positive_int",
    "check_positive_float",
    "check_odd_int",
    "check_choice",
    "check_divisible",
    "check_input",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(module: str, name: str, value: Any, *, minimum: int = 1) -> int:
    """Return ``value`` as ``int`` if it is an integer ``>= minimum``.

    Raises:
        TypeError: ``value`` is not an integer (``bool`` is rejected too).
        ValueError: ``value`` is smaller than ``minimum``.
    """
    if not _is_int(value):
        raise TypeError(f"{module}: {name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{module}: {name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_positive_float(module: str, name: str, value: Any) -> float:
    """Return ``value`` as ``float`` if it is a real number ``> 0``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{module}: {name} must be a positive number, got {value!r}")
    if not float(value) > 0:
        raise ValueError(f"{module}: {name} must be a positive number, got {value}")
    return float(value)


def check_odd_int(module: str, name: str, value: Any) -> int:
    """Return ``value`` if it is a positive odd integer (a kernel with a centre)."""
    value = check_positive_int(module, name, value)
    if value % 2 == 0:
        raise ValueError(f"{module}: {name} must be a positive odd integer, got {value}")
    return value


def check_choice(module: str, name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        expected = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{module}: {name} must be one of {expected}; got {value!r}")
    return value


def check_divisible(module: str, name: str, value: int, divisor_name: str, divisor: int) -> None:
    """Raise unless ``value`` is a multiple of ``divisor``."""
    if value % divisor != 0:
        raise ValueError(
            f"{module}: {name} ({value}) must be divisible by {divisor_name} ({divisor})"
        )


def check_input(module: str, x: Any, channels: int, spatial_dims: int = 2) -> None:
    """Check a forward input: a tensor of rank ``2 + spatial_dims`` with ``channels`` channels.

    The checks depend only on the rank and on the channel count, which are static for
    ``torch.compile``, ``torch.export`` and ONNX export, so they add no graph breaks and no runtime
    cost there. A ``torch.fx`` symbolic-tracing ``Proxy`` carries no shape: it passes unchecked
    (the traced graph then checks nothing; its input is checked when it runs as a module again).
    """
    if isinstance(x, torch.fx.Proxy):
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{module}: input must be a torch.Tensor, got {type(x).__name__}")
    rank = 2 + spatial_dims
    if x.dim() != rank:
        layout = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"}[spatial_dims]
        raise ValueError(
            f"{module}: input must have {rank} dimensions {layout}, got shape {tuple(x.shape)}"
        )
    if x.shape[1] != channels:
        raise ValueError(
            f"{module}: input must have channels={channels} in dim 1, got shape {tuple(x.shape)}"
        )


def resolve_submodule(owner: str, model: Any, path: str) -> Any:
    """``model.get_submodule(path)``, or a ``ValueError`` naming ``owner`` and the closest paths."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        import difflib

        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"{owner}: the model has no module {path!r}.{hint}") from None
