"""attnzoo: plug-and-play visual attention modules for PyTorch CNNs.

Public entry points::

    attnzoo.create(name, channels, **kwargs)   # build a module
    attnzoo.available(family=None)             # registry names
    attnzoo.info(name)                         # paper, defaults, presets, parameter formula
    attnzoo.get(name)                          # the class
"""

from __future__ import annotations

from attnzoo import modules  # noqa: F401  (registers every module)
from attnzoo.modules import *  # noqa: F401,F403
from attnzoo.models.attach import attach, attached, detach, load_pretrained
from attnzoo.registry import FAMILIES, ModuleInfo, available, create, get, info, register

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "ModuleInfo",
    "attach",
    "attached",
    "available",
    "detach",
    "load_pretrained",
    "create",
    "get",
    "info",
    "register",
    "__version__",
    *modules.__all__,
]
