"""Insert attention modules into existing networks, list them, remove them, load weights.

``attach(model, "cbam")`` puts a CBAM module into every residual block of a torchvision or timm
ResNet (before the residual addition, the placement of the SE, CBAM, ECA, GC and EMA papers) and
returns the same model object. Nothing is copied, no existing parameter is touched, and the
``state_dict`` keys of the original layers stay exactly what they were, so pretrained weights of
the plain network still load (see :func:`load_pretrained`).

How it works (no forward hooks)
-------------------------------
The inserted module becomes a **new child of the block** (``layer1.0.attention``), and the block's
class is swapped for a small subclass of its own class whose ``forward`` is the original block's
computation with *slots* where an attention child, if present, is applied. The original children
keep their names (``layer1.0.bn3.weight`` is unchanged); only new keys appear. :func:`detach`
deletes the children and restores the original class, which gives back the original module tree
exactly. The subclass reports the original class name in ``repr``, passes ``isinstance`` checks
for the original class, pickles (``torch.save(model)``) and deep-copies. Because the forward is
plain Python over the block's own submodules, ``torch.compile(fullgraph=True)`` and ONNX export
trace through it like through the original.

Supported blocks and positions (``position=``; child name in brackets)
----------------------------------------------------------------------
torchvision ``BasicBlock``/``Bottleneck`` (resnet18-152, resnext, wide_resnet), timm ``BasicBlock``/
``Bottleneck`` (timm's resnet family) and this package's ``SKBottleneck``:

* ``"before_add"`` [``attention``] (default): after the block's last BN, before the residual
  addition. SE, CBAM, ECA, GC and EMA papers. In timm blocks it comes after timm's own ``se``.
* ``"after_conv3x3"`` [``attention_conv3x3``]: after the (first) 3x3 conv *and its BN and ReLU*,
  i.e. on the input of the next conv; ``width`` channels in a Bottleneck, ``planes`` in a
  BasicBlock. The activation is included so that the attention sees the same kind of
  (non-negative) features as at every other position and in the MobileNetV2 placement.
* ``"after_conv3x3_pre_bn"`` [``attention_pre_bn``]: right after the block's ``conv2`` (the 3x3
  of a Bottleneck, the second 3x3 of a BasicBlock) and **before** its BatchNorm ``bn2``: SimAM's
  official placement (``conv2 = Sequential(conv3x3, simam)``); ``conv2.out_channels`` channels.
* ``"after_block"`` [``attention_out``]: a separate block after the residual block's final ReLU.
  With ``every=2`` this is the non-local placement ("after every other residual block"; the
  official video-nonlocal code adds it after blocks 1, 3, 5, ... of a stage, i.e. block index
  ``i % every == every - 1``).
* ``"after_stage"`` [``attention_out`` of a stage's last block]: between stages (BAM).

torchvision ``InvertedResidual`` (MobileNetV2):

* ``"after_dwconv"`` [``attention_dw``] (default): after the depthwise conv + BN + ReLU6, on the
  expanded (hidden) channels, before the projection; the Coordinate Attention and EMA placement.
* ``"before_add"``, ``"after_block"``, ``"after_stage"`` as above (after the projection BN).

Any model, any module: ``after=["layer3.5", "features.18"]`` inserts after those modules; channels
come from one dry run (``example_input``). A plain ``nn.Sequential`` gets the attention appended
as its last child ``attention_out``; any other module gets its class swapped to one that applies
``attention_out`` to its output. A module that runs more than once per forward (a shared ReLU) is
refused.

Stages: the known blocks in module order are grouped into stages; a new stage starts when the
parent container changes or the block's output width changes. Stage ``1`` of a ResNet is
``layer1`` (the papers' ``conv2_x``/``c2``), so GCNet's "c3-c5" is ``stages=(2, 3, 4)``. MobileNetV2
has the 7 stages of its (t, c, n, s) table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo import fast
from attnzoo.ops.validation import resolve_submodule
from attnzoo.registry import create

__all__ = [
    "POSITIONS",
    "AttachedModule",
    "IdentityInit",
    "attach",
    "attached",
    "detach",
    "load_pretrained",
    "register_block",
    "resolve_weights",
]

POSITIONS = (
    "before_add",
    "after_conv3x3",
    "after_conv3x3_pre_bn",
    "after_dwconv",
    "after_block",
    "after_stage",
)

#: child name used for each position
_SLOT = {
    "before_add": "attention",
    "after_conv3x3": "attention_conv3x3",
    "after_conv3x3_pre_bn": "attention_pre_bn",
    "after_dwconv": "attention_dw",
    "after_block": "attention_out",
    "after_stage": "attention_out",
    "after": "attention_out",
}
_RECORD = "_attnzoo_slots"  # host attribute: {child name: {"position": ..., "channels": ...}}
_FOLDED = "_attnzoo_folded"  # host attribute, not a child: {slot: fast.BatchNormGate2d}


# ---------------------------------------------------------------------------------------------
# identity_init wrapper
class IdentityInit(nn.Module):
    """``out = x + alpha * (attn(x) - x)`` with a learnable scalar ``alpha`` initialised to 0.

    Wrapping an inserted module with this makes the attached network compute exactly the
    original network's function at initialisation (``alpha = 0``), so fine-tuning starts from
    the pretrained accuracy. ``alpha`` receives a gradient ``<attn(x) - x, dL/dout>`` at once;
    the attention's own parameters start learning after the first step moves ``alpha``
    (the ReZero / SAGAN-gamma scheme). At ``alpha = 1`` the wrapper is the bare module.

    Keys: the wrapped module's parameters live under ``attn.``, the scalar is ``alpha``.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.alpha.to(x.dtype) * (self.attn(x) - x)


