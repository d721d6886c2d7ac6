"""attnzoo: plug-and-play visual attention modules for PyTorch CNNs.

Public entry points::

    attnzoo.create(name, channels, **kwargs)   # build a module
    attnzoo.available(family=None)             # registry names
    attnzoo.info(name)                         # paper, defaults, presets, parameter formula
    attnzoo.get(name)                          # the class
    attnzoo.attach(model, "cbam")              # put modules into a network
    attnzoo.viz.cam(model, images)             # Grad-CAM (needs attnzoo[viz])
    attnzoo.viz.attention_maps(model, images)  # what every attention module computed

Everything is imported on first use (PEP 562): ``import attnzoo`` itself imports no third-party
package, so the command line answers ``--help`` without loading torch. The first access to a
public name (``attnzoo.create``, ``attnzoo.SqueezeExcitation``...) imports torch, torchvision
and every attention module (which registers them).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from attnzoo import registry as _registry

__version__ = "0.1.0"

#: public name -> the module that defines it
_API = {
    **dict.fromkeys(
        ("FAMILIES", "ModuleInfo", "available", "create", "get", "info", "register"),
        "attnzoo.registry",
    ),
    **dict.fromkeys(("attach", "attached", "detach", "load_pretrained"), "attnzoo.models.attach"),
}


def _modules() -> Any:
    return importlib.import_module("attnzoo.modules")  # registers every module


# The registry (torch-free) imports the built-in modules on its first lookup through this loader:
# the package root wires the layers together, so the registry never imports upward.
_registry.add_loader(_modules)


def __getattr__(name: str) -> Any:
    if name == "__all__":
        value: Any = sorted(_API) + ["__version__", *_modules().__all__]
    elif name in _API:
        _modules()
        value = getattr(importlib.import_module(_API[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"attnzoo.{name}") is not None:
        return importlib.import_module(f"attnzoo.{name}")  # attnzoo.viz, attnzoo.bench...
    elif not name.startswith("_") and name in _modules().__all__:
        value = getattr(_modules(), name)  # the module classes: attnzoo.SqueezeExcitation...
    else:
        raise AttributeError(f"module 'attnzoo' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__getattr__("__all__")})
