"""The name → class registry of attention modules, with the metadata users and tests rely on.

A module joins the library with one decorator::

    @register("se", family="channel", paper="Squeeze-and-Excitation Networks",
              venue="CVPR", year=2018, code="https://github.com/hujie-frank/SENet",
              presets={"yolov4-tiny": {"bias": False}}, param_count=se_param_count)
    class SqueezeExcitation(nn.Module): ...

Registering a module enrols it in the contract tests (``tests/test_contract.py``), which are
parametrised over :func:`available`.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported by the modules themselves, not by the registry
    from torch import nn

__all__ = [
    "FAMILIES",
    "ModuleInfo",
    "register",
    "get",
    "info",
    "available",
    "create",
    "resolve",
]

#: The kinds of attention the registry knows. ``kernel`` is SKNet's attention over kernel sizes.
FAMILIES = ("channel", "spatial", "hybrid", "pixel-pair", "kernel")


@dataclass(frozen=True)
class ModuleInfo:
    """Metadata of one registered attention module.

    Attributes:
        name: registry name (lower case, e.g. ``"cbam"``).
        cls: the ``nn.Module`` class.
        family: one of :data:`FAMILIES`.
        paper: paper title.
        venue: where it was published (``"CVPR"``, ``"ECCV"`` ...).
        year: publication year.
        code: the official code repository of the authors.
        presets: named keyword sets; ``"official"`` (no overrides) is always present.
        param_count: closed-form parameter count, ``param_count(channels, **kwargs) -> int``,
            taking the same keyword arguments as the constructor.
        spatial_dims: 1, 2 or 3: the input is ``(B, C, L)``, ``(B, C, H, W)`` or
            ``(B, C, T, H, W)``.
        example_channels: a channel count valid with the defaults (used by tests and the CLI).
        identity_at_init: the official initialisation makes the module the identity map.
    """

    name: str
    cls: type[nn.Module]
    family: str
    paper: str
    venue: str
    year: int
    code: str
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    param_count: Callable[..., int] | None = None
    spatial_dims: int = 2
    example_channels: int = 64
    identity_at_init: bool = False

    @property
    def defaults(self) -> dict[str, Any]:
        """The constructor's keyword defaults (the official configuration)."""
        params = inspect.signature(self.cls.__init__).parameters
        return {
            k: p.default
            for k, p in params.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
        }

    @property
    def summary(self) -> str:
        """First paragraph of the class docstring."""
        doc = inspect.getdoc(self.cls) or ""
        return doc.split("\n\n")[0].replace("\n", " ").strip()

    def count_params(self, channels: int, **kwargs: Any) -> int:
        """Closed-form parameter count for ``create(name, channels, **kwargs)``.

        Falls back to building the module on the ``meta`` device (no memory, no initialisation
        cost) when no formula is registered.
        """
        kwargs = self.resolve_kwargs(kwargs)
        if self.param_count is not None:
            return int(self.param_count(channels, **kwargs))
        import torch  # the registry itself does not import torch

        with torch.device("meta"):
            module = self.cls(channels, **kwargs)
        return sum(p.numel() for p in module.parameters())

    def resolve_kwargs(
        self, kwargs: Mapping[str, Any], preset: str | None = None
    ) -> dict[str, Any]:
        """Merge a preset's keywords with explicit ones (explicit ones win)."""
        preset = "official" if preset is None else preset
        if preset not in self.presets:
            known = ", ".join(sorted(self.presets))
            raise ValueError(f"{self.name}: preset must be one of {known}; got {preset!r}")
        return {**self.presets[preset], **kwargs}


_REGISTRY: dict[str, ModuleInfo] = {}