# ---------------------------------------------------------------------------------------------
# known blocks: their forward with attention slots, and the channels at each position
def _slot(host: nn.Module, name: str) -> nn.Module | None:
    return getattr(host, name, None)


def _apply(host: nn.Module, name: str, x: Tensor) -> Tensor:
    module = _slot(host, name)
    return x if module is None else module(x)


def _apply_norm(host: nn.Module, name: str, norm: nn.Module, z: Tensor) -> Tensor:
    """``attention(norm(z))``: through the :class:`attnzoo.fast.BatchNormGate2d` that
    :func:`attach` kept beside the pair (switch on), while it still holds this very pair."""
    folded = getattr(host, _FOLDED, {}).get(name)
    if folded is not None and folded.norm is norm and folded.gate is _slot(host, name):
        return folded(z)
    return _apply(host, name, norm(z))


def _tv_basic_forward(self: nn.Module, x: Tensor) -> Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = _apply(self, "attention_conv3x3", out)
    out = _apply(self, "attention_pre_bn", self.conv2(out))
    out = _apply_norm(self, "attention", self.bn2, out)
    if self.downsample is not None:
        identity = self.downsample(x)
    out += identity  # in place, as torchvision's blocks
    out = self.relu(out)
    return _apply(self, "attention_out", out)


def _tv_bottleneck_forward(self: nn.Module, x: Tensor) -> Tensor:
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(_apply(self, "attention_pre_bn", self.conv2(out))))
    out = _apply(self, "attention_conv3x3", out)
    out = _apply_norm(self, "attention", self.bn3, self.conv3(out))
    if self.downsample is not None:
        identity = self.downsample(x)
    out += identity  # in place, as torchvision's blocks
    out = self.relu(out)
    return _apply(self, "attention_out", out)


def _timm_basic_forward(self: nn.Module, x: Tensor) -> Tensor:
    shortcut = x
    x = self.act1(self.drop_block(self.bn1(self.conv1(x))))
    x = self.aa(x)
    x = _apply(self, "attention_conv3x3", x)
    x = _apply(self, "attention_pre_bn", self.conv2(x))
    if self.se is None:
        x = _apply_norm(self, "attention", self.bn2, x)
    else:
        x = _apply(self, "attention", self.se(self.bn2(x)))
    if self.drop_path is not None:
        x = self.drop_path(x)
    if self.downsample is not None:
        shortcut = self.downsample(shortcut)
    x += shortcut  # in place, as timm's blocks
    x = self.act2(x)
    return _apply(self, "attention_out", x)


def _timm_bottleneck_forward(self: nn.Module, x: Tensor) -> Tensor:
    shortcut = x
    x = self.act1(self.bn1(self.conv1(x)))
    x = self.act2(self.drop_block(self.bn2(_apply(self, "attention_pre_bn", self.conv2(x)))))
    x = self.aa(x)
    x = _apply(self, "attention_conv3x3", x)
    if self.se is None:
        x = _apply_norm(self, "attention", self.bn3, self.conv3(x))
    else:
        x = _apply(self, "attention", self.se(self.bn3(self.conv3(x))))
    if self.drop_path is not None:
        x = self.drop_path(x)
    if self.downsample is not None:
        shortcut = self.downsample(shortcut)
    x += shortcut  # in place, as timm's blocks
    x = self.act3(x)
    return _apply(self, "attention_out", x)


