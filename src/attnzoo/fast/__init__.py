"""Optional CPU accelerators for attention modules, behind one switch that is **off by default**.

The modules in :mod:`attnzoo.modules` are plain PyTorch; ``torch.compile`` of them is the first
answer to "make it faster", on CPU and GPU. This package keeps hand-written fast paths only where
they beat ``torch.compile`` of the plain module clearly (``benchmarks/results/modules.md``):
CBAM, ECA and GC (the whole block with add fusion, else its attention pooling), and a BatchNorm2d
followed by SE or ECA folded into one layer
(:class:`BatchNormGate2d`), in float32 on the CPU.

The switch (in the spirit of timm's ``set_fast_norm``)::

    import attnzoo.fast
    attnzoo.fast.set_enabled(True)          # for the process; attnzoo.fast.is_enabled()
    with attnzoo.fast.enabled():            # or for a block (restored afterwards)
        ...
    # or ATTNZOO_FAST=1 in the environment (read at import)

How it works: :func:`accelerate` swaps the class of every CBAM / ECA / GC module inside a model for
an accelerated subclass (:class:`FastCBAM`, :class:`FastECA`, :class:`FastGC`: same parameters,
buffers and ``state_dict``; :func:`plain` swaps back). :func:`attnzoo.attach` and the builders in
:mod:`attnzoo.models` do this themselves while the switch is on. An accelerated module runs its
custom ops (:mod:`attnzoo.fast.ops`: ``torch.ops.attnzoo.cbam``, ``torch.ops.attnzoo.eca``,
``torch.ops.attnzoo.gc_add`` / ``gc_context``, each seen as one node by ``torch.compile``,
``torch.export``, ``torch.fx`` and ``FlopCounterMode``) only when the switch is on *at call time*
and the input is a float32, contiguous CPU tensor outside autocast; anything else (CUDA, float64,
bfloat16, channels_last, autocast, other CBAM orders) runs the plain ``forward``. Results equal
the plain path up to float rounding, gradients included; a double backward (``create_graph=True``)
differentiates the plain formula. A module whose submodules (``fc1``, ``conv``, ``gate``, ...)
carry forward hooks or were replaced (an adapter, a wrapper) runs the plain ``forward`` too, so
hooks fire and replacements are used.

Detectors: :func:`accelerate` also swaps torchvision's ``MultiScaleRoIAlign`` (the RoI pooler of
Faster / Cascade R-CNN) for :class:`FastMultiScaleRoIAlign`, which spreads CPU inference over
``torch.get_num_threads()`` threads (torchvision's CPU kernel uses one); the builders in
:mod:`attnzoo.detection` do this while the switch is on. Same output, bit for bit.

BatchNorm folding: in a residual block SE and ECA sit right after the block's last BatchNorm.
Both the gate's descriptor and its output are affine in the BatchNorm's input per (sample,
channel), so :class:`BatchNormGate2d` computes ``gate(norm(z))`` in BatchNorm's own two passes
(forward and backward; ``torch.ops.attnzoo.bn_gate``). While the switch is on,
:func:`attnzoo.attach` keeps one beside every such (BatchNorm, SE / ECA) pair of a ResNet block
and the block calls it instead of the two modules; the modules stay the block's children (same
``state_dict``), and with the switch off, or a hook on either, the two run one after the other.
"""

from __future__ import annotations

from torch import nn

from attnzoo.fast.modules import (
    FAST_CLASSES,
    BatchNormGate2d,
    FastCBAM,
    FastECA,
    FastGC,
    FastMultiScaleRoIAlign,
    foldable,
    qualifies,
)
from attnzoo.fast.switch import ENV_VAR, enabled, is_enabled, set_enabled

__all__ = [
    "ENV_VAR",
    "BatchNormGate2d",
    "FastCBAM",
    "FastECA",
    "FastGC",
    "FastMultiScaleRoIAlign",
    "accelerate",
    "enabled",
    "foldable",
    "is_enabled",
    "plain",
    "qualifies",
    "set_enabled",
]

_PLAIN_CLASSES = {fast: base for base, fast in FAST_CLASSES.items()}


def _swap(model: nn.Module, table: dict[type, type], what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"attnzoo.fast.{what}: model must be an nn.Module, got {type(model).__name__}"
        )
    for module in model.modules():
        new = table.get(type(module))
        if new is not None:
            module.__class__ = new
    return model


def accelerate(model: nn.Module) -> nn.Module:
    """Swap every plain CBAM / ECA / GC module and torchvision ``MultiScaleRoIAlign`` in ``model``
    (``model`` itself included) for its accelerated subclass, in place; returns ``model``. Exact
    classes only (a user subclass keeps its own forward)."""
    return _swap(model, FAST_CLASSES, "accelerate")


def plain(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate`, in place; returns ``model``."""
    return _swap(model, _PLAIN_CLASSES, "plain")
