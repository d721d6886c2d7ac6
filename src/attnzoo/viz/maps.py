"""What the attention modules of a network computed: maps captured with forward pre-hooks.

:func:`attention_maps` runs ONE forward pass of a model and returns, for every attention module
in it, the attention it applied, as named CPU tensors. Nothing in any ``forward`` changes: a
forward *pre*-hook on each attention module receives the module's input ``x`` and recomputes
the attention from it with the module's own ``attention_maps`` method, under ``torch.no_grad()``,
before the module runs. The hooks are removed afterwards, also
on error.

Which modules: every instance of a class registered in :mod:`attnzoo.registry` (also subclasses,
handled as their registered base), found with ``model.named_modules()``. A registered module
inside another one (CBAM's :class:`~attnzoo.modules.cbam.ChannelGate` and
:class:`~attnzoo.modules.cbam.SpatialGate`, DANet's PAM and CAM inside
:class:`~attnzoo.modules.danet.DualAttention`) is reported once, as part of the outer module.
Unregistered user classes are skipped: there is no contract telling what their attention is.

Keys are module paths as in ``named_modules()`` (``"layer1.0.attention"``; ``""`` when the model
itself is the attention module). A module that :func:`attnzoo.attach` wrapped in
:class:`~attnzoo.models.attach.IdentityInit` is keyed by the wrapper's path (the path that
:func:`attnzoo.attached` reports) and its record has ``wrapped=True`` and ``module_path`` ending in
``.attn``; its maps are those of the wrapped module (the wrapper then blends
``x + alpha * (attn(x) - x)``).

What each module computed comes from its own ``attention_maps(x, *, query="mean") ->
dict[str, Tensor]`` method, called by the hook on the module's input (see each module's
docstring for its keys and shapes; ``docs/viz.md`` has the table). Conventions: ``channel``
``(B, C)``, ``spatial`` ``(B, H, W)`` (on the key grid for pixel-pair modules), plus
module-specific extras. A new module that implements the method needs no change here. A
registered class without the method gets the generic record ``{"attention_map":
module.attention_map(x)}`` (or no maps when it has neither), so user-registered modules still
appear.

Pixel-pair maps (non-local, SAGAN, DANet PAM ...) depend on ``query``: ``"mean"`` (the mean over
all query rows, computed in chunks, never the ``N x M`` matrix), ``(y, x)`` indices of the
module's *own input grid* (``(l,)`` for 1-D, ``(t, y, x)`` for 3-D; out-of-range points raise
``ValueError``), or ``(fy, fx)`` fractions in ``[0, 1]`` (natural when modules sit at different
resolutions); see :mod:`attnzoo.ops.query`. Such modules set the class attribute
``attention_query = True``; their record's ``query`` is the point resolved on their input grid.

Train mode. The model runs in the mode it is in (call ``model.eval()`` for inference maps, the
usual case). In train mode the maps use batch statistics exactly as the forward does, and every
buffer of the model (BatchNorm running statistics, which both the forward and the recomputation
would update) is restored afterwards, so the call leaves no trace in the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.ops.query import QUERY_ATTRIBUTE, Query, check_query, resolve_query
from attnzoo.registry import available, info

__all__ = ["AttentionRecord", "Query", "attention_maps", "upsample_map"]


@dataclass
class AttentionRecord:
    """The attention one module computed during :func:`attention_maps`.

    Attributes:
        path: the key (module path; the :class:`IdentityInit` wrapper's path when wrapped).
        module_path: path of the attention module itself (``path + ".attn"`` when wrapped).
        name: registry name (``"cbam"``).
        cls: the module's class.
        maps: named tensors, detached, on the CPU (the module's ``attention_maps``).
        input_shape: shape of the module's input ``x``.
        wrapped: the module sits inside an :class:`~attnzoo.models.attach.IdentityInit`.
        query: pixel-pair modules: ``"mean"`` or the query point as indices of the module's
            input grid; ``None`` for the others.
        calls: how many times the module ran in the forward pass; the maps are those of the
            first call.
    """

    path: str
    module_path: str
    name: str
    cls: type[nn.Module]
    maps: dict[str, Tensor] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()
    wrapped: bool = False
    query: str | tuple[int, ...] | None = None
    calls: int = 0


# ---------------------------------------------------------------------------------------------
# upsampling
def upsample_map(maps: Tensor, size: int | Sequence[int]) -> Tensor:
    """Resize ``(B, h, w)`` maps to ``size`` = ``(H, W)`` (or ``H`` for square) bilinearly.

    ``align_corners=False``: pixel centres are at half-integer positions, so map cell ``(i, j)``
    covers image pixels ``[i H/h, (i+1) H/h) x [j W/w, (j+1) W/w)``, the same geometry as
    ``F.interpolate``, OpenCV's ``resize`` (which grad-cam uses) and ``imshow`` with the default
    extent. Integer maps are converted to float32; floating maps keep their dtype.
    """
    if not isinstance(maps, Tensor) or maps.dim() != 3:
        raise ValueError(
            "attnzoo.viz.upsample_map: maps must be a (B, h, w) tensor; got "
            f"{tuple(maps.shape) if isinstance(maps, Tensor) else type(maps)}"
        )
    if isinstance(size, int):
        size = (size, size)
    size = tuple(size)
    if len(size) != 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size
    ):
        raise ValueError(f"attnzoo.viz.upsample_map: size must be (H, W) positive ints; got {size}")
    if not maps.is_floating_point():
        maps = maps.float()
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(
        maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False
    ).squeeze(1)


# ---------------------------------------------------------------------------------------------
# the maps of one module
def _module_maps(module: nn.Module, x: Tensor, query: Query) -> dict[str, Tensor]:
    """``module.attention_maps(x, query=query)``; the generic record for a registered class
    without that method."""
    method = getattr(module, "attention_maps", None)
    if callable(method):
        maps = method(x, query=query)
        if not isinstance(maps, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in maps.items()
        ):
            raise TypeError(
                f"attnzoo.viz.attention_maps: {type(module).__name__}.attention_maps must return "
                f"a dict of named tensors; got {type(maps).__name__}"
            )
        return maps
    fn = getattr(module, "attention_map", None)
    out = fn(x) if callable(fn) else None
    return {"attention_map": out} if isinstance(out, Tensor) else {}


# ---------------------------------------------------------------------------------------------
# finding the modules
def _registered_classes() -> dict[type, str]:
    return {info(name).cls: name for name in available()}


def _registry_name(module: nn.Module, classes: dict[type, str]) -> str | None:
    for cls in type(module).__mro__:
        if cls in classes:
            return classes[cls]
    return None


def _find(model: nn.Module) -> list[tuple[str, str, nn.Module, str, bool]]:
    """(key, module path, module, registry name, wrapped) of the outermost attention modules."""
    from attnzoo.models.attach import IdentityInit

    classes = _registered_classes()
    modules = dict(model.named_modules())
    found: list[tuple[str, str, nn.Module, str, bool]] = []
    taken: list[str] = []
    for path, module in modules.items():
        if any(path == t or path.startswith(t + ".") or t == "" for t in taken):
            continue
        name = _registry_name(module, classes)
        if name is None:
            continue
        taken.append(path)
        key, wrapped = path, False
        parent, _, child = path.rpartition(".")
        if child == "attn" and isinstance(modules.get(parent), IdentityInit):
            key, wrapped = parent, True
        found.append((key, path, module, name, wrapped))
    return found


def _to_cpu(maps: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in maps.items()}


def attention_maps(
    model: nn.Module, images: Any, *, query: Query = "mean"
) -> dict[str, AttentionRecord]:
    """Run ``model(images)`` once and return what every attention module in it computed.

    Args:
        model: any network (or a single attention module); its forward is not changed.
        images: the model's input (passed as ``model(images)``).
        query: pixel-pair modules only: ``"mean"`` (mean over query positions), ``(y, x)``
            indices in each module's input grid, or ``(fy, fx)`` fractions in ``[0, 1]``; see the
            module docstring.

    Returns:
        ``{path: AttentionRecord}`` in ``named_modules()`` order, one per outermost registered
        attention module that ran (map names and shapes: each module's ``attention_maps``).
        Modules that did not run in this forward are absent.

    The forward runs under ``torch.no_grad()`` in the model's current train/eval mode; hooks are
    removed and (in train mode) buffers restored afterwards, also on error.

    Example:
        >>> from attnzoo.models import cifar_resnet8
        >>> model = cifar_resnet8("cbam").eval()
        >>> maps = attention_maps(model, torch.randn(2, 3, 32, 32))
        >>> maps["layer1.0.attention"].maps["spatial"].shape
        torch.Size([2, 16, 16])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"attnzoo.viz.attention_maps: model must be an nn.Module, got {type(model).__name__}"
        )
    check_query(query)
    records: dict[str, AttentionRecord] = {}
    handles = []

    def make_hook(key: str, path: str, name: str, wrapped: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            record = records.get(key)
            if record is not None:
                record.calls += 1
                return
            if not args or not isinstance(args[0], Tensor):
                return
            x = args[0]
            point: str | tuple[int, ...] | None = None
            if getattr(module, QUERY_ATTRIBUTE, False):
                where = f"attnzoo.viz.attention_maps (module {path!r})"
                point = resolve_query(query, x.shape[2:], where)
            with torch.no_grad():
                maps = _module_maps(module, x, query if point is None else point)
            records[key] = AttentionRecord(
                path=key,
                module_path=path,
                name=name,
                cls=type(module),
                maps=_to_cpu(maps),
                input_shape=tuple(x.shape),
                wrapped=wrapped,
                query=point,
                calls=1,
            )

        return hook

    found = _find(model)
    training = any(m.training for m in model.modules())
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if training else []
    try:
        for key, path, module, name, wrapped in found:
            handles.append(module.register_forward_pre_hook(make_hook(key, path, name, wrapped)))
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    order = [key for key, *_ in found]
    return {key: records[key] for key in order if key in records}
