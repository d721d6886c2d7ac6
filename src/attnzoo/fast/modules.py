"""Accelerated subclasses of the plain modules: same parameters, buffers and ``state_dict``.

:class:`FastCBAM`, :class:`FastECA` and :class:`FastGC` run custom ops (:mod:`attnzoo.fast.ops`)
when the switch is on and the input qualifies (:func:`qualifies`), else the plain module's
``forward``. The op computes the whole module (GC: its attention pooling), so it runs only while
every submodule is the exact layer the op stands for and carries no hooks: a hooked, replaced or
wrapped submodule (``fc1``, ``act``, ``conv``, ``gate``, ...) sends the call to the plain
``forward``, where the hook fires and the replacement is used.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign

from attnzoo.fast import ops
from attnzoo.fast.poolers import FastMultiScaleRoIAlign
from attnzoo.fast.switch import is_enabled
from attnzoo.modules.cbam import CBAM, ChannelGate, SpatialGate
from attnzoo.modules.eca import EfficientChannelAttention
from attnzoo.modules.gc import GlobalContext
from attnzoo.modules.se import SqueezeExcitation
from attnzoo.ops.validation import check_input

__all__ = [
    "BatchNormGate2d",
    "FastCBAM",
    "FastECA",
    "FastGC",
    "FastMultiScaleRoIAlign",
    "foldable",
    "qualifies",
]


def qualifies(x: object) -> bool:
    """Whether the fast path may run on ``x``: the switch is on, and ``x`` is a float32,
    contiguous (NCHW) CPU tensor outside autocast. A ``torch.fx`` proxy qualifies (the traced
    graph records the op, which computes the plain formula on inputs that do not qualify)."""
    if not is_enabled():
        return False
    if isinstance(x, torch.fx.Proxy):
        return True
    return (
        isinstance(x, Tensor)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
    )


def _batchnorm_args(bn: nn.BatchNorm2d | None) -> tuple:
    """``(weight, bias, running_mean, running_var, use_batch_stats, eps)`` as
    ``nn.BatchNorm2d.forward`` passes them to ``F.batch_norm``."""
    if bn is None:
        return None, None, None, None, True, 1e-5
    use_batch = bn.training or bn.running_mean is None
    return bn.weight, bn.bias, bn.running_mean, bn.running_var, use_batch, bn.eps


@torch.no_grad()
def _update_running_stats(bn: nn.BatchNorm2d | None, z: Tensor) -> None:
    """The running-statistics update of ``nn.BatchNorm2d`` in training, from its input ``z``."""
    if bn is None or not (bn.training and bn.track_running_stats):
        return
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=1)
    bn.running_mean.lerp_(mean, factor)
    bn.running_var.lerp_(var, factor)


def _plain_batchnorm(bn: nn.Module | None) -> bool:
    return bn is None or (type(bn) is nn.BatchNorm2d and bn.affine)


_CBAM_LAYERS = {
    "channel": ChannelGate,
    "spatial": SpatialGate,
    "channel.fc1": nn.Linear,
    "channel.act": nn.ReLU,
    "channel.fc2": nn.Linear,
    "channel.gate": nn.Sigmoid,
    "spatial.conv": nn.Conv2d,
    "spatial.bn": nn.BatchNorm2d,
    "spatial.gate": nn.Sigmoid,
}
_ECA_LAYERS = {"conv": nn.Conv1d, "gate": nn.Sigmoid}


def _untouched(module: nn.Module, layers: dict[str, type]) -> bool:
    """Every submodule is the exact class the op computes, and none has a hook."""
    for name, sub in module.named_modules():
        if not name:
            continue
        if type(sub) is not layers.get(name) or sub._forward_hooks or sub._forward_pre_hooks:
            return False
    return True


class FastCBAM(CBAM):
    """:class:`~attnzoo.modules.cbam.CBAM` whose channel-then-spatial forward is the custom op
    ``attnzoo::cbam`` when :func:`qualifies`; other orders, inputs, and hooked or replaced
    submodules run the plain forward."""

    def forward(self, x: Tensor) -> Tensor:
        spatial = self.spatial
        if (
            self.order != "channel-spatial"
            or not qualifies(x)
            or not _plain_batchnorm(spatial.bn)
            or not _untouched(self, _CBAM_LAYERS)
        ):
            return super().forward(x)
        check_input("CBAM", x, self.channels)
        fc1, fc2 = self.channel.fc1, self.channel.fc2
        out = ops.cbam(
            x,
            fc1.weight,
            fc1.bias,
            fc2.weight,
            fc2.bias,
            spatial.conv.weight,
            *_batchnorm_args(spatial.bn),
            spatial.pool_order == "max-mean",
        )
        _update_running_stats(spatial.bn, out[7])
        return out[0]


class FastECA(EfficientChannelAttention):
    """:class:`~attnzoo.modules.eca.EfficientChannelAttention` whose forward is the custom op
    ``attnzoo::eca`` when :func:`qualifies` (and no submodule is hooked or replaced), else the
    plain forward."""

    def forward(self, x: Tensor) -> Tensor:
        if not qualifies(x) or not _untouched(self, _ECA_LAYERS):
            return super().forward(x)
        check_input("EfficientChannelAttention", x, self.channels)
        return ops.eca(x, self.conv.weight)[0]


_GC_POOL_LAYERS = {"conv_mask": nn.Conv2d, "context_softmax": nn.Softmax}


_GC_TRANSFORM_LAYERS = {"0": nn.Conv2d, "1": nn.LayerNorm, "2": nn.ReLU, "3": nn.Conv2d}


class FastGC(GlobalContext):
    """:class:`~attnzoo.modules.gc.GlobalContext` on custom ops when :func:`qualifies`: with add
    fusion alone (the official default) the whole block is the op ``attnzoo::gc_add``; otherwise
    the attention pooling (:meth:`context`) is ``attnzoo::gc_context`` and the transforms run as
    matrix products on the ``(B, C)`` context (a 1x1 convolution of a 1x1 map is a linear map;
    oneDNN's convolution is slow at that shape). Average pooling, and a hooked or replaced
    ``conv_mask`` / ``context_softmax`` / transform layer, take the plain :meth:`context` /
    :meth:`transforms`."""

    def _pool_untouched(self) -> bool:
        for name, cls in _GC_POOL_LAYERS.items():
            sub = getattr(self, name, None)
            if type(sub) is not cls or sub._forward_hooks or sub._forward_pre_hooks:
                return False
        conv, softmax = self.conv_mask, self.context_softmax
        return (
            softmax.dim in (-1, 2)
            and conv.kernel_size == (1, 1)
            and conv.bias is not None
            and conv.stride == (1, 1)
            and conv.padding == (0, 0)
            and conv.dilation == (1, 1)
            and conv.groups == 1
        )

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.channel_mul_conv is not None
            or self.channel_add_conv is None
            or self.pooling != "att"
            or not qualifies(x)
            or not self._pool_untouched()
            or not _linear_transform(self.channel_add_conv)
        ):
            return super().forward(x)
        check_input("GlobalContext", x, self.channels)
        conv = self.conv_mask
        weights = _transform_weights(self.channel_add_conv)
        return ops.gc_add(x, conv.weight.view(-1), conv.bias, *weights)[0]

    def context(self, x: Tensor) -> Tensor:
        if self.pooling != "att" or not qualifies(x) or not self._pool_untouched():
            return super().context(x)
        conv = self.conv_mask
        return ops.gc_context(x, conv.weight.view(-1), conv.bias)[0]

    def transforms(self, ctx: Tensor) -> tuple[Tensor | None, Tensor | None]:
        branches = (self.channel_mul_conv, self.channel_add_conv)
        if not qualifies(ctx) or not all(_linear_transform(b) for b in branches):
            return super().transforms(ctx)
        mul, add = (None if b is None else _transform_as_linear(b, ctx) for b in branches)
        return (None if mul is None else self.gate(mul)), add


def _linear_transform(branch: nn.Module | None) -> bool:
    """Whether a GC transform (``None`` or conv 1x1, LayerNorm, ReLU, conv 1x1) runs as
    :func:`_transform_as_linear`: exactly those layers, unhooked, plain 1x1 convolutions with
    bias, the LayerNorm over the 1x1 map with an affine transform."""
    if branch is None:
        return True
    if (
        type(branch) is not nn.Sequential
        or branch._forward_hooks
        or branch._forward_pre_hooks
        or not _untouched(branch, _GC_TRANSFORM_LAYERS)
    ):
        return False
    first, norm, _, last = branch
    return (
        all(
            conv.kernel_size == (1, 1)
            and conv.bias is not None
            and conv.groups == 1
            and conv.padding == (0, 0)
            and conv.stride == (1, 1)
            for conv in (first, last)
        )
        and norm.elementwise_affine
        and norm.bias is not None
        and tuple(norm.normalized_shape) == (first.out_channels, 1, 1)
    )


def _transform_as_linear(branch: nn.Sequential, ctx: Tensor) -> Tensor:
    """``conv_2(relu(layer_norm(conv_1(ctx))))`` on a ``(B, C, 1, 1)`` context, as products on
    ``(B, C)``."""
    t = ops.gc_transform_plain(ctx.flatten(1), *_transform_weights(branch))
    return t.view(*t.shape, 1, 1)


def _transform_weights(branch: nn.Sequential) -> tuple:
    """``(w1, b1, ln_w, ln_b, eps, w2, b2)`` of a GC transform, the convolutions as matrices."""
    first, norm, _, last = branch
    return (
        first.weight.flatten(1),
        first.bias,
        norm.weight.flatten(),
        norm.bias.flatten(),
        norm.eps,
        last.weight.flatten(1),
        last.bias,
    )


_SE_LAYERS = {"fc1": nn.Linear, "act": nn.ReLU, "fc2": nn.Linear, "gate": nn.Sigmoid}
#: gate classes whose pairing with a preceding BatchNorm2d folds exactly: class -> (op kind, layers)
_FOLDABLE_GATES: dict[type[nn.Module], tuple[str, dict[str, type]]] = {
    SqueezeExcitation: ("se", _SE_LAYERS),
    EfficientChannelAttention: ("eca", _ECA_LAYERS),
    FastECA: ("eca", _ECA_LAYERS),
}
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(module: nn.Module) -> bool:
    """Any hook on ``module`` or a submodule, or a global module hook."""
    from torch.nn.modules import module as nn_module

    if (
        nn_module._global_forward_hooks
        or nn_module._global_forward_pre_hooks
        or nn_module._global_backward_hooks
        or nn_module._global_backward_pre_hooks
    ):
        return True
    return any(getattr(m, d) for m in module.modules() for d in _HOOK_DICTS)


def foldable(norm: nn.Module, gate: nn.Module) -> bool:
    """Whether ``gate(norm(z))`` has a folded form: ``norm`` exactly an affine
    :class:`torch.nn.BatchNorm2d`, ``gate`` exactly SE or ECA over the same channels, with the
    layers the op computes (ECA's convolution as built: odd kernel, ``same`` padding, no bias)."""
    entry = _FOLDABLE_GATES.get(type(gate))
    if entry is None or type(norm) is not nn.BatchNorm2d or not norm.affine:
        return False
    if norm.num_features != gate.channels or not _untouched(gate, entry[1]):
        return False
    if entry[0] == "eca":
        conv = gate.conv
        k = conv.kernel_size[0]
        return (
            conv.bias is None
            and k % 2 == 1
            and conv.padding == (k // 2,)
            and conv.stride == (1,)
            and conv.dilation == (1,)
            and conv.groups == 1
        )
    return True


class BatchNormGate2d(nn.Module):
    """``gate(norm(z))`` for a :class:`torch.nn.BatchNorm2d` followed by a mean-pooled channel
    gate (SE, ECA), as one custom op ``attnzoo::bn_gate`` (:mod:`attnzoo.fast.ops`: the gate's
    descriptor and output are affine in ``z`` per row, so BatchNorm's two passes carry the gate,
    forward and backward) when the switch is on and the input qualifies; else, or when a module
    in the pair carries a hook, was replaced or changed, the two modules one after the other.
    The running statistics are updated as ``norm`` updates them (momentum or cumulative average,
    ``num_batches_tracked``).

    Both modules are submodules (``norm``, ``gate``) and keep their parameters:
    :func:`attnzoo.attach` (switch on) keeps such a layer beside a block's own BatchNorm and
    attention children, which stay where they were (``state_dict`` keys unchanged), and the
    block's forward calls it in place of the pair.
    """

    def __init__(self, norm: nn.BatchNorm2d, gate: nn.Module) -> None:
        super().__init__()
        if not foldable(norm, gate):
            raise ValueError(
                "attnzoo.fast.BatchNormGate2d: norm must be an affine nn.BatchNorm2d and gate an "
                f"unmodified SqueezeExcitation or EfficientChannelAttention over the same "
                f"channels; got {type(norm).__name__} and {type(gate).__name__}"
            )
        self.norm = norm
        self.gate = gate

    def _folds(self, z: Tensor) -> bool:
        norm = self.norm
        if (
            not qualifies(z)
            or isinstance(z, torch.fx.Proxy)
            or z.shape[1] != norm.num_features
            or not foldable(norm, self.gate)
            or _hooked(self)
        ):
            return False
        if norm.training and z.shape[0] * z.shape[2] * z.shape[3] <= 1:
            return False  # BatchNorm's own error
        return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in self.parameters())

    def forward(self, z: Tensor) -> Tensor:
        if not self._folds(z):
            return self.gate(self.norm(z))
        norm, gate = self.norm, self.gate
        kind = _FOLDABLE_GATES[type(gate)][0]
        if kind == "se":
            weights = (gate.fc1.weight, gate.fc1.bias, gate.fc2.weight, gate.fc2.bias)
        else:
            weights = (gate.conv.weight, None, None, None)
        bn_w, bn_b, running_mean, running_var, use_batch, eps = _batchnorm_args(norm)
        y, *_, mean, var = ops.bn_gate(
            z, bn_w, bn_b, running_mean, running_var, use_batch, eps, kind, *weights
        )
        if use_batch:
            total = z.shape[0] * z.shape[2] * z.shape[3]
            _update_running(norm, mean, var * (total / (total - 1)))
        return y


@torch.no_grad()
def _update_running(bn: nn.BatchNorm2d, mean: Tensor, unbiased_var: Tensor) -> None:
    """``nn.BatchNorm2d``'s running-statistics update in training, from the batch's mean and
    unbiased variance."""
    if not (bn.training and bn.track_running_stats) or bn.running_mean is None:
        return
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.lerp_(mean.detach(), factor)
    bn.running_var.lerp_(unbiased_var.detach(), factor)


#: plain class -> accelerated subclass (exact classes only: a user subclass keeps its forward)
FAST_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    CBAM: FastCBAM,
    EfficientChannelAttention: FastECA,
    GlobalContext: FastGC,
    MultiScaleRoIAlign: FastMultiScaleRoIAlign,
}
