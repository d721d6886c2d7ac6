"""attnzoo: plug-and-play visual attention modules for PyTorch CNNs.

Public entry points::

    attnzoo.create(name, channels, **kwargs)   # build a module
    attnzoo.available(family=None)             # registry names
    attnzoo.info(name)                         # paper, defaults, presets, parameter formula
    attnzoo.get(name)                          # the class
    attnzoo.attach(model, "cbam")              # put modules into a network
    attnzoo.viz.cam(model, images)             # Grad-CAM (needs attnzoo[viz])
    attnzoo.viz.attention_maps(model, images)  # what every attention module computed

``attnzoo.viz``, ``attnzoo.bench`` and ``attnzoo.detection`` are imported on first use, so that
``import attnzoo`` needs only torch and torchvision.
"""

from __future__ import annotations

from attnzoo import modules  # noqa: F401  (registers every module)
from attnzoo.modules import *  # noqa: F401,F403
from attnzoo.models.attach import attach, attached, detach, load_pretrained
from attnzoo.registry import FAMILIES, ModuleInfo, available, create, get, info, register

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("viz", "bench", "detection", "models")


def __getattr__(name: str):  # PEP 562: attnzoo.viz etc. without importing them up front
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"attnzoo.{name}")
    raise AttributeError(f"module 'attnzoo' has no attribute {name!r}")

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