def _dw_index(block: nn.Module) -> int:
    """Index of the depthwise conv (+BN+ReLU6) in torchvision's ``InvertedResidual.conv``."""
    return len(block.conv) - 3


def _tv_inverted_forward(self: nn.Module, x: Tensor) -> Tensor:
    out = x
    dw = len(self.conv) - 3
    for i, layer in enumerate(self.conv):
        out = layer(out)
        if i == dw:
            out = _apply(self, "attention_dw", out)
    out = _apply(self, "attention", out)
    if self.use_res_connect:
        out = x + out
    return _apply(self, "attention_out", out)


def _check_inverted(block: nn.Module) -> None:
    dw = block.conv[_dw_index(block)][0]
    if not (isinstance(dw, nn.Conv2d) and dw.groups == dw.in_channels == dw.out_channels):
        raise ValueError(
            "attnzoo.attach: this InvertedResidual does not have torchvision's layout "
            "[(expand), depthwise ConvBNReLU6, project conv, BN]; use after=[paths]"
        )


@dataclass(frozen=True)
class _Kind:
    forward: Callable[[nn.Module, Tensor], Tensor]
    default: str
    channels: Mapping[str, Callable[[nn.Module], int]]  # position -> channels at that point
    check: Callable[[nn.Module], None] | None = None


_KINDS: dict[tuple[str, str], _Kind] = {}


def register_block(
    cls: type[nn.Module] | tuple[str, str],
    forward: Callable[[nn.Module, Tensor], Tensor],
    *,
    default: str,
    channels: Mapping[str, Callable[[nn.Module], int]],
    check: Callable[[nn.Module], None] | None = None,
) -> None:
    """Teach :func:`attach` a block type: its forward with slots and the channels per position.

    ``forward(block, x)`` must compute exactly the block's own forward and call
    ``attention``, ``attention_conv3x3``, ``attention_pre_bn``, ``attention_dw`` or
    ``attention_out`` children where present (absent children are skipped). ``cls`` may be
    given as ``(module, qualname)`` so the owning library need not be imported. Only exact classes
    match: a subclass may override ``forward``, so it is treated as unknown (use ``after=``).
    """
    key = (cls.__module__, cls.__qualname__) if isinstance(cls, type) else tuple(cls)
    positions = set(channels) | {"after_block", "after_stage"}
    if default not in positions:
        raise ValueError(f"register_block: default {default!r} not in {sorted(positions)}")
    _KINDS[key] = _Kind(forward, default, dict(channels), check)


def _out_channels_basic(b: nn.Module) -> int:
    return b.conv2.out_channels


def _out_channels_bottleneck(b: nn.Module) -> int:
    return b.conv3.out_channels


register_block(
    ("torchvision.models.resnet", "BasicBlock"),
    _tv_basic_forward,
    default="before_add",
    channels={
        "before_add": _out_channels_basic,
        "after_conv3x3": lambda b: b.conv1.out_channels,
        "after_conv3x3_pre_bn": lambda b: b.conv2.out_channels,
        "after_block": _out_channels_basic,
    },
)
register_block(
    ("torchvision.models.resnet", "Bottleneck"),
    _tv_bottleneck_forward,
    default="before_add",
    channels={
        "before_add": _out_channels_bottleneck,
        "after_conv3x3": lambda b: b.conv2.out_channels,
        "after_conv3x3_pre_bn": lambda b: b.conv2.out_channels,
        "after_block": _out_channels_bottleneck,
    },
)
register_block(
    ("timm.models.resnet", "BasicBlock"),
    _timm_basic_forward,
    default="before_add",
    channels={
        "before_add": _out_channels_basic,
        "after_conv3x3": lambda b: b.conv1.out_channels,
        "after_conv3x3_pre_bn": lambda b: b.conv2.out_channels,
        "after_block": _out_channels_basic,
    },
)
register_block(
    ("timm.models.resnet", "Bottleneck"),
    _timm_bottleneck_forward,
    default="before_add",
    channels={
        "before_add": _out_channels_bottleneck,
        "after_conv3x3": lambda b: b.conv2.out_channels,
        "after_conv3x3_pre_bn": lambda b: b.conv2.out_channels,
        "after_block": _out_channels_bottleneck,
    },
)
register_block(
    ("torchvision.models.mobilenetv2", "InvertedResidual"),
    _tv_inverted_forward,
    default="after_dwconv",
    channels={
        "after_dwconv": lambda b: b.conv[_dw_index(b)][0].out_channels,
        "before_add": lambda b: b.out_channels,
        "after_block": lambda b: b.out_channels,
    },
    check=_check_inverted,
)


