"""Accelerated subclasses of the plain modules: same parameters, buffers and ``state_dict``.

:class:`FastCBAM` and :class:`FastECA` run one custom op (:mod:`attnzoo.fast.ops`) when the
switch is on and the input qualifies (:func:`qualifies`), else the plain module's ``forward``.
The op computes the whole module, so it runs only while every submodule is the exact layer the
op stands for and carries no hooks: a hooked, replaced or wrapped submodule (``fc1``, ``act``,
``conv``, ``gate``, ...) sends the call to the plain ``forward``, where the hook fires and the
replacement is used.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnzoo.fast import ops
from attnzoo.fast.switch import is_enabled
from attnzoo.modules.cbam import CBAM, ChannelGate, SpatialGate
from attnzoo.modules.eca import EfficientChannelAttention
from attnzoo.ops.validation import check_input

__all__ = ["FastCBAM", "FastECA", "qualifies"]


def qualifies(x: object) -> bool:
    """Whether the fast path may run on ``x``: the switch is on, and ``x`` is a float32,
    contiguous (NCHW) CPU tensor outside autocast. A ``torch.fx`` proxy qualifies (the traced
    graph records the op, which computes the plain formula on inputs that do not qualify)."""
    if not is_enabled():
        return False
    if isinstance(x, torch.fx.Proxy):
        return True
    return (isinstance(x, Tensor) and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() == 4 and x.is_contiguous() and not torch.is_autocast_enabled("cpu"))


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


_CBAM_LAYERS = {"channel": ChannelGate, "spatial": SpatialGate, "channel.fc1": nn.Linear,
                "channel.act": nn.ReLU, "channel.fc2": nn.Linear, "channel.gate": nn.Sigmoid,
                "spatial.conv": nn.Conv2d, "spatial.bn": nn.BatchNorm2d,
                "spatial.gate": nn.Sigmoid}
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
        if (self.order != "channel-spatial" or not qualifies(x)
                or not _plain_batchnorm(spatial.bn) or not _untouched(self, _CBAM_LAYERS)):
            return super().forward(x)
        check_input("CBAM", x, self.channels)
        fc1, fc2 = self.channel.fc1, self.channel.fc2
        out = ops.cbam(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, spatial.conv.weight,
                       *_batchnorm_args(spatial.bn), spatial.pool_order == "max-mean")
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


#: plain class -> accelerated subclass (exact classes only: a user subclass keeps its forward)
FAST_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    CBAM: FastCBAM,
    EfficientChannelAttention: FastECA,
}
