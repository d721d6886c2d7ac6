"""The one switch of :mod:`attnzoo.fast`: off by default, ``ATTNZOO_FAST=1`` turns it on."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["ENV_VAR", "enabled", "is_enabled", "set_enabled"]

#: environment variable read at import: ``1``/``true``/``yes``/``on`` turn the switch on
ENV_VAR = "ATTNZOO_FAST"

_enabled = os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def _check(flag: object) -> bool:
    if not isinstance(flag, bool):
        raise TypeError(f"attnzoo.fast: the switch takes True or False, got {flag!r}")
    return flag


def set_enabled(flag: bool) -> None:
    """Turn the fast paths on (``True``) or off (``False``) for the whole process."""
    global _enabled
    _enabled = _check(flag)


def is_enabled() -> bool:
    """Whether the fast paths are on."""
    return _enabled


@contextlib.contextmanager
def enabled(flag: bool = True) -> Iterator[None]:
    """``with attnzoo.fast.enabled(): ...`` (or ``enabled(False)``): the switch set within the
    block, restored afterwards (also on error)."""
    global _enabled
    previous, _enabled = _enabled, _check(flag)
    try:
        yield
    finally:
        _enabled = previous