#: the BatchNorm right before the "before_add" slot, per block forward: the (norm, attention)
#: pairs that attnzoo.fast folds into one layer while its switch is on
_NORM_BEFORE_ADD = {
    _tv_basic_forward: "bn2",
    _tv_bottleneck_forward: "bn3",
    _timm_basic_forward: "bn2",
    _timm_bottleneck_forward: "bn3",
}


def _fold(host: nn.Module, child: str, module: nn.Module) -> None:
    """Keep a :class:`attnzoo.fast.BatchNormGate2d` of (the block's last BatchNorm, ``module``)
    beside them, for :func:`_apply_norm` (not a child: ``state_dict`` keys stay unchanged)."""
    norm = getattr(host, _NORM_BEFORE_ADD.get(type(host).forward, ""), None)
    if norm is not None and getattr(host, "se", None) is None and fast.foldable(norm, module):
        host.__dict__.setdefault(_FOLDED, {})[child] = fast.BatchNormGate2d(norm, module)


def _kind_of(cls: type) -> _Kind | None:
    return _KINDS.get((cls.__module__, cls.__qualname__))


# ---------------------------------------------------------------------------------------------
# the swapped classes
_PREFIX = "_Attached_"
_CLASSES: dict[type, type] = {}


def _encode(cls: type) -> str:
    def esc(s: str) -> str:
        return s.replace("_", "_0").replace(".", "_1")

    return f"{_PREFIX}{esc(cls.__module__)}_2{esc(cls.__qualname__)}"


def _decode(name: str) -> type:
    body = name[len(_PREFIX) :]
    mod, _, qual = body.partition("_2")

    def unesc(s: str) -> str:
        return s.replace("_1", ".").replace("_0", "_")

    obj: Any = importlib.import_module(unesc(mod))
    for part in unesc(qual).split("."):
        obj = getattr(obj, part)
    return obj


def _generic_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    out = type(self)._attnzoo_base.forward(self, *args, **kwargs)
    return self.attention_out(out)


def _attached_class(base: type[nn.Module]) -> type[nn.Module]:
    """The subclass of ``base`` whose forward has attention slots (created once per base)."""
    if getattr(base, "_attnzoo_base", None) is base:
        raise TypeError("attnzoo: internal error, already an attached class")
    cls = _CLASSES.get(base)
    if cls is None:
        kind = _kind_of(base)
        name = _encode(base)
        namespace = {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": base.__doc__,
            "_attnzoo_base": base,
            "forward": kind.forward if kind is not None else _generic_forward,
            "_get_name": lambda self: base.__name__,
        }
        cls = type(name, (base,), namespace)
        _CLASSES[base] = cls
    return cls


