"""What the attention modules of a network computed: maps captured with forward pre-hooks.

:func:`attention_maps` runs ONE forward pass of a model and returns, for every attention module
in it, the attention it applied, as named CPU tensors. Nothing in any ``forward`` changes: a
forward *pre*-hook on each attention module receives the module's input ``x`` and recomputes
the attention from it with the module's own methods (``attention_map``, ``gates``, ``context``
...), under ``torch.no_grad()``, before the module runs. The hooks are removed afterwards, also
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

Maps per module, for an input ``x`` of shape ``(B, C, H, W)`` (``(B, C, L)`` and
``(B, C, T, H, W)`` for the 1-D/3-D non-local blocks):

=================  ===========================  ===============================================
registry name      key: shape                   what it is
=================  ===========================  ===============================================
``se``             channel: (B, C)              the sigmoid gate ``s``
``eca``            channel: (B, C)              the sigmoid gate ``s``
``cbam_channel``   channel: (B, C)              ``M_c``
``cbam_spatial``   spatial: (B, H, W)           ``M_s``
``cbam``           channel: (B, C)              ``M_c`` and ``M_s`` on the inputs they are
                   spatial: (B, H, W)           applied to: ``order="channel-spatial"``: ``M_s``
                                                of ``x * M_c``; ``"spatial-channel"``: ``M_c``
                                                of ``x * M_s``; ``"parallel"``: both of ``x``
``ca``             spatial: (B, H, W)           ``mean_c(a_h a_w)``: the per-channel gate
                                                ``a_h[c, i] a_w[c, j]`` averaged over channels
                   a_h: (B, C, H)               the height gate
                   a_w: (B, C, W)               the width gate
``gc``             spatial: (B, H, W)           softmax context-pooling weights (sum to 1;
                                                only with ``pooling="att"``)
                   channel_mul: (B, C)          ``sigmoid(t_mul)`` (with ``channel_mul``)
                   channel_add: (B, C)          the added term ``t_add`` (with ``channel_add``;
                                                zero at the official initialisation)
``ema``            spatial: (B, H, W)           the sigmoid weights averaged over the groups
                                                (= over channels: every group has C/G)
                   groups: (B, G, H, W)         the sigmoid weights per group
``sk``             branch: (B, M, C_out)        softmax weights of the M branches
``cam``            channel_affinity: (B, C, C)  ``A`` (rows: output channel, sum to 1)
                   channel: (B, C)              ``A.mean(1)``: the weight each channel gets
                                                as a source, averaged over output channels
``pam``            spatial: (B, h', w')         pixel-pair row(s), see below (h', w' = H, W)
``sagan``          spatial: (B, h', w')         pixel-pair; ``variant="tf"`` keys are 2x2
                                                max-pooled: h', w' = ceil(H/2), ceil(W/2)
``nonlocal2d``     spatial: (B, h', w')         pixel-pair; ``sub_sample=True`` (default) keys
                                                are pooled: ceil(H/2), ceil(W/2)
``nonlocal1d``     spatial: (B, L')             pixel-pair on the key grid (L' = ceil(L/2))
``nonlocal3d``     spatial: (B, T', h', w')     pixel-pair (T' = T, h', w' = ceil(H/2),
                                                ceil(W/2); time is not pooled)
``dual_attention`` spatial: (B, H, W)           PAM's pixel-pair map
                   channel_affinity, channel    CAM's, as for ``cam``
=================  ===========================  ===============================================

Pixel-pair maps (non-local, SAGAN, DANet PAM): the module's ``(B, N, M)`` affinity (``N`` query
positions of its input, ``M`` key positions, rows normalised as the module normalises them) is
reduced to one row per image and shown on the key grid:

* ``query="mean"`` (default): the mean over all ``N`` query rows ("where do positions look on
  average"). Computed in chunks of query rows, so the ``N x M`` matrix is never held at once:
  memory ``O(B * chunk * M)`` with at most 2**22 values per chunk, time ``O(B N M d)`` (what the
  module's own forward costs).
* ``query=(y, x)``: the row of that query position, in the module's *own input grid*
  (``(l,)`` for 1-D, ``(t, y, x)`` for 3-D); out-of-range points raise ``ValueError``. Only this
  row is computed: ``O(M)`` memory.
* ``query=(fy, fx)`` floats in ``[0, 1]``: the same as a fraction of the module's input size
  (index ``min(int(f * size), size - 1)``), natural when modules sit at different resolutions.

Registered classes without an entry here (added after this table) get the generic record
``{"attention_map": module.attention_map(x)}`` as returned by the module (if it has one).

Train mode. The model runs in the mode it is in (call ``model.eval()`` for inference maps, the
usual case). In train mode the maps use batch statistics exactly as the forward does, and every
buffer of the model (BatchNorm running statistics, which both the forward and the recomputation
would update) is restored afterwards, so the call leaves no trace in the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.registry import available, info

__all__ = ["QUERY_CHUNK_VALUES", "AttentionRecord", "attention_maps", "upsample_map"]

#: at most this many affinity values are held at once when averaging over query rows
QUERY_CHUNK_VALUES = 2**22

Query = str | Sequence[int] | Sequence[float]


@dataclass
class AttentionRecord:
    """The attention one module computed during :func:`attention_maps`.

    Attributes:
        path: the key (module path; the :class:`IdentityInit` wrapper's path when wrapped).
        module_path: path of the attention module itself (``path + ".attn"`` when wrapped).
        name: registry name (``"cbam"``).
        cls: the module's class.
        maps: named tensors, detached, on the CPU (see the table in the module docstring).
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
# query points
def _check_query(query: Any) -> None:
    if isinstance(query, str):
        if query != "mean":
            raise ValueError(
                f"attnzoo.viz.attention_maps: query must be 'mean', a point of ints "
                f"(y, x) or of floats (fy, fx) in [0, 1]; got {query!r}"
            )
        return
    if not isinstance(query, Sequence) or len(query) == 0:
        raise TypeError(
            "attnzoo.viz.attention_maps: query must be 'mean' or a tuple such as "
            f"(y, x); got {query!r}"
        )
    ints = all(isinstance(q, int) and not isinstance(q, bool) for q in query)
    floats = all(isinstance(q, float) for q in query)
    if not (ints or floats):
        raise TypeError(
            "attnzoo.viz.attention_maps: query coordinates must be all ints (grid "
            f"indices) or all floats (fractions in [0, 1]); got {query!r}"
        )
    if floats and not all(0.0 <= q <= 1.0 for q in query):
        raise ValueError(
            "attnzoo.viz.attention_maps: fractional query coordinates must lie in "
            f"[0, 1]; got {query!r}"
        )


def _resolve_query(query: Query, grid: Sequence[int], where: str) -> str | tuple[int, ...]:
    if isinstance(query, str):
        return query
    if len(query) != len(grid):
        raise ValueError(
            f"attnzoo.viz.attention_maps: query {tuple(query)} has {len(query)} "
            f"coordinates but the module {where!r} has a {len(grid)}-D input grid "
            f"{tuple(grid)}"
        )
    if isinstance(query[0], float):
        return tuple(min(int(f * s), s - 1) for f, s in zip(query, grid))
    if not all(0 <= q < s for q, s in zip(query, grid)):
        raise ValueError(
            f"attnzoo.viz.attention_maps: query {tuple(query)} is outside the input "
            f"grid {tuple(grid)} of module {where!r}"
        )
    return tuple(query)


def _flat_index(point: tuple[int, ...], grid: Sequence[int]) -> int:
    index = 0
    for p, s in zip(point, grid):
        index = index * s + p
    return index


# ---------------------------------------------------------------------------------------------
# pixel-pair rows
RowsFn = Callable[[slice], Tensor]  # query rows -> (B, n, M) affinity rows


def _reduce_rows(
    rows: RowsFn, n: int, m: int, batch: int, point: str | tuple[int, ...], grid: Sequence[int]
) -> Tensor:
    """One row per image ``(B, M)``: the query point's row, or the mean over all ``n`` rows."""
    if isinstance(point, tuple):
        i = _flat_index(point, grid)
        return rows(slice(i, i + 1))[:, 0]
    chunk = max(1, QUERY_CHUNK_VALUES // max(1, batch * m))
    total = None
    for start in range(0, n, chunk):
        part = rows(slice(start, min(n, start + chunk))).sum(1, dtype=torch.float64)
        total = part if total is None else total + part
    assert total is not None
    return total / n


def _key_grid(pooled_like: Tensor | None, x: Tensor) -> tuple[int, ...]:
    return tuple((x if pooled_like is None else pooled_like).shape[2:])


def _pixel_pair(module: nn.Module, x: Tensor, point: str | tuple[int, ...]) -> Tensor:
    """The reduced affinity row(s) of a non-local / SAGAN / PAM module on its key grid, from the
    module's public ``affinity_rows`` (rows on demand, no ``N x M`` matrix)."""
    rows, keys = module.affinity_rows(x)
    grid = tuple(x.shape[2:])
    row = _reduce_rows(rows, math.prod(grid), math.prod(keys), x.shape[0], point, grid)
    return row.to(x.dtype).view(x.shape[0], *keys)


# ---------------------------------------------------------------------------------------------
# extractors: (module, x, resolved query) -> maps
def _channel(module: nn.Module, x: Tensor, point: Any) -> dict[str, Tensor]:
    return {"channel": module.attention_map(x).flatten(1)}


def _spatial_gate(module: nn.Module, x: Tensor, point: Any) -> dict[str, Tensor]:
    return {"spatial": module.attention_map(x)[:, 0]}


def _cbam(module: nn.Module, x: Tensor, point: Any) -> dict[str, Tensor]:
    if module.order == "channel-spatial":
        mc = module.channel.attention_map(x)
        ms = module.spatial.attention_map(x * mc)
    elif module.order == "spatial-channel":
        ms = module.spatial.attention_map(x)
        mc = module.channel.attention_map(x * ms)
    else:
        mc, ms = module.channel.attention_map(x), module.spatial.attention_map(x)
    return {"channel": mc.flatten(1), "spatial": ms[:, 0]}


def _coord(module: nn.Module, x: Tensor, point: Any) -> dict[str, Tensor]:
    a_h, a_w = module.gates(x)  # (B, C, H, 1), (B, C, 1, W)
    a_h, a_w = a_h[..., 0], a_w[:, :, 0]
    spatial = torch.einsum("bch,bcw->bhw", a_h, a_w) / x.shape[1]  # no (B, C, H, W) tensor
    return {"spatial": spatial, "a_h": a_h, "a_w": a_w}


def _gc(module: nn.Module, x: Tensor, point: Any) -> dict[str, Tensor]:
    out = {}
    if module.pooling == "att":
        out["spatial"] = module.attention_map(x)[:, 0]
    scale, shift = module.transforms(module.context(x))
    if scale is not None:
        out["channel_mul"] = scale.flatten(1)
    if shift is not None:
        out["channel_add"] = shift.flatten(1)
    return out


def _ema(module: nn.Module, x: Tensor, point: Any) -> dict[str, Tensor]:
    weights = module.attention_map(x)  # (B, G, H, W)
    return {"spatial": weights.mean(1), "groups": weights}


def _sk(module: nn.Module, x: Tensor, point: Any) -> dict[str, Tensor]:
    return {"branch": module.attention_map(x).flatten(2)}  # (B, M, C_out, 1, 1) -> (B, M, C)


def _channel_affinity(module: nn.Module, x: Tensor, point: Any) -> dict[str, Tensor]:
    a = module.attention_map(x)  # (B, C, C)
    return {"channel_affinity": a, "channel": a.mean(1)}


def _pixel(module: nn.Module, x: Tensor, point: Any) -> dict[str, Tensor]:
    return {"spatial": _pixel_pair(module, x, point)}


def _dual(module: nn.Module, x: Tensor, point: Any) -> dict[str, Tensor]:
    return {"spatial": _pixel_pair(module.pam, x, point), **_channel_affinity(module.cam, x, None)}


def _generic(module: nn.Module, x: Tensor, point: Any) -> dict[str, Tensor]:
    fn = getattr(module, "attention_map", None)
    out = fn(x) if callable(fn) else None
    return {"attention_map": out} if isinstance(out, Tensor) else {}


_EXTRACTORS: dict[str, Callable[[nn.Module, Tensor, Any], dict[str, Tensor]]] = {
    "se": _channel,
    "eca": _channel,
    "cbam_channel": _channel,
    "cbam_spatial": _spatial_gate,
    "cbam": _cbam,
    "ca": _coord,
    "gc": _gc,
    "ema": _ema,
    "sk": _sk,
    "cam": _channel_affinity,
    "pam": _pixel,
    "sagan": _pixel,
    "nonlocal1d": _pixel,
    "nonlocal2d": _pixel,
    "nonlocal3d": _pixel,
    "dual_attention": _dual,
}
#: the modules whose maps depend on ``query``
PIXEL_PAIR = frozenset({"pam", "sagan", "nonlocal1d", "nonlocal2d", "nonlocal3d", "dual_attention"})


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
        attention module that ran (the table of map names and shapes is in the module
        docstring). Modules that did not run in this forward are absent.

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
    _check_query(query)
    records: dict[str, AttentionRecord] = {}
    handles = []

    def make_hook(key: str, path: str, name: str, wrapped: bool) -> Callable[..., None]:
        extract = _EXTRACTORS.get(name, _generic)

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            record = records.get(key)
            if record is not None:
                record.calls += 1
                return
            if not args or not isinstance(args[0], Tensor):
                return
            x = args[0]
            point = None
            if name in PIXEL_PAIR:
                point = _resolve_query(query, x.shape[2:], path)
            with torch.no_grad():
                maps = extract(module, x, point)
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