def register(
    name: str,
    *,
    family: str,
    paper: str,
    venue: str,
    year: int,
    code: str,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    param_count: Callable[..., int] | None = None,
    spatial_dims: int = 2,
    example_channels: int = 64,
    identity_at_init: bool = False,
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that adds an attention module to the registry (see :class:`ModuleInfo`)."""
    key = name.lower()
    if family not in FAMILIES:
        raise ValueError(f"register({name!r}): family must be one of {FAMILIES}; got {family!r}")
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"register({name!r}): spatial_dims must be 1, 2 or 3; got {spatial_dims}")
    all_presets = {"official": {}, **dict(presets or {})}

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        _accept_factory_kwargs(cls)
        if key in _REGISTRY and _REGISTRY[key].cls is not cls:
            raise ValueError(
                f"register: the name {key!r} is taken by {_REGISTRY[key].cls.__name__}"
            )
        _REGISTRY[key] = ModuleInfo(
            name=key,
            cls=cls,
            family=family,
            paper=paper,
            venue=venue,
            year=year,
            code=code,
            presets=all_presets,
            param_count=param_count,
            spatial_dims=spatial_dims,
            example_channels=example_channels,
            identity_at_init=identity_at_init,
        )
        cls.registry_name = key  # type: ignore[attr-defined]
        return cls

    return decorator


def _accept_factory_kwargs(cls: type[nn.Module]) -> None:
    """Let ``cls(channels, ..., device=None, dtype=None)`` work, like torch's own layers.

    timm's ``attn_layer`` hook (and ``nn.Module`` factory conventions in general) pass these
    factory keywords; the module is built as usual and then moved/cast. ``inspect.signature``
    still shows the original constructor (``functools.wraps``).
    """
    init = cls.__init__
    if getattr(init, "_attnzoo_factory_kwargs", False):
        return

    @functools.wraps(init)
    def __init__(
        self: nn.Module, *args: Any, device: Any = None, dtype: Any = None, **kwargs: Any
    ) -> None:
        init(self, *args, **kwargs)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    __init__._attnzoo_factory_kwargs = True  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]


#: callables that import packages whose modules register themselves; each runs once, before the
#: first lookup after it was added (the package root adds the one for ``attnzoo.modules``)
_LOADERS: list[Callable[[], object]] = []


def add_loader(loader: Callable[[], object]) -> None:
    """Run ``loader`` before the next lookup (:func:`info`, :func:`available`, :func:`create`).

    Modules register themselves when their file is imported. The registry does not know which
    packages hold modules (it is the lowest layer); whoever does adds a loader that imports them:
    ``attnzoo/__init__.py`` adds the one importing :mod:`attnzoo.modules`, and a package of
    third-party modules can add its own, so lookups always see every module, whichever part of
    attnzoo was imported first."""
    if not callable(loader):
        raise TypeError(f"attnzoo.registry.add_loader: expected a callable, got {loader!r}")
    _LOADERS.append(loader)


def _ensure_loaded() -> None:
    while _LOADERS:
        _LOADERS.pop(0)()  # popped first: a lookup during the import does not re-enter


def info(name: str) -> ModuleInfo:
    """Metadata of a registered module. Unknown names raise ``ValueError`` with suggestions."""
    _ensure_loaded()
    if not isinstance(name, str):
        raise TypeError(f"attnzoo: an attention name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"attnzoo: unknown attention {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[key]


def get(name: str) -> type[nn.Module]:
    """The class registered under ``name``."""
    return info(name).cls


def available(family: str | None = None) -> list[str]:
    """Sorted registry names, optionally only those of one family (see :data:`FAMILIES`)."""
    _ensure_loaded()
    if family is not None and family not in FAMILIES:
        raise ValueError(f"attnzoo.available: family must be one of {FAMILIES}; got {family!r}")
    return sorted(k for k, v in _REGISTRY.items() if family is None or v.family == family)


def _info_for_class(cls: Any) -> ModuleInfo | None:
    _ensure_loaded()
    return next((v for v in _REGISTRY.values() if v.cls is cls), None)


def resolve(
    attention: str | type[nn.Module] | Callable[..., nn.Module],
) -> Callable[..., nn.Module]:
    """Turn a registry name, a class or a factory (e.g. ``functools.partial``) into a factory.

    The factory is called as ``factory(channels, **kwargs)``.
    """
    if isinstance(attention, str):
        return get(attention)
    if callable(attention):
        return attention
    raise TypeError(
        "attnzoo: attention must be a registry name, an nn.Module class or a factory "
        f"callable; got {type(attention).__name__}"
    )


def create(
    attention: str | type[nn.Module] | Callable[..., nn.Module],
    channels: int,
    *,
    preset: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build an attention module for a feature map with ``channels`` channels.

    Args:
        attention: a registry name (``"cbam"``), a module class, or any callable returning a
            module when called as ``f(channels, **kwargs)`` (e.g. ``functools.partial``).
        channels: number of input channels ``C``.
        preset: a named variant (``"official"`` by default, ``"timm"``, ``"yolov4-tiny"`` ...;
            see ``attnzoo.info(name).presets``). Explicit ``kwargs`` override the preset's.
        **kwargs: the module's keyword-only hyperparameters.

    Example:
        >>> import attnzoo
        >>> attn = attnzoo.create("cbam", 256, reduction=8)
    """
    factory = resolve(attention)
    base = factory.func if isinstance(factory, functools.partial) else factory
    meta = info(attention) if isinstance(attention, str) else _info_for_class(base)
    if meta is not None and (isinstance(attention, str) or factory is base):
        kwargs = meta.resolve_kwargs(kwargs, preset)
    elif preset is not None:
        raise ValueError(
            f"attnzoo.create: preset={preset!r} needs a registry name or a registered class, "
            f"got {attention!r}"
        )
    if meta is not None:
        try:
            module_kwargs = {k: v for k, v in kwargs.items() if k not in ("device", "dtype")}
            inspect.signature(meta.cls).bind(channels, **module_kwargs)
        except TypeError as err:
            raise TypeError(
                f"{meta.cls.__name__}: {err}. Keyword arguments it takes: "
                f"{', '.join(meta.defaults) or 'none'}"
            ) from None
    return factory(channels, **kwargs)