def __getattr__(name: str) -> Any:  # PEP 562: lets pickle find the swapped classes
    if name.startswith(_PREFIX):
        return _attached_class(_decode(name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _base_class(module: nn.Module) -> type[nn.Module]:
    cls = type(module)
    return cls._attnzoo_base if "_attnzoo_base" in cls.__dict__ else cls


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


# ---------------------------------------------------------------------------------------------
# public API
@dataclass(frozen=True)
class AttachedModule:
    """One inserted module: where (``path`` of the inserted child), what, and its width.

    ``identity_init`` is True when the module was attached with ``identity_init=True``: it is
    then wrapped in :class:`IdentityInit`, or left bare if it already is the identity at init.
    """

    path: str
    position: str
    cls: str
    channels: int
    params: int
    identity_init: bool


def _inserted_parent_paths(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(p, m) for p, m in model.named_modules() if _RECORD in m.__dict__]


def attached(model: nn.Module) -> list[AttachedModule]:
    """List the modules :func:`attach` inserted into ``model``, in module order."""
    out = []
    for path, host in _inserted_parent_paths(model):
        for child, rec in host.__dict__[_RECORD].items():
            module = host._modules[child]
            inner = module.attn if isinstance(module, IdentityInit) else module
            out.append(
                AttachedModule(
                    path=f"{path}.{child}" if path else child,
                    position=rec["position"],
                    cls=type(inner).__name__,
                    channels=rec["channels"],
                    params=sum(p.numel() for p in module.parameters()),
                    identity_init=rec["identity_init"],
                )
            )
    return out


def detach(model: nn.Module) -> nn.Module:
    """Remove everything :func:`attach` inserted and restore the original classes. In place."""
    for _, host in _inserted_parent_paths(model):
        for child in host.__dict__.pop(_RECORD):
            del host._modules[child]
        host.__dict__.pop(_FOLDED, None)
        if "_attnzoo_base" in type(host).__dict__:
            host.__class__ = type(host)._attnzoo_base
    return model


def _stages(model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Known blocks in module order, grouped into stages (parent changes or width changes)."""
    stages: list[list[tuple[str, nn.Module]]] = []
    prev_parent, prev_width = None, None
    for path, module in model.named_modules():
        kind = _kind_of(_base_class(module))
        if kind is None:
            continue
        parent = path.rpartition(".")[0]
        width = kind.channels.get("after_block", lambda b: None)(module)
        if not stages or parent != prev_parent or width != prev_width:
            stages.append([])
        stages[-1].append((path, module))
        prev_parent, prev_width = parent, width
    return stages


def _device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


def _build(
    attention: Any, channels: int, kwargs: Mapping[str, Any], identity_init: bool, host: nn.Module
) -> nn.Module:
    module = create(attention, channels, **kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"attnzoo.attach: the attention factory returned {type(module).__name__}, "
            "expected an nn.Module"
        )
    device, dtype = _device_dtype(host)
    if device is not None:
        module = module.to(device=device, dtype=dtype)
    if fast.is_enabled():
        fast.accelerate(module)  # CBAM / ECA: the custom ops of attnzoo.fast (same state_dict)
    if identity_init and not _is_identity(module, channels, device, dtype):
        module = IdentityInit(module).to(device=device, dtype=dtype)
    return module.train(host.training)


@torch.no_grad()
def _is_identity(module: nn.Module, channels: int, device: Any, dtype: Any) -> bool:
    """Does ``module`` already return its input exactly (GC's zero-initialised add branch,
    non-local's zero BN, SAGAN's gamma = 0)? Such modules are not wrapped by ``identity_init``:
    ``x + alpha * (attn(x) - x)`` would give zero gradient to alpha *and* to the module."""
    was_training = module.training
    module.eval()
    try:
        probe = torch.randn(
            2, channels, 5, 7, device=device, dtype=dtype or torch.get_default_dtype()
        )
        return bool(torch.equal(module(probe), probe))
    except Exception:  # noqa: BLE001  (a module that cannot run on the probe is simply wrapped)
        return False
    finally:
        module.train(was_training)


def _insert(
    host: nn.Module,
    child: str,
    module: nn.Module,
    position: str,
    channels: int,
    identity_init: bool,
) -> None:
    if child in host._modules:
        raise ValueError(f"attnzoo.attach: {type(host).__name__} already has a child {child!r}")
    if not _is_plain_sequential(host) and "_attnzoo_base" not in type(host).__dict__:
        host.__class__ = _attached_class(type(host))
    host.add_module(child, module)
    host.__dict__.setdefault(_RECORD, {})[child] = {
        "position": position,
        "channels": channels,
        "identity_init": identity_init,
    }
    if fast.is_enabled() and position == "before_add":
        _fold(host, child, module)  # SE / ECA after a BatchNorm2d: one folded layer


def _check_free(host: nn.Module, child: str, path: str) -> None:
    if child in host._modules:
        raise ValueError(
            f"attnzoo.attach: {path or 'model'} already has {child!r}; "
            "call attnzoo.detach(model) first"
        )


def _dry_run(model: nn.Module, paths: list[str], example_input: Any) -> dict[str, list[Any]]:
    outputs: dict[str, list[Any]] = {p: [] for p in paths}
    handles = []
    for p in paths:
        module = model.get_submodule(p)
        handles.append(module.register_forward_hook(lambda m, a, o, p=p: outputs[p].append(o)))
    device, dtype = _device_dtype(model)
    if example_input is None:
        example_input = (1, 3, 224, 224)
    if isinstance(example_input, (tuple, list, torch.Size)) and all(
        isinstance(s, int) for s in example_input
    ):
        example_input = torch.zeros(tuple(example_input), device=device, dtype=dtype)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return outputs


def _resolve_path(model: nn.Module, path: str) -> nn.Module:
    return resolve_submodule("attnzoo.attach", model, path)


def attach(
    model: nn.Module,
    attention: str | type[nn.Module] | Callable[..., nn.Module],
    *,
    position: str | None = None,
    stages: Iterable[int] | None = None,
    every: int = 1,
    select: Callable[[str, int], bool] | None = None,
    stage_kwargs: Mapping[int, Mapping[str, Any]] | None = None,
    after: Iterable[str] | None = None,
    example_input: Tensor | tuple[int, ...] | None = None,
    identity_init: bool = False,
    **module_kwargs: Any,
) -> nn.Module:
    """Insert ``attention`` modules into ``model`` in place and return ``model``.

    Args:
        model: a network with known residual blocks (torchvision/timm ResNet family, MobileNetV2,
            this package's builders) or, with ``after=``, any network.
        attention: a registry name (``"cbam"``), an ``nn.Module`` class or a factory called as
            ``factory(channels, **kwargs)``.
        position: where in each block (see the module docstring); default: the block's paper
            placement (``"before_add"`` for ResNet blocks, ``"after_dwconv"`` for MobileNetV2).
        stages: 1-based stage numbers to use (ResNet: 1 = ``layer1`` = c2); default all.
        every: use blocks ``i`` with ``i % every == every - 1`` within each stage (``every=2`` is
            the non-local placement: after the 2nd, 4th, ... block).
        select: optional filter ``select(block_path, channels) -> bool`` (e.g. the EMA
            MobileNetV2 placement ``lambda path, c: c > 144``).
        stage_kwargs: extra module keywords per stage, e.g. ECA-Net50's
            ``{1: {"kernel_size": 3}, 2: {"kernel_size": 5}, 3: {"kernel_size": 5},
            4: {"kernel_size": 7}}``.
        after: module paths to insert after, for any model; exclusive with the block options.
        example_input: input (or input shape) for the dry run that ``after=`` needs to learn the
            channel counts; default ``(1, 3, 224, 224)`` zeros.
        identity_init: make the network compute exactly the original function at
            initialisation: every inserted module is wrapped in :class:`IdentityInit`, except
            modules that already return their input at init (GC's zero-initialised add branch,
            non-local, SAGAN), which are left bare (checked on a random probe) because the wrapper
            would freeze them: ``alpha`` and the module would both get zero gradient.
        **module_kwargs: the attention's keyword arguments (``reduction=8``, ``preset="timm"``).

    Raises:
        ValueError: unknown position/stage/path, no known blocks, an occupied slot, a module that
            runs several times per forward, or a non-tensor output at an ``after=`` path.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attnzoo.attach: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"attnzoo.attach: every must be an integer >= 1, got {every!r}")
    if position is not None and position not in POSITIONS:
        raise ValueError(f"attnzoo.attach: position must be one of {POSITIONS}, got {position!r}")
    stage_kwargs = dict(stage_kwargs or {})
    plan: list[tuple[nn.Module, str, str, str, int, dict[str, Any]]] = []

    if after is not None:
        if isinstance(after, str):
            after = [after]
        paths = list(after)
        if position is not None or stages is not None or every != 1 or stage_kwargs or select:
            raise ValueError(
                "attnzoo.attach: after= cannot be combined with position, stages, "
                "every, select or stage_kwargs"
            )
        if not paths:
            raise ValueError("attnzoo.attach: after= is empty")
        hosts = {p: _resolve_path(model, p) for p in paths}
        for p in paths:
            _check_free(hosts[p], _SLOT["after"], p)
        outputs = _dry_run(model, paths, example_input)
        for p in paths:
            calls = outputs[p]
            if len(calls) != 1:
                raise ValueError(
                    f"attnzoo.attach: module {p!r} ran {len(calls)} times in one forward pass; "
                    "an attention after it would apply at every call (shared modules such as "
                    "torchvision's block.relu cannot be targets). Choose another path."
                )
            out = calls[0]
            if not isinstance(out, Tensor) or out.dim() < 3:
                raise ValueError(
                    f"attnzoo.attach: module {p!r} does not return a (B, C, ...) "
                    f"tensor, got {type(out).__name__}"
                )
            plan.append((hosts[p], p, _SLOT["after"], "after", int(out.shape[1]), dict()))
    else:
        all_stages = _stages(model)
        if not all_stages:
            known = ", ".join(f"{m}.{q}" for m, q in _KINDS)
            raise ValueError(
                f"attnzoo.attach: found no known residual blocks in the model; it "
                f"has {_block_types(model)}. Known blocks: {known}. Use "
                "after=[module paths] to insert after any module, or "
                "attnzoo.models.register_block for a new block type"
            )
        chosen = range(1, len(all_stages) + 1) if stages is None else list(stages)
        for s in chosen:
            if not isinstance(s, int) or not 1 <= s <= len(all_stages):
                raise ValueError(
                    f"attnzoo.attach: stages must be integers in 1..{len(all_stages)} "
                    f"for this model, got {s!r}"
                )
        unknown = set(stage_kwargs) - set(chosen)
        if unknown:
            raise ValueError(
                f"attnzoo.attach: stage_kwargs for stages {sorted(unknown)} that "
                f"are not attached (stages={list(chosen)})"
            )
        if position == "after_stage" and every != 1:
            raise ValueError("attnzoo.attach: every= has no meaning with position='after_stage'")
        for s in chosen:
            blocks = all_stages[s - 1]
            if position == "after_stage":
                blocks = blocks[-1:]
            else:
                blocks = [b for i, b in enumerate(blocks) if i % every == every - 1]
            for path, block in blocks:
                kind = _kind_of(_base_class(block))
                assert kind is not None
                pos = kind.default if position is None else position
                lookup = "after_block" if pos == "after_stage" else pos
                if lookup not in kind.channels:
                    supported = sorted(set(kind.channels) | {"after_stage"})
                    raise ValueError(
                        f"attnzoo.attach: position {pos!r} is not available in "
                        f"{_base_class(block).__name__} ({path}); supported: {supported}"
                    )
                if kind.check is not None:
                    kind.check(block)
                channels = int(kind.channels[lookup](block))
                if select is not None and not select(path, channels):
                    continue
                _check_free(block, _SLOT[pos], path)
                plan.append((block, path, _SLOT[pos], pos, channels, dict(stage_kwargs.get(s, {}))))
        if not plan:
            raise ValueError("attnzoo.attach: the options select no block")

    # build everything first, so that a failing constructor leaves the model untouched
    built = []
    for host, path, _, pos, ch, extra in plan:
        try:
            built.append(_build(attention, ch, {**module_kwargs, **extra}, identity_init, host))
        except (ValueError, TypeError) as err:
            kind = ValueError if isinstance(err, ValueError) else TypeError
            raise kind(
                f"attnzoo.attach: cannot build {_attention_name(attention)} for "
                f"{_base_class(host).__name__} {path!r} (position {pos!r}, {ch} channels): "
                f"{err}. Skip such blocks with select=/stages=, or change the module's "
                "arguments"
            ) from err
    for (host, _, child, pos, ch, _), module in zip(plan, built):
        _insert(host, child, module, pos, ch, identity_init)
    return model


def _block_types(model: nn.Module, n: int = 12) -> str:
    """The distinct module classes of ``model`` that are not torch's own layers, for errors."""
    seen = list(
        dict.fromkeys(
            type(m).__name__ for m in model.modules() if not type(m).__module__.startswith("torch.")
        )
    )
    if not seen:
        layers = list(dict.fromkeys(type(m).__name__ for m in model.modules()))
        return "only torch.nn layers (" + ", ".join(layers[:n]) + ")"
    more = f" and {len(seen) - n} more" if len(seen) > n else ""
    return "the module types " + ", ".join(seen[:n]) + more


def _attention_name(attention: Any) -> str:
    if isinstance(attention, str):
        return repr(attention)
    return getattr(attention, "__name__", type(attention).__name__)


def _hub_file(weights: Any) -> Path:
    """The local torch hub cache file of a torchvision weights enum; never downloads."""
    from urllib.parse import urlparse

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / Path(urlparse(weights.url).path).name
    if not path.is_file():
        raise FileNotFoundError(
            f"attnzoo: the weights {type(weights).__name__}.{weights.name} are not in the local "
            f"torch hub cache: expected the file {path.name} in {folder}. attnzoo never "
            f"downloads: fetch {weights.url} yourself and place it there (the folder follows "
            "TORCH_HOME), or pass weights= a file path or a state dict"
        )
    return path


def _weights_by_name(name: str, enum_cls: Any) -> Any:
    """``"IMAGENET1K_V2"`` / ``"DEFAULT"`` of ``enum_cls``, or ``"ResNet50_Weights.IMAGENET1K_V2"``;
    None when the string names no weights."""
    from torchvision.models import get_weight

    try:
        bare = name.replace(f"{enum_cls.__name__}.", "") if enum_cls is not None else None
        if bare is not None and bare in enum_cls.__members__:
            return enum_cls[bare]
        return get_weight(name) if "." in name else None
    except (KeyError, ValueError, AttributeError):
        return None


def resolve_weights(
    weights: Any, enum_cls: Any = None, *, who: str = "attnzoo.load_pretrained"
) -> Mapping[str, Tensor]:
    """A state dict from any of the ``weights=`` forms the builders accept.

    Args:
        weights: a state dict; a file path (``torch.load(weights_only=True)`` on CPU); a
            torchvision weights enum (``ResNet50_Weights.IMAGENET1K_V2``) or its name
            (``"IMAGENET1K_V2"``, ``"DEFAULT"`` with ``enum_cls``, or the qualified
            ``"ResNet50_Weights.IMAGENET1K_V2"``), read from the local torch hub cache
            ``torch.hub.get_dir()/checkpoints/<file>``. Nothing is ever downloaded: a missing file
            raises ``FileNotFoundError`` naming the file and the folder.
        enum_cls: the builder's torchvision weights enum, for bare names.
        who: the caller's name in error messages.
    """
    from torchvision.models import WeightsEnum

    if isinstance(weights, Mapping):
        return weights
    if isinstance(weights, WeightsEnum):
        return torch.load(_hub_file(weights), map_location="cpu", weights_only=True)
    if not isinstance(weights, (str, Path)):
        raise TypeError(
            f"{who}: weights must be a state dict, a file path, a torchvision "
            f"weights enum or its name; got {type(weights).__name__}"
        )
    if Path(weights).is_file():
        return torch.load(weights, map_location="cpu", weights_only=True)
    enum = _weights_by_name(str(weights), enum_cls) if isinstance(weights, str) else None
    if enum is None:
        names = (
            f" ({enum_cls.__name__}: {', '.join(enum_cls.__members__)})"
            if enum_cls is not None
            else ""
        )
        raise FileNotFoundError(
            f"{who}: weights {str(weights)!r} is neither a file nor the "
            f"name of torchvision weights{names}"
        )
    return torch.load(_hub_file(enum), map_location="cpu", weights_only=True)


def _head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier: the last ``nn.Linear`` of the network."""
    last = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    return {f"{p}.{k}" if p else k for p in last for k in ("weight", "bias")}


def load_pretrained(
    model: nn.Module,
    state_dict: Mapping[str, Tensor] | str | Path | Any,
    *,
    strict: bool = True,
    new_head: bool = False,
) -> list[str]:
    """Load a plain (attention-free) ``state_dict`` into an attached model.

    Every key of the original network must be present and match; the only keys allowed to be
    missing are those of the inserted attention modules, which keep their initialisation.

    Args:
        model: the attached model.
        state_dict: a mapping, a file path, or torchvision weights (see :func:`resolve_weights`).
        strict: if True (default), raise on unexpected keys and on missing non-attention keys.
        new_head: if True, a classifier (the network's last ``nn.Linear``) whose shape differs
            from the weights' (another ``num_classes``) keeps its initialisation: everything
            else is loaded and a ``UserWarning`` names the skipped keys (fine-tuning).

    Returns:
        The missing keys, all of them inserted-attention keys (sorted).

    Raises:
        RuntimeError: unexpected keys, missing non-attention keys (``strict``), or shape
            mismatches (always, as in ``load_state_dict``, except the head with ``new_head``).
    """
    state_dict = resolve_weights(state_dict)
    prefixes = tuple(a.path + "." for a in attached(model))
    own = model.state_dict()
    expected = set(own)
    given = set(state_dict)
    mismatched = [
        k
        for k in sorted(expected & given)
        if isinstance(state_dict[k], Tensor) and state_dict[k].shape != own[k].shape
    ]
    head = _head_keys(model) if new_head else set()
    skipped = [k for k in mismatched if k in head]
    bad_shapes = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in mismatched
        if k not in skipped
    ]
    if bad_shapes:
        raise RuntimeError(
            f"attnzoo.load_pretrained: shape mismatch (given vs model): {_short(bad_shapes)}"
        )
    missing = expected - given
    missing_attn = sorted(k for k in missing if k.startswith(prefixes))
    other_missing = sorted(k for k in missing if not k.startswith(prefixes))
    unexpected = sorted(given - expected)
    if strict and (other_missing or unexpected):
        raise RuntimeError(
            "attnzoo.load_pretrained: the state_dict does not match the network outside the "
            f"attention modules. Missing: {_short(other_missing)}; unexpected: "
            f"{_short(unexpected)}"
        )
    if skipped:
        import warnings

        shapes = ", ".join(
            f"{k} {tuple(state_dict[k].shape)} -> {tuple(own[k].shape)}" for k in skipped
        )
        warnings.warn(
            f"attnzoo.load_pretrained: new classifier head, not loaded from the "
            f"weights: {shapes}; it keeps its initialisation",
            UserWarning,
            stacklevel=2,
        )
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in skipped}, strict=False)
    return missing_attn


def _short(keys: list[str], n: int = 10) -> str:
    return str(keys[:n])[:-1] + (", ...]" if len(keys) > n else "]")
